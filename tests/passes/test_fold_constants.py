from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt import optimize
from onnxopt.testing import assert_equivalent, make_model, op_histogram, parameter_count, vi

NAME = "fold-constants"
I64 = TensorProto.INT64
rng = np.random.default_rng(0)


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_folds_weight_chain(opset: int) -> None:
    w = rng.standard_normal((4, 3)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
            helper.make_node("Mul", ["wt", "two"], ["w2"]),
            helper.make_node("MatMul", ["x", "w2"], ["y"]),
        ],
        [vi("x", [2, 3])],
        [vi("y", [2, 4])],
        {"w": w, "two": np.float32(2.0)},
        opset=opset,
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"MatMul": 1}
    assert report.stats(NAME) == {"folded-nodes": 2}
    assert_equivalent(model, optimized)


def test_folds_through_constant_nodes() -> None:
    model = make_model(
        [
            helper.make_node(
                "Constant",
                [],
                ["a"],
                value=onnx.numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3)),
            ),
            helper.make_node("Constant", [], ["b"], value_float=3.0),
            helper.make_node("Add", ["a", "b"], ["c"]),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Add": 1}
    assert report.stats(NAME) == {"folded-nodes": 1}
    assert_equivalent(model, optimized)


def _shape_model(x_shape, index: int, opset: int = 13) -> onnx.ModelProto:
    return make_model(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "i"], ["d"], axis=0),
            helper.make_node("Unsqueeze", ["d", "ax"], ["d1"]),
            helper.make_node("Concat", ["minus1", "d1"], ["shape"], axis=0),
            helper.make_node("Reshape", ["x", "shape"], ["y"]),
        ],
        [vi("x", x_shape)],
        [vi("y", [None, x_shape[index]])],
        {
            "i": np.array(index, np.int64),
            "ax": np.array([0], np.int64),
            "minus1": np.array([-1], np.int64),
        },
        opset=opset,
    )


def test_folds_shape_gather_with_dynamic_batch() -> None:
    model = _shape_model(["N", 3, 4], 2)
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Reshape": 1}
    assert report.stats(NAME) == {"folded-nodes": 4}
    assert_equivalent(model, optimized, shapes={"x": [2, 3, 4]})


def test_declines_dynamic_dim_shape() -> None:
    model = _shape_model(["N", 3, 4], 0)
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == op_histogram(model)
    assert report.stats(NAME) == {}
    assert not report.records[0].changed


