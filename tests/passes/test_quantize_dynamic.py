from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import optimize
from onnxopt.testing import (
    assert_declined,
    make_model,
    mlp_model,
    op_histogram,
    random_feeds,
    run_model,
    vi,
)

PASS = "quantize-dynamic"
CHAIN = {"Cast": 1, "DynamicQuantizeLinear": 1, "MatMulInteger": 1, "Mul": 2}


def matmul_model(
    k: int = 32,
    n: int = 16,
    batch: int | str = 4,
    opset: int = 17,
    constant_node: bool = False,
    output_also_read: bool = False,
    seed: int = 0,
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    nodes, inits = [], {}
    if constant_node:
        nodes.append(helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w)))
    else:
        inits["W"] = w
    nodes.append(helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"))
    outputs = [vi("y", [batch, n])]
    if output_also_read:
        nodes.append(helper.make_node("Relu", ["y"], ["z"]))
        outputs.append(vi("z", [batch, n]))
    return make_model(nodes, [vi("x", [batch, k])], outputs, inits, opset=opset)


def ort_quantize_linear(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """onnxruntime's QuantizeLinear to int8 along axis 1 (round half to even, saturate)."""
    zero = np.zeros_like(scale, np.int8)
    inits = [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z")]
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["q"], axis=1)],
        "quantize",
        [vi("w", list(w.shape))],
        [vi("q", list(w.shape), TensorProto.INT8)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"w": w})[0]


