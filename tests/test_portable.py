"""Portable means checked: onnxopt's outputs run in a second runtime, OpenVINO, with the same answers.

The default output must run in any ONNX runtime that runs its input. Each model here goes
through level 1 (and, for the int8 case, level 1 plus the quantize-qdq pass); the written
graph is run in OpenVINO's CPU plugin (f32 inference precision: by default it may compute
in bf16 on CPUs that have it) and compared with onnxruntime (graph optimizations off):

- level 1 in OpenVINO against the ORIGINAL model in onnxruntime: the exact tolerance of
  validation, atol 1e-4 + rtol 1e-3 (outputs of order 1);
- int8 (QDQ) in OpenVINO against the same int8 model in onnxruntime: OpenVINO turns the
  Q/DQ pairs into its FakeQuantize and may round a value that sits on a step boundary to
  the other step, so the bound is in output terms: max |diff| <= 2% of the output's
  range, cosine >= 0.999 (measured with openvino 2026.4.1: at most 0.5%, on the demo model).

Skipped with the reason when openvino is not installed (it is in the ``test`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxopt.api import optimize
from onnxopt.data import load as load_data
from onnxopt.graph_utils import op_histogram
from onnxopt.runtime import run_model
from onnxopt.testing import conv_bn_model, make_model, mlp_model, random_feeds, vi

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'onnxopt[test]')")

REPO = Path(__file__).resolve().parent.parent
EXACT_ATOL, EXACT_RTOL = 1e-4, 1e-3
INT8_RANGE_SHARE, INT8_MIN_COSINE = 0.02, 0.999


def run_openvino(model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]], tmp_path: Path,
                 ) -> list[list[np.ndarray]]:
    """Outputs per feed, in graph-output order, from OpenVINO's CPU plugin at f32."""
    path = tmp_path / "openvino_input.onnx"
    onnx.save(model, path)
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    outputs = []
    for feed in feeds:
        result = compiled(feed)
        outputs.append([np.asarray(result[compiled.output(i)]) for i in range(len(model.graph.output))])
    return outputs


def transformer_block(opset: int, seed: int = 0) -> onnx.ModelProto:
    """x[2, 8, 32]: Identity, MatMul+Add, decomposed LayerNorm, decomposed (erf) Gelu, MatMul+Add, residual.

    The Identity makes sure level 1 changes it today; the rest is what the transformer rewrites
    (3-D MatMul+Add, LayerNormalization, Gelu) turn into single ops where they fire.
    """
    rng = np.random.default_rng(seed)
    d, h = 32, 64
    inits = {
        "w1": (rng.standard_normal((d, h)) / np.sqrt(d)).astype(np.float32),
        "b1": (0.1 * rng.standard_normal(h)).astype(np.float32),
        "w2": (rng.standard_normal((h, d)) / np.sqrt(h)).astype(np.float32),
        "b2": (0.1 * rng.standard_normal(d)).astype(np.float32),
        "gamma": rng.uniform(0.5, 1.5, h).astype(np.float32), "beta": (0.1 * rng.standard_normal(h)).astype(np.float32),
        "two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32), "one": np.array(1.0, np.float32),
        "half": np.array(0.5, np.float32), "sqrt2": np.array(np.sqrt(2.0), np.float32),
    }
    rm = (lambda i, o: helper.make_node("ReduceMean", [i], [o], axes=[-1])) if opset < 18 else (
        lambda i, o: helper.make_node("ReduceMean", [i, "axis"], [o]))
    if opset >= 18:
        inits["axis"] = np.array([-1], np.int64)
    n = helper.make_node
    nodes = [
        n("Identity", ["x"], ["xi"]), n("MatMul", ["xi", "w1"], ["m1"]), n("Add", ["m1", "b1"], ["a1"]),
        rm("a1", "mu"), n("Sub", ["a1", "mu"], ["xc"]), n("Pow", ["xc", "two"], ["sq"]), rm("sq", "var"),
        n("Add", ["var", "eps"], ["ve"]), n("Sqrt", ["ve"], ["sd"]), n("Div", ["xc", "sd"], ["nz"]),
        n("Mul", ["nz", "gamma"], ["ng"]), n("Add", ["ng", "beta"], ["ln"]),
        n("Div", ["ln", "sqrt2"], ["g0"]), n("Erf", ["g0"], ["g1"]), n("Add", ["g1", "one"], ["g2"]),
        n("Mul", ["ln", "g2"], ["g3"]), n("Mul", ["g3", "half"], ["gelu"]),
        n("MatMul", ["gelu", "w2"], ["m2"]), n("Add", ["m2", "b2"], ["a2"]), n("Add", ["a2", "x"], ["y"]),
    ]
    return make_model(nodes, [vi("x", [2, 8, d])], [vi("y", [2, 8, d])], inits, opset=opset)


def digits() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    model = onnx.load(str(REPO / "models" / "digits_cnn.onnx"))
    return model, load_data(REPO / "models" / "digits_val.npz", model).feeds[:16]