def test_folds_slice_of_shape_opset_15_shape_start() -> None:
    model = make_model(
        [
            helper.make_node("Shape", ["x"], ["s"], start=1),
            helper.make_node("Slice", ["s", "st", "en"], ["tail"]),
            helper.make_node("Concat", ["minus1", "tail"], ["shape"], axis=0),
            helper.make_node("Reshape", ["x", "shape"], ["y"]),
        ],
        [vi("x", ["N", 3, 4, 5])],
        [vi("y", ["N", 4, 5])],
        {
            "st": np.array([1], np.int64),
            "en": np.array([9], np.int64),
            "minus1": np.array([-1], np.int64),
        },
        opset=15,
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Reshape": 1}
    assert report.stats(NAME) == {"folded-nodes": 3}
    assert_equivalent(model, optimized, shapes={"x": [2, 3, 4, 5]})


def test_graph_output_that_becomes_constant_keeps_name() -> None:
    model = make_model(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Add", ["a", "b"], ["c"]),
            helper.make_node("Relu", ["x"], ["y"]),
        ],
        [vi("x", [2, 3])],
        [vi("s", [2], I64), vi("c", [2]), vi("y", [2, 3])],
        {"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)},
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Constant": 2, "Relu": 1}
    assert report.stats(NAME) == {"folded-nodes": 2}
    assert [o.name for o in optimized.graph.output] == ["s", "c", "y"]
    assert_equivalent(model, optimized)
    _, report = optimize(optimized, passes=[NAME])
    assert not report.records[0].changed


@pytest.mark.parametrize("op", ["RandomNormal", "RandomUniform"])
def test_never_folds_nondeterministic(op: str) -> None:
    model = make_model(
        [
            helper.make_node(op, [], ["r"], shape=[2, 3], dtype=TensorProto.FLOAT),
            helper.make_node("Add", ["r", "one"], ["r1"]),
            helper.make_node("Add", ["x", "r1"], ["y"]),
        ],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
        {"one": np.float32(1.0)},
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == op_histogram(model)
    assert report.stats(NAME) == {"skipped:nondeterministic": 1}


def test_never_folds_bernoulli_of_constant() -> None:
    model = make_model(
        [helper.make_node("Bernoulli", ["p"], ["r"]), helper.make_node("Add", ["x", "r"], ["y"])],
        [vi("x", [3])],
        [vi("y", [3])],
        {"p": np.full(3, 0.5, np.float32)},
        opset=15,
    )
    _, report = optimize(model, passes=[NAME])
    assert report.stats(NAME) == {"skipped:nondeterministic": 1}


def test_never_folds_custom_domain() -> None:
    model = make_model(
        [
            helper.make_node("Foo", ["a"], ["f"], domain="com.example"),
            helper.make_node("Add", ["x", "f"], ["y"]),
        ],
        [vi("x", [2])],
        [vi("y", [2])],
        {"a": np.ones(2, np.float32)},
        extra_opsets={"com.example": 1},
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == op_histogram(model)
    assert report.stats(NAME) == {"skipped:custom-domain": 1}


@pytest.mark.parametrize("op", ["Expand", "ConstantOfShape", "Tile"])
def test_size_cap_keeps_blowups(op: str) -> None:
    big = np.array([512, 1024], np.int64)  # 2 MiB of float32
    if op == "Expand":
        node, inits = (
            helper.make_node("Expand", ["one", "shape"], ["b"]),
            {"one": np.ones(1, np.float32)},
        )
    elif op == "ConstantOfShape":
        node, inits = (
            helper.make_node(
                "ConstantOfShape",
                ["shape"],
                ["b"],
                value=onnx.numpy_helper.from_array(np.ones(1, np.float32)),
            ),
            {},
        )
    else:
        node, inits = (
            helper.make_node("Tile", ["one2", "shape"], ["b"]),
            {"one2": np.ones((1, 1), np.float32)},
        )
    model = make_model(
        [node, helper.make_node("Add", ["x", "b"], ["y"])],
        [vi("x", [512, 1024])],
        [vi("y", [512, 1024])],
        {"shape": big, **inits},
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == op_histogram(model)
    assert report.stats(NAME) == {"skipped:size-cap": 1}
    assert parameter_count(optimized) == parameter_count(model)
    # below the cap it folds, when the run's growth budget is lifted too (else that declines it)
    capped, rep = optimize(model, passes=[f"{NAME}:max_output_bytes=4194304"])
    assert rep.stats(NAME) == {"skipped:growth-budget": 1}
    assert op_histogram(capped) == op_histogram(model)
    small, rep = optimize(model, passes=[f"{NAME}:max_output_bytes=4194304,max_run_growth=inf"])
    assert rep.stats(NAME) == {"folded-nodes": 1}
    assert op_histogram(small) == {"Add": 1}


def test_big_transpose_still_folds() -> None:
    w = rng.standard_normal((512, 1024)).astype(np.float32)  # 2 MiB, same size after
    model = make_model(
        [
            helper.make_node("Transpose", ["w"], ["wt"]),
            helper.make_node("MatMul", ["x", "wt"], ["y"]),
        ],
        [vi("x", [2, 1024])],
        [vi("y", [2, 512])],
        {"w": w},
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"MatMul": 1}
    assert report.stats(NAME) == {"folded-nodes": 1}
    assert_equivalent(model, optimized, atol=1e-4, rtol=1e-4)


def test_quantize_linear_kept() -> None:
    model = make_model(
        [
            helper.make_node("DequantizeLinear", ["q", "s"], ["w"]),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
        {"q": np.ones((3, 3), np.int8), "s": np.float32(0.1)},
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == op_histogram(model)
    assert report.stats(NAME) == {}


def test_subgraph_reads_folded_outer_value_and_folds_inside() -> None:
    def branch(name: str) -> onnx.GraphProto:
        return helper.make_graph(
            [
                helper.make_node("Neg", ["c"], [f"{name}_n"]),  # outer-scope constant input
                helper.make_node("Add", ["x", f"{name}_n"], [f"{name}_out"]),
            ],
            name,
            [],
            [vi(f"{name}_out", [2])],
        )

    model = make_model(
        [
            helper.make_node("Add", ["a", "a"], ["c"]),
            helper.make_node(
                "If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("else")
            ),
        ],
        [vi("x", [2]), vi("cond", [], TensorProto.BOOL)],
        [vi("y", [2])],
        {"a": np.array([1.0, 2.0], np.float32)},
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Add": 2, "If": 1}
    assert report.stats(NAME) == {"folded-nodes": 3}
    for c in (True, False):
        feeds = [{"x": np.array([1.0, -1.0], np.float32), "cond": np.array(c)}]
        assert_equivalent(model, optimized, feeds=feeds)


def test_fold_error_leaves_graph_alone() -> None:
    # the Reshape fails in onnxruntime (6 elements into 4): the graph must stay as it was
    model = make_model(
        [
            helper.make_node("Reshape", ["a", "s"], ["c"]),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ],
        [vi("x", [4])],
        [vi("y", [4])],
        {"a": np.ones(6, np.float32), "s": np.array([4], np.int64)},
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == op_histogram(model)
    assert report.stats(NAME) == {"skipped:fold-error": 1}
    assert not report.records[0].changed
    onnx.checker.check_model(optimized)


def test_nothing_to_do_and_idempotent() -> None:
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])])
    _, report = optimize(model, passes=[NAME])
    assert not report.records[0].changed
    assert report.stats(NAME) == {}
    once, _ = optimize(_shape_model([2, 3, 4], 1), passes=[NAME])
    _, report = optimize(once, passes=[NAME])
    assert not report.records[0].changed