def reference_weight(w: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """The pass's contract for a [K, N] weight: scale = max|W| / 64 per column (or one), codes
    by onnxruntime's QuantizeLinear with zero point 0; independent of the pass's helpers."""
    amax = np.abs(w).max(axis=0) if per_channel else np.abs(w).max()
    scale = (np.asarray(amax, np.float32) / np.float32(64)).astype(np.float32)
    return ort_quantize_linear(w, scale), scale


def simulate(x: np.ndarray, w: np.ndarray, per_channel: bool = True) -> np.ndarray:
    """DynamicQuantizeLinear + MatMulInteger + scale, as the ONNX spec defines them."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    xs = np.float32((hi - lo) / 255)
    xz = np.clip(np.rint(-lo / xs), 0, 255)
    xq = np.clip(np.rint(x / xs) + xz, 0, 255)
    wq, ws = reference_weight(w, per_channel)
    acc = (xq - xz).astype(np.int64) @ wq.astype(np.int64)
    return (acc.astype(np.float32) * (xs * ws)).astype(np.float32)


def stored_weight(model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray]:
    """The quantized model's one int8 [K, N] weight and its one float32 scale."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    int8 = [v for v in inits.values() if v.dtype == np.int8 and v.ndim == 2]
    scales = [v for v in inits.values() if v.dtype == np.float32]
    assert len(int8) == 1
    assert len(scales) == 1
    return int8[0], scales[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def outputs(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    return np.concatenate([r[0].ravel() for r in run_model(model, feeds)])


@pytest.mark.parametrize("per_channel", [True, False])
def test_matmul_matches_numpy_simulation(per_channel: bool) -> None:
    model = matmul_model()
    quantized, report = optimize(model, passes=[f"{PASS}:per_channel={per_channel}"])
    assert op_histogram(quantized) == CHAIN
    assert report.stats(PASS) == {"quantized-matmul": 1}
    w = numpy_helper.to_array(model.graph.initializer[0])
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    assert not any(
        v.dtype == np.float32 and v.shape == w.shape for v in inits.values()
    )  # no float copy
    wq, ws = reference_weight(w, per_channel)
    stored_q, stored_s = stored_weight(quantized)
    np.testing.assert_array_equal(stored_q, wq)
    np.testing.assert_allclose(stored_s, ws, rtol=1e-7)
    assert stored_s.shape == ((16,) if per_channel else ())
    for feed in random_feeds(model, 2):
        got = run_model(quantized, [feed])[0][0]
        np.testing.assert_allclose(got, simulate(feed["x"], w, per_channel), rtol=1e-4, atol=1e-4)


# a [K=3, N=2] weight whose codes are worked out by hand: column 0 has max|w| = 32, column 1
# max|w| = 16, so with Q = 64 the scales are 0.5 and 0.25 and 1.25 / 0.5, -0.75 / 0.5,
# 0.375 / 0.25, 0.125 / 0.25 land exactly on .5: round half to even gives 2, -2, 2, 0
HAND_W = np.array([[32.0, -16.0], [1.25, 0.375], [-0.75, 0.125]], np.float32)


@pytest.mark.parametrize(
    ("options", "scale", "codes"),
    [
        ({}, [0.5, 0.25], [[64, -64], [2, 2], [-2, 0]]),
        ({"per_channel": False}, 0.5, [[64, -32], [2, 1], [-2, 0]]),
        # Q = 127: 1.25 * 127 / 32 = 4.96, -0.75 * 127 / 32 = -2.98, 0.375 * 127 / 16 = 2.98,
        # 0.125 * 127 / 16 = 0.99
        ({"reduce_range": False}, [32 / 127, 16 / 127], [[127, -127], [5, 3], [-3, 1]]),
    ],
)
def test_weight_codes_and_scales_worked_out_by_hand(
    options: dict[str, bool], scale: float | list[float], codes: list[list[int]]
) -> None:
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    model = make_model([node], [vi("x", [1, 3])], [vi("y", [1, 2])], {"W": HAND_W})
    quantized, report = optimize(model, passes=[(PASS, options)])
    assert report.stats(PASS) == {"quantized-matmul": 1}
    stored_q, stored_s = stored_weight(quantized)
    assert stored_q.tolist() == codes
    np.testing.assert_array_equal(stored_s, np.asarray(scale, np.float32))


@pytest.mark.parametrize("rank", [2, 3])
def test_mlp_cosine_against_float(rank: int) -> None:
    model = mlp_model(sizes=(64, 128, 128, 32), rank=rank)
    quantized, report = optimize(model, passes=[PASS])
    assert report.stats(PASS) == {"quantized-matmul": 3}
    assert report.notes[PASS] == {"quantized": ["fc0", "fc1", "fc2"], "skipped": {}}
    assert op_histogram(quantized) == {
        "Add": 3,
        "Cast": 3,
        "DynamicQuantizeLinear": 3,
        "MatMulInteger": 3,
        "Mul": 6,
        "Relu": 2,
    }
    feeds = random_feeds(model, 4)
    assert cosine(outputs(model, feeds), outputs(quantized, feeds)) >= 0.99


def test_gemm_transb_alpha_beta_bias() -> None:
    rng = np.random.default_rng(1)
    w, c = (
        rng.standard_normal((16, 32)).astype(np.float32),
        rng.standard_normal(16).astype(np.float32),
    )
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="g", transB=1, alpha=0.5, beta=2.0)
    model = make_model([node], [vi("x", [4, 32])], [vi("y", [4, 16])], {"W": w, "C": c})
    quantized, report = optimize(model, passes=[PASS])
    assert report.stats(PASS) == {"quantized-gemm": 1}
    assert op_histogram(quantized) == {**CHAIN, "Add": 1}
    for feed in random_feeds(model, 2):
        expected = simulate(feed["x"], w.T) * 0.5 + 2.0 * c
        np.testing.assert_allclose(
            run_model(quantized, [feed])[0][0], expected, rtol=1e-4, atol=1e-4
        )


def test_shared_weight_and_activation_quantized_once() -> None:
    w = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"], name="q"),
        helper.make_node("MatMul", ["x", "W"], ["b"], name="k"),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [4, 32])], [vi("y", [4, 16])], {"W": w})
    quantized, report = optimize(model, passes=[PASS])
    assert report.stats(PASS) == {"quantized-matmul": 2}
    assert op_histogram(quantized) == {
        "Add": 1,
        "Cast": 2,
        "DynamicQuantizeLinear": 1,
        "MatMulInteger": 2,
        "Mul": 4,
    }
    assert (
        sum(
            numpy_helper.to_array(t).dtype == np.int8 and len(t.dims) == 2
            for t in quantized.graph.initializer
        )
        == 1
    )
    feeds = random_feeds(model, 2)
    assert cosine(outputs(model, feeds), outputs(quantized, feeds)) >= 0.999


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_opsets_constant_node_weight_dynamic_batch_and_output_read_twice(opset: int) -> None:
    model = matmul_model(opset=opset, constant_node=True, batch="N", output_also_read=True)
    quantized, report = optimize(model, passes=[PASS])
    assert report.stats(PASS) == {"quantized-matmul": 1}
    assert op_histogram(quantized) == {**CHAIN, "Relu": 1}
    assert [o.name for o in quantized.graph.output] == ["y", "z"]
    feeds = random_feeds(model, 2, shapes={"x": (3, 32)})
    assert cosine(outputs(model, feeds), outputs(quantized, feeds)) >= 0.999


