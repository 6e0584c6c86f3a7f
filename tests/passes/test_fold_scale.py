from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt import optimize
from onnxopt.testing import assert_declined, assert_equivalent, make_model, op_histogram, run_pass, vi

PASS = "fold-scale"
F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def scale_after(
    op: str,
    x_shape: list[int | str],
    w_shape: tuple[int, ...],
    y_shape: list[int | str],
    s: np.ndarray,
    scale_op: str = "Mul",
    attrs: dict | None = None,
    bias: np.ndarray | None = None,
    dtype: int = F32,
    opset: int = 17,
    swap: bool = False,
    seed: int = 0,
) -> onnx.ModelProto:
    """x -> op(x, W[, B]) -> z -> scale_op(z, s) -> y."""
    np_dt = helper.tensor_dtype_to_np_dtype(dtype)
    inits = {"W": np.random.default_rng(seed).standard_normal(w_shape).astype(np_dt),
             "s": s.astype(np_dt)}
    op_inputs = ["x", "W"]
    if bias is not None:
        inits["B"] = bias.astype(np_dt)
        op_inputs.append("B")
    nodes = [helper.make_node(op, op_inputs, ["z"], **(attrs or {})),
             helper.make_node(scale_op, ["s", "z"] if swap else ["z", "s"], ["y"])]
    return make_model(nodes, [vi("x", x_shape, dtype)], [vi("y", y_shape, dtype)], inits, opset=opset)


S4 = np.array([0.5, -2.0, 3.0, 0.25])


def _conv(s: np.ndarray, **kw: object) -> onnx.ModelProto:
    return scale_after("Conv", [2, 3, 5, 5], (4, 3, 3, 3), [2, 4, 3, 3], s, **kw)


@pytest.mark.parametrize("s", [S4.reshape(4, 1, 1), S4.reshape(1, 4, 1, 1), np.array(1.5),
                               np.array([0.75])])
