"""Measurement: latency in onnxruntime (interleaved, medians), size, nodes, parameters, MACs.

Sessions run with all of onnxruntime's graph optimizations on, as users ship them,
spinning off so that sessions timed in turn do not starve each other. Repeats are
interleaved across models (A B A B ...), so drift in machine load hits all alike.
With one intra-op thread the work runs on the calling thread, and its CPU time
(``time.thread_time``) is used: it is robust to other load on the machine.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from onnxopt.data import Feed
from onnxopt.graph_utils import node_count, op_histogram, parameter_count
from onnxopt.runtime import ModelRef, run, session
from onnxopt.shapes import copy_structure, infer

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Latency:
    median_ms: float
    p90_ms: float
    min_ms: float
    repeats: int
    threads: int
    clock: str
    # every timing, in the order taken (interleaved rounds): the report draws their distribution
    samples_ms: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"samples_ms": list(self.samples_ms)}


def measure_latency(
    models: Mapping[str, ModelRef],
    feeds: Sequence[Feed],
    threads: int = 1,
    repeats: int = 30,
    warmup: int = 3,
    max_seconds: float = 30.0,
    tick: Callable[[int, int], None] | None = None,
) -> dict[str, Latency]:
    """Median and p90 milliseconds per feed for each model, interleaved round-robin.

    ``tick(done, total)`` is called after each round (one run of every model); the
    last call has ``done == total``, also when ``max_seconds`` ends the rounds early.
    """
    sessions = {k: session(m, optimize=True, threads=threads) for k, m in models.items()}
    clock = time.thread_time if threads == 1 else time.perf_counter
    feeds = list(feeds)[:4] or [{}]
    # each session gets its own inputs of the feed: models with different inputs can be
    # timed side by side (a bench's GEMM-only floor model beside the model it comes from)
    own = {k: [{i.name: f[i.name] for i in sess.get_inputs() if i.name in f} for f in feeds]
           for k, sess in sessions.items()}
    for k, sess in sessions.items():
        for _ in range(warmup):
            for f in own[k]:
                run(sess, f)
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    start = time.perf_counter()
    keys = list(sessions)
    for r in range(repeats):
        # the order rotates every round: a place in the round (caches warmed by the model before)
        # must not favour one model; on a 0.17 ms model it was worth 2%
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            sess = sessions[k]
            f = own[k][r % len(feeds)]
            t0 = clock()
            sess.run(None, f)
            samples[k].append((clock() - t0) * 1e3)
        stop = r >= 4 and time.perf_counter() - start > max_seconds
        if tick:
            tick(r + 1, r + 1 if stop else repeats)
        if stop:
            break
    out = {}
    for k, s in samples.items():
        arr = np.asarray(s)
        out[k] = Latency(float(np.median(arr)), float(np.percentile(arr, 90)), float(arr.min()),
                         len(s), threads, "thread_time" if threads == 1 else "wall",
                         tuple(round(float(x), 6) for x in s))
    return out


@dataclasses.dataclass(frozen=True)
class ModelStats:
    nodes: int
    parameters: int
    size_bytes: int
    macs: int | None
    ops: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_stats(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None,
                size_bytes: int | None = None) -> ModelStats:
    return ModelStats(
        nodes=node_count(model),
        parameters=parameter_count(model),
        size_bytes=size_bytes if size_bytes is not None else model.ByteSize(),
        macs=estimate_macs(model, input_shapes or {}),
        ops=op_histogram(model),
    )


def _dims(tp: onnx.TypeProto | None) -> list[int] | None:
    if tp is None or tp.WhichOneof("value") != "tensor_type":
        return None
    if not tp.tensor_type.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tp.tensor_type.shape.dim]
    return dims if all(d > 0 for d in dims) or not dims else None


def estimate_macs(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> int | None:
    """Multiply-accumulates of Conv, ConvTranspose, MatMul, Gemm (and their int8 forms).

    Shapes come from onnx shape inference with the given input shapes pinned; returns
    None when no such op could be sized.
    """
    per_node = macs_per_node(model, input_shapes)
    return sum(per_node.values()) if per_node else None


def macs_per_node(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Layer key (node name, else first output) -> MACs, for the ops ``estimate_macs`` sizes."""
    # structure only: shape inference does not need weight values beyond small ones
    pinned = onnx.ModelProto()
    copy_structure(model, pinned)
    inits = {t.name for t in model.graph.initializer}
    symbols: dict[str, int] = {}  # an input's named dim, pinned: the same size wherever it is named
    for vi in pinned.graph.input:
        if vi.name in input_shapes and vi.name not in inits:
            dims = vi.type.tensor_type.shape.dim
            shape = list(input_shapes[vi.name])
            if len(dims) == len(shape):
                for d, v in zip(dims, shape, strict=True):
                    if d.HasField("dim_param"):
                        symbols[d.dim_param] = int(v)
                    d.Clear()
                    d.dim_value = int(v)
    # unpinned inputs and the value_info an exporter wrote name those dims too ('batch', 'seq'): left
    # symbolic, they win over the pinned sizes where inference broadcasts them against a pinned 1, and
    # a Reshape that copies one (0) stays unsized
    for vi in list(pinned.graph.input) + list(pinned.graph.value_info) + list(pinned.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in symbols:
                size = symbols[d.dim_param]
                d.Clear()
                d.dim_value = size
            elif d.HasField("dim_value") and d.dim_value <= 0:
                d.Clear()  # Paddle2ONNX writes -1 for a dynamic dim: unknown, for inference to fill
    types = infer(pinned)
    sized = ("Conv", "QLinearConv", "ConvInteger", "ConvTranspose", *_MATMULS)
    if any(n.domain == "com.microsoft" for n in model.graph.node):
        types = {**types, **_ort_types(pinned)}  # onnx's inference stops at contrib ops
    elif any(n.op_type in sized and n.output and not _dims(types.get(n.output[0])) for n in model.graph.node):
        # onnx's data propagation stops at some shape computations (Pad's pads through a Cast
        # chain: open-nsfw); onnxruntime's symbolic inference sizes what it left unsized
        types = {**types, **{k: v for k, v in _ort_types(pinned).items() if not _dims(types.get(k))}}
    for t in model.graph.initializer:
        types.setdefault(t.name, onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims)))
    macs: dict[str, int] = {}
    for node in model.graph.node:
        key = node.name or (node.output[0] if node.output else "")
        op = node.op_type
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if op in ("Conv", "QLinearConv", "ConvInteger", "ConvTranspose"):
            w_idx = 3 if op == "QLinearConv" else 1
            w = _dims(types.get(node.input[w_idx])) if len(node.input) > w_idx else None
            out = _dims(types.get(node.output[0]))
            inp = _dims(types.get(node.input[0]))
            if not w or not out:
                continue
            # weight dims [Cout, Cin/group, k...] already count the group split
            if op == "ConvTranspose":
                if not inp:
                    continue
                macs[key] = int(np.prod(inp)) * int(np.prod(w[1:]))
            else:
                macs[key] = int(np.prod(out)) * int(np.prod(w[1:]))
        elif op in _MATMULS:
            n = _matmul_macs(node, attrs, types)
            if n is not None:
                macs[key] = n
        elif op in ("Attention", "QAttention", "MultiHeadAttention") and node.domain == "com.microsoft":
            n = _attention_macs(node, attrs, types)
            if n is not None:
                macs[key] = n
    return macs


