from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt import optimize
from onnxopt.testing import (
    assert_equivalent,
    conv_bn_model,
    make_model,
    op_histogram,
    tensor,
    vi,
)

PASS = "fold-batchnorm"
F32, F16, F64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE
NP = {F32: np.float32, F16: np.float16, F64: np.float64}


def _bn_params(c: int, rng: np.random.Generator, dtype: type = np.float32) -> dict[str, np.ndarray]:
    return {
        "gamma": rng.uniform(0.5, 1.5, c).astype(dtype),
        "beta": rng.standard_normal(c).astype(dtype),
        "mean": rng.standard_normal(c).astype(dtype),
        "var": rng.uniform(0.5, 2.0, c).astype(dtype),
    }


def bn_model(
    op: str,
    x_shape: list[int | str],
    w_shape: tuple[int, ...],
    y_shape: list[int | str],
    channels: int,
    attrs: dict | None = None,
    bias_shape: tuple[int, ...] | None = None,
    dtype: int = F32,
    opset: int = 17,
    bn_attrs: dict | None = None,
    constant_nodes: bool = False,
    seed: int = 0,
) -> onnx.ModelProto:
    """x -> op(x, W[, B]) -> z -> BatchNormalization -> y."""
    rng = np.random.default_rng(seed)
    np_dt = NP[dtype]
    inits = {"W": rng.standard_normal(w_shape).astype(np_dt)}
    op_inputs = ["x", "W"]
    if bias_shape is not None:
        inits["B"] = rng.standard_normal(bias_shape).astype(np_dt)
        op_inputs.append("B")
    inits |= _bn_params(channels, rng, np_dt)
    nodes = []
    if constant_nodes:
        for name, value in inits.items():
            nodes.append(helper.make_node("Constant", [], [name], value=tensor(name + "_v", value)))
        inits = {}
    bn_kw = {"epsilon": 1e-3} | (bn_attrs or {})
    nodes += [
        helper.make_node(op, op_inputs, ["z"], **(attrs or {})),
        helper.make_node("BatchNormalization", ["z", "gamma", "beta", "mean", "var"], ["y"],
                         **bn_kw),
    ]
    return _make(nodes, [vi("x", x_shape, dtype)], [vi("y", y_shape, dtype)], inits, opset)


def _make(nodes: list, inputs: list, outputs: list, inits: dict, opset: int) -> onnx.ModelProto:
    model = make_model(nodes, inputs, outputs, inits, opset=opset, check=False)
    # IR 3 (opset < 9) wants initializers listed as inputs; IR 4 carries old opsets without that
    model.ir_version = max(model.ir_version, 4)
    onnx.checker.check_model(model)
    return model


