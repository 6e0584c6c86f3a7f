from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from onnxopt.passes.quantize_qdq import QuantizeQDQPass

from onnxopt import optimize
from onnxopt.errors import MissingRequirementError, PreconditionError
from onnxopt.io import to_graph
from onnxopt.pass_base import NameGenerator, PassContext
from onnxopt.testing import make_model, op_histogram, run_model, vi

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


# ---- builders ----


def conv_net(opset: int = 17, constant_nodes: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv+Relu -> Conv(depthwise)+Relu -> MaxPool -> Flatten -> Gemm -> y[N,10]."""
    rng = np.random.default_rng(seed)
    w = {
        "W1": rng.standard_normal((8, 3, 3, 3)) * 0.4,
        "B1": rng.standard_normal(8) * 0.1,
        "W2": rng.standard_normal((8, 1, 3, 3)) * 0.4,
        "B2": rng.standard_normal(8) * 0.1,
        "W3": rng.standard_normal((10, 8 * 4 * 4)) * 0.1,
        "B3": rng.standard_normal(10) * 0.1,
    }
    w = {k: v.astype(np.float32) for k, v in w.items()}
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node(
            "Conv", ["r1", "W2", "B2"], ["c2"], pads=[1, 1, 1, 1], group=8, name="conv2"
        ),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node(
            "MaxPool", ["r2"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"
        ),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "W3", "B3"], ["y"], transB=1, name="fc"),
    ]
    inits: dict[str, np.ndarray] = w
    if constant_nodes:
        nodes = [
            helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k))
            for k, v in w.items()
        ] + nodes
        inits = {}
    return make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 10])], inits, opset=opset)


def mlp(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x[B,S,16] -> MatMul(W1)+b1 as Gemm-free MatMul+Add -> Relu -> MatMul(W2) -> y."""
    rng = np.random.default_rng(seed)
    w = {"W1": rng.standard_normal((16, 32)) * 0.3, "W2": rng.standard_normal((32, 8)) * 0.3}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),
    ]
    return make_model(nodes, [vi("x", ["B", "S", 16])], [vi("y", ["B", "S", 8])], w), w


def image_feeds(n: int, seed: int = 1, batch: int = 4) -> list[dict[str, np.ndarray]]:
    # "realistic": smooth, non-negative images rather than white noise
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        base = rng.uniform(0, 1, (batch, 3, 4, 4)).astype(np.float32)
        feeds.append({"x": np.repeat(np.repeat(base, 2, axis=2), 2, axis=3)})
    return feeds


def seq_feeds(n: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"x": rng.standard_normal((2, int(s), 16)).astype(np.float32)}
        for s in rng.integers(3, 12, n)
    ]


def quantize(model: onnx.ModelProto, feeds, **options):
    return optimize(model, passes=[("quantize-qdq", options)], calibration=feeds)


# ---- structure helpers ----


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_qdq_input(model: onnx.ModelProto, name: str) -> tuple[onnx.NodeProto, onnx.NodeProto]:
    """``name`` is DequantizeLinear(QuantizeLinear(...)); returns (Q, DQ)."""
    prod = producers(model)
    dq = prod[name]
    assert dq.op_type == "DequantizeLinear", name
    q = prod[dq.input[0]]
    assert q.op_type == "QuantizeLinear", name
    return q, dq


def assert_int8_weight(
    model: onnx.ModelProto, name: str
) -> tuple[np.ndarray, np.ndarray, int | None]:
    """``name`` is DequantizeLinear(int8 initializer); returns (int8 values, scales, axis)."""
    dq = producers(model)[name]
    assert dq.op_type == "DequantizeLinear"
    values = inits(model)
    assert values[dq.input[0]].dtype == np.int8
    assert not values[dq.input[2]].any()
    axis = next((a.i for a in dq.attribute if a.name == "axis"), None)
    return values[dq.input[0]], values[dq.input[1]], axis


def assert_fully_quantized(model: onnx.ModelProto) -> None:
    """Every targeted node reads its activation through Q->DQ and its weight through int8->DQ."""
    values = inits(model)
    scales = {
        n.input[1] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
    }
    assert not [n for n, v in values.items() if v.dtype == np.float32 and n not in scales], (
        "float weights remain"
    )
    for node in model.graph.node:
        if node.op_type in TARGETS:
            assert_qdq_input(model, node.input[0])
            assert_int8_weight(model, node.input[1])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def ort_optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> dict[str, int]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return op_histogram(onnx.load(so.optimized_model_filepath))


# ---- oracles independent of onnxopt.calibration and passes/_qdq.py ----