def test_matmul_inside_if_branch_reading_outer_scope() -> None:
    w = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    then = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["t"], name="inner")],
        "then",
        [],
        [vi("t", [4, 16])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["zeros"], ["e"])], "else", [], [vi("e", [4, 16])]
    )
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)]
    model = make_model(
        nodes,
        [vi("x", [4, 32]), vi("cond", [], TensorProto.BOOL)],
        [vi("y", [4, 16])],
        {"W": w, "zeros": np.zeros((4, 16), np.float32)},
    )
    quantized, report = optimize(model, passes=[PASS])
    assert report.stats(PASS) == {"quantized-matmul": 1}
    assert op_histogram(quantized) == {**CHAIN, "Identity": 1, "If": 1}
    x = np.random.default_rng(2).standard_normal((4, 32)).astype(np.float32)
    got = run_model(quantized, [{"x": x, "cond": np.array(True)}])[0][0]
    assert cosine(run_model(model, [{"x": x, "cond": np.array(True)}])[0][0], got) >= 0.999


def _declined(model: onnx.ModelProto, reason: str, spec: str = PASS) -> None:
    assert_declined(model, PASS, reason, spec)


def test_declines_excluded_node() -> None:
    _declined(matmul_model(), "excluded", f"{PASS}:exclude=mm")


def test_declines_opset_below_11() -> None:
    _declined(matmul_model(opset=10), "opset-below-11")


def test_declines_weight_not_constant() -> None:
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    _declined(
        make_model([node], [vi("x", [4, 32]), vi("W", [32, 16])], [vi("y", [4, 16])]),
        "weight-not-constant",
    )


def test_declines_weight_not_2d() -> None:
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    w = np.ones((2, 32, 16), np.float32)
    _declined(
        make_model([node], [vi("x", [2, 4, 32])], [vi("y", [2, 4, 16])], {"W": w}), "weight-not-2d"
    )


def test_declines_weight_not_float32() -> None:
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    model = make_model(
        [node],
        [vi("x", [4, 32], TensorProto.DOUBLE)],
        [vi("y", [4, 16], TensorProto.DOUBLE)],
        {"W": np.ones((32, 16), np.float64)},
    )
    _declined(model, "weight-not-float32")


def test_declines_input_of_unknown_dtype() -> None:
    nodes = [
        helper.make_node("Mystery", ["x"], ["h"], domain="custom"),
        helper.make_node("MatMul", ["h", "W"], ["y"]),
    ]
    model = make_model(
        nodes,
        [vi("x", [4, 32])],
        [vi("y", [4, 16])],
        {"W": np.ones((32, 16), np.float32)},
        extra_opsets={"custom": 1},
        check=False,
    )
    _declined(model, "input-not-float32")


