from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt import optimize
from onnxopt.testing import assert_equivalent, make_model, op_histogram, tensor, vi

PASS = "fuse-matmul-add"
F32, F16, F64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE
NP = {F32: np.float32, F16: np.float16, F64: np.float64, TensorProto.INT32: np.int32}


def matmul_add(
    a_shape: list[int | str] | None,
    w_shape: tuple[int, ...],
    c_shape: tuple[int, ...],
    y_shape: list[int | str],
    dtype: int = F32,
    opset: int = 17,
    bias_input: list[int | str] | None = None,
    constant_node: bool = False,
    swap: bool = False,
) -> onnx.ModelProto:
    """a -> MatMul(a, W) -> z -> Add(z, c) -> y; ``bias_input`` makes c a graph input."""
    rng = np.random.default_rng(0)
    np_dt = NP[dtype]
    w = (rng.standard_normal(w_shape) * 2).astype(np_dt)
    inits: dict[str, np.ndarray] = {}
    nodes = []
    if constant_node:
        nodes.append(helper.make_node("Constant", [], ["W"], value=tensor("W_v", w)))
    else:
        inits["W"] = w
    inputs = [vi("a", a_shape, dtype)]
    if bias_input is not None:
        inputs.append(vi("c", bias_input, dtype))
    else:
        inits["c"] = (rng.standard_normal(c_shape) * 2).astype(np_dt)
    nodes += [helper.make_node("MatMul", ["a", "W"], ["z"]),
              helper.make_node("Add", ["c", "z"] if swap else ["z", "c"], ["y"])]
    return make_model(nodes, inputs, [vi("y", y_shape, dtype)], inits, opset=opset)