def ort_run(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, np.ndarray],
    outputs: list[onnx.ValueInfoProto],
    consts: dict[str, np.ndarray],
) -> list[np.ndarray]:
    graph = helper.make_graph(
        nodes,
        "oracle",
        [vi(k, list(v.shape)) for k, v in inputs.items()],
        outputs,
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


def ort_dynamic_qparams(values: np.ndarray) -> tuple[np.float32, int]:
    """uint8 asymmetric (scale, zero point) of ``values`` by onnxruntime's DynamicQuantizeLinear,
    whose spec is the minmax formula: range widened to 0, scale = range / 255, zp rounded."""
    x = np.asarray(values, np.float32).ravel()
    _, scale, zp = ort_run(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])],
        {"x": x},
        [
            vi("q", list(x.shape), onnx.TensorProto.UINT8),
            vi("s", []),
            vi("z", [], onnx.TensorProto.UINT8),
        ],
        {},
    )
    return scale, int(zp)


def ort_quantize_int8(w: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """onnxruntime's QuantizeLinear to int8 (zero point 0, round half to even, saturate)."""
    return ort_run(
        [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["q"], axis=axis)],
        {"w": w},
        [vi("q", list(w.shape), onnx.TensorProto.INT8)],
        {"s": scale.astype(np.float32), "z": np.zeros(scale.shape, np.int8)},
    )[0]


# ---- tests ----


def test_conv_net_structure_stats_and_fidelity(tmp_path: Path) -> None:
    model = conv_net()
    calib, held = image_feeds(8), image_feeds(4, seed=9)
    q, report = quantize(model, calib)
    assert op_histogram(q) == {
        "Conv": 2,
        "DequantizeLinear": 11,
        "Flatten": 1,
        "Gemm": 1,
        "MaxPool": 1,
        "QuantizeLinear": 5,
    }
    assert report.stats("quantize-qdq") == {
        "quantized:Conv": 2,
        "quantized:Gemm": 1,
        "quantized:MaxPool": 1,
        "quantized:Flatten": 1,
        "folded-activations": 2,
    }
    assert_fully_quantized(q)
    # Relu folded: each Conv writes straight into Q, whose zero point is qmin
    for name in ("r1", "r2"):
        qn, _ = assert_qdq_input(q, name)
        assert inits(q)[qn.input[2]] == 0
    # MaxPool and Flatten reuse their input's scale (onnxruntime drops those Q/DQ pairs)
    prod = producers(q)
    assert prod["p"].op_type == prod["f"].op_type == "DequantizeLinear"
    assert prod["p"].input[1] == prod["r2"].input[1] == prod["f"].input[1]
    # the last Gemm keeps a float output
    assert prod["y"].op_type == "Gemm"
    for out_q, out_f in zip(run_model(q, held), run_model(model, held), strict=False):
        assert cosine(out_q[0], out_f[0]) >= 0.99
    fused = ort_optimized_ops(q, tmp_path)
    assert fused.get("com.microsoft::QLinearConv") == 2
    assert fused.get("com.microsoft::QGemm") == 1
    assert "Conv" not in fused
    assert "Gemm" not in fused


def test_scales_and_zero_points_match_onnxruntime() -> None:
    model, w = mlp()
    calib = seq_feeds(6)
    q, _ = quantize(model, calib)
    x = np.concatenate([f["x"].reshape(-1, 16) for f in calib])
    r = np.maximum(x @ w["W1"], 0)
    values = inits(q)
    qx, _ = assert_qdq_input(q, next(n for n in q.graph.node if n.name == "mm1").input[0])
    scale, zp = values[qx.input[1]], int(values[qx.input[2]])
    ort_scale, ort_zp = ort_dynamic_qparams(x)
    assert scale == ort_scale
    assert zp == ort_zp
    qr, _ = assert_qdq_input(q, "r")  # Relu folded: MatMul -> Q(zp 0) -> DQ -> r
    scale, zp = values[qr.input[1]], int(values[qr.input[2]])
    np.testing.assert_allclose(scale, ort_dynamic_qparams(r)[0], rtol=1e-6)
    assert zp == 0
    for wname, node in (("W1", "mm1"), ("W2", "mm2")):
        mm = next(n for n in q.graph.node if n.name == node)
        wq, ws, axis = assert_int8_weight(q, mm.input[1])
        assert axis == 1
        expect = (np.abs(w[wname]).max(axis=0) / 64).astype(np.float32)  # reduce_range: 7 bits
        np.testing.assert_allclose(ws, expect, rtol=1e-7)
        np.testing.assert_array_equal(wq, ort_quantize_int8(w[wname], expect, axis=1))


