from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt import optimize
from onnxopt.testing import assert_equivalent, make_model, op_histogram, vi

NAME = "eliminate-common-subexpressions"


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_merges_duplicate_chains(opset: int) -> None:
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["a1"]),
            helper.make_node("Relu", ["x"], ["a2"]),
            helper.make_node("Mul", ["a1", "x"], ["b1"]),
            helper.make_node("Mul", ["a2", "x"], ["b2"]),
            helper.make_node("Add", ["b1", "b2"], ["y"]),
        ],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
        opset=opset,
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Add": 1, "Mul": 1, "Relu": 1}
    assert report.stats(NAME) == {"merged-nodes": 2}
    assert_equivalent(model, optimized)


def test_merges_equal_constants_then_nodes() -> None:
    c = np.arange(6, dtype=np.float32).reshape(2, 3)
    model = make_model(
        [
            helper.make_node("Constant", [], ["k"], value=onnx.numpy_helper.from_array(c.copy())),
            helper.make_node("Add", ["x", "c1"], ["a1"]),
            helper.make_node("Add", ["x", "k"], ["a2"]),
            helper.make_node("Sub", ["a1", "a2"], ["y"]),
        ],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
        {"c1": c, "c2": c.copy()},
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Add": 1, "Sub": 1}
    assert report.stats(NAME) == {"merged-constants": 1, "merged-nodes": 1}
    assert_equivalent(model, optimized)


def test_different_attributes_or_dtypes_kept() -> None:
    model = make_model(
        [
            helper.make_node("Add", ["x", "c32"], ["a"]),
            helper.make_node("Add", ["x", "c32b"], ["b"]),
            helper.make_node("Softmax", ["a"], ["s1"], axis=0),
            helper.make_node("Softmax", ["a"], ["s2"], axis=1),
            helper.make_node("Cast", ["b"], ["d"], to=TensorProto.DOUBLE),
        ],
        [vi("x", [2, 3])],
        [vi("s1", [2, 3]), vi("s2", [2, 3]), vi("d", [2, 3], TensorProto.DOUBLE)],
        {"c32": np.zeros(3, np.float32), "c32b": np.full(3, -0.0, np.float32)},
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == op_histogram(model)
    assert report.stats(NAME) == {}
    assert not report.records[0].changed


def test_duplicate_graph_outputs_keep_names() -> None:
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["y1"]),
            helper.make_node("Relu", ["x"], ["y2"]),
            helper.make_node("Neg", ["y2"], ["z"]),
        ],
        [vi("x", [2, 3])],
        [vi("y1", [2, 3]), vi("y2", [2, 3]), vi("z", [2, 3])],
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Identity": 1, "Neg": 1, "Relu": 1}
    assert report.stats(NAME) == {"merged-nodes": 1}
    assert [o.name for o in optimized.graph.output] == ["y1", "y2", "z"]
    assert_equivalent(model, optimized)
    _, again = optimize(optimized, passes=[NAME])
    assert not again.records[0].changed


def test_duplicate_identity_outputs_declined() -> None:
    model = make_model(
        [helper.make_node("Identity", ["x"], ["y1"]), helper.make_node("Identity", ["x"], ["y2"])],
        [vi("x", [2])],
        [vi("y1", [2]), vi("y2", [2])],
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Identity": 2}
    assert report.stats(NAME) == {"skipped:graph-output": 1}


def test_never_merges_random_or_custom() -> None:
    model = make_model(
        [
            helper.make_node("RandomNormalLike", ["x"], ["r1"]),
            helper.make_node("RandomNormalLike", ["x"], ["r2"]),
            helper.make_node("Foo", ["x"], ["f1"], domain="com.example"),
            helper.make_node("Foo", ["x"], ["f2"], domain="com.example"),
        ],
        [vi("x", [2])],
        [vi("r1", [2]), vi("r2", [2]), vi("f1", [2]), vi("f2", [2])],
        extra_opsets={"com.example": 1},
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == op_histogram(model)
    assert report.stats(NAME) == {"skipped:nondeterministic": 2}


def _branch(name: str, const: float) -> onnx.GraphProto:
    return helper.make_graph(
        [
            helper.make_node("Constant", [], [f"{name}_k"], value_float=const),
            helper.make_node("Mul", ["x", f"{name}_k"], [f"{name}_m1"]),
            helper.make_node("Mul", ["x", f"{name}_k"], [f"{name}_m2"]),
            helper.make_node("Add", [f"{name}_m1", f"{name}_m2"], [f"{name}_out"]),
        ],
        name,
        [],
        [vi(f"{name}_out", [2])],
    )


def test_if_branches_merge_inside_not_across() -> None:
    model = make_model(
        [
            helper.make_node(
                "If", ["c"], ["y1"], then_branch=_branch("t1", 2.0), else_branch=_branch("e1", 3.0)
            ),
            helper.make_node(
                "If", ["c"], ["y2"], then_branch=_branch("t2", 2.0), else_branch=_branch("e2", 3.0)
            ),
        ],
        [vi("x", [2]), vi("c", [], TensorProto.BOOL)],
        [vi("y1", [2]), vi("y2", [2])],
    )
    optimized, report = optimize(model, passes=[NAME])
    # one Mul per branch disappears; If nodes (subgraphs) are never merged
    assert op_histogram(optimized) == {"Add": 4, "Constant": 4, "If": 2, "Mul": 4}
    assert report.stats(NAME) == {"merged-nodes": 4}
    for c in (True, False):
        feeds = [{"x": np.array([1.0, -2.0], np.float32), "c": np.array(c)}]
        assert_equivalent(model, optimized, feeds=feeds)


def test_body_reuses_outer_constant() -> None:
    then = helper.make_graph(
        [
            helper.make_node(
                "Constant",
                [],
                ["tk"],
                value=onnx.numpy_helper.from_array(np.full(2, 5, np.float32)),
            ),
            helper.make_node("Add", ["x", "tk"], ["t_out"]),
        ],
        "then",
        [],
        [vi("t_out", [2])],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e_out"])], "else", [], [vi("e_out", [2])]
    )
    model = make_model(
        [
            helper.make_node("Add", ["x", "k"], ["a"]),
            helper.make_node("If", ["c"], ["b"], then_branch=then, else_branch=other),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ],
        [vi("x", [2]), vi("c", [], TensorProto.BOOL)],
        [vi("y", [2])],
        {"k": np.full(2, 5, np.float32)},
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Add": 3, "If": 1, "Neg": 1}  # the body's Constant is gone
    assert report.stats(NAME) == {"merged-constants": 1}
    for c in (True, False):
        feeds = [{"x": np.array([1.0, -2.0], np.float32), "c": np.array(c)}]
        assert_equivalent(model, optimized, feeds=feeds)


def test_graph_inputs_not_merged_nothing_to_do() -> None:
    model = make_model(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        [vi("x", [2]), vi("w", [2])],
        [vi("y", [2])],
    )
    _, report = optimize(model, passes=[NAME])
    assert not report.records[0].changed
    assert report.stats(NAME) == {}
