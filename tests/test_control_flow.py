"""If, Loop and Scan subgraphs that read outer-scope values survive the default pipeline.

Each model has work for the passes both outside and inside the subgraph (Identity,
Conv+BatchNormalization), and the subgraph reads values of the enclosing graph. The
checks: the optimized model passes onnx.checker, its outputs match the original's,
the subgraph interfaces (input/output names) are unchanged, and the Identity inside
the subgraph is gone.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt import optimize
from onnxopt.graph_utils import iter_proto_graphs
from onnxopt.registry import registry
from onnxopt.testing import assert_equivalent, make_model, op_histogram, tensor, vi

rng = np.random.default_rng(0)
C = 4


def _bn_params(prefix: str) -> dict[str, np.ndarray]:
    return {
        f"{prefix}w": rng.standard_normal((C, C, 3, 3)).astype(np.float32) * 0.3,
        f"{prefix}g": rng.uniform(0.5, 1.5, C).astype(np.float32),
        f"{prefix}b": rng.standard_normal(C).astype(np.float32),
        f"{prefix}m": rng.standard_normal(C).astype(np.float32),
        f"{prefix}v": rng.uniform(0.5, 2.0, C).astype(np.float32),
    }


def _conv_bn(x: str, p: str, out: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node("Conv", [x, f"{p}w"], [f"{p}conv"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", [f"{p}conv", f"{p}g", f"{p}b", f"{p}m", f"{p}v"], [out]),
    ]


def _subgraph_io(model: onnx.ModelProto) -> list[tuple[list[str], list[str]]]:
    return [([i.name for i in g.input], [o.name for o in g.output])
            for g in iter_proto_graphs(model.graph)][1:]


def _body_ops(model: onnx.ModelProto) -> dict[str, int]:
    ops: dict[str, int] = {}
    for g in list(iter_proto_graphs(model.graph))[1:]:
        for n in g.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


def _check(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]] | None = None) -> onnx.ModelProto:
    optimized, _ = optimize(model)
    onnx.checker.check_model(optimized, full_check=True)
    assert_equivalent(model, optimized, atol=1e-4, rtol=1e-3, feeds=feeds)
    assert _subgraph_io(optimized) == _subgraph_io(model)
    again, _ = optimize(optimized)
    assert op_histogram(again) == op_histogram(optimized)  # a fixpoint: nothing left to do
    return optimized


def _if_model() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    outer = _bn_params("o_")
    inner = _bn_params("i_")
    # the then-branch reads the outer Conv+BN result and runs its own Conv+BN on it,
    # its weights being outer-scope initializers
    then_nodes = [helper.make_node("Identity", ["feat"], ["t_id"]), *_conv_bn("t_id", "i_", "t_bn"),
                  helper.make_node("Relu", ["t_bn"], ["t_out"])]
    then_g = helper.make_graph(then_nodes, "then", [], [vi("t_out", [1, C, 8, 8])])
    else_nodes = [helper.make_node("Neg", ["feat"], ["e_neg"]), helper.make_node("Identity", ["e_neg"], ["e_out"])]
    else_g = helper.make_graph(else_nodes, "else", [], [vi("e_out", [1, C, 8, 8])])
    nodes = [*_conv_bn("x", "o_", "bn"), helper.make_node("Identity", ["bn"], ["feat"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    model = make_model(nodes, [vi("x", [1, C, 8, 8]), vi("cond", [], TensorProto.BOOL)],
                       [vi("y", [1, C, 8, 8])], {**outer, **inner})
    x = rng.standard_normal((1, C, 8, 8)).astype(np.float32)
    return model, [{"x": x, "cond": np.array(True)}, {"x": x, "cond": np.array(False)}]


def test_if_branches_reading_outer_scope() -> None:
    model, feeds = _if_model()
    optimized = _check(model, feeds)
    assert op_histogram(optimized, recurse=False) == {"Conv": 1, "If": 1}  # outer BN folded
    assert _body_ops(optimized) == {"Conv": 1, "Neg": 1, "Relu": 1}  # ... and the inner one


def _loop_model() -> tuple[onnx.ModelProto, None]:
    params = _bn_params("l_")
    body_nodes = [
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        helper.make_node("Identity", ["v_in"], ["v_id"]),
        *_conv_bn("v_id", "l_", "v_bn"),
        helper.make_node("Add", ["v_bn", "bias_outer"], ["v_add"]),  # outer-scope activation
        helper.make_node("Tanh", ["v_add"], ["v_out"]),
        helper.make_node("Identity", ["v_out"], ["scan_out"]),
    ]
    body = helper.make_graph(
        body_nodes, "body",
        [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("v_in", [1, C, 8, 8])],
        [vi("cond_out", [], TensorProto.BOOL), vi("v_out", [1, C, 8, 8]), vi("scan_out", [1, C, 8, 8])],
    )
    nodes = [
        helper.make_node("Relu", ["bias"], ["bias_r"]),
        helper.make_node("Identity", ["bias_r"], ["bias_outer"]),
        helper.make_node("Loop", ["trip", "", "x"], ["v_final", "scans"], body=body),
    ]
    model = make_model(
        nodes, [vi("x", [1, C, 8, 8]), vi("bias", [1, C, 1, 1])],
        [vi("v_final", [1, C, 8, 8]), vi("scans", [3, 1, C, 8, 8])],
        [tensor("trip", np.array(3, np.int64)), *[tensor(k, v) for k, v in params.items()]],
    )
    return model, None


def test_loop_body_reading_outer_scope() -> None:
    optimized = _check(_loop_model()[0])
    assert op_histogram(optimized, recurse=False) == {"Loop": 1, "Relu": 1}
    # kept: cond_in -> cond_out (body input to body output) and v_out -> scan_out (both
    # body outputs); removed: the Identity in the middle, and BN folded into the Conv
    assert _body_ops(optimized) == {"Add": 1, "Conv": 1, "Identity": 2, "Tanh": 1}


def _scan_model() -> tuple[onnx.ModelProto, None]:
    w = rng.standard_normal((3, 3)).astype(np.float32)
    body_nodes = [
        helper.make_node("Identity", ["row"], ["row_id"]),
        helper.make_node("MatMul", ["row_id", "w_outer"], ["mm"]),
        helper.make_node("Add", ["acc_in", "mm"], ["acc_out"]),
        helper.make_node("Identity", ["acc_out"], ["ys"]),
    ]
    body = helper.make_graph(body_nodes, "scan_body", [vi("acc_in", [3]), vi("row", [3])],
                             [vi("acc_out", [3]), vi("ys", [3])])
    nodes = [
        helper.make_node("Identity", ["w"], ["w_outer"]),
        helper.make_node("Scan", ["acc0", "xs"], ["acc", "ys_all"], body=body, num_scan_inputs=1),
    ]
    model = make_model(nodes, [vi("acc0", [3]), vi("xs", [5, 3])], [vi("acc", [3]), vi("ys_all", [5, 3])],
                       {"w": w})
    return model, None


def test_scan_body_reading_outer_scope() -> None:
    optimized = _check(_scan_model()[0])
    # acc_out -> ys stays: both are body outputs
    assert op_histogram(optimized) == {"Add": 1, "Identity": 1, "MatMul": 1, "Scan": 1}


def test_subgraph_output_that_is_an_outer_value_is_kept() -> None:
    # the branch returns an outer-scope value through an Identity: removing it would
    # leave the branch output without a producer inside the branch
    then_g = helper.make_graph([helper.make_node("Identity", ["a"], ["t_out"])], "then", [],
                               [vi("t_out", [2])])
    else_g = helper.make_graph([helper.make_node("Neg", ["a"], ["e_out"])], "else", [], [vi("e_out", [2])])
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    model = make_model(nodes, [vi("x", [2]), vi("cond", [], TensorProto.BOOL)], [vi("y", [2])])
    x = np.array([-1.0, 2.0], np.float32)
    optimized, report = optimize(model)
    onnx.checker.check_model(optimized, full_check=True)
    assert_equivalent(model, optimized, feeds=[{"x": x, "cond": np.array(c)} for c in (True, False)])
    assert op_histogram(optimized) == op_histogram(model)
    assert report.stats("eliminate-identity").get("skipped:graph-output") == 1


@pytest.mark.parametrize("name", [n for n, cls in registry().items() if cls.exact])
def test_every_lossless_pass_keeps_subgraphs_valid(name: str) -> None:
    for build in (_if_model, _loop_model, _scan_model):
        model, feeds = build()
        optimized, _ = optimize(model, passes=[name])
        onnx.checker.check_model(optimized, full_check=True)
        assert_equivalent(model, optimized, atol=1e-4, rtol=1e-3, feeds=feeds)
        assert _subgraph_io(optimized) == _subgraph_io(model)