@pytest.mark.parametrize("scale_op", ["Mul", "Div"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_folds_per_channel_scale_into_conv(s: np.ndarray, scale_op: str, with_bias: bool) -> None:
    model = _conv(s, scale_op=scale_op, bias=np.arange(4.0) - 1.5 if with_bias else None)
    out, stats = run_pass(model, PASS)
    assert op_histogram(out) == {"Conv": 1}
    assert stats == {"folded": 1}
    assert_equivalent(model, out, atol=1e-5, rtol=1e-5)


def test_folded_weight_equals_hand_scaled_weight() -> None:
    model = _conv(S4.reshape(4, 1, 1), scale_op="Div", bias=np.ones(4))
    out, _ = run_pass(model, PASS)
    w = onnx.numpy_helper.to_array(model.graph.initializer[0])
    new = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    (w_name,) = [k for k in new if new[k].ndim == 4]
    (b_name,) = [k for k in new if new[k].ndim == 1]
    np.testing.assert_allclose(new[w_name], w / S4.reshape(4, 1, 1, 1).astype(np.float32), rtol=1e-7)
    np.testing.assert_allclose(new[b_name], 1 / S4.astype(np.float32), rtol=1e-7)


@pytest.mark.parametrize("opset", [9, 13, 21])
def test_folds_swapped_mul_across_opsets(opset: int) -> None:
    model = _conv(S4.reshape(4, 1, 1), swap=True, opset=opset)
    out, stats = run_pass(model, PASS)
    assert op_histogram(out) == {"Conv": 1}
    assert stats == {"folded": 1}
    assert_equivalent(model, out)


@pytest.mark.parametrize("group", [1, 2])
def test_folds_into_conv_transpose_with_groups_and_dynamic_batch(group: int) -> None:
    model = scale_after("ConvTranspose", ["N", 4, 4, 4], (4, 6 // group, 3, 3), ["N", 6, 6, 6],
                        np.linspace(0.5, 3, 6).reshape(6, 1, 1), attrs={"group": group},
                        bias=np.arange(6.0))
    out, stats = run_pass(model, PASS)
    assert op_histogram(out) == {"ConvTranspose": 1}
    assert stats == {"folded": 1}
    assert_equivalent(model, out, shapes={"x": [3, 4, 4, 4]})


@pytest.mark.parametrize(("s", "bias"), [
    (np.linspace(1, 2, 5), None), (np.linspace(1, 2, 5).reshape(1, 5), np.arange(5.0)),
    (np.array(3.0), np.arange(15.0).reshape(3, 5)), (np.linspace(1, 2, 5), np.array([2.0])),
])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("scale_op", ["Mul", "Div"])
def test_folds_into_gemm(s: np.ndarray, bias: np.ndarray | None, trans_b: int, scale_op: str) -> None:
    model = scale_after("Gemm", [3, 4], (5, 4) if trans_b else (4, 5), [3, 5], s, scale_op=scale_op,
                        attrs={"transB": trans_b, "alpha": 0.5, "beta": 2.0}, bias=bias)
    out, stats = run_pass(model, PASS)
    assert op_histogram(out) == {"Gemm": 1}
    assert stats == {"folded": 1}
    assert_equivalent(model, out)


@pytest.mark.parametrize(("x_shape", "s"), [
    (["B", "S", 4], np.linspace(1, 2, 5)),
    (["B", "S", 4], np.linspace(1, 2, 5).reshape(1, 1, 5)),
    ([4], np.linspace(1, 2, 5)),
    ([2, 4], np.array(0.125)),
])
@pytest.mark.parametrize("opset", [9, 13, 20])
def test_folds_into_matmul_of_any_activation_rank(x_shape: list, s: np.ndarray, opset: int) -> None:
    y_shape = [*x_shape[:-1], 5]
    model = scale_after("MatMul", x_shape, (4, 5), y_shape, s, opset=opset)
    out, stats = run_pass(model, PASS)
    assert op_histogram(out) == {"MatMul": 1}
    assert stats == {"folded": 1}
    shapes = {"x": [2, 3, 4]} if len(x_shape) == 3 else None
    assert_equivalent(model, out, shapes=shapes)


def test_folds_fp16() -> None:
    model = _conv(S4.reshape(4, 1, 1), dtype=F16, bias=np.ones(4))
    out, stats = run_pass(model, PASS)
    assert stats == {"folded": 1}
    assert_equivalent(model, out, atol=2e-2, rtol=2e-2)


# ---- declines ----------------------------------------------------------------------------------

@pytest.mark.parametrize("s", [
    S4,                                   # broadcasts along width, not channels
    np.ones((4, 3, 3)),                   # varies spatially
    np.ones((2, 4, 1, 1)),                # varies over the batch
    np.ones((1, 1, 4, 1, 1)),             # enlarges the output rank
])
def test_declines_non_per_channel_conv_scale(s: np.ndarray) -> None:
    model = scale_after("Conv", [2, 3, 6, 6], (4, 3, 3, 3), [2, 4, 4, 4], s)
    assert_declined(model, PASS, "broadcast")


def test_declines_per_row_gemm_and_growing_c() -> None:
    model = scale_after("Gemm", [3, 4], (4, 5), [3, 5], np.ones((3, 1)))
    assert_declined(model, PASS, "broadcast")
    model = scale_after("Gemm", [3, 4], (4, 5), [3, 5], np.linspace(1, 2, 5), bias=np.ones((3, 1)))
    assert_declined(model, PASS, "broadcast")


def test_declines_matmul_scale_on_other_axis() -> None:
    model = scale_after("MatMul", [2, 3, 4], (4, 5), [2, 3, 5], np.ones((3, 1)))
    assert_declined(model, PASS, "broadcast")


def test_declines_non_constant_weight_and_scale() -> None:
    nodes = [helper.make_node("MatMul", ["q", "k"], ["z"]), helper.make_node("Div", ["z", "s"], ["y"])]
    model = make_model(nodes, [vi("q", [2, 3, 4]), vi("k", [2, 4, 3])], [vi("y", [2, 3, 3])],
                       {"s": np.array(2.0, np.float32)})
    assert_declined(model, PASS, "non-constant")
    nodes = [helper.make_node("Conv", ["x", "W"], ["z"]), helper.make_node("Mul", ["z", "s"], ["y"])]
    model = make_model(nodes, [vi("x", [1, 3, 5, 5]), vi("s", [4, 1, 1])], [vi("y", [1, 4, 3, 3])],
                       {"W": np.ones((4, 3, 3, 3), np.float32)})
    assert_declined(model, PASS, "non-constant")


def test_declines_shared_output_graph_output_and_shared_weight() -> None:
    model = _conv(S4.reshape(4, 1, 1))
    model.graph.node.append(helper.make_node("Relu", ["z"], ["r"]))
    model.graph.output.append(vi("r", [2, 4, 3, 3]))
    assert_declined(model, PASS, "conv-output-shared")
    model = _conv(S4.reshape(4, 1, 1))
    model.graph.output.append(vi("z", [2, 4, 3, 3]))
    assert_declined(model, PASS, "graph-output")
    model = _conv(S4.reshape(4, 1, 1))
    model.graph.node.append(helper.make_node("Conv", ["x", "W"], ["z2"]))
    model.graph.output.append(vi("z2", [2, 4, 3, 3]))
    assert_declined(model, PASS, "shared-weight")


def test_declines_zero_divisor_and_overflow() -> None:
    assert_declined(_conv(np.array([1.0, 0.0, 2.0, 1.0]).reshape(4, 1, 1), scale_op="Div"),
                    PASS, "zero-divisor")
    assert_declined(_conv(np.array([3e38, 1.0, 1.0, 1.0]).reshape(4, 1, 1), scale_op="Mul"),
                    PASS, "range")


def test_leaves_constant_divided_by_conv_alone_and_is_idempotent() -> None:
    model = _conv(S4.reshape(4, 1, 1), scale_op="Div", swap=True)
    out, stats = run_pass(model, PASS)
    assert stats == {}
    assert op_histogram(out) == op_histogram(model)
    once, _ = run_pass(_conv(S4.reshape(4, 1, 1)), PASS)
    _, report = optimize(once, passes=[PASS])
    assert report.records[-1].changed is False


def test_level1_folds_conv_bn_then_scale_chain() -> None:
    """fold-arithmetic-chains merges the two Muls, fold-scale folds the product, fold-bias the Sub."""
    model = _conv(S4.reshape(4, 1, 1), bias=np.ones(4))
    model.graph.node[-1].output[0] = "u"
    model.graph.initializer.extend([onnx.numpy_helper.from_array(np.float32([2.0]), "s2"),
                                    onnx.numpy_helper.from_array(np.float32([0.5] * 4).reshape(4, 1, 1), "c")])
    model.graph.node.extend([helper.make_node("Mul", ["u", "s2"], ["v"]),
                             helper.make_node("Sub", ["v", "c"], ["y"])])
    out, _ = optimize(model, level=1)
    assert op_histogram(out) == {"Conv": 1}
    assert_equivalent(model, out)