# weights whose int8 codes are worked out by hand: each output channel's max|w| is 64 * a power
# of two, so with reduce_range (Q = 64) the scales are exact and the listed values land on .5
HAND_CASES = {
    # MatMul W[K=3, N=2]: channels are columns (axis 1), scales 0.5 and 0.25;
    # 1.25 / 0.5 = 2.5 -> 2, -0.75 / 0.5 = -1.5 -> -2, 0.375 / 0.25 = 1.5 -> 2, 0.125 / 0.25 -> 0
    "MatMul": (
        [[32.0, -16.0], [1.25, 0.375], [-0.75, 0.125]],
        1,
        [0.5, 0.25],
        [[64, -64], [2, 2], [-2, 0]],
    ),
    # Conv W[M=2, C=1, 1, 3]: channels are rows (axis 0), scales 0.25 and 1;
    # 0.625 / 0.25 = 2.5 -> 2, -0.375 / 0.25 = -1.5 -> -2, 3.5 -> 4, -0.5 -> 0
    "Conv": (
        [[[[16.0, 0.625, -0.375]]], [[[-64.0, 3.5, -0.5]]]],
        0,
        [0.25, 1.0],
        [[[[64, 2, -2]]], [[[-64, 4, 0]]]],
    ),
}


@pytest.mark.parametrize("op", list(HAND_CASES))
def test_weight_codes_and_scales_worked_out_by_hand(op: str) -> None:
    w_list, axis, scales, codes = HAND_CASES[op]
    w = np.array(w_list, np.float32)
    rng = np.random.default_rng(0)
    if op == "MatMul":
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")
        shapes, x = ([4, 3], [4, 2]), rng.standard_normal((4, 3))
    else:
        node = helper.make_node("Conv", ["x", "w"], ["y"], name="layer")
        shapes, x = ([1, 1, 4, 5], [1, 2, 4, 3]), rng.standard_normal((1, 1, 4, 5))
    model = make_model([node], [vi("x", shapes[0])], [vi("y", shapes[1])], {"w": w})
    q, report = quantize(model, [{"x": x.astype(np.float32)}])
    assert report.stats("quantize-qdq") == {f"quantized:{op}": 1}
    layer = next(n for n in q.graph.node if n.name == "layer")
    wq, ws, got_axis = assert_int8_weight(q, layer.input[1])
    assert got_axis == axis
    assert ws.tolist() == scales
    assert wq.tolist() == codes


def test_bias_is_int32_at_input_times_weight_scale() -> None:
    model = conv_net()
    q, _ = quantize(model, image_feeds(4))
    values, prod = inits(q), producers(q)
    conv = next(n for n in q.graph.node if n.name == "conv1")
    qx, _ = assert_qdq_input(q, conv.input[0])
    _, ws, axis = assert_int8_weight(q, conv.input[1])
    assert axis == 0
    dq_b = prod[conv.input[2]]
    bq, bs = values[dq_b.input[0]], values[dq_b.input[1]]
    assert bq.dtype == np.int32
    expect_scale = (values[qx.input[1]] * ws).astype(np.float32)
    np.testing.assert_array_equal(bs, expect_scale)
    b = inits(model)["B1"]
    np.testing.assert_array_equal(
        bq, np.round(b / expect_scale.astype(np.float64)).astype(np.int32)
    )


def test_percentile_scale_matches_numpy_percentile() -> None:
    model, _ = mlp()
    rng = np.random.default_rng(4)
    calib = [{"x": rng.standard_normal((4, 64, 16)).astype(np.float32)} for _ in range(8)]
    q, _ = quantize(model, calib, method="percentile", percentile=99.0)
    x = np.concatenate([f["x"].ravel() for f in calib])
    qx, _ = assert_qdq_input(q, next(n for n in q.graph.node if n.name == "mm1").input[0])
    lo, hi = np.percentile(x, 0.5), np.percentile(x, 99.5)
    width = (x.max() - x.min()) / 2048
    scale, zp = ort_dynamic_qparams(np.array([lo, hi]))
    np.testing.assert_allclose(inits(q)[qx.input[1]], scale, atol=3 * width / 255)
    assert abs(int(inits(q)[qx.input[2]]) - zp) <= 1


def test_mlp_fidelity_and_ort_fusion(tmp_path: Path) -> None:
    model, _ = mlp()
    q, report = quantize(model, seq_feeds(6))
    assert report.stats("quantize-qdq") == {"quantized:MatMul": 2, "folded-activations": 1}
    assert op_histogram(q) == {"DequantizeLinear": 4, "MatMul": 2, "QuantizeLinear": 2}
    assert_fully_quantized(q)
    held = seq_feeds(3, seed=7)
    for out_q, out_f in zip(run_model(q, held), run_model(model, held), strict=False):
        assert cosine(out_q[0], out_f[0]) >= 0.99
    fused = ort_optimized_ops(q, tmp_path)
    integer_kernels = {
        "com.microsoft::MatMulIntegerToFloat",
        "QLinearMatMul",
        "MatMulInteger",
        "com.microsoft::DynamicQuantizeMatMul",
    }
    assert sum(fused.get(k, 0) for k in integer_kernels) == 2
    assert "MatMul" not in fused


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_histogram_methods_give_ranges_within_minmax(method: str) -> None:
    model = conv_net()
    calib = image_feeds(4)
    notes_minmax = _notes(model, calib)
    notes = _notes(model, calib, method=method)
    assert notes["ranges"].keys() == notes_minmax["ranges"].keys()
    for name, (lo, hi) in notes["ranges"].items():
        mlo, mhi = notes_minmax["ranges"][name]
        assert mlo <= lo <= hi <= mhi, name


