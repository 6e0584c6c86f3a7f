from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

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


# ---- an oracle independent of passes/quantize_weight_only.py ----


def blocks_of(w: np.ndarray, block_size: int) -> np.ndarray:
    """[K, N] -> [N, blocks, block_size], the last block zero-padded."""
    k, n = w.shape
    padded = np.zeros((n, -(-k // block_size) * block_size), np.float32)
    padded[:, :k] = w.T
    return padded.reshape(n, -1, block_size)


def reference_qparams(
    w: np.ndarray, bits: int, block_size: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero points [N, blocks] as the pass's docstring defines them."""
    x = blocks_of(w, block_size)
    if symmetric:  # s = max|w| / (2^(bits-1) - 1), z = 2^(bits-1)
        scale = np.abs(x).max(axis=2) / np.float32(2 ** (bits - 1) - 1)
        zero = np.full(scale.shape, 2 ** (bits - 1))
    else:  # s = (max(w, 0) - min(w, 0)) / (2^bits - 1), z = round(-min(w, 0) / s)
        lo = np.minimum(x.min(axis=2), np.float32(0))
        scale = (np.maximum(x.max(axis=2), np.float32(0)) - lo) / np.float32(2**bits - 1)
        zero = np.rint(-lo / scale).astype(np.int64)
    return scale.astype(np.float32), zero


def ort_quantize_blocks(
    w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int, block_size: int
) -> np.ndarray:
    """Codes [N, blocks * block_size] by onnxruntime's blocked QuantizeLinear (opset 21:
    round half to even, saturate to uint4 / uint8), read back as uint8."""
    x = blocks_of(w, block_size).reshape(scale.shape[0], -1)
    qtype = TensorProto.UINT4 if bits == 4 else TensorProto.UINT8
    z = helper.make_tensor("z", qtype, list(zero.shape), zero.ravel().tolist())
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=1, block_size=block_size),
        helper.make_node("Cast", ["q"], ["codes"], to=TensorProto.UINT8),
    ]
    graph = helper.make_graph(
        nodes,
        "quantize_blocks",
        [vi("x", list(x.shape))],
        [vi("codes", list(x.shape), TensorProto.UINT8)],
        [numpy_helper.from_array(scale, "s"), z],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def reference_weight(w: np.ndarray, bits: int, block_size: int, symmetric: bool) -> np.ndarray:
    """The [K, N] weight the pass's codes should stand for: (codes - z) * s."""
    scale, zero = reference_qparams(w, bits, block_size, symmetric)
    codes = ort_quantize_blocks(w, scale, zero, bits, block_size).reshape(*scale.shape, -1)
    deq = (codes.astype(np.float32) - zero[..., None]) * scale[..., None]
    return deq.reshape(len(scale), -1)[:, : w.shape[0]].T


def unpack_low_bits_first(packed: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits packing: element j of a byte sits at bits [j * bits, (j + 1) * bits)."""
    shifts = np.arange(8 // bits, dtype=np.uint8) * bits
    codes = (packed[..., None] >> shifts) & (2**bits - 1)
    return codes.reshape(*packed.shape[:-1], -1)


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
    # scales, zero points and codes against the docstring's formulas and onnxruntime's
    # QuantizeLinear, read back from the packed inputs as the contrib-op spec lays them out
    w = weight(model)
    scale, zero = reference_qparams(w, bits, 32, symmetric)
    np.testing.assert_array_equal(inits[node.input[2]].reshape(16, blocks), scale)
    if not symmetric:  # symmetric: no input, the spec's default 2^(bits-1) applies
        stored_zero = unpack_low_bits_first(inits[node.input[3]].reshape(16, -1), bits)
        np.testing.assert_array_equal(stored_zero[:, :blocks], zero)
    codes = unpack_low_bits_first(b, bits).reshape(16, -1)
    np.testing.assert_array_equal(codes, ort_quantize_blocks(w, scale, zero, bits, 32))
    # the kernel computes x @ (the weight those codes stand for), to float rounding
    w_hat = reference_weight(w, bits, 32, symmetric)
    feed = random_feeds(model, 1)[0]
    np.testing.assert_allclose(
        run_model(quantized, [feed])[0][0], feed["x"] @ w_hat, rtol=1e-4, atol=1e-4
    )
    # and the dequantized weight is within half a step of the original in every block
    step = scale.repeat(32, axis=1)[:, :k].T
    assert np.all(np.abs(w_hat - w) <= step / 2 + 1e-6)


def test_int4_codes_low_nibble_first_worked_out_by_hand() -> None:
    # one column, three blocks of 32, 4 bits, asymmetric
    # block 0: w[k] = k - 8 for k < 16, then 0.5, -0.5, 2.5, zeros -> scale 1, zero point 8;
    #   codes 0, 1, ..., 15, then 8, 8, 10 (ties round half to even), 8, 8, ...
    # block 1: -2.5, 12.5, 1.5, zeros -> scale 15 / 15 = 1, zero point round(2.5) = 2;
    #   codes round(-2.5) + 2 = 0, 12 + 2 = 14, 2 + 2 = 4, then 2, 2, ...
    # block 2: -1, 14, zeros -> scale 1, zero point 1; codes 0, 15, then 1, 1, ...
    w = np.zeros((96, 1), np.float32)
    w[:16, 0] = np.arange(16) - 8.0
    w[16:19, 0] = [0.5, -0.5, 2.5]
    w[32:35, 0] = [-2.5, 12.5, 1.5]
    w[64:66, 0] = [-1.0, 14.0]
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [vi("x", [96, 96])],
        [vi("y", [96, 1])],
        {"W": w},
    )
    quantized, _ = optimize(model, passes=[f"{PASS}:bits=4,symmetric=False,block_size=32"])
    node = quantized.graph.node[0]
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    b = inits[node.input[1]]
    assert b.shape == (1, 3, 16)
    low_first = [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE, 0x88, 0x8A]
    assert b[0, 0].tolist() == low_first + [0x88] * 6
    assert b[0, 1].tolist() == [0xE0, 0x24] + [0x22] * 14
    assert b[0, 2].tolist() == [0xF0] + [0x11] * 15
    assert inits[node.input[2]].tolist() == [1.0, 1.0, 1.0]
    # block 0's zero point in the low nibble; three blocks padded to two bytes, high nibble 0
    assert inits[node.input[3]].tolist() == [0x28, 0x01]
    # onnxruntime reads the same weight back: x = I gives the dequantized column
    expected = w.copy()
    expected[16:19, 0] = [0.0, 0.0, 2.0]
    expected[32:35, 0] = [-2.0, 12.0, 2.0]
    got = run_model(quantized, [{"x": np.eye(96, dtype=np.float32)}])[0][0]
    np.testing.assert_array_equal(got, expected)


def test_int8_symmetric_codes_worked_out_by_hand() -> None:
    # max|w| = 127 -> scale 1, implied zero point 128; 0.5 -> 128, 1.5 -> 130, -2.5 -> 126
    w = np.zeros((32, 1), np.float32)
    w[:5, 0] = [127.0, -127.0, 0.5, 1.5, -2.5]
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [vi("x", [32, 32])],
        [vi("y", [32, 1])],
        {"W": w},
    )
    quantized, _ = optimize(model, passes=[f"{PASS}:bits=8,symmetric=True,block_size=32"])
    node = quantized.graph.node[0]
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    assert len(node.input) == 3
    assert inits[node.input[1]][0, 0].tolist() == [255, 1, 128, 130, 126] + [128] * 27
    assert inits[node.input[2]].tolist() == [1.0]
    got = run_model(quantized, [{"x": np.eye(32, dtype=np.float32)}])[0][0]
    expected = w.copy()
    expected[2:5, 0] = [0.0, 2.0, -2.0]
    np.testing.assert_array_equal(got, expected)


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
    w_hat = reference_weight(w.T, 8, 32, symmetric=False)
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
