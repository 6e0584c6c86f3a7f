from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxopt.passes.quantize_weight_only import quantize_blockwise

from onnxopt import optimize
from onnxopt.errors import PreconditionError
from onnxopt.testing import (
    assert_declined,
    make_model,
    mlp_model,
    op_histogram,
    random_feeds,
    run_model,
    vi,
)

PASS = "quantize-weight-only"
NBITS = "com.microsoft::MatMulNBits"


def matmul_model(
    k: int = 64,
    n: int = 16,
    batch: int | str = 4,
    opset: int = 17,
    constant_node: bool = False,
    rank: int = 2,
    seed: int = 0,
) -> onnx.ModelProto:
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    nodes, inits = [], {}
    if constant_node:
        nodes.append(helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w)))
    else:
        inits["W"] = w
    nodes.append(helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"))
    lead = [batch] if rank == 2 else [batch, 3]
    return make_model(nodes, [vi("x", [*lead, k])], [vi("y", [*lead, n])], inits, opset=opset)


def weight(model: onnx.ModelProto) -> np.ndarray:
    return numpy_helper.to_array(model.graph.initializer[0])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("k", [64, 72])  # 72: the last block is zero-padded
def test_packs_as_the_spec_says_and_runs_the_dequantized_weight(
    bits: int, symmetric: bool, k: int
) -> None:
    model = matmul_model(k=k)
    quantized, report = optimize(
        model, passes=[f"{PASS}:bits={bits},symmetric={symmetric},block_size=32"]
    )
    assert op_histogram(quantized) == {NBITS: 1}
    assert report.stats(PASS) == {f"quantized-{bits}bit": 1}
    node = quantized.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"K": k, "N": 16, "bits": bits, "block_size": 32, "accuracy_level": 0}
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    blocks = -(-k // 32)
    b = inits[node.input[1]]
    assert b.dtype == np.uint8
    assert b.shape == (16, blocks, 32 * bits // 8)
    assert inits[node.input[2]].shape == (16 * blocks,)
    assert len(node.input) == (3 if symmetric else 4)
    if not symmetric:
        assert inits[node.input[3]].shape == (
            (16 * -(-blocks // 2),) if bits == 4 else (16 * blocks,)
        )
    assert not any(
        v.dtype == np.float32 and v.shape == (k, 16) for v in inits.values()
    )  # no float copy
    # the kernel computes x @ (the weight the packed codes stand for), to float rounding
    bq = quantize_blockwise(weight(model), bits, 32, symmetric)
    w_hat = bq.dequantize(k, bits, 32)
    feed = random_feeds(model, 1)[0]
    np.testing.assert_allclose(
        run_model(quantized, [feed])[0][0], feed["x"] @ w_hat, rtol=1e-4, atol=1e-4
    )
    # and the dequantized weight is within half a step of the original in every block
    step = bq.scales.reshape(16, blocks).repeat(32, axis=1)[:, :k].T
    assert np.all(np.abs(w_hat - weight(model)) <= step / 2 + 1e-6)


def test_int4_codes_low_nibble_first() -> None:
    # one column, one block: w[k] = k - 8 for k < 16, then zeros -> scale 1, zero point 8,
    # codes 0, 1, ..., 15, 8, 8, ...
    w = np.zeros((32, 1), np.float32)
    w[:16, 0] = np.arange(16) - 8.0
    bq = quantize_blockwise(w, 4, 32, symmetric=False)
    assert bq.scales.tolist() == [1.0]
    assert bq.packed.shape == (1, 1, 16)
    assert bq.packed[0, 0, :8].tolist() == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]
    assert bq.packed[0, 0, 8:].tolist() == [0x88] * 8
    assert bq.zero_points.tolist() == [0x08]  # one block, padded to a byte: high nibble 0
    assert np.array_equal(bq.dequantize(32, 4, 32), w)


@pytest.mark.parametrize(("bits", "floor"), [(8, 0.999), (4, 0.98)])
def test_mlp_cosine_against_float(bits: int, floor: float) -> None:
    model = mlp_model(sizes=(64, 128, 128, 32), rank=3)
    quantized, report = optimize(model, passes=[f"{PASS}:bits={bits}"])
    assert report.stats(PASS) == {f"quantized-{bits}bit": 3}
    assert report.notes[PASS] == {"quantized": ["fc0", "fc1", "fc2"], "skipped": {}}
    assert op_histogram(quantized) == {"Add": 3, "Relu": 2, NBITS: 3}
    feeds = random_feeds(model, 4)
    a = np.concatenate([r[0].ravel() for r in run_model(model, feeds)])
    b = np.concatenate([r[0].ravel() for r in run_model(quantized, feeds)])
    assert cosine(a, b) >= floor


def test_gemm_with_trans_b_alpha_beta_bias() -> None:
    rng = np.random.default_rng(1)
    w, c = (
        rng.standard_normal((16, 64)).astype(np.float32),
        rng.standard_normal(16).astype(np.float32),
    )
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="g", transB=1, alpha=0.5, beta=2.0)
    model = make_model([node], [vi("x", [4, 64])], [vi("y", [4, 16])], {"W": w, "C": c})
    quantized, report = optimize(model, passes=[f"{PASS}:bits=8"])
    assert report.stats(PASS) == {"quantized-8bit": 1}
    assert op_histogram(quantized) == {NBITS: 1}
    feed = random_feeds(model, 1)[0]
    w_hat = quantize_blockwise(w.T, 8, 32, False).dequantize(64, 8, 32)
    expected = 0.5 * feed["x"] @ w_hat + 2.0 * c
    np.testing.assert_allclose(run_model(quantized, [feed])[0][0], expected, rtol=1e-4, atol=1e-4)


def test_shared_weight_packed_once() -> None:
    w = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"]),
        helper.make_node("MatMul", ["x", "W"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [4, 64])], [vi("y", [4, 16])], {"W": w})
    quantized, report = optimize(model, passes=[PASS])
    assert report.stats(PASS) == {"quantized-4bit": 2}
    assert op_histogram(quantized) == {"Add": 1, NBITS: 2}
    assert (
        sum(
            t.data_type == TensorProto.UINT8 and len(t.dims) == 3
            for t in quantized.graph.initializer
        )
        == 1
    )


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_opsets_constant_node_weight_rank3_dynamic_batch(opset: int) -> None:
    model = matmul_model(opset=opset, constant_node=True, rank=3, batch="N")
    quantized, report = optimize(model, passes=[f"{PASS}:bits=8"])
    assert report.stats(PASS) == {"quantized-8bit": 1}
    assert op_histogram(quantized) == {NBITS: 1}
    feeds = random_feeds(model, 2, shapes={"x": (2, 3, 64)})
    a = np.concatenate([r[0].ravel() for r in run_model(model, feeds)])
    b = np.concatenate([r[0].ravel() for r in run_model(quantized, feeds)])
    assert cosine(a, b) >= 0.999


def test_matmul_inside_if_branch() -> None:
    w = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    then = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["t"])], "then", [], [vi("t", [4, 16])]
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["zeros"], ["e"])], "else", [], [vi("e", [4, 16])]
    )
    model = make_model(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
        [vi("x", [4, 64]), vi("cond", [], TensorProto.BOOL)],
        [vi("y", [4, 16])],
        {"W": w, "zeros": np.zeros((4, 16), np.float32)},
    )
    quantized, report = optimize(model, passes=[f"{PASS}:bits=8"])
    assert report.stats(PASS) == {"quantized-8bit": 1}
    assert op_histogram(quantized) == {"Identity": 1, "If": 1, NBITS: 1}
    feed = {
        "x": np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32),
        "cond": np.array(True),
    }
    assert cosine(run_model(model, [feed])[0][0], run_model(quantized, [feed])[0][0]) >= 0.999