_MATMULS = ("MatMul", "MatMulInteger", "QLinearMatMul", "Gemm", "MatMulNBits",
            # onnxruntime's contrib forms (com.microsoft), as --target onnxruntime and its quantizer write them
            "FusedGemm", "FusedMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")


def _matmul_macs(node: onnx.NodeProto, attrs: Mapping[str, Any], types: Mapping[str, onnx.TypeProto]) -> int | None:
    """Outputs times the reduced dim; Gemm forms from A and B alone (M N K), as their output
    may be unsized where onnxruntime's inference only guesses a contrib op's rank."""
    a = _dims(types.get(node.input[0]))
    if not a:
        return None
    if node.op_type in ("Gemm", "FusedGemm") and len(a) == 2:
        b = _dims(types.get(node.input[1])) if len(node.input) > 1 else None
        if not b or len(b) != 2:
            return None
        m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
        return int(m) * int(k) * int(b[0] if attrs.get("transB", 0) else b[1])
    out = _dims(types.get(node.output[0]))
    if not out:
        return None
    k = a[-2 if node.op_type == "FusedMatMul" else 0] if attrs.get("transA", 0) else a[-1]
    return int(np.prod(out)) * int(k)


def _attention_macs(node: onnx.NodeProto, attrs: Mapping[str, Any],
                    types: Mapping[str, onnx.TypeProto]) -> int | None:
    """The projections (Attention's packed weight) plus Q K^T and P V over every head.

    Attention: input ``[B, S, H]`` times the packed ``[H, Wq + Wk + Wv]`` weight, then
    ``B S S Wq`` for the scores and ``B S S Wv`` for the weighted sum. MultiHeadAttention takes
    projected ``query [B, S, Wq]`` and ``key``/``value [B, L, W]`` (packed and cached forms:
    not sized, None).
    """
    def dims(i: int) -> list[int] | None:
        return _dims(types.get(node.input[i])) if len(node.input) > i and node.input[i] else None

    if node.op_type in ("Attention", "QAttention"):
        x, w = dims(0), dims(1)
        if not x or not w or len(x) != 3 or len(w) != 2:
            return None
        b, s, h = x
        sizes = list(attrs.get("qkv_hidden_sizes") or [w[1] // 3] * 3)
        return b * s * h * w[1] + b * s * s * (sizes[0] + sizes[2])
    q, k, v = dims(0), dims(1), dims(2)
    if not q or not k or not v or not (len(q) == len(k) == len(v) == 3):
        return None
    b, s, wq = q
    return b * s * k[1] * wq + b * s * v[1] * v[2]


def _ort_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Types from onnxruntime's symbolic shape inference, which knows its contrib ops.

    ``model`` is a structure copy (``copy_structure``).
    """
    light = onnx.ModelProto()
    light.CopyFrom(model)  # a structure copy: big weights are shells without data
    shells = [t for t in light.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for t in shells:  # a shell read as a value would fail: as an input it has a shape and no value
        light.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        light.graph.initializer.remove(t)
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
        # infer_shapes() itself saves a partly inferred model into the working directory
        # (sym_shape_infer_temp.onnx) and raises; its loop, without that, keeps what it inferred.
        # guess_output_rank: an op it does not know (FusedGemm) gets unsized outputs, not a stop.
        sym = SymbolicShapeInference(2**31 - 1, True, True, 0)
        sym._preprocess(light)
        while sym.run_:
            sym._infer_impl()
        sym._update_output_from_vi()
        out = sym.out_mp_
    except Exception as e:  # noqa: BLE001 - a size estimate, not a check: MACs stay unknown
        logger.info("onnxruntime's shape inference failed: %s", str(e).splitlines()[0] if str(e) else e)
        return {}
    if out is None:
        return {}
    return {vi.name: vi.type for vi in list(out.graph.value_info) + list(out.graph.output)}
