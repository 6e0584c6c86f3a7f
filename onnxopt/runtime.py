"""onnxruntime sessions for validation (no ORT rewrites) and for measurement (all of them).

Three things every caller gets from here rather than from onnxruntime directly:

- quiet sessions: onnxruntime logs a failing node as a coloured ``[E:onnxruntime:...]`` line
  on stderr *and* raises; the exception is the report, so sessions and runs log only fatal
  errors.
- whole, readable error messages: ``[ONNXRuntimeError] : 1 : FAIL : `` and the C++ source
  location and signature are dropped; the rest is kept, never truncated.
- bfloat16 and float8 tensors: onnxruntime's Python API takes and returns no ml_dtypes arrays,
  so ``run`` passes them through OrtValues as raw bytes (4-bit and 2-bit types, which
  onnxruntime packs, are not supported).
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from onnxopt.errors import OnnxoptError

ModelRef = onnx.ModelProto | str | os.PathLike[str] | bytes

_FATAL = 4  # onnxruntime severities: 0 verbose ... 3 error, 4 fatal

_RUN_OPTIONS = ort.RunOptions()
_RUN_OPTIONS.log_severity_level = _FATAL

# element types that go through OrtValues as raw bytes: onnx type string -> ml_dtypes dtype
_BYTE_TYPES = {
    f"tensor({name.lower()})": np.dtype(
        onnx.helper.tensor_dtype_to_np_dtype(getattr(onnx.TensorProto, name)))
    for name in ("BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")
}
_BYTE_DTYPES = frozenset(_BYTE_TYPES.values())


def session(
    model: ModelRef, optimize: bool = False, threads: int = 1, spinning: bool = False
) -> ort.InferenceSession:
    """A CPU session; ``optimize=False`` runs the graph as written (the validation oracle)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = _FATAL  # failures are raised and reported, not logged
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, (str, os.PathLike)):
        model = str(Path(model))
    try:
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for unloadable models
        message = ort_message(e)
    if f"{EXTENSIONS_DOMAIN}:" in message and "is not a registered function/op" in message:
        # tokenizers and string ops in the graph: onnxruntime-extensions has their kernels
        library = extensions_library()
        if library is None:
            raise OnnxoptError(f"onnxruntime cannot load the model: {message} (its {EXTENSIONS_DOMAIN} ops "
                               "need `pip install onnxruntime-extensions`)")
        so.register_custom_ops_library(library)
        try:
            return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        except Exception as e:
            message = ort_message(e)
    raise OnnxoptError(f"onnxruntime cannot load the model: {message}")


EXTENSIONS_DOMAIN = "ai.onnx.contrib"


def extensions_library() -> str | None:
    """onnxruntime-extensions' custom-op library, if that package is installed."""
    try:
        from onnxruntime_extensions import get_library_path
    except ImportError:
        return None
    return str(get_library_path())


def output_names(sess: ort.InferenceSession) -> list[str]:
    return [o.name for o in sess.get_outputs()]


def positional_feed(sess: ort.InferenceSession, values: Sequence[Any]) -> dict[str, Any]:
    """Name ``values`` after the inputs to feed, in order; ``None`` leaves an input out.

    The inputs to feed are the graph inputs without an initializer (onnxruntime lists
    those that have one as overridable initializers, not as inputs).
    """
    names = [i.name for i in sess.get_inputs()]
    return {n: v for n, v in zip(names, values, strict=False) if v is not None}


def run(sess: ort.InferenceSession, feed: dict[str, Any]) -> list[Any]:
    """All outputs of ``sess`` on ``feed``; bfloat16/float8 arrays in and out as ml_dtypes."""
    try:
        if any(_byte_typed(v) for v in feed.values()) or any(
            o.type in _BYTE_TYPES for o in sess.get_outputs()
        ):
            return _run_ort_values(sess, feed)
        return list(sess.run(None, feed, _RUN_OPTIONS))
    except Exception as e:
        raise OnnxoptError(f"onnxruntime failed to run the model: {ort_message(e)}") from None


def run_model(model: ModelRef, feeds: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """Run ``model`` as written (no ORT rewrites) on each feed."""
    sess = session(model)
    return [run(sess, f) for f in feeds]


def failure(model: ModelRef, feeds: Sequence[dict[str, Any]] = ()) -> str | None:
    """onnxruntime's own error when ``model`` does not load, or fails on one of ``feeds``; else None."""
    try:
        run_model(model, feeds)
    except OnnxoptError as e:
        return str(e)
    return None


def ort_message(e: BaseException) -> str:
    """onnxruntime's message on one line, whole, without its code prefix and C++ locations."""
    text = " ".join(str(e).split())
    # the code prefix also appears inside a message ("Exception during initialization: [...")
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    return _strip_source_locations(text) or type(e).__name__


_LOCATION = re.compile(r"(/onnxruntime_src/\S+|\b[\w.-]+\.(cc|cpp|h)):\d+ ")


def _strip_source_locations(text: str) -> str:
    """Drop ``/onnxruntime_src/x.cc:52 void ns::f(const T&, int) const `` wherever it occurs.

    Some messages name the file alone: ``element_wise_ops.cc:2421 operator() ``.

    The signature ends at the first space outside brackets after its parameter list
    (``Locale::Locale(const std::string&)::<lambda()>`` included).
    """
    out = []
    pos = 0
    while m := _LOCATION.search(text, pos):
        out.append(text[pos:m.start()])
        end = _signature_end(text, m.end())
        if text.startswith("const ", end):
            end += len("const ")
        if text.startswith("[with ", end) and (close := text.find("] ", end)) > 0:
            end = close + 2  # a template's arguments: "[with T = float] "
        pos = end
    out.append(text[pos:])
    return "".join(out).strip()


def _signature_end(text: str, start: int) -> int:
    depth = 0
    closed = False  # a parameter list has been seen
    for i in range(start, len(text)):
        c = text[i]
        if c in "(<[":
            depth += 1
        elif c in ")>]":
            depth = max(0, depth - 1)
            closed = closed or c == ")"
        elif c == " " and depth == 0 and closed:
            return i + 1
    return start  # not a signature after all: keep the text


def _byte_typed(v: Any) -> bool:
    return isinstance(v, np.ndarray) and v.dtype in _BYTE_DTYPES


def _run_ort_values(sess: ort.InferenceSession, feed: dict[str, Any]) -> list[Any]:
    values = {}
    for name, v in feed.items():
        if _byte_typed(v):
            raw = np.ascontiguousarray(v).view(np.uint8 if v.dtype.itemsize == 1 else np.uint16)
            elem = onnx.helper.np_dtype_to_tensor_dtype(v.dtype)
            values[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, elem)
        else:
            values[name] = ort.OrtValue.ortvalue_from_numpy(np.asarray(v))
    outputs = sess.run_with_ort_values(None, values, _RUN_OPTIONS)
    results = []
    for value, out in zip(outputs, sess.get_outputs(), strict=True):
        dtype = _BYTE_TYPES.get(out.type)
        if dtype is None:
            results.append(value.numpy())
            continue
        size = value.tensor_size_in_bytes()
        raw = bytes((ctypes.c_char * size).from_address(value.data_ptr())) if size else b""
        results.append(np.frombuffer(raw, dtype=dtype).reshape(value.shape()).copy())
    return results
