from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt import optimize
from onnxopt.testing import assert_equivalent, make_model, op_histogram, tensor, vi

PASS = "fold-bias"
F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
NP = {F32: np.float32, F16: np.float16}


def add_after(
    op: str,
    x_shape: list[int | str],
    w_shape: tuple[int, ...],
    y_shape: list[int | str],
    c_shape: tuple[int, ...],
    attrs: dict | None = None,
    bias_shape: tuple[int, ...] | None = None,
    dtype: int = F32,
    opset: int = 17,
    constant_node: bool = False,
    swap: bool = False,
    seed: int = 0,
    add_op: str = "Add",
) -> onnx.ModelProto:
    """x -> op(x, W[, B]) -> z -> add_op(z, c) -> y."""
    rng = np.random.default_rng(seed)
    np_dt = NP[dtype]
    inits = {"W": rng.standard_normal(w_shape).astype(np_dt)}
    op_inputs = ["x", "W"]
    if bias_shape is not None:
        inits["B"] = rng.standard_normal(bias_shape).astype(np_dt)
        op_inputs.append("B")
    c = rng.standard_normal(c_shape).astype(np_dt)
    nodes = [helper.make_node(op, op_inputs, ["z"], **(attrs or {}))]
    if constant_node:
        nodes.append(helper.make_node("Constant", [], ["c"], value=tensor("c_v", c)))
    else:
        inits["c"] = c
    nodes.append(helper.make_node(add_op, ["c", "z"] if swap else ["z", "c"], ["y"]))
    return make_model(nodes, [vi("x", x_shape, dtype)], [vi("y", y_shape, dtype)], inits,
                      opset=opset)