def _notes(model: onnx.ModelProto, calib, **options) -> dict:
    graph = to_graph(model)
    from onnxopt.shapes import apply_shapes

    apply_shapes(graph, model)
    ctx = PassContext(names=NameGenerator(graph), opset=17, calibration=calib)
    ctx.notes["source_model"] = model
    QuantizeQDQPass(QuantizeQDQPass.Options(**options)).run(graph, ctx)
    return ctx.notes["quantize-qdq"]


def test_notes_list_quantized_skipped_and_ranges() -> None:
    model = conv_net()
    notes = _notes(model, image_feeds(2), exclude=("fc",))
    # with fc in float, MaxPool's output reaches no quantized op: it stays float too
    assert notes["quantized"] == ["conv1", "conv2"]
    assert notes["skipped"] == {"fc": "excluded"}
    assert set(notes["ranges"]) == {"x", "r1", "r2"}
    assert notes["ranges"]["r1"][0] == 0.0


def test_excluded_node_stays_float() -> None:
    model = conv_net()
    q, report = quantize(model, image_feeds(2), exclude=("conv2", "fc"))
    assert report.stats("quantize-qdq") == {
        "quantized:Conv": 1,
        "skipped:excluded": 2,
        "folded-activations": 1,
    }
    prod, values = producers(q), inits(q)
    conv2 = next(n for n in q.graph.node if n.name == "conv2")
    assert conv2.input[1] == "W2"
    assert values["W2"].dtype == np.float32
    assert prod["r1"].op_type == "DequantizeLinear"  # conv1's output is still quantized
    assert "Relu" in op_histogram(q)


def test_constant_node_weights() -> None:
    model = conv_net(constant_nodes=True)
    q, report = quantize(model, image_feeds(2))
    assert report.stats("quantize-qdq")["quantized:Conv"] == 2
    assert "Constant" not in op_histogram(q)
    assert_fully_quantized(q)
    for out_q, out_f in zip(
        run_model(q, image_feeds(2, 5)), run_model(model, image_feeds(2, 5)), strict=False
    ):
        assert cosine(out_q[0], out_f[0]) >= 0.99


def test_opset_11_model_is_upgraded(caplog: pytest.LogCaptureFixture) -> None:
    model = conv_net(opset=11)
    with caplog.at_level("WARNING"):
        q, report = quantize(model, image_feeds(2))
    assert "upgraded the model from opset 11 to 13" in caplog.text
    assert next(i.version for i in q.opset_import if i.domain == "") == 13
    assert report.stats("quantize-qdq")["quantized:Conv"] == 2
    assert_fully_quantized(q)
    onnx.checker.check_model(q)


def test_check_refuses_opset_below_13_when_called_directly() -> None:
    graph = to_graph(conv_net(opset=11))
    ctx = PassContext(names=NameGenerator(graph), opset=11, calibration=image_feeds(1))
    with pytest.raises(PreconditionError, match="upgrade_opset"):
        QuantizeQDQPass().check(graph, ctx)


def test_requires_calibration_data() -> None:
    with pytest.raises(MissingRequirementError, match="calibration"):
        optimize(conv_net(), passes=["quantize-qdq"])


def test_second_run_changes_nothing() -> None:
    model = conv_net()
    q, _ = quantize(model, image_feeds(2))
    q2, report = quantize(q, image_feeds(2))
    assert report.stats("quantize-qdq") == {"skipped:already-quantized": 3}
    assert not any(r.changed for r in report.records)
    assert op_histogram(q2) == op_histogram(q)


