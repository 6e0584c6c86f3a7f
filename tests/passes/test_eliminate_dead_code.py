from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxopt import optimize
from onnxopt.testing import assert_equivalent, make_model, op_histogram, parameter_count, vi

NAME = "eliminate-dead-code"


def test_removes_dead_nodes_and_initializers() -> None:
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["y"]),
            helper.make_node("Add", ["x", "w"], ["dead1"]),
            helper.make_node("Neg", ["dead1"], ["dead2"]),
        ],
        [vi("x", [2])],
        [vi("y", [2])],
        {"w": np.ones(2, np.float32), "unused": np.ones(3, np.float32)},
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Relu": 1}
    # "unused" is referenced by no node: graphsurgeon drops it on import, so it is gone but
    # not counted; "w" becomes unused when its reader dies and is counted
    assert report.stats(NAME) == {"removed-nodes": 2, "removed-initializers": 1}
    assert parameter_count(optimized) == 0
    assert not optimized.graph.initializer
    assert_equivalent(model, optimized)


def test_unused_graph_input_kept() -> None:
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [vi("x", [2]), vi("unused", [3])],
        [vi("y", [2])],
    )
    optimized, report = optimize(model, passes=[NAME])
    assert [i.name for i in optimized.graph.input] == ["x", "unused"]
    assert report.stats(NAME) == {}
    assert not report.records[0].changed


def test_value_read_only_by_subgraph_is_kept() -> None:
    then = helper.make_graph(
        [helper.make_node("Neg", ["outer"], ["t_out"])], "then", [], [vi("t_out", [2])]
    )
    other = helper.make_graph(
        [
            helper.make_node("Add", ["x", "k"], ["e_out"]),
            helper.make_node("Abs", ["x"], ["e_dead"]),
        ],
        "else",
        [],
        [vi("e_out", [2])],
    )
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["outer"]),  # read only inside the then-branch
            helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
        ],
        [vi("x", [2]), vi("c", [], TensorProto.BOOL)],
        [vi("y", [2])],
        {"k": np.ones(2, np.float32)},  # initializer read only inside the else-branch
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Add": 1, "If": 1, "Neg": 1, "Relu": 1}
    assert report.stats(NAME) == {"removed-nodes": 1}
    for c in (True, False):
        feeds = [{"x": np.array([1.0, -2.0], np.float32), "c": np.array(c)}]
        assert_equivalent(model, optimized, feeds=feeds)


def test_dead_constant_node_removed_live_output_of_multi_output_node_kept() -> None:
    model = make_model(
        [
            helper.make_node(
                "Constant", [], ["k"], value=onnx.numpy_helper.from_array(np.ones(4, np.float32))
            ),
            helper.make_node("Split", ["x"], ["a", "b"], axis=0, num_outputs=2),
        ],
        [vi("x", [4])],
        [vi("a", [2])],
        opset=18,
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Split": 1}
    assert report.stats(NAME) == {"removed-nodes": 1}
    assert_equivalent(model, optimized)


def test_nothing_to_do_is_idempotent() -> None:
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])])
    _, report = optimize(model, passes=[NAME])
    assert not report.records[0].changed
    assert report.stats(NAME) == {}