def _fuse(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    optimized, report = optimize(model, passes=[PASS])
    return optimized, report.stats(PASS)


@pytest.mark.parametrize("c_shape", [(5,), (1, 5), (3, 5), (3, 1), (), (1,)])
@pytest.mark.parametrize("opset", [9, 11, 13, 17, 21])
def test_fuses_2d_matmul_add(c_shape: tuple[int, ...], opset: int) -> None:
    model = matmul_add([3, 4], (4, 5), c_shape, [3, 5], opset=opset)
    optimized, stats = _fuse(model)
    assert op_histogram(optimized) == {"Gemm": 1}
    assert stats == {"fused": 1}
    assert_equivalent(model, optimized)


@pytest.mark.parametrize("dtype", [F16, F64])
def test_fuses_fp16_and_double_with_constant_node_weight(dtype: int) -> None:
    model = matmul_add([3, 4], (4, 5), (5,), [3, 5], dtype=dtype, constant_node=True, swap=True)
    optimized, stats = _fuse(model)
    assert op_histogram(optimized) == {"Constant": 1, "Gemm": 1}
    assert stats == {"fused": 1}
    tol = 2e-2 if dtype == F16 else 1e-6
    assert_equivalent(model, optimized, atol=tol, rtol=tol)


def test_fuses_dynamic_batch_and_dynamic_bias() -> None:
    model = matmul_add(["M", 4], (4, 5), (), ["M", 5], bias_input=["M", 5])
    optimized, stats = _fuse(model)
    assert op_histogram(optimized) == {"Gemm": 1}
    assert stats == {"fused": 1}
    assert_equivalent(model, optimized, shapes={"a": [6, 4], "c": [6, 5]})


def test_fuses_inferred_2d_input() -> None:
    # A is an intermediate whose rank comes from shape inference
    model = matmul_add([3, 4], (4, 5), (5,), [3, 5])
    model.graph.node[-2].input[0] = "r"
    model.graph.node.insert(0, helper.make_node("Relu", ["a"], ["r"]))
    optimized, stats = _fuse(model)
    assert op_histogram(optimized) == {"Gemm": 1, "Relu": 1}
    assert stats == {"fused": 1}
    assert_equivalent(model, optimized)


def test_declines_rank3_transformer_matmul() -> None:
    model = matmul_add([2, 3, 4], (4, 5), (5,), [2, 3, 5])
    optimized, stats = _fuse(model)
    assert op_histogram(optimized) == {"Add": 1, "MatMul": 1}
    assert stats == {"skipped:rank": 1}


def test_declines_unknown_rank() -> None:
    # Reshape to a shape of unknown length: A's rank cannot be inferred
    model = matmul_add([3, 4], (4, 5), (5,), [3, 5])
    model.graph.node[-2].input[0] = "r"
    model.graph.node.insert(0, helper.make_node("Reshape", ["a", "s"], ["r"]))
    model.graph.input.append(vi("s", ["k"], TensorProto.INT64))
    optimized, stats = _fuse(model)
    assert op_histogram(optimized) == {"Add": 1, "MatMul": 1, "Reshape": 1}
    assert stats == {"skipped:unknown-rank": 1}


@pytest.mark.parametrize(("a_shape", "c_shape", "y_shape"), [
    ([3, 4], (2, 3, 5), [2, 3, 5]),    # enlarges the rank
    ([1, 4], (3, 5), [3, 5]),          # enlarges M
    (["M", 4], (3, 5), ["M", 5]),      # M=1 at run time would be enlarged
])
def test_declines_bias_that_enlarges_output(a_shape: list, c_shape: tuple, y_shape: list) -> None:
    model = matmul_add(a_shape, (4, 5), c_shape, y_shape)
    optimized, stats = _fuse(model)
    assert op_histogram(optimized) == {"Add": 1, "MatMul": 1}
    assert stats == {"skipped:broadcast": 1}


def test_declines_integer_matmul() -> None:
    model = matmul_add([3, 4], (4, 5), (5,), [3, 5], dtype=TensorProto.INT32)
    optimized, stats = _fuse(model)
    assert op_histogram(optimized) == {"Add": 1, "MatMul": 1}
    assert stats == {"skipped:dtype": 1}
    assert_equivalent(model, optimized)


def test_declines_shared_matmul_output() -> None:
    model = matmul_add([3, 4], (4, 5), (5,), [3, 5])
    model.graph.node.append(helper.make_node("Relu", ["z"], ["r"]))
    model.graph.output.append(vi("r", [3, 5]))
    optimized, stats = _fuse(model)
    assert op_histogram(optimized) == {"Add": 1, "MatMul": 1, "Relu": 1}
    assert stats == {"skipped:matmul-output-shared": 1}


def test_declines_matmul_output_as_graph_output() -> None:
    model = matmul_add([3, 4], (4, 5), (5,), [3, 5])
    model.graph.output.append(vi("z", [3, 5]))
    optimized, stats = _fuse(model)
    assert op_histogram(optimized) == {"Add": 1, "MatMul": 1}
    assert stats == {"skipped:graph-output": 1}
    assert_equivalent(model, optimized)


def test_add_of_two_matmuls_fuses_one_side() -> None:
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("MatMul", ["a", "W1"], ["z1"]),
             helper.make_node("MatMul", ["a", "W2"], ["z2"]),
             helper.make_node("Add", ["z1", "z2"], ["y"])]
    model = make_model(nodes, [vi("a", [3, 4])], [vi("y", [3, 5]), vi("z1", [3, 5])],
                       {"W1": rng.standard_normal((4, 5)).astype(np.float32),
                        "W2": rng.standard_normal((4, 5)).astype(np.float32)})
    optimized, stats = _fuse(model)
    # z1 is a graph output, so the Gemm absorbs the other MatMul
    assert op_histogram(optimized) == {"Gemm": 1, "MatMul": 1}
    assert stats == {"fused": 1}
    assert_equivalent(model, optimized)


def test_unchanged_and_idempotent() -> None:
    model = matmul_add([3, 4], (4, 5), (5,), [3, 5])
    once, _ = _fuse(model)
    twice, report = optimize(once, passes=[PASS])
    assert not report.records[0].changed
    assert report.stats(PASS) == {}
    assert op_histogram(twice) == {"Gemm": 1}


def test_fuses_inside_if_branch_with_outer_scope_reads() -> None:
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["a", "W"], ["z"]), helper.make_node("Add", ["z", "c"], ["t"])],
        "then", [], [vi("t", [3, 5])])
    else_g = helper.make_graph([helper.make_node("MatMul", ["a", "W"], ["e"])], "else", [],
                               [vi("e", [3, 5])])
    rng = np.random.default_rng(2)
    model = make_model(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
        [vi("a", [3, 4]), vi("cond", [], TensorProto.BOOL)], [vi("y", [3, 5])],
        {"W": rng.standard_normal((4, 5)).astype(np.float32),
         "c": rng.standard_normal(5).astype(np.float32)})
    optimized, stats = _fuse(model)
    assert op_histogram(optimized) == {"Gemm": 1, "If": 1, "MatMul": 1}
    assert stats == {"fused": 1}
    for cond in (True, False):
        feeds = [{"a": rng.standard_normal((3, 4)).astype(np.float32), "cond": np.array(cond)}]
        assert_equivalent(model, optimized, feeds=feeds)
