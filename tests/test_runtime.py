"""onnxopt.runtime: quiet sessions, whole error messages, bfloat16/float8 through OrtValues."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt import runtime
from onnxopt.data import Dataset
from onnxopt.errors import OnnxoptError
from onnxopt.validate import compare


def _model(nodes, inputs, outputs, initializers=(), opset: int = 21) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _bad_reshape(node_name: str = "") -> onnx.ModelProto:
    """A Reshape whose target shape is fed: [4, 4] cannot hold a [2, 3] input."""
    return _model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name=node_name)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )


_BAD_FEED = {"x": np.zeros((2, 3), np.float32), "shape": np.array([4, 4], np.int64)}


def test_ort_message_drops_prefix_and_source_location() -> None:
    raw = (
        "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Reshape "
        "node. Name:'' Status Message: /onnxruntime_src/onnxruntime/core/providers/cpu/tensor/"
        "reshape_helper.h:91 onnxruntime::ReshapeHelper::ReshapeHelper(const onnxruntime::"
        "TensorShape&, onnxruntime::TensorShapeVector&, bool) input_shape_size == "
        "requested_shape_size was false. The input tensor cannot be reshaped.\n"
    )
    assert runtime.ort_message(Exception(raw)) == (
        "Non-zero status code returned while running Reshape node. Name:'' Status Message: "
        "input_shape_size == requested_shape_size was false. The input tensor cannot be reshaped."
    )


@pytest.mark.parametrize(("raw", "clean"), [
    ("Status Message: element_wise_ops.cc:2421 operator() Integer modulo by zero",
     "Status Message: Integer modulo by zero"),
    ("Exception during initialization: /onnxruntime_src/a/string_normalizer.cc:235 "
     "onnxruntime::StringNormalizer::Locale::Locale(const std::string&)::<lambda()> "
     "Failed to construct locale",
     "Exception during initialization: Failed to construct locale"),
    ("/onnxruntime_src/a/rnn.h:30 std::vector<int> ns::f<T>(int) const [with T = float] "
     "layout_ == 0 was false.", "layout_ == 0 was false."),
    ("no location here: x > 0 (y)", "no location here: x > 0 (y)"),
])
def test_ort_message_forms(raw: str, clean: str) -> None:
    assert runtime.ort_message(Exception(raw)) == clean


def test_run_error_is_whole_and_clean() -> None:
    # a long node name puts the informative end of the message far past 300 characters
    name = "node_" + "n" * 400
    sess = runtime.session(_bad_reshape(name))
    with pytest.raises(OnnxoptError) as info:
        runtime.run(sess, _BAD_FEED)
    text = str(info.value)
    assert text.startswith("onnxruntime failed to run the model: Non-zero status code")
    assert name in text
    assert text.endswith("Input shape:{2,3}, requested shape:{4,4}")
    assert "[ONNXRuntimeError]" not in text
    assert "onnxruntime_src" not in text
    assert "\n" not in text


def test_load_error_is_clean() -> None:
    bad = _model(
        [helper.make_node("Add", ["x", "z"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("z", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    with pytest.raises(OnnxoptError, match=r"^onnxruntime cannot load the model: Type Error: "):
        runtime.session(bad)


def test_failing_run_logs_nothing_to_stderr() -> None:
    # onnxruntime logs a failing node as "[E:onnxruntime:...]" with colour codes, on top of
    # raising: the raise is reported, the log line must not reach the console
    script = textwrap.dedent("""
        import numpy as np
        from onnx import TensorProto, helper
        from onnxopt import runtime
        from onnxopt.errors import OnnxoptError

        graph = helper.make_graph(
            [helper.make_node("Reshape", ["x", "shape"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
             helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        for _ in range(2):
            try:
                runtime.run_model(model, [{"x": np.zeros((2, 3), np.float32),
                                           "shape": np.array([4, 4], np.int64)}])
            except OnnxoptError as e:
                print("raised:", e)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("raised: onnxruntime failed to run the model") == 2
    assert "[E:onnxruntime" not in done.stderr
    assert "\x1b[" not in done.stderr


def _failing_for_any_input(op: str) -> onnx.ModelProto:
    """Gather at a constant index out of range (fails at run), Mod by a constant 0 (at load)."""
    if op == "Gather":
        const = onnx.numpy_helper.from_array(np.array([10], np.int64), "c")
        dtype, out_shape = TensorProto.FLOAT, [1, 3]
    else:
        const = onnx.numpy_helper.from_array(np.zeros(3, np.int32), "c")
        dtype, out_shape = TensorProto.INT32, [2, 3]
    return _model(
        [helper.make_node(op, ["x", "c"], ["y"])],
        [helper.make_tensor_value_info("x", dtype, [2, 3])],
        [helper.make_tensor_value_info("y", dtype, out_shape)],
        initializers=[const],
    )


@pytest.mark.parametrize("op", ["Gather", "Mod"])
def test_cli_on_a_failing_model_keeps_ort_logs_off_the_console(tmp_path: Path, op: str) -> None:
    # the whole product path (fold-constants' own sessions, validation, measurement)
    path = tmp_path / "bad.onnx"
    onnx.save_model(_failing_for_any_input(op), path)
    done = subprocess.run(
        [sys.executable, "-m", "onnxopt", "optimize", str(path), "-o", str(tmp_path / "out.onnx")],
        capture_output=True, text=True, timeout=300,
    )
    console = done.stdout + done.stderr
    assert "[E:onnxruntime" not in console
    assert "\x1b[1;31m" not in console
    assert "[ONNXRuntimeError]" not in console


def test_code_prefix_inside_a_message_is_dropped() -> None:
    with pytest.raises(OnnxoptError) as info:
        runtime.session(_failing_for_any_input("Mod"))
    assert str(info.value) == ("onnxruntime cannot load the model: "
                               "Exception during initialization: Integer modulo by zero")


def test_bfloat16_inputs_and_outputs() -> None:
    model = _model(
        [helper.make_node("Concat", ["x", "x"], ["pair"], axis=0),
         helper.make_node("Cast", ["pair"], ["f"], to=TensorProto.FLOAT)],
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [3])],
        [helper.make_tensor_value_info("pair", TensorProto.BFLOAT16, [6]),
         helper.make_tensor_value_info("f", TensorProto.FLOAT, [6])],
    )
    x = np.array([1.5, -2.0, 0.25], dtype=ml_dtypes.bfloat16)
    [pair, f] = runtime.run_model(model, [{"x": x}])[0]
    assert pair.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(pair.astype(np.float32), [1.5, -2.0, 0.25] * 2)
    assert f.dtype == np.float32
    np.testing.assert_array_equal(f, [1.5, -2.0, 0.25] * 2)


def test_float_in_bfloat16_and_float8_out() -> None:
    model = _model(
        [helper.make_node("Cast", ["x"], ["b"], to=TensorProto.BFLOAT16),
         helper.make_node("Cast", ["x"], ["e4"], to=TensorProto.FLOAT8E4M3FN)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("b", TensorProto.BFLOAT16, [2, 2]),
         helper.make_tensor_value_info("e4", TensorProto.FLOAT8E4M3FN, [2, 2])],
    )
    x = np.array([[1.0, 2.0], [-0.5, 4.0]], dtype=np.float32)
    b, e4 = runtime.run_model(model, [{"x": x}])[0]
    assert (b.dtype, b.shape) == (np.dtype(ml_dtypes.bfloat16), (2, 2))
    assert e4.dtype == np.dtype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(b.astype(np.float32), x)
    np.testing.assert_array_equal(e4.astype(np.float32), x)


def test_validation_compares_bfloat16_models() -> None:
    model = _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 3])],
    )
    feeds = [{"x": np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)}]
    report = compare(model, model, Dataset(feeds))
    assert report
    assert [o.name for o in report.outputs] == ["y"]