def _fold(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    optimized, report = optimize(model, passes=[PASS])
    return optimized, report.stats(PASS)


# ---- Conv --------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("opset", [9, 11, 13, 14, 15, 17, 21])
def test_folds_conv_bn_across_opsets(with_bias: bool, opset: int) -> None:
    model = conv_bn_model(channels=4, with_bias=with_bias, opset=opset)
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == {"Conv": 1}
    assert stats == {"folded": 1}
    assert_equivalent(model, optimized, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("group", [2, 4])  # grouped and depthwise
def test_folds_grouped_and_depthwise_conv(group: int) -> None:
    model = conv_bn_model(channels=4, group=group, with_bias=True)
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == {"Conv": 1}
    assert stats == {"folded": 1}
    assert_equivalent(model, optimized, atol=1e-4, rtol=1e-4)


def test_folds_with_dynamic_batch() -> None:
    model = conv_bn_model(channels=4, dynamic_batch=True)
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == {"Conv": 1}
    assert stats == {"folded": 1}
    assert_equivalent(model, optimized, atol=1e-4, rtol=1e-4, shapes={"x": [3, 4, 8, 8]})
    assert optimized.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_folds_opset7_spatial_default_and_default_epsilon() -> None:
    model = bn_model("Conv", [2, 3, 5, 5], (4, 3, 3, 3), [2, 4, 3, 3], 4, opset=7,
                     bn_attrs={"epsilon": 1e-5, "spatial": 1})
    del model.graph.node[1].attribute[:]  # no epsilon, no spatial: both defaults
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == {"Conv": 1}
    assert stats == {"folded": 1}
    assert_equivalent(model, optimized, atol=1e-4, rtol=1e-4)


def test_folds_constant_node_weights() -> None:
    model = bn_model("Conv", [2, 3, 5, 5], (4, 3, 3, 3), [2, 4, 3, 3], 4, bias_shape=(4,),
                     constant_nodes=True)
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == {"Conv": 1}
    assert stats == {"folded": 1}
    assert_equivalent(model, optimized, atol=1e-4, rtol=1e-4)


def test_folds_fp16_conv() -> None:
    model = bn_model("Conv", [2, 3, 5, 5], (4, 3, 3, 3), [2, 4, 3, 3], 4, bias_shape=(4,),
                     dtype=F16)
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == {"Conv": 1}
    assert stats == {"folded": 1}
    assert {t.data_type for t in optimized.graph.initializer} == {F16}
    assert_equivalent(model, optimized, atol=5e-2, rtol=2e-2)


def test_folds_two_bns_in_a_row() -> None:
    rng = np.random.default_rng(1)
    inits = {"W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)}
    inits |= _bn_params(4, rng)
    inits |= {f"{k}2": v for k, v in _bn_params(4, rng).items()}
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["z"]),
        helper.make_node("BatchNormalization", ["z", "gamma", "beta", "mean", "var"], ["u"]),
        helper.make_node("BatchNormalization", ["u", "gamma2", "beta2", "mean2", "var2"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [2, 3, 5, 5])], [vi("y", [2, 4, 3, 3])], inits)
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == {"Conv": 1}
    assert stats == {"folded": 2}
    assert_equivalent(model, optimized, atol=1e-4, rtol=1e-4)


def test_bn_output_that_is_also_read_keeps_its_name() -> None:
    model = bn_model("Conv", [2, 3, 5, 5], (4, 3, 3, 3), [2, 4, 3, 3], 4)
    model.graph.node.append(helper.make_node("Relu", ["y"], ["r"]))
    model.graph.output.append(vi("r", [2, 4, 3, 3]))
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == {"Conv": 1, "Relu": 1}
    assert stats == {"folded": 1}
    assert optimized.graph.node[0].output[0] == "y"
    assert_equivalent(model, optimized, atol=1e-4, rtol=1e-4)


# ---- ConvTranspose, Gemm, MatMul ---------------------------------------------------------------

@pytest.mark.parametrize(("group", "cin", "cout"), [(1, 3, 4), (2, 4, 6), (3, 6, 3)])
def test_folds_conv_transpose(group: int, cin: int, cout: int) -> None:
    model = bn_model("ConvTranspose", [2, cin, 4, 4], (cin, cout // group, 3, 3),
                     [2, cout, 6, 6], cout, attrs={"group": group}, bias_shape=(cout,))
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == {"ConvTranspose": 1}
    assert stats == {"folded": 1}
    assert_equivalent(model, optimized, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize(("bias_shape", "beta"), [(None, 1.0), ((5,), 1.0), ((3, 5), 0.5),
                                                  ((3, 1), 0.0), ((1,), 2.0)])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_folds_gemm(
    trans_b: int, bias_shape: tuple[int, ...] | None, beta: float, dtype: int
) -> None:
    w_shape = (5, 4) if trans_b else (4, 5)
    model = bn_model("Gemm", [3, 4], w_shape, [3, 5], 5, bias_shape=bias_shape, dtype=dtype,
                     attrs={"transB": trans_b, "alpha": 1.5, "beta": beta})
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == {"Gemm": 1}
    assert stats == {"folded": 1}
    assert_equivalent(model, optimized, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [F32, F16, F64])
def test_folds_2d_matmul_into_matmul_add(dtype: int) -> None:
    model = bn_model("MatMul", ["N", 4], (4, 5), ["N", 5], 5, dtype=dtype)
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == {"Add": 1, "MatMul": 1}
    assert stats == {"folded": 1}
    tol = 2e-2 if dtype == F16 else 1e-4
    assert_equivalent(model, optimized, atol=tol, rtol=tol, shapes={"x": [3, 4]})


def test_matmul_fold_then_fuse_gives_one_gemm() -> None:
    model = bn_model("MatMul", [3, 4], (4, 5), [3, 5], 5)
    optimized, _ = optimize(model, passes=[PASS, "fuse-matmul-add"])
    assert op_histogram(optimized) == {"Gemm": 1}
    assert_equivalent(model, optimized, atol=1e-4, rtol=1e-4)


def test_declines_rank3_matmul() -> None:
    # BN scales axis 1 of [B, S, C]: that is S, not W's columns
    model = bn_model("MatMul", [2, 5, 4], (4, 5), [2, 5, 5], 5)
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == op_histogram(model)
    assert stats == {"skipped:rank": 1}


# ---- declines ----------------------------------------------------------------------------------

def test_declines_when_conv_output_is_shared() -> None:
    model = conv_bn_model(channels=4, extra_consumer=True)
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == op_histogram(model)
    assert stats == {"skipped:conv-output-shared": 1}


def test_declines_when_conv_output_is_graph_output() -> None:
    model = bn_model("Conv", [2, 3, 5, 5], (4, 3, 3, 3), [2, 4, 3, 3], 4)
    model.graph.output.append(vi("z", [2, 4, 3, 3]))
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == op_histogram(model)
    assert stats == {"skipped:graph-output": 1}
    assert_equivalent(model, optimized)


def test_declines_shared_weight() -> None:
    rng = np.random.default_rng(2)
    inits = {"W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)} | _bn_params(4, rng)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["z1"]),
        helper.make_node("Conv", ["x", "W"], ["z2"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["z1", "gamma", "beta", "mean", "var"], ["y1"]),
        helper.make_node("BatchNormalization", ["z2", "gamma", "beta", "mean", "var"], ["y2"]),
    ]
    model = make_model(nodes, [vi("x", [2, 3, 5, 5])],
                       [vi("y1", [2, 4, 3, 3]), vi("y2", [2, 4, 5, 5])], inits)
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == op_histogram(model)
    assert stats == {"skipped:shared-weight": 2}


def test_declines_non_constant_bn_parameter() -> None:
    model = bn_model("Conv", [2, 3, 5, 5], (4, 3, 3, 3), [2, 4, 3, 3], 4)
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "gamma"))
    model.graph.input.append(vi("gamma", [4]))
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == op_histogram(model)
    assert stats == {"skipped:non-constant": 1}


def test_declines_non_constant_weight() -> None:
    model = bn_model("Conv", [2, 3, 5, 5], (4, 3, 3, 3), [2, 4, 3, 3], 4)
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "W"))
    model.graph.input.append(vi("W", [4, 3, 3, 3]))
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == op_histogram(model)
    assert stats == {"skipped:non-constant": 1}