def _assert_close(name: str, expected: np.ndarray, got: np.ndarray) -> None:
    assert got.shape == expected.shape, f"{name}: shape {got.shape} != {expected.shape}"
    np.testing.assert_allclose(got, expected, atol=EXACT_ATOL, rtol=EXACT_RTOL, err_msg=name)


CASES = {
    "conv-bn-opset13": lambda: conv_bn_model(channels=8, with_bias=True, opset=13, dynamic_batch=True),
    "conv-bn-opset17": lambda: conv_bn_model(channels=8, opset=17),
    "mlp": lambda: mlp_model(),
    "transformer-opset17": lambda: transformer_block(17),
    "transformer-opset20": lambda: transformer_block(20),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_level1_output_runs_in_openvino_like_the_original(case: str, tmp_path: Path) -> None:
    model = CASES[case]()
    feeds = random_feeds(model, 3, shapes={"x": [2, 8, 8, 8]} if case == "conv-bn-opset13" else None)
    optimized, report = optimize(model)
    assert report.changed_passes, "level 1 changed nothing: the test would check the input again"
    assert op_histogram(optimized) != op_histogram(model)
    expected = run_model(model, feeds)
    for f, (want, got) in enumerate(zip(expected, run_openvino(optimized, feeds, tmp_path), strict=True)):
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            _assert_close(f"feed {f} output {i}", np.asarray(w), g)


def test_standard_ops_level1_writes_run_in_openvino(tmp_path: Path) -> None:
    # the ops level 1 writes in place of decomposed patterns are exactly what a second runtime
    # might lack: check they are there, then that OpenVINO runs them like the original
    model = transformer_block(20)
    optimized, _ = optimize(model)
    hist = op_histogram(optimized)
    assert hist.get("LayerNormalization") == 1
    assert hist.get("Gelu") == 1
    assert "Erf" not in hist
    feeds = random_feeds(model, 2, seed=3)
    for want, got in zip(run_model(model, feeds), run_openvino(optimized, feeds, tmp_path), strict=True):
        _assert_close("y", np.asarray(want[0]), got[0])


def test_demo_model_level1_runs_in_openvino(tmp_path: Path) -> None:
    model, feeds = digits()
    optimized, report = optimize(model)
    assert "fold-batchnorm" in report.changed_passes
    expected = run_model(model, feeds)
    got = run_openvino(optimized, feeds, tmp_path)
    for f, (want, have) in enumerate(zip(expected, got, strict=True)):
        _assert_close(f"feed {f}", np.asarray(want[0]), have[0])
    # the same digits predicted
    assert [int(np.argmax(w[0])) for w in expected] == [int(np.argmax(g[0])) for g in got]


def _int8(model: onnx.ModelProto, calibration: list[dict[str, np.ndarray]]) -> onnx.ModelProto:
    quantized, report = optimize(model, level=1, passes=["quantize-qdq"], calibration=calibration)
    hist = op_histogram(quantized)
    assert hist.get("QuantizeLinear", 0) > 0
    assert hist.get("DequantizeLinear", 0) > 0
    assert not report.exact
    return quantized


def _assert_int8_close(name: str, expected: np.ndarray, got: np.ndarray) -> None:
    assert got.shape == expected.shape, f"{name}: shape {got.shape} != {expected.shape}"
    spread = float(expected.max() - expected.min()) or 1.0
    worst = float(np.abs(got - expected).max())
    assert worst <= INT8_RANGE_SHARE * spread, f"{name}: max |diff| {worst:.3g} > 2% of range {spread:.3g}"
    a, b = expected.ravel().astype(np.float64), got.ravel().astype(np.float64)
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert cosine >= INT8_MIN_COSINE, f"{name}: cosine {cosine:.5f}"


@pytest.mark.parametrize("case", ["conv-bn-opset17", "mlp", "transformer-opset17"])
def test_int8_output_runs_in_openvino_like_in_onnxruntime(case: str, tmp_path: Path) -> None:
    model = CASES[case]()
    calibration = random_feeds(model, 16, seed=1)
    feeds = random_feeds(model, 3, seed=2)
    quantized = _int8(model, calibration)
    expected = run_model(quantized, feeds)
    for f, (want, got) in enumerate(zip(expected, run_openvino(quantized, feeds, tmp_path), strict=True)):
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            _assert_int8_close(f"feed {f} output {i}", np.asarray(w), g)


def test_demo_model_int8_runs_in_openvino(tmp_path: Path) -> None:
    model, feeds = digits()
    calibration = load_data(REPO / "models" / "digits_val.npz", model).feeds[16:48]
    quantized = _int8(model, calibration)
    expected = run_model(quantized, feeds)
    got = run_openvino(quantized, feeds, tmp_path)
    for f, (want, have) in enumerate(zip(expected, got, strict=True)):
        _assert_int8_close(f"feed {f}", np.asarray(want[0]), have[0])