def test_positional_feed_skips_initializers_and_omitted_inputs() -> None:
    model = _model(
        [helper.make_node("Clip", ["x", "lo", "hi"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("lo", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("hi", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        initializers=[onnx.numpy_helper.from_array(np.array(0.0, np.float32), "lo")],
    )
    sess = runtime.session(model)
    x = np.array([-1.0, 0.5, 3.0], np.float32)
    assert list(runtime.positional_feed(sess, [x, None])) == ["x"]
    feed = runtime.positional_feed(sess, [x, np.array(1.0, np.float32)])
    assert list(feed) == ["x", "hi"]
    np.testing.assert_array_equal(runtime.run(sess, feed)[0], [0.0, 0.5, 1.0])


def _string_and_float_model() -> onnx.ModelProto:
    """An ai.onnx.contrib string op (onnxruntime-extensions has its kernel) beside a float path."""
    return helper.make_model(helper.make_graph(
        [helper.make_node("StringLower", ["s"], ["t"], domain="ai.onnx.contrib"),
         helper.make_node("Identity", ["x"], ["xi"]), helper.make_node("Relu", ["xi"], ["y"])], "g",
        [helper.make_tensor_value_info("s", TensorProto.STRING, [None]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, [None]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.contrib", 1)])


def test_contrib_string_ops_run_with_onnxruntime_extensions(tmp_path: Path) -> None:
    """Models with in-graph tokenizers validate when onnxruntime-extensions is installed."""
    from onnxopt.api import optimize_file
    from onnxopt.graph_utils import op_histogram

    pytest.importorskip("onnxruntime_extensions")
    sess = runtime.session(_string_and_float_model())
    out = runtime.run(sess, {"s": np.array(["AbC", "XY"], dtype=object), "x": -np.ones((2, 3), np.float32)})
    assert list(out[0]) == ["abc", "xy"]
    np.testing.assert_array_equal(out[1], np.zeros((2, 3), np.float32))
    src, dst = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_string_and_float_model(), src)
    result = optimize_file(src, dst, bench=False)
    assert result.validation_skipped is None
    assert result.validation is not None
    assert bool(result.validation)
    assert op_histogram(onnx.load(str(dst))) == {"ai.onnx.contrib::StringLower": 1, "Relu": 1}


def test_contrib_ops_without_onnxruntime_extensions_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "extensions_library", lambda: None)
    with pytest.raises(OnnxoptError, match=r"StringLower.*need `pip install onnxruntime-extensions`\)$"):
        runtime.session(_string_and_float_model())