def test_declines_gemm_trans_a_and_runtime_bias() -> None:
    w = np.ones((32, 16), np.float32)
    trans_a = helper.make_node("Gemm", ["x", "W"], ["y"], transA=1)
    _declined(
        make_model([trans_a], [vi("x", [32, 4])], [vi("y", [4, 16])], {"W": w}), "gemm-transA"
    )
    runtime_c = helper.make_node("Gemm", ["x", "W", "c"], ["y"])
    _declined(
        make_model([runtime_c], [vi("x", [4, 32]), vi("c", [16])], [vi("y", [4, 16])], {"W": w}),
        "gemm-bias-not-constant",
    )


def test_nothing_to_do_and_idempotent() -> None:
    relu = make_model(
        [helper.make_node("Relu", ["x"], ["y"])], [vi("x", [4, 8])], [vi("y", [4, 8])]
    )
    _, report = optimize(relu, passes=[PASS])
    assert report.stats(PASS) == {}
    assert not report.records[-1].changed
    once, _ = optimize(matmul_model(), passes=[PASS])
    twice, report = optimize(once, passes=[PASS])
    assert not report.records[-1].changed
    assert report.stats(PASS) == {}
    assert op_histogram(twice) == op_histogram(once)


def test_conv_is_left_alone_by_default() -> None:
    conv = helper.make_node("Conv", ["x", "W"], ["y"])
    model = make_model(
        [conv],
        [vi("x", [1, 3, 8, 8])],
        [vi("y", [1, 4, 6, 6])],
        {"W": np.ones((4, 3, 3, 3), np.float32)},
    )
    _, report = optimize(model, passes=[PASS])
    assert report.stats(PASS) == {}
    assert not report.records[-1].changed


def test_embedding_table_and_projection_both_quantized() -> None:
    """A transformer's input: Gather(word table) -> MatMul. The table is int8 with per-row scales."""
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((2000, 32)) * rng.uniform(0.05, 2.0, (2000, 1))).astype(np.float32)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    model = make_model(
        [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
         helper.make_node("MatMul", ["e", "W"], ["y"], name="proj")],
        [vi("ids", ["N", "T"], TensorProto.INT64)], [vi("y", ["N", "T", 16])], {"table": table, "W": w},
    )
    q, report = optimize(model, passes=[PASS])
    assert report.stats(PASS) == {"quantized-gather": 1, "quantized-matmul": 1}
    stored = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    assert "table" not in stored and sorted(v.shape for v in stored.values() if v.dtype == np.int8 and v.size > 16) == [(32, 16), (2000, 32)]
    assert q.ByteSize() < 0.3 * model.ByteSize()
    feeds = [{"ids": rng.integers(0, 2000, (2, int(t))).astype(np.int64)} for t in (3, 7)]
    assert cosine(outputs(model, feeds), outputs(q, feeds)) > 0.999
    _, off = optimize(model, passes=[(PASS, {"gather": False})])
    assert off.stats(PASS) == {"quantized-matmul": 1}


def test_embedding_table_also_read_inside_an_if_branch_stays_float() -> None:
    """The table feeds a Gather in the main graph and, by outer scope, one in an If branch."""
    table = np.random.default_rng(0).standard_normal((1000, 16)).astype(np.float32)
    out = [helper.make_tensor_value_info("b_out", TensorProto.FLOAT, ["M", 16])]
    then_g = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["b_out"])], "then", [], out)
    else_g = helper.make_graph([helper.make_node("Identity", ["e"], ["b_out"])], "else", [], out)
    model = make_model(
        [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
         helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="if")],
        [vi("ids", ["N"], TensorProto.INT64), vi("cond", [], TensorProto.BOOL)], [vi("y", ["M", 16])],
        {"table": table},
    )
    q, report = optimize(model, passes=[PASS])
    assert report.stats(PASS) == {"skipped:shared-weight": 1}
    for cond in (True, False):
        feed = {"ids": np.array([1, 5, 999], np.int64), "cond": np.array(cond)}
        np.testing.assert_array_equal(run_model(model, [feed])[0][0], run_model(q, [feed])[0][0])