def test_prequantized_model_is_left_alone() -> None:
    rng = np.random.default_rng(0)
    wq = rng.integers(-127, 127, (4, 3, 3, 3)).astype(np.int8)
    w2 = rng.standard_normal((4, 4, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "sw"], ["wd"]),
        helper.make_node("Conv", ["xd", "wd"], ["c"], name="preq"),
        helper.make_node("QuantizeLinear", ["c", "sx", "zx"], ["cq"]),
        helper.make_node("DequantizeLinear", ["cq", "sx", "zx"], ["cd"]),
        helper.make_node("Conv", ["cd", "w2"], ["y"], name="float_conv"),
    ]
    consts = {
        "sx": np.array(0.05, np.float32),
        "zx": np.array(128, np.uint8),
        "wq": wq,
        "sw": np.array(0.01, np.float32),
        "w2": w2,
    }
    model = make_model(nodes, [vi("x", [1, 3, 5, 5])], [vi("y", [1, 4, 3, 3])], consts)
    q, report = quantize(model, [{"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)}])
    # both Convs read a DQ output already: neither is quantized again
    assert report.stats("quantize-qdq") == {"skipped:already-quantized": 2}
    assert op_histogram(q) == op_histogram(model)


def test_if_branch_compute_stays_float() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["h", "w"], ["t"])], "then", [], [vi("t", [2, 4])]
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["h"], ["e"])], "else", [], [vi("e", [2, 4])]
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="outer"),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
    ]
    model = make_model(
        nodes, [vi("x", [2, 4]), vi("cond", [], onnx.TensorProto.BOOL)], [vi("y", [2, 4])], {"w": w}
    )
    feeds = [{"x": rng.standard_normal((2, 4)).astype(np.float32), "cond": np.array(True)}]
    q, report = quantize(model, feeds)
    # the outer MatMul shares w with the branch's MatMul, which stays float
    assert report.stats("quantize-qdq") == {"skipped:subgraph": 1, "skipped:shared-weight": 1}
    assert op_histogram(q) == op_histogram(model)
    # with its own weight, the outer MatMul is quantized and the branch still reads h
    model = make_model(
        [helper.make_node("MatMul", ["x", "w0"], ["h"], name="outer"), nodes[1]],
        [vi("x", [2, 4]), vi("cond", [], onnx.TensorProto.BOOL)],
        [vi("y", [2, 4])],
        {"w": w, "w0": w.copy()},
    )
    q, report = quantize(model, feeds)
    assert report.stats("quantize-qdq") == {"skipped:subgraph": 1, "quantized:MatMul": 1}
    branch = next(
        a.g
        for n in q.graph.node
        if n.op_type == "If"
        for a in n.attribute
        if a.name == "then_branch"
    )
    assert [n.op_type for n in branch.node] == ["MatMul"]
    for cond in (True, False):
        f = [{"x": feeds[0]["x"], "cond": np.array(cond)}]
        assert cosine(run_model(q, f)[0][0], run_model(model, f)[0][0]) >= 0.99


def test_shared_activation_gets_one_qdq_pair_and_shared_weight_one_copy() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], name="a"),
        helper.make_node("Conv", ["x", "w"], ["b"], name="b"),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4, 4, 4])], {"w": w})
    q, report = quantize(model, [{"x": rng.standard_normal((1, 3, 4, 4)).astype(np.float32)}])
    assert report.stats("quantize-qdq") == {"quantized:Conv": 2}
    # x: one Q/DQ; a, b: one each (Conv outputs); w: one int8 copy behind one DQ
    assert op_histogram(q) == {"Add": 1, "Conv": 2, "DequantizeLinear": 4, "QuantizeLinear": 3}
    assert [v.dtype == np.int8 and v.shape == w.shape for v in inits(q).values()].count(True) == 1
    convs = [n for n in q.graph.node if n.op_type == "Conv"]
    assert convs[0].input == convs[1].input


def test_weight_shared_with_float_consumer_is_declined() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "w"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [4, 4])], [vi("y", [4, 4])], {"w": w})
    q, report = quantize(model, [{"x": rng.standard_normal((4, 4)).astype(np.float32)}])
    assert report.stats("quantize-qdq") == {"skipped:shared-weight": 1}
    assert op_histogram(q) == op_histogram(model)


