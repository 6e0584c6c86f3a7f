from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.calibration import (
    Histogram,
    TensorStats,
    collect_ranges,
    collect_stats,
    scale_zero_point,
)
from onnxopt.errors import InputDataError, PreconditionError
from onnxopt.opset import upgrade_opset
from onnxopt.testing import make_model, run_model, vi

# (lo, hi) -> {(qtype, symmetric): (scale, zero point)}, worked out by hand from
#   asymmetric: range widened to include 0, scale = (hi - lo) / 255, zp = round(qmin - lo / scale)
#   symmetric:  scale = max(|lo|, |hi|) / 127, zp = 0 (int8) or 128 (uint8)
# with ties rounded half to even, as QuantizeLinear and DynamicQuantizeLinear round.
HAND_QPARAMS = {
    # 1.5 / (4.75 / 255) = 80.53: zp 81 (uint8), round(-128 + 80.53) = -47 (int8)
    (-1.5, 3.25): {
        ("uint8", False): (4.75 / 255, 81),
        ("int8", False): (4.75 / 255, -47),
        ("uint8", True): (3.25 / 127, 128),
        ("int8", True): (3.25 / 127, 0),
    },
    # all positive: the range becomes [0, 2]
    (0.5, 2.0): {
        ("uint8", False): (2.0 / 255, 0),
        ("int8", False): (2.0 / 255, -128),
        ("uint8", True): (2.0 / 127, 128),
        ("int8", True): (2.0 / 127, 0),
    },
    # all negative: the range becomes [-4, 0], zero lands on qmax
    (-4.0, -1.0): {
        ("uint8", False): (4.0 / 255, 255),
        ("int8", False): (4.0 / 255, 127),
        ("uint8", True): (4.0 / 127, 128),
        ("int8", True): (4.0 / 127, 0),
    },
    (0.0, 6.0): {
        ("uint8", False): (6.0 / 255, 0),
        ("int8", False): (6.0 / 255, -128),
        ("uint8", True): (6.0 / 127, 128),
        ("int8", True): (6.0 / 127, 0),
    },
    # scale exactly 1 and zp on a tie: 2.5 -> 2 (away from zero: 3); -125.5 -> -126
    (-2.5, 252.5): {
        ("uint8", False): (1.0, 2),
        ("int8", False): (1.0, -126),
        ("uint8", True): (252.5 / 127, 128),
        ("int8", True): (252.5 / 127, 0),
    },
    # 1.5 -> 2; -126.5 -> -126 (away from zero: -127)
    (-1.5, 253.5): {
        ("uint8", False): (1.0, 2),
        ("int8", False): (1.0, -126),
        ("uint8", True): (253.5 / 127, 128),
        ("int8", True): (253.5 / 127, 0),
    },
}
QPARAM_CASES = [
    (lo, hi, qtype, symmetric)
    for (lo, hi), table in HAND_QPARAMS.items()
    for qtype, symmetric in table
]


def _session(nodes: list[onnx.NodeProto], inputs, outputs, inits=()) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "oracle", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _ort_dynamic_qparams(lo: float, hi: float) -> tuple[np.float32, int]:
    """onnxruntime's DynamicQuantizeLinear on [lo, hi]: the spec's uint8 asymmetric formula."""
    sess = _session(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])],
        [vi("x", [2])],
        [vi("q", [2], TensorProto.UINT8), vi("s", []), vi("z", [], TensorProto.UINT8)],
    )
    _, scale, zp = sess.run(None, {"x": np.array([lo, hi], np.float32)})
    return scale, int(zp)


def _ort_quantize(values: list[float], scale: np.float32, zp: int, qtype: str) -> list[int]:
    """onnxruntime's QuantizeLinear (round half to even, saturate) with the given parameters."""
    dtype = np.uint8 if qtype == "uint8" else np.int8
    sess = _session(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])],
        [vi("x", [len(values)])],
        [vi("q", [len(values)], helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))],
        [
            numpy_helper.from_array(np.array(scale, np.float32), "s"),
            numpy_helper.from_array(np.array(zp, dtype), "z"),
        ],
    )
    return sess.run(None, {"x": np.array(values, np.float32)})[0].tolist()