def _declined(model: onnx.ModelProto, reason: str, spec: str = PASS) -> None:
    assert_declined(model, PASS, reason, spec)


def test_declines_excluded() -> None:
    _declined(matmul_model(), "excluded", f"{PASS}:exclude=mm")


def test_declines_weight_not_constant_not_2d_not_float32() -> None:
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    _declined(
        make_model([node], [vi("x", [4, 64]), vi("W", [64, 16])], [vi("y", [4, 16])]),
        "weight-not-constant",
    )
    _declined(
        make_model(
            [node],
            [vi("x", [2, 4, 64])],
            [vi("y", [2, 4, 16])],
            {"W": np.ones((2, 64, 16), np.float32)},
        ),
        "weight-not-2d",
    )
    f64 = TensorProto.DOUBLE
    _declined(
        make_model(
            [node], [vi("x", [4, 64], f64)], [vi("y", [4, 16], f64)], {"W": np.ones((64, 16))}
        ),
        "weight-not-float32",
    )


def test_declines_unknown_input_dtype_and_rank_1_input() -> None:
    nodes = [
        helper.make_node("Mystery", ["x"], ["h"], domain="custom"),
        helper.make_node("MatMul", ["h", "W"], ["y"]),
    ]
    model = make_model(
        nodes,
        [vi("x", [4, 64])],
        [vi("y", [4, 16])],
        {"W": np.ones((64, 16), np.float32)},
        extra_opsets={"custom": 1},
        check=False,
    )
    _declined(model, "input-not-float32")
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    _declined(
        make_model([node], [vi("x", [64])], [vi("y", [16])], {"W": np.ones((64, 16), np.float32)}),
        "input-rank",
    )


def test_declines_gemm_trans_a_and_bias_that_is_not_a_row() -> None:
    w = np.ones((64, 16), np.float32)
    trans_a = helper.make_node("Gemm", ["x", "W"], ["y"], transA=1)
    _declined(
        make_model([trans_a], [vi("x", [64, 4])], [vi("y", [4, 16])], {"W": w}), "gemm-transA"
    )
    full_c = helper.make_node("Gemm", ["x", "W", "C"], ["y"])
    _declined(
        make_model(
            [full_c],
            [vi("x", [4, 64])],
            [vi("y", [4, 16])],
            {"W": w, "C": np.ones((4, 16), np.float32)},
        ),
        "gemm-bias",
    )


@pytest.mark.parametrize("spec", ["bits=3", "block_size=24", "block_size=8", "accuracy_level=7"])
def test_bad_options_are_refused(spec: str) -> None:
    with pytest.raises(PreconditionError):
        optimize(matmul_model(), passes=[f"{PASS}:{spec}"])


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
    assert op_histogram(twice) == op_histogram(once)