def test_conv_output_that_is_graph_output_and_intermediate() -> None:
    rng = np.random.default_rng(0)
    w = {
        "w1": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "w2": rng.standard_normal((4, 4, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),  # not folded: c is also a graph output
        helper.make_node("Conv", ["r", "w2"], ["y"]),
    ]
    model = make_model(
        nodes, [vi("x", [1, 3, 5, 5])], [vi("y", [1, 4, 5, 5]), vi("c", [1, 4, 5, 5])], w
    )
    feeds = [{"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)} for _ in range(2)]
    q, report = quantize(model, feeds)
    assert report.stats("quantize-qdq") == {"quantized:Conv": 2}
    assert [o.name for o in q.graph.output] == ["y", "c"]
    assert op_histogram(q)["Relu"] == 1
    assert_qdq_input(q, "c")
    assert_qdq_input(q, "r")
    for out_q, out_f in zip(run_model(q, feeds), run_model(model, feeds), strict=False):
        assert cosine(out_q[0], out_f[0]) >= 0.99
        assert cosine(out_q[1], out_f[1]) >= 0.99


def test_declines_unfolded_batchnorm_and_dynamic_weight() -> None:
    rng = np.random.default_rng(0)
    c = 4
    bn = {"g": np.ones(c), "b": np.zeros(c), "m": np.zeros(c), "v": np.ones(c)}
    consts = {k: v.astype(np.float32) for k, v in bn.items()}
    consts["w"] = rng.standard_normal((c, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv_bn"),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"]),
        helper.make_node("Conv", ["n", "wd"], ["y"], name="conv_dyn"),
    ]
    model = make_model(
        nodes, [vi("x", [1, 3, 5, 5]), vi("wd", [4, 4, 1, 1])], [vi("y", [1, 4, 3, 3])], consts
    )
    feeds = [
        {
            "x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32),
            "wd": rng.standard_normal((4, 4, 1, 1)).astype(np.float32),
        }
    ]
    q, report = quantize(model, feeds)
    assert report.stats("quantize-qdq") == {
        "skipped:batchnorm-not-folded": 1,
        "skipped:dynamic-weight": 1,
    }
    assert report.records[0].changed is False
    assert op_histogram(q) == op_histogram(model)


def test_varying_shape_calibration_feeds() -> None:
    model, _ = mlp()
    feeds = [
        {
            "x": np.random.default_rng(s)
            .standard_normal((1 + s % 2, 3 + 4 * s, 16))
            .astype(np.float32)
        }
        for s in range(5)
    ]
    q, report = quantize(model, feeds)
    assert report.stats("quantize-qdq")["quantized:MatMul"] == 2
    for f in feeds:
        assert cosine(run_model(q, [f])[0][0], run_model(model, [f])[0][0]) >= 0.99


def test_weight_heavy_model_shrinks_about_4x() -> None:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    w = {
        "w1": rng.standard_normal((256, 512)).astype(np.float32) * 0.05,
        "w2": rng.standard_normal((512, 256)).astype(np.float32) * 0.05,
    }
    model = make_model(nodes, [vi("x", ["N", 256])], [vi("y", ["N", 256])], w)
    q, _ = quantize(model, [{"x": rng.standard_normal((8, 256)).astype(np.float32)}])
    assert q.ByteSize() * 3.8 < model.ByteSize()


def test_nothing_to_do() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    model = make_model(nodes, [vi("x", [2, 2])], [vi("y", [2, 2])])
    q, report = quantize(model, [{"x": np.ones((2, 2), np.float32)}])
    assert report.stats("quantize-qdq") == {}
    assert not report.records[0].changed
    assert op_histogram(q) == {"Relu": 1}


def test_int8_symmetric_activations_keep_relu() -> None:
    model = conv_net()
    q, report = quantize(model, image_feeds(2), activation_type="int8", activation_symmetric=True)
    assert "folded-activations" not in report.stats("quantize-qdq")
    assert op_histogram(q)["Relu"] == 2
    values = inits(q)
    zps = [values[n.input[2]] for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert all(z.dtype == np.int8 and z == 0 for z in zps)
    held = image_feeds(2, seed=3)
    assert cosine(run_model(q, held)[0][0], run_model(model, held)[0][0]) >= 0.99


DEMO = ROOT / "models" / "digits_cnn.onnx"


@pytest.mark.skipif(
    not (DEMO.exists() and DEMO.with_name("digits_val.npz").exists()), reason="demo model not built"
)
def test_demo_model_accuracy_drop_below_one_point(tmp_path: Path) -> None:
    model = onnx.load(str(DEMO))
    data = np.load(DEMO.with_name("digits_val.npz"))
    images, labels = data["image"], data["labels"]
    half = len(images) // 2
    calib = [{"image": images[i : i + 32]} for i in range(0, half, 32)]
    q, report = optimize(model, level=1, passes=[("quantize-qdq", {})], calibration=calib)
    assert report.stats("quantize-qdq")["quantized:Conv"] == 3
    assert q.ByteSize() < model.ByteSize() / 2

    def accuracy(m: onnx.ModelProto) -> float:
        logits = run_model(m, [{"image": images[half:]}])[0][0]
        return float((logits.argmax(1) == labels[half:]).mean() * 100)

    assert accuracy(model) - accuracy(q) < 1.0
    fused = ort_optimized_ops(q, tmp_path)
    assert fused.get("com.microsoft::QLinearConv") == 3


def test_residual_add_concat_and_pool_stay_in_int8(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = {k: (rng.standard_normal(s) * 0.3).astype(np.float32) for k, s in
         {"wt": (8, 4, 2, 2), "wc": (4, 4, 3, 3), "wd": (4, 4, 3, 3), "wg": (8, 5)}.items()}
    w["cg"] = rng.standard_normal(5).astype(np.float32)
    nodes = [
        helper.make_node("ConvTranspose", ["x", "wt"], ["t"], strides=[2, 2], name="up"),
        helper.make_node("Conv", ["t", "wc"], ["c"], pads=[1, 1, 1, 1], name="c"),
        helper.make_node("Add", ["c", "t"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["ar"]),
        helper.make_node("Conv", ["ar", "wd"], ["d"], pads=[1, 1, 1, 1], name="d"),
        helper.make_node("Concat", ["d", "ar"], ["cc"], axis=1, name="concat"),
        helper.make_node("GlobalAveragePool", ["cc"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wg", "cg"], ["y"], beta=0.5, name="fc"),
    ]
    model = make_model(nodes, [vi("x", [1, 8, 6, 6])], [vi("y", [1, 5])], w)
    feeds = [{"x": rng.standard_normal((1, 8, 6, 6)).astype(np.float32)} for _ in range(6)]
    q, report = quantize(model, feeds)
    assert report.stats("quantize-qdq") == {
        "quantized:ConvTranspose": 1, "quantized:Conv": 2, "quantized:Gemm": 1,
        "quantized:Add": 1, "quantized:Concat": 1, "quantized:GlobalAveragePool": 1,
        "quantized:Flatten": 1, "folded-activations": 1,
    }
    assert_fully_quantized(q)
    up = next(n for n in q.graph.node if n.name == "up")
    assert assert_int8_weight(q, up.input[1])[2] == 1  # ConvTranspose: output channels on axis 1
    fc = next(n for n in q.graph.node if n.name == "fc")
    assert assert_int8_weight(q, fc.input[1])[2] == 1  # Gemm without transB: [K, N]
    assert next(a.f for a in fc.attribute if a.name == "beta") == 1.0  # beta folded into C
    held = [{"x": rng.standard_normal((1, 8, 6, 6)).astype(np.float32)} for _ in range(3)]
    for out_q, out_f in zip(run_model(q, held), run_model(model, held)):
        assert cosine(out_q[0], out_f[0]) >= 0.99
    fused = ort_optimized_ops(q, tmp_path)
    for op in ("QLinearConv", "QLinearAdd", "QLinearConcat", "QLinearGlobalAveragePool", "QGemm"):
        assert f"com.microsoft::{op}" in fused, op


def test_fused_int8_kernels_match_the_qdq_graph_on_this_cpu() -> None:
    """7-bit weights (reduce_range) keep onnxruntime's fused int8 kernels exact.

    On x86 without VNNI, QLinearConv/QGemm accumulate pairs of u8*s8 products in int16 with
    saturation; full-range weights then drift from the QDQ graph's own semantics.
    """
    from pathlib import Path

    import onnx as _onnx

    from onnxopt import optimize as _optimize
    from onnxopt.data import load
    from onnxopt.runtime import session

    root = Path(__file__).resolve().parents[2] / "models"
    model = _onnx.load(root / "digits_cnn.onnx")
    calib, evaluation = load(root / "digits_val.npz", model).split(0.5)
    q, _ = _optimize(model, level=1, passes=[("quantize-qdq", {})], calibration=calib.feeds)
    fused, plain = session(q, optimize=True), session(q, optimize=False)
    a = np.concatenate([fused.run(None, f)[0] for f in evaluation.feeds]).ravel()
    b = np.concatenate([plain.run(None, f)[0] for f in evaluation.feeds]).ravel()
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99999


def test_calibration_cache_measures_each_range_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver quantizes one float model many times: a shared cache calibrates each tensor once."""
    import onnxopt.passes.quantize_qdq as qdq
    from onnxopt.manager import PassManager, resolve

    asked: list[list[str]] = []
    real = qdq.collect_ranges

    def counting(model, feeds, names, *args, **kwargs):
        asked.append(sorted(names))
        return real(model, feeds, names, *args, **kwargs)

    monkeypatch.setattr(qdq, "collect_ranges", counting)
    model, feeds, cache = conv_net(), image_feeds(3), {}

    def run(exclude: tuple[str, ...], method: str = "minmax") -> onnx.ModelProto:
        opts = {"exclude": exclude, "method": method}
        return PassManager((), resolve(None, [("quantize-qdq", opts)])[1]).run(
            model, calibration=feeds, calibration_cache=cache
        )[0]

    partial = run(("conv2", "fc"))  # conv1 alone: its input and its (Relu-folded) output
    full = run(())  # adds conv2's output only (MaxPool shares its scale)
    again = run(())
    assert asked == [["r1", "x"], ["r2"]]
    # cached ranges give the same model as a fresh calibration
    assert again.SerializeToString() == full.SerializeToString()
    fresh, _ = quantize(model, feeds)
    assert inits(full).keys() == inits(fresh).keys()
    for name, value in inits(fresh).items():
        np.testing.assert_array_equal(inits(full)[name], value)
    assert op_histogram(partial)["QuantizeLinear"] < op_histogram(full)["QuantizeLinear"]
    run((), method="percentile")  # other settings: their own entry
    assert asked[-1] == ["r1", "r2", "x"] and len(cache) == 2


# ---- embedding tables ----


def embedding_model(vocab: int = 1000, dim: int = 16, tied: bool = False, axis: int = 0) -> onnx.ModelProto:
    """ids[N,T] -> Gather(table) -> MatMul(W) -> y; ``tied``: the table is also the output projection."""
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((vocab, dim)) * rng.uniform(0.05, 2.0, (vocab, 1))).astype(np.float32)
    w = rng.standard_normal((dim, 8)).astype(np.float32)
    if axis:
        table = np.ascontiguousarray(table.T)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], axis=axis, name="embed"),
             helper.make_node("MatMul", ["e", "W"], ["y"], name="proj")]
    outputs = [vi("y", ["N", "T", 8] if not axis else [dim, "N", "T", 8])]
    if tied:
        nodes.append(helper.make_node("Transpose", ["table"], ["tT"], perm=[1, 0], name="tie"))
        nodes.append(helper.make_node("MatMul", ["e", "tT"], ["logits"], name="lm_head"))
        outputs.append(vi("logits", ["N", "T", vocab]))
    inputs = [vi("ids", ["N", "T"], onnx.TensorProto.INT64)]
    return make_model(nodes, inputs, outputs, {"table": table, "W": w})


def id_feeds(n: int, vocab: int = 1000) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"ids": rng.integers(0, vocab, (2, int(t))).astype(np.int64)} for t in rng.integers(3, 9, n)]


def test_embedding_table_is_stored_int8_with_per_row_scales() -> None:
    model = embedding_model()
    q, report = quantize(model, id_feeds(4), op_types=())
    assert report.stats("quantize-qdq") == {"quantized:Gather": 1}
    values = inits(q)
    assert "table" not in values  # no float copy beside the int8 one
    (qtable,) = [v for v in values.values() if v.dtype == np.int8]
    (scales,) = [v for k, v in values.items() if k.endswith("_scales")]
    table = inits(model)["table"]
    assert qtable.shape == table.shape and scales.shape == (1000, 1)
    np.testing.assert_allclose(scales[:, 0], np.abs(table).max(1) / 127, rtol=1e-6)
    np.testing.assert_array_equal(qtable, ort_quantize_int8(table, scales[:, 0], axis=0))
    assert op_histogram(q) == {"Gather": 2, "Cast": 1, "Mul": 1, "MatMul": 1}
    # exactly the float model run on the dequantized table, for any ids, lengths included
    dequantized = make_model(list(model.graph.node), list(model.graph.input), list(model.graph.output),
                             {"table": qtable.astype(np.float32) * scales, "W": inits(model)["W"]})
    for feed in id_feeds(3):
        np.testing.assert_allclose(run_model(q, [feed])[0][0], run_model(dequantized, [feed])[0][0],
                                   rtol=1e-6, atol=1e-6)
        ref, got = run_model(model, [feed])[0][0], run_model(q, [feed])[0][0]
        assert float(np.sum(ref * got) / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.9999
    assert q.ByteSize() < 0.35 * model.ByteSize()


def test_embedding_table_shared_with_a_tied_projection_stays_float() -> None:
    q, report = quantize(embedding_model(tied=True), id_feeds(2), op_types=())
    assert report.stats("quantize-qdq") == {"skipped:shared-weight": 1}
    assert inits(q)["table"].dtype == np.float32 and "Cast" not in op_histogram(q)


def test_embedding_declines_small_tables_other_axes_and_exclusions() -> None:
    small, _ = quantize(embedding_model(vocab=100), id_feeds(2, vocab=100), op_types=())
    assert inits(small)["table"].dtype == np.float32  # 1,600 values: below gather_min_elements
    _, report = quantize(embedding_model(axis=1), [{"ids": np.array([[1, 2]], np.int64)}], op_types=())
    assert report.stats("quantize-qdq") == {"skipped:gather-axis": 1}
    _, report = quantize(embedding_model(), id_feeds(2), op_types=(), exclude=("embed",))
    assert report.stats("quantize-qdq") == {"skipped:excluded": 1}
    off, _ = quantize(embedding_model(), id_feeds(2), gather=False)
    assert inits(off)["table"].dtype == np.float32


def test_embedding_table_feeding_a_quantized_matmul_is_quantized_too() -> None:
    """The transformer input: the looked-up rows get the MatMul's Q/DQ pair after the table's rewrite."""
    model = embedding_model()
    q, report = quantize(model, id_feeds(4))
    assert report.stats("quantize-qdq") == {"quantized:Gather": 1, "quantized:MatMul": 1}
    assert inits(q).get("table") is None
    for feed in id_feeds(2):
        ref, got = run_model(model, [feed])[0][0], run_model(q, [feed])[0][0]
        assert float(np.sum(ref * got) / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.999
