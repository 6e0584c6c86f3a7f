from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt import optimize
from onnxopt.testing import assert_equivalent, make_model, op_histogram, vi

NAME = "eliminate-identity"


def test_removes_identity_chain() -> None:
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Identity", ["r"], ["i1"]),
            helper.make_node("Identity", ["i1"], ["i2"]),
            helper.make_node("Neg", ["i2"], ["y"]),
            helper.make_node("Abs", ["i1"], ["z"]),
        ],
        [vi("x", [2, 3])],
        [vi("y", [2, 3]), vi("z", [2, 3])],
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Abs": 1, "Neg": 1, "Relu": 1}
    assert report.stats(NAME) == {"removed-identity": 2}
    assert_equivalent(model, optimized)


def test_identity_as_graph_output_renames_producer() -> None:
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])],
        [vi("x", [2])],
        [vi("y", [2])],
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Relu": 1}
    assert report.stats(NAME) == {"removed-identity": 1}
    assert [o.name for o in optimized.graph.output] == ["y"]
    assert_equivalent(model, optimized)


def test_declines_graph_input_to_graph_output() -> None:
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])])
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Identity": 1}
    assert report.stats(NAME) == {"skipped:graph-output": 1}
    assert not report.records[0].changed


def test_declines_output_to_output() -> None:
    model = make_model(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Identity", ["a"], ["b"])],
        [vi("x", [2])],
        [vi("a", [2]), vi("b", [2])],
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Identity": 1, "Relu": 1}
    assert report.stats(NAME) == {"skipped:graph-output": 1}


def _dropout_model(opset: int, mode: str | None, mask_used: bool = False) -> onnx.ModelProto:
    inputs, inits, graph_inputs = ["x"], {}, [vi("x", [2, 3])]
    if mode is not None:
        inputs += ["ratio", "mode"]
        inits["ratio"] = np.float32(0.5)
        if mode == "input":
            graph_inputs.append(vi("mode", [], TensorProto.BOOL))
        else:
            inits["mode"] = np.array(mode == "true")
    outputs = ["d", "mask"] if mask_used else ["d"]
    nodes = [helper.make_node("Dropout", inputs, outputs), helper.make_node("Relu", ["d"], ["y"])]
    graph_outputs = [vi("y", [2, 3])]
    if mask_used:
        nodes.append(helper.make_node("Not", ["mask"], ["m"]))
        graph_outputs.append(vi("m", [2, 3], TensorProto.BOOL))
    return make_model(nodes, graph_inputs, graph_outputs, inits, opset=opset)


@pytest.mark.parametrize(("opset", "mode"), [(10, None), (12, None), (12, "false"), (13, "false")])
def test_removes_inference_dropout(opset: int, mode: str | None) -> None:
    model = _dropout_model(opset, mode)
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Relu": 1}
    assert report.stats(NAME) == {"removed-dropout": 1}
    assert_equivalent(model, optimized)


@pytest.mark.parametrize(("opset", "mode"), [(12, "true"), (13, "true"), (13, "input")])
def test_declines_training_dropout(opset: int, mode: str) -> None:
    model = _dropout_model(opset, mode)
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Dropout": 1, "Relu": 1}
    assert report.stats(NAME) == {"skipped:training-mode": 1}


@pytest.mark.parametrize("opset", [10, 13])
def test_declines_dropout_mask_used(opset: int) -> None:
    model = _dropout_model(opset, None, mask_used=True)
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Dropout": 1, "Not": 1, "Relu": 1}
    assert report.stats(NAME) == {"skipped:mask-used": 1}


def test_inside_if_and_loop_bodies_with_outer_scope() -> None:
    then = helper.make_graph(
        [helper.make_node("Identity", ["r"], ["t_i"]), helper.make_node("Neg", ["t_i"], ["t_out"])],
        "then",
        [],
        [vi("t_out", [2])],
    )
    other = helper.make_graph(  # outer value straight out of the branch: must stay
        [helper.make_node("Identity", ["r"], ["e_out"])],
        "else",
        [],
        [vi("e_out", [2])],
    )
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["acc"], ["acc_i"]),
            helper.make_node("Add", ["acc_i", "r"], ["acc_out"]),
        ],
        "body",
        [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("acc", [2])],
        [vi("cond_out", [], TensorProto.BOOL), vi("acc_out", [2])],
    )
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("If", ["c"], ["b"], then_branch=then, else_branch=other),
            helper.make_node("Loop", ["n", "", "b"], ["y"], body=body),
        ],
        [vi("x", [2]), vi("c", [], TensorProto.BOOL), vi("n", [], TensorProto.INT64)],
        [vi("y", [2])],
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {
        "Add": 1,
        "Identity": 2,
        "If": 1,
        "Loop": 1,
        "Neg": 1,
        "Relu": 1,
    }
    assert report.stats(NAME) == {"removed-identity": 2, "skipped:graph-output": 2}
    for c in (True, False):
        feeds = [{"x": np.array([1.0, -2.0], np.float32), "c": np.array(c), "n": np.array(3)}]
        assert_equivalent(model, optimized, feeds=feeds)


def test_nothing_to_do_and_idempotent() -> None:
    model = make_model(
        [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Relu", ["i"], ["y"])],
        [vi("x", [2])],
        [vi("y", [2])],
    )
    once, _ = optimize(model, passes=[NAME])
    _, report = optimize(once, passes=[NAME])
    assert not report.records[0].changed
    assert report.stats(NAME) == {}


@pytest.mark.parametrize("opset", [10, 13])
def test_declines_dropout_whose_mask_is_a_graph_output(opset: int) -> None:
    # removing it would leave graph output 'mask' with no producer: the checker rejects that
    nodes = [helper.make_node("Dropout", ["x"], ["d", "mask"]), helper.make_node("Relu", ["d"], ["y"])]
    model = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3]), vi("mask", [2, 3], TensorProto.BOOL)],
                       opset=opset)
    optimized, report = optimize(model, passes=[NAME])
    onnx.checker.check_model(optimized)
    assert op_histogram(optimized) == {"Dropout": 1, "Relu": 1}
    assert report.stats(NAME) == {"skipped:mask-used": 1}
    assert_equivalent(model, optimized)