def _fold(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    optimized, report = optimize(model, passes=[PASS])
    return optimized, report.stats(PASS)


def _conv(c_shape: tuple[int, ...], **kw: object) -> onnx.ModelProto:
    return add_after("Conv", [2, 3, 5, 5], (4, 3, 3, 3), [2, 4, 3, 3], c_shape, **kw)


@pytest.mark.parametrize("c_shape", [(4, 1, 1), (1, 4, 1, 1), (), (1,), (1, 1, 1)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_folds_per_channel_add_into_conv(c_shape: tuple[int, ...], with_bias: bool) -> None:
    model = _conv(c_shape, bias_shape=(4,) if with_bias else None)
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == {"Conv": 1}
    assert stats == {"folded": 1}
    assert_equivalent(model, optimized)


@pytest.mark.parametrize("opset", [9, 11, 13, 17, 21])
def test_folds_across_opsets_with_swapped_operands(opset: int) -> None:
    model = _conv((4, 1, 1), opset=opset, swap=True)
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == {"Conv": 1}
    assert stats == {"folded": 1}
    assert_equivalent(model, optimized)


@pytest.mark.parametrize("group", [2, 4])
def test_folds_grouped_and_depthwise_conv(group: int) -> None:
    model = add_after("Conv", [2, 4, 5, 5], (4, 4 // group, 3, 3), [2, 4, 3, 3], (4, 1, 1),
                      attrs={"group": group}, bias_shape=(4,))
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == {"Conv": 1}
    assert stats == {"folded": 1}
    assert_equivalent(model, optimized)


def test_folds_conv_transpose_group_and_dynamic_batch() -> None:
    model = add_after("ConvTranspose", ["N", 4, 4, 4], (4, 3, 3, 3), ["N", 6, 6, 6], (6, 1, 1),
                      attrs={"group": 2})
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == {"ConvTranspose": 1}
    assert stats == {"folded": 1}
    assert_equivalent(model, optimized, shapes={"x": [3, 4, 4, 4]})


def test_folds_constant_node_and_fp16() -> None:
    model = _conv((1, 4, 1, 1), constant_node=True, dtype=F16, bias_shape=(4,))
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == {"Conv": 1}
    assert stats == {"folded": 1}
    assert_equivalent(model, optimized, atol=2e-2, rtol=2e-2)


def test_folds_a_chain_of_adds() -> None:
    model = _conv((4, 1, 1))
    model.graph.node[-1].output[0] = "u"
    model.graph.initializer.append(tensor("c2", np.full((4, 1, 1), 0.5, np.float32)))
    model.graph.node.append(helper.make_node("Add", ["u", "c2"], ["y"]))
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == {"Conv": 1}
    assert stats == {"folded": 2}
    assert_equivalent(model, optimized)


@pytest.mark.parametrize(("c_shape", "bias_shape", "beta"), [
    ((5,), None, 1.0), ((1, 5), (5,), 0.5), ((3, 5), (3, 1), 2.0), ((3, 1), (5,), 0.0),
    ((), (5,), 1.0),
])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_folds_add_into_gemm_c(c_shape: tuple[int, ...], bias_shape: tuple[int, ...] | None,
                               beta: float, trans_b: int) -> None:
    model = add_after("Gemm", [3, 4], (5, 4) if trans_b else (4, 5), [3, 5], c_shape,
                      attrs={"transB": trans_b, "alpha": 0.5, "beta": beta}, bias_shape=bias_shape)
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == {"Gemm": 1}
    assert stats == {"folded": 1}
    assert_equivalent(model, optimized)


@pytest.mark.parametrize("opset", [9, 11, 13])
def test_folds_gemm_with_dynamic_m_and_row_bias(opset: int) -> None:
    model = add_after("Gemm", ["M", 4], (4, 5), ["M", 5], (1, 5), bias_shape=(5,), opset=opset)
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == {"Gemm": 1}
    assert stats == {"folded": 1}
    assert_equivalent(model, optimized, shapes={"x": [7, 4]})


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose", "Gemm"])
@pytest.mark.parametrize("opset", [9, 13, 21])
def test_folds_sub_as_negated_add(op: str, opset: int) -> None:
    if op == "Gemm":
        model = add_after(op, [3, 4], (4, 5), [3, 5], (5,), bias_shape=(5,), opset=opset,
                          add_op="Sub")
    else:
        w_shape, y_shape = ((4, 3, 3, 3), [2, 4, 3, 3]) if op == "Conv" else ((3, 4, 3, 3), [2, 4, 7, 7])
        model = add_after(op, [2, 3, 5, 5], w_shape, y_shape, (4, 1, 1), opset=opset, add_op="Sub")
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == {op: 1}
    assert stats == {"folded": 1}
    assert_equivalent(model, optimized)
    # the folded bias is the negated constant (no bias before): an oracle independent of ORT
    c = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "c"))
    new_bias = onnx.numpy_helper.to_array(next(t for t in optimized.graph.initializer if t.name != "W"
                                               and t.name != "B"))
    if op != "Gemm":
        np.testing.assert_array_equal(new_bias, -c.reshape(-1))


def test_leaves_constant_minus_conv_alone() -> None:
    model = _conv((4, 1, 1), add_op="Sub", swap=True)
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == op_histogram(model)
    assert stats == {}


# ---- declines ----------------------------------------------------------------------------------

@pytest.mark.parametrize("c_shape", [
    (4,),            # broadcasts along the last (spatial) axis, not the channel axis
    (4, 3, 3),       # varies spatially
    (2, 4, 1, 1),    # varies over the batch
    (1, 1, 4, 1, 1), # enlarges the output rank
])
def test_declines_non_per_channel_constant(c_shape: tuple[int, ...]) -> None:
    model = add_after("Conv", [2, 3, 6, 6], (4, 3, 3, 3), [2, 4, 4, 4], c_shape)
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == op_histogram(model)
    assert stats == {"skipped:broadcast": 1}


def test_declines_gemm_bias_on_dynamic_rows() -> None:
    # with M dynamic, a [3, 5] constant would enlarge an M=1 output
    model = add_after("Gemm", ["M", 4], (4, 5), ["M", 5], (3, 5))
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == op_histogram(model)
    assert stats == {"skipped:broadcast": 1}


def test_declines_non_constant_addend() -> None:
    nodes = [helper.make_node("Conv", ["x", "W"], ["z"]),
             helper.make_node("Add", ["z", "b"], ["y"])]
    model = make_model(nodes, [vi("x", [2, 3, 5, 5]), vi("b", [4, 1, 1])], [vi("y", [2, 4, 3, 3])],
                       {"W": np.ones((4, 3, 3, 3), np.float32)})
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == op_histogram(model)
    assert stats == {"skipped:non-constant": 1}


def test_declines_non_constant_gemm_c() -> None:
    model = add_after("Gemm", [3, 4], (4, 5), [3, 5], (5,))
    model.graph.node[0].input.append("c_in")
    model.graph.input.append(vi("c_in", [5]))
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == op_histogram(model)
    assert stats == {"skipped:non-constant": 1}


def test_declines_shared_conv_output() -> None:
    model = _conv((4, 1, 1))
    model.graph.node.append(helper.make_node("Relu", ["z"], ["r"]))
    model.graph.output.append(vi("r", [2, 4, 3, 3]))
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == op_histogram(model)
    assert stats == {"skipped:conv-output-shared": 1}


def test_declines_conv_output_that_is_graph_output() -> None:
    model = _conv((4, 1, 1))
    model.graph.output.append(vi("z", [2, 4, 3, 3]))
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == op_histogram(model)
    assert stats == {"skipped:graph-output": 1}
    assert_equivalent(model, optimized)


def test_declines_unknown_weight_shape() -> None:
    nodes = [helper.make_node("Conv", ["x", "W"], ["z"]),
             helper.make_node("Add", ["z", "c"], ["y"])]
    model = make_model(nodes, [vi("x", [2, 3, 5, 5]), vi("W", None)], [vi("y", [2, 4, 3, 3])],
                       {"c": np.ones((4, 1, 1), np.float32)}, check=False)
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == op_histogram(model)
    assert stats == {"skipped:unknown-shape": 1}


def test_add_output_as_graph_output_keeps_name() -> None:
    model = _conv((4, 1, 1))
    model.graph.node.append(helper.make_node("Relu", ["y"], ["r"]))
    model.graph.output.append(vi("r", [2, 4, 3, 3]))
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == {"Conv": 1, "Relu": 1}
    assert stats == {"folded": 1}
    assert [o.name for o in optimized.graph.output] == ["y", "r"]
    assert_equivalent(model, optimized)


def test_unchanged_without_candidates_and_idempotent() -> None:
    model = _conv((4, 1, 1))
    once, _ = _fold(model)
    twice, report = optimize(once, passes=[PASS])
    assert not report.records[0].changed
    assert report.stats(PASS) == {}
    assert op_histogram(twice) == {"Conv": 1}


def test_folds_inside_loop_body_reading_outer_weight() -> None:
    body = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["z"]),
         helper.make_node("Add", ["z", "c"], ["zb"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL)],
        [vi("cond_out", [], TensorProto.BOOL), vi("zb", [2, 4, 3, 3])],
    )
    rng = np.random.default_rng(3)
    inits = {"W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
             "c": rng.standard_normal((4, 1, 1)).astype(np.float32),
             "n": np.array(2, np.int64), "t": np.array(True)}
    model = make_model([helper.make_node("Loop", ["n", "t"], ["y"], body=body)],
                       [vi("x", [2, 3, 5, 5])], [vi("y", [2, 2, 4, 3, 3])], inits)
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == {"Conv": 1, "Identity": 1, "Loop": 1}
    assert stats == {"folded": 1}
    assert_equivalent(model, optimized)
