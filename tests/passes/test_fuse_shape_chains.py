from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt import optimize
from onnxopt.testing import assert_equivalent, make_model, op_histogram, run_pass, vi

PASS = "fuse-shape-chains"
I64 = TensorProto.INT64


def _axes_node(op: str, inp: str, out: str, axes: list[int] | None, opset: int,
               inits: dict[str, np.ndarray]) -> onnx.NodeProto:
    """Squeeze/Unsqueeze with axes as an attribute (opset < 13) or an initializer input."""
    if axes is None:
        return helper.make_node(op, [inp], [out])
    if opset < 13:
        return helper.make_node(op, [inp], [out], axes=axes)
    inits[f"{out}_axes"] = np.array(axes, np.int64)
    return helper.make_node(op, [inp, f"{out}_axes"], [out])


def chain(
    ops: list[tuple[str, object]], x_shape: list[int | str], y_shape: list[int | str] | None,
    opset: int = 17, extra_outputs: tuple[str, ...] = (), y_dtype: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    """x -> op1 -> t1 -> op2 -> ... -> y. Each op is (op_type, argument)."""
    inits: dict[str, np.ndarray] = {}
    nodes = []
    names = [f"t{i}" for i in range(1, len(ops))] + ["y"]
    prev = "x"
    for (op, arg), out in zip(ops, names, strict=True):
        if op == "Transpose":
            kw = {} if arg is None else {"perm": arg}
            nodes.append(helper.make_node(op, [prev], [out], **kw))
        elif op == "Reshape":
            shape, allowzero = arg if isinstance(arg, tuple) else (arg, 0)
            inits[f"{out}_shape"] = np.array(shape, np.int64)
            kw = {"allowzero": 1} if allowzero else {}
            nodes.append(helper.make_node(op, [prev, f"{out}_shape"], [out], **kw))
        elif op == "Flatten":
            nodes.append(helper.make_node(op, [prev], [out], axis=arg))
        else:
            nodes.append(_axes_node(op, prev, out, arg, opset, inits))
        prev = out
    outputs = [vi("y", y_shape, y_dtype)] + [vi(n, None) for n in extra_outputs]
    return make_model(nodes, [vi("x", x_shape)], outputs, inits, opset=opset, check=False)


# ---- Transpose ---------------------------------------------------------------------------------

def test_composes_transposes() -> None:
    model = chain([("Transpose", [0, 2, 3, 1]), ("Transpose", [1, 0, 3, 2])], [2, 3, 4, 5],
                  [4, 2, 5, 3])
    optimized, stats = run_pass(model, PASS)
    assert op_histogram(optimized) == {"Transpose": 1}
    assert stats == {"fused-transpose": 1}
    assert list(optimized.graph.node[0].attribute[0].ints) == [2, 0, 1, 3]
    assert_equivalent(model, optimized)


def test_inverse_transposes_vanish() -> None:
    model = chain([("Relu", None), ("Transpose", [0, 2, 3, 1]), ("Transpose", [0, 3, 1, 2])],
                  ["N", 3, 4, 5], ["N", 3, 4, 5])
    optimized, stats = run_pass(model, PASS)
    assert op_histogram(optimized) == {"Relu": 1}
    assert stats == {"removed-pair": 1}
    assert optimized.graph.node[0].output[0] == "y"
    assert_equivalent(model, optimized, shapes={"x": [2, 3, 4, 5]})


def test_inverse_transposes_between_graph_input_and_output_keep_an_identity() -> None:
    model = chain([("Transpose", None), ("Transpose", None)], [2, 3, 4], [2, 3, 4])
    optimized, stats = run_pass(model, PASS)
    assert op_histogram(optimized) == {"Identity": 1}
    assert stats == {"fused-to-identity": 1}
    assert_equivalent(model, optimized)


def test_default_perm_with_unknown_rank_is_declined() -> None:
    model = chain([("Reshape", [2, 3, 4]), ("Transpose", None), ("Transpose", None)], [24], None)
    model.graph.node[0].input[1] = "s_in"
    model.graph.input.append(vi("s_in", ["k"], I64))
    del model.graph.initializer[:]
    optimized, stats = run_pass(model, PASS)
    assert op_histogram(optimized) == op_histogram(model)
    assert stats == {"skipped:unknown-rank": 1}


# ---- Reshape -----------------------------------------------------------------------------------

def test_reshape_reshape_keeps_second_target() -> None:
    model = chain([("Reshape", [6, 4]), ("Reshape", [-1, 2, 2])], ["N", 2, 3, 4], ["M", 2, 2])
    optimized, stats = run_pass(model, PASS)
    assert op_histogram(optimized) == {"Reshape": 1}
    assert stats == {"fused-reshape": 1}
    assert_equivalent(model, optimized, shapes={"x": [1, 2, 3, 4]})


def test_reshape_copy_dim_refers_to_the_intermediate() -> None:
    # second 0 copies dim 0 of [6, 4] (=6), not of x (=2)
    model = chain([("Reshape", [6, 4]), ("Reshape", [0, 2, 2])], [2, 3, 4], [6, 2, 2])
    optimized, stats = run_pass(model, PASS)
    assert op_histogram(optimized) == {"Reshape": 1}
    assert stats == {"fused-reshape": 1}
    shape = next(t for t in optimized.graph.initializer if t.name.startswith("shape_fused"))
    assert onnx.numpy_helper.to_array(shape).tolist() == [6, 2, 2]
    assert_equivalent(model, optimized)


def test_reshape_copy_dim_of_dynamic_intermediate_is_declined() -> None:
    model = chain([("Reshape", [0, -1]), ("Reshape", [0, 3, 4])], ["N", 3, 4], ["N", 3, 4])
    optimized, stats = run_pass(model, PASS)
    assert op_histogram(optimized) == {"Reshape": 2}
    assert stats == {"skipped:unknown-shape": 1}
    assert_equivalent(model, optimized, shapes={"x": [2, 3, 4]})


def test_reshape_allowzero_keeps_literal_zero() -> None:
    model = chain([("Reshape", [0, 12]), ("Reshape", ([0, 3, 4], 1))], [0, 3, 4], [0, 3, 4],
                  opset=14)
    optimized, stats = run_pass(model, PASS)
    assert op_histogram(optimized) == {"Reshape": 1}
    assert stats == {"fused-reshape": 1}
    assert optimized.graph.node[0].attribute[0].name == "allowzero"
    assert_equivalent(model, optimized, feeds=[{"x": np.zeros((0, 3, 4), np.float32)}])


def test_non_constant_second_shape_is_declined() -> None:
    model = chain([("Reshape", [6, 4]), ("Reshape", [24])], [2, 3, 4], None)
    model.graph.node[1].input[1] = "s_in"
    model.graph.input.append(vi("s_in", [1], I64))
    optimized, stats = run_pass(model, PASS)
    assert op_histogram(optimized) == {"Reshape": 2}
    assert stats == {"skipped:non-constant": 1}


def test_chain_of_three_reshapes_fuses_twice() -> None:
    model = chain([("Reshape", [6, 4]), ("Reshape", [24]), ("Reshape", [4, 6])], [2, 3, 4], [4, 6])
    optimized, stats = run_pass(model, PASS)
    assert op_histogram(optimized) == {"Reshape": 1}
    assert stats == {"fused-reshape": 2}
    assert_equivalent(model, optimized)


# ---- Squeeze / Unsqueeze -----------------------------------------------------------------------

@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_composes_squeezes(opset: int) -> None:
    # [1, N, 1, 4, 1] -squeeze 0-> [N, 1, 4, 1] -squeeze 1, -1-> [N, 4]
    model = chain([("Squeeze", [0]), ("Squeeze", [1, -1])], [1, "N", 1, 4, 1], ["N", 4],
                  opset=opset)
    optimized, stats = run_pass(model, PASS)
    assert op_histogram(optimized) == {"Squeeze": 1}
    assert stats == {"fused-squeeze": 1}
    assert_equivalent(model, optimized, shapes={"x": [1, 3, 1, 4, 1]})


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_composes_unsqueezes(opset: int) -> None:
    # [N, 4] -unsqueeze 1-> [N, 1, 4] -unsqueeze 0, -1-> [1, N, 1, 4, 1]
    model = chain([("Unsqueeze", [1]), ("Unsqueeze", [0, -1])], ["N", 4], [1, "N", 1, 4, 1],
                  opset=opset)
    optimized, stats = run_pass(model, PASS)
    assert op_histogram(optimized) == {"Unsqueeze": 1}
    assert stats == {"fused-unsqueeze": 1}
    assert_equivalent(model, optimized, shapes={"x": [3, 4]})


def test_squeeze_without_axes_and_dynamic_dims_is_declined() -> None:
    model = chain([("Squeeze", [0]), ("Squeeze", None)], [1, "N", 4], None)
    optimized, stats = run_pass(model, PASS)
    assert op_histogram(optimized) == {"Squeeze": 2}
    assert stats == {"skipped:no-axes": 1}


def test_negative_axes_with_unknown_rank_are_declined() -> None:
    model = chain([("Reshape", [1, 3, 4]), ("Unsqueeze", [-1]), ("Unsqueeze", [0])], [12], None)
    model.graph.node[0].input[1] = "s_in"
    model.graph.input.append(vi("s_in", ["k"], I64))
    optimized, stats = run_pass(model, PASS)
    assert op_histogram(optimized) == {"Reshape": 1, "Unsqueeze": 2}
    # Unsqueeze pair: rank needed for -1; Reshape->Unsqueeze: intermediate shape unknown
    assert stats == {"skipped:unknown-rank": 1, "skipped:unknown-shape": 1}


# ---- mixed chains ------------------------------------------------------------------------------

@pytest.mark.parametrize(("ops", "x_shape", "y_shape"), [
    ([("Flatten", 1), ("Unsqueeze", [2, 3])], [2, 3, 4], [2, 12, 1, 1]),
    ([("Unsqueeze", [0]), ("Flatten", 1)], [3, 4], [1, 12]),
    ([("Squeeze", [1]), ("Reshape", [0, -1])], [2, 1, 3, 4], [2, 12]),
    ([("Reshape", [6, 4]), ("Squeeze", None)], [2, 3, 4], [6, 4]),
])
@pytest.mark.parametrize("opset", [11, 13])
def test_mixed_static_chain_becomes_one_reshape(ops: list, x_shape: list, y_shape: list,
                                                opset: int) -> None:
    model = chain(ops, x_shape, y_shape, opset=opset)
    optimized, stats = run_pass(model, PASS)
    assert op_histogram(optimized) == {"Reshape": 1}
    assert stats == {"fused-to-reshape": 1}
    assert_equivalent(model, optimized)


def test_unsqueeze_then_squeeze_same_axis_vanishes() -> None:
    model = chain([("Relu", None), ("Unsqueeze", [1]), ("Squeeze", [1])], [2, 3], [2, 3])
    optimized, stats = run_pass(model, PASS)
    assert op_histogram(optimized) == {"Relu": 1}
    assert stats == {"removed-pair": 1}
    assert_equivalent(model, optimized)


def test_mixed_chain_with_dynamic_intermediate_is_declined() -> None:
    model = chain([("Flatten", 1), ("Unsqueeze", [0])], ["N", 3, 4], [1, "N", 12])
    optimized, stats = run_pass(model, PASS)
    assert op_histogram(optimized) == {"Flatten": 1, "Unsqueeze": 1}
    assert stats == {"skipped:unknown-shape": 1}


def test_declared_graph_output_shape_is_not_trusted() -> None:
    # y declares a wrong shape; the fused target comes from the intermediate, not from y
    model = chain([("Flatten", 1), ("Unsqueeze", [0])], [2, 3, 4], [7, 7])
    optimized, stats = run_pass(model, PASS)
    assert stats == {"fused-to-reshape": 1}
    shape = next(t for t in optimized.graph.initializer if t.name.startswith("shape_fused"))
    assert onnx.numpy_helper.to_array(shape).tolist() == [1, 2, 12]


# ---- declines, subgraphs, idempotence ----------------------------------------------------------

def test_intermediate_used_elsewhere_is_declined() -> None:
    model = chain([("Transpose", [1, 0]), ("Transpose", [1, 0])], [2, 3], [2, 3],
                  extra_outputs=("t1",))
    optimized, stats = run_pass(model, PASS)
    assert op_histogram(optimized) == {"Transpose": 2}
    assert stats == {"skipped:intermediate-shared": 1}


def test_intermediate_with_second_consumer_is_declined() -> None:
    model = chain([("Reshape", [6, 4]), ("Reshape", [24])], [2, 3, 4], [24])
    model.graph.node.append(helper.make_node("Relu", ["t1"], ["r"]))
    model.graph.output.append(vi("r", [6, 4]))
    optimized, stats = run_pass(model, PASS)
    assert op_histogram(optimized) == {"Relu": 1, "Reshape": 2}
    assert stats == {"skipped:intermediate-shared": 1}


def test_unrelated_pairs_are_ignored_and_unchanged() -> None:
    model = chain([("Transpose", [1, 0]), ("Reshape", [6])], [2, 3], [6])
    optimized, report = optimize(model, passes=[PASS])
    assert op_histogram(optimized) == op_histogram(model)
    assert report.stats(PASS) == {}
    assert not report.records[0].changed


def test_idempotent() -> None:
    model = chain([("Squeeze", [0]), ("Squeeze", [1])], [1, 3, 1, 4], [3, 4])
    once, _ = run_pass(model, PASS)
    twice, report = optimize(once, passes=[PASS])
    assert not report.records[0].changed
    assert op_histogram(twice) == {"Squeeze": 1}


def test_fuses_inside_if_branch_reading_outer_scope() -> None:
    then_g = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["a"], perm=[1, 0]),
         helper.make_node("Transpose", ["a"], ["b"], perm=[1, 0]),
         helper.make_node("Relu", ["b"], ["t_out"])],
        "then", [], [vi("t_out", [2, 3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e_out"])], "else", [],
                               [vi("e_out", [2, 3])])
    model = make_model(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
        [vi("x", [2, 3]), vi("cond", [], TensorProto.BOOL)], [vi("y", [2, 3])])
    optimized, stats = run_pass(model, PASS)
    assert op_histogram(optimized) == {"If": 1, "Neg": 1, "Relu": 1}
    assert stats == {"removed-pair": 1}
    rng = np.random.default_rng(0)
    for cond in (True, False):
        feeds = [{"x": rng.standard_normal((2, 3)).astype(np.float32), "cond": np.array(cond)}]
        assert_equivalent(model, optimized, feeds=feeds)