@pytest.mark.parametrize(("lo", "hi", "qtype", "symmetric"), QPARAM_CASES)
def test_scale_zero_point_worked_out_by_hand(
    lo: float, hi: float, qtype: str, symmetric: bool
) -> None:
    scale, zp = HAND_QPARAMS[(lo, hi)][(qtype, symmetric)]
    assert scale_zero_point(lo, hi, qtype, symmetric) == (np.float32(scale), zp)


@pytest.mark.parametrize(("lo", "hi"), list(HAND_QPARAMS))
def test_uint8_asymmetric_matches_onnxruntime_dynamic_quantize_linear(lo: float, hi: float) -> None:
    scale, zp = scale_zero_point(lo, hi, "uint8")
    ort_scale, ort_zp = _ort_dynamic_qparams(lo, hi)
    assert scale == ort_scale
    assert zp == ort_zp


@pytest.mark.parametrize(("lo", "hi", "qtype", "symmetric"), QPARAM_CASES)
def test_onnxruntime_quantizes_the_range_without_clipping(
    lo: float, hi: float, qtype: str, symmetric: bool
) -> None:
    """QuantizeLinear with these parameters sends 0 to the zero point exactly, and every point of
    the range (widened to include 0) to a code whose dequantized value is within half a step."""
    scale, zp = scale_zero_point(lo, hi, qtype, symmetric)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    assert _ort_quantize([0.0], scale, zp, qtype) == [zp]
    if symmetric:
        lo, hi = -max(-lo, hi), max(-lo, hi)
    values = [*np.linspace(lo, hi, 101).tolist(), lo, hi]
    codes = np.array(_ort_quantize(values, scale, zp, qtype))
    err = np.abs((codes - zp) * np.float64(scale) - np.array(values, np.float32))
    assert err.max() <= scale / 2 * (1 + 1e-5)


def test_scale_zero_point_relu_range_puts_zero_at_qmin() -> None:
    assert scale_zero_point(0.0, 6.0, "uint8")[1] == 0
    assert scale_zero_point(0.0, 6.0, "int8")[1] == -128


def test_scale_zero_point_empty_range() -> None:
    assert scale_zero_point(0.0, 0.0, "uint8") == (np.float32(1.0), 0)


def _model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["m"]),
        helper.make_node("Relu", ["m"], ["y"]),
    ]
    return make_model(
        nodes, [vi("x", ["N", 4])], [vi("y", ["N", 4])], {"two": np.array(2.0, np.float32)}
    )


def test_minmax_streams_over_feeds_and_reads_inputs_and_outputs() -> None:
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((3, 4)).astype(np.float32)} for _ in range(5)]
    model = _model()
    before = model.SerializeToString()
    ranges = collect_ranges(model, feeds, ["x", "m", "y"])
    allx = np.concatenate([f["x"] for f in feeds])
    assert ranges["x"] == (float(allx.min()), float(allx.max()))
    assert ranges["m"] == pytest.approx((2 * allx.min(), 2 * allx.max()))
    assert ranges["y"] == pytest.approx((0.0, 2 * allx.max()))
    assert model.SerializeToString() == before  # extra outputs removed again


def test_varying_shapes_and_sample_limit() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    model = make_model(
        nodes,
        [vi("x", ["B", "S", 4])],
        [vi("y", ["B", "S", 2])],
        {"w": np.ones((4, 2), np.float32)},
    )
    feeds = [{"x": np.full((1, s, 4), float(s), np.float32)} for s in (3, 7, 5, 9)]
    assert collect_ranges(model, feeds, ["y"]) == {"y": (12.0, 36.0)}
    # two samples: the third and fourth feeds are not run
    assert collect_ranges(model, feeds, ["y"], max_samples=2) == {"y": (12.0, 28.0)}


def test_large_batches_are_split_into_chunks() -> None:
    feeds = [{"x": np.arange(100 * 4, dtype=np.float32).reshape(100, 4)}]
    stats = collect_stats(_model(), feeds, ["y"], max_samples=1000)
    assert (stats["y"].lo, stats["y"].hi) == (0.0, 2 * 399.0)