def test_declines_training_mode_attribute() -> None:
    model = bn_model("Conv", [2, 3, 5, 5], (4, 3, 3, 3), [2, 4, 3, 3], 4, opset=14,
                     bn_attrs={"training_mode": 1})
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == op_histogram(model)
    assert stats == {"skipped:training-mode": 1}


def test_declines_when_running_mean_is_read() -> None:
    model = bn_model("Conv", [2, 3, 5, 5], (4, 3, 3, 3), [2, 4, 3, 3], 4, opset=9)
    model.graph.node[1].output.extend(["running_mean"])
    model.graph.output.append(vi("running_mean", [4]))
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == op_histogram(model)
    assert stats == {"skipped:training-mode": 1}


def test_declines_spatial_zero() -> None:
    rng = np.random.default_rng(3)
    inits = {"W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)}
    inits |= {k: np.abs(v).reshape(4, 1, 1) * np.ones((4, 3, 3), np.float32)
              for k, v in _bn_params(4, rng).items()}
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["z"]),
        helper.make_node("BatchNormalization", ["z", "gamma", "beta", "mean", "var"], ["y"],
                         spatial=0),
    ]
    model = _make(nodes, [vi("x", [2, 3, 5, 5])], [vi("y", [2, 4, 3, 3])], inits, opset=7)
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == op_histogram(model)
    assert stats == {"skipped:spatial": 1}