def test_empty_or_wrong_feeds_are_input_errors() -> None:
    with pytest.raises(InputDataError, match="empty"):
        collect_ranges(_model(), [], ["y"])
    with pytest.raises(InputDataError, match="lacks model input"):
        collect_ranges(_model(), [{"z": np.zeros((1, 4), np.float32)}], ["y"])


def test_histogram_rebins_without_losing_mass() -> None:
    rng = np.random.default_rng(1)
    h = Histogram(bins=512)
    chunks = [rng.standard_normal(1000) * s for s in (0.5, 1.0, 3.0)]
    for c in chunks:
        h.add(c)
    allv = np.concatenate(chunks)
    assert h.counts.sum() == pytest.approx(3000)
    assert (h.edges[0], h.edges[-1]) == (allv.min(), allv.max())
    assert h.quantile(0.5) == pytest.approx(np.median(allv), abs=0.05)


def test_percentile_on_known_distribution() -> None:
    rng = np.random.default_rng(2)
    stats = TensorStats(histogram=True)
    values = [rng.standard_normal(20000).astype(np.float32) for _ in range(5)]
    for v in values:
        stats.add(v)
    lo, hi = stats.range("percentile", 99.0)
    allv = np.concatenate(values)
    width = (allv.max() - allv.min()) / 2048
    assert lo == pytest.approx(float(np.percentile(allv, 0.5)), abs=float(2 * width))
    assert hi == pytest.approx(float(np.percentile(allv, 99.5)), abs=float(2 * width))
    assert hi == pytest.approx(2.576, abs=0.05)  # the normal distribution's 99.5% point


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_methods_stay_within_minmax(method: str) -> None:
    rng = np.random.default_rng(3)
    stats = TensorStats(histogram=True)
    for _ in range(4):
        stats.add(np.concatenate([rng.standard_normal(5000), rng.standard_normal(5) * 20]))
    lo, hi = stats.range(method)
    assert stats.lo <= lo <= hi <= stats.hi
    # the outliers make the full range wasteful: the method must clip them
    assert hi - lo < stats.hi - stats.lo


def test_relu_like_data_keeps_zero_point_at_qmin() -> None:
    rng = np.random.default_rng(4)
    stats = TensorStats(histogram=True)
    stats.add(np.maximum(rng.standard_normal(10000), 0))
    for method in ("minmax", "percentile", "entropy", "mse"):
        lo, hi = stats.range(method)
        assert 0.0 <= lo < 1e-3 < hi
        assert scale_zero_point(lo, hi, "uint8")[1] == 0


def test_non_finite_values_are_ignored() -> None:
    stats = TensorStats(histogram=True)
    stats.add(np.array([np.nan, -1.0, 2.0, np.inf]))
    assert stats.range("minmax") == (-1.0, 2.0)


def test_upgrade_opset_keeps_weights_and_numerics() -> None:
    rng = np.random.default_rng(5)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Unsqueeze", ["c"], ["u"], axes=[0]),
        helper.make_node("Squeeze", ["u"], ["y"], axes=[0]),
    ]
    model = make_model(nodes, [vi("x", [1, 3, 5, 5])], [vi("y", [1, 8, 5, 5])], {"w": w}, opset=11)
    up = upgrade_opset(model, 13)
    onnx.checker.check_model(up)
    assert up.opset_import[0].version == 13
    assert model.opset_import[0].version == 11
    assert onnx.numpy_helper.to_array(up.graph.initializer[0]).tobytes() == w.tobytes()
    feed = [{"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)}]
    np.testing.assert_array_equal(run_model(up, feed)[0][0], run_model(model, feed)[0][0])
    assert upgrade_opset(up, 13) is up


def test_upgrade_opset_failure_is_a_precondition_error() -> None:
    nodes = [helper.make_node("Custom", ["x"], ["y"], domain="")]
    model = make_model(nodes, [vi("x", [1])], [vi("y", [1])], opset=11, check=False)
    with pytest.raises(PreconditionError, match="cannot upgrade"):
        upgrade_opset(model, 13)