def test_declines_non_constant_gemm_c() -> None:
    model = bn_model("Gemm", [3, 4], (4, 5), [3, 5], 5)
    model.graph.node[0].input.append("c_in")
    model.graph.input.append(vi("c_in", [5]))
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == op_histogram(model)
    assert stats == {"skipped:non-constant": 1}


def test_standalone_bn_is_left_alone_and_unchanged() -> None:
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("BatchNormalization", ["r", "gamma", "beta", "mean", "var"], ["y"])]
    model = make_model(nodes, [vi("x", [2, 4, 3, 3])], [vi("y", [2, 4, 3, 3])], _bn_params(4, rng))
    optimized, report = optimize(model, passes=[PASS])
    assert op_histogram(optimized) == op_histogram(model)
    assert report.stats(PASS) == {}
    assert not report.records[0].changed


def test_idempotent() -> None:
    model = conv_bn_model(channels=4, with_bias=True)
    once, _ = _fold(model)
    twice, report = optimize(once, passes=[PASS])
    assert not report.records[0].changed
    assert op_histogram(twice) == {"Conv": 1}


# ---- subgraphs ---------------------------------------------------------------------------------

def _if_model(conv_in_branch: bool) -> onnx.ModelProto:
    """An If whose then-branch holds BN (and the Conv, or reads the outer Conv's output)."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    params = _bn_params(4, rng)
    then_nodes = []
    if conv_in_branch:
        then_nodes.append(helper.make_node("Conv", ["x", "W"], ["z_in"]))
    then_nodes.append(helper.make_node(
        "BatchNormalization", ["z_in" if conv_in_branch else "z", "gamma", "beta", "mean", "var"],
        ["t_out"]))
    then_g = helper.make_graph(then_nodes, "then", [], [vi("t_out", [2, 4, 3, 3])])
    else_g = helper.make_graph([helper.make_node("Relu", ["z"], ["e_out"])], "else", [],
                               [vi("e_out", [2, 4, 3, 3])])
    nodes = [helper.make_node("Conv", ["x", "W2"], ["z"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    inits = {"W": w, "W2": w.copy()} | params
    return make_model(nodes, [vi("x", [2, 3, 5, 5]), vi("cond", [], TensorProto.BOOL)],
                      [vi("y", [2, 4, 3, 3])], inits)


def test_folds_inside_if_branch() -> None:
    model = _if_model(conv_in_branch=True)
    optimized, stats = _fold(model)
    assert op_histogram(optimized) == {"Conv": 2, "If": 1, "Relu": 1}
    assert stats == {"folded": 1}
    for cond in (True, False):
        feeds = [{"x": np.random.default_rng(0).standard_normal((2, 3, 5, 5)).astype(np.float32),
                  "cond": np.array(cond)}]
        assert_equivalent(model, optimized, atol=1e-4, rtol=1e-4, feeds=feeds)


def test_leaves_outer_conv_read_by_branch_bn() -> None:
    model = _if_model(conv_in_branch=False)
    optimized, stats = _fold(model)
    # z is read by both branches: shared; and the Conv lives in the outer graph anyway
    assert op_histogram(optimized) == op_histogram(model)
    assert stats == {}
