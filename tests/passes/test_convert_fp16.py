from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import optimize
from onnxopt.testing import (
    assert_equivalent,
    conv_bn_model,
    make_model,
    mlp_model,
    op_histogram,
    run_model,
    vi,
)

PASS = "convert-fp16"
F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT


def io_types(model: onnx.ModelProto) -> list[int]:
    return [
        v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)
    ]


def assert_no_cancelling_casts(model: onnx.ModelProto) -> None:
    producers = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type != "Cast":
            continue
        src = producers.get(n.input[0])
        if src is not None and src.op_type == "Cast":
            to = {a.name: a.i for a in n.attribute}["to"]
            assert {a.name: a.i for a in src.attribute}["to"] != {F16: F32, F32: F16}.get(to), (
                f"Cast pair {src.name} -> {n.name} cancels"
            )


def test_mlp_runs_in_fp16_with_float32_io() -> None:
    model = mlp_model()
    converted, report = optimize(model, passes=[PASS])
    assert op_histogram(converted) == {"Add": 3, "Cast": 2, "MatMul": 3, "Relu": 2}
    assert report.stats(PASS) == {
        "casts-inserted": 2,
        "converted-constants": 6,
        "converted-nodes": 8,
    }
    assert io_types(converted) == [F32, F32]
    assert all(t.data_type == F16 for t in converted.graph.initializer)
    assert_no_cancelling_casts(converted)
    assert_equivalent(model, converted, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_conv_bn_opsets_dynamic_batch(opset: int) -> None:
    model = conv_bn_model(opset=opset, dynamic_batch=True)
    converted, report = optimize(model, passes=[PASS])
    assert op_histogram(converted) == {"BatchNormalization": 1, "Cast": 2, "Conv": 1}
    assert report.stats(PASS) == {
        "casts-inserted": 2,
        "converted-constants": 5,
        "converted-nodes": 2,
    }
    assert io_types(converted) == [F32, F32]
    assert_equivalent(model, converted, atol=3e-2, rtol=3e-2, shapes={"x": (2, 4, 8, 8)})


def test_blocked_op_gets_casts_at_its_boundary_only() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"]),
        helper.make_node("TopK", ["m", "k"], ["v", "i"], axis=-1),
        helper.make_node("Relu", ["v"], ["y"]),
    ]
    inits = {
        "W": np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32),
        "k": np.array([3], np.int64),
    }
    model = make_model(
        nodes, [vi("x", [2, 8])], [vi("y", [2, 3]), vi("i", [2, 3], TensorProto.INT64)], inits
    )
    converted, report = optimize(model, passes=[PASS])
    # x -> fp16 | MatMul | -> fp32 | TopK | -> fp16 | Relu | -> fp32 y
    assert op_histogram(converted) == {"Cast": 4, "MatMul": 1, "Relu": 1, "TopK": 1}
    assert report.stats(PASS) == {
        "casts-inserted": 4,
        "converted-constants": 1,
        "converted-nodes": 2,
        "skipped:blocked-op": 1,
    }
    assert io_types(converted) == [F32, F32, TensorProto.INT64]
    assert_no_cancelling_casts(converted)
    assert_equivalent(model, converted, atol=2e-2, rtol=2e-2)


def test_graph_output_that_is_also_read_keeps_its_name_and_dtype() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sigmoid", ["r"], ["s"])]
    model = make_model(nodes, [vi("x", [2, 8])], [vi("r", [2, 8]), vi("s", [2, 8])])
    converted, report = optimize(model, passes=[PASS])
    assert op_histogram(converted) == {"Cast": 3, "Relu": 1, "Sigmoid": 1}
    assert report.stats(PASS) == {"casts-inserted": 3, "converted-nodes": 2}
    assert [o.name for o in converted.graph.output] == ["r", "s"]
    assert io_types(converted) == [F32, F32, F32]
    assert_equivalent(model, converted, atol=1e-2, rtol=1e-2)


def test_if_body_reading_an_fp16_producers_output_reads_a_float32_copy() -> None:
    then = helper.make_graph(
        [helper.make_node("Mul", ["h", "two"], ["t"])], "then", [], [vi("t", [2, 8])]
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["h"], ["e"])], "else", [], [vi("e", [2, 8])]
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["h"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other),
    ]
    model = make_model(
        nodes,
        [vi("x", [2, 8]), vi("cond", [], TensorProto.BOOL)],
        [vi("y", [2, 8])],
        {"two": np.array(2.0, np.float32)},
    )
    converted, report = optimize(model, passes=[PASS])
    assert op_histogram(converted) == {"Cast": 2, "If": 1, "Mul": 1, "Neg": 1, "Relu": 1}
    assert report.stats(PASS) == {
        "casts-inserted": 2,
        "converted-nodes": 1,
        "skipped:subgraph-op": 1,
    }
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    for cond in (True, False):
        feed = {"x": x, "cond": np.array(cond)}
        np.testing.assert_allclose(
            run_model(converted, [feed])[0][0], run_model(model, [feed])[0][0], atol=1e-2, rtol=1e-2
        )


def test_existing_cast_to_float_writes_fp16_instead() -> None:
    nodes = [
        helper.make_node("Cast", ["ids"], ["f"], to=F32),
        helper.make_node("Relu", ["f"], ["y"]),
    ]
    model = make_model(nodes, [vi("ids", [2, 8], TensorProto.INT64)], [vi("y", [2, 8])])
    converted, report = optimize(model, passes=[PASS])
    assert op_histogram(converted) == {"Cast": 2, "Relu": 1}
    assert report.stats(PASS) == {"casts-inserted": 1, "converted-nodes": 2}
    casts = [n for n in converted.graph.node if n.op_type == "Cast"]
    assert sorted(a.i for n in casts for a in n.attribute) == [F32, F16]
    assert_no_cancelling_casts(converted)
    assert_equivalent(
        model, converted, atol=1e-2, rtol=1e-2, feeds=[{"ids": np.arange(16).reshape(2, 8)}]
    )


def test_out_of_range_weights_are_clipped_and_infinities_kept() -> None:
    nodes = [helper.make_node("Add", ["x", "c"], ["y"])]
    c = np.array([1e6, -1e6, -np.inf, 1.0], np.float32)
    model = make_model(nodes, [vi("x", [4])], [vi("y", [4])], {"c": c})
    converted, report = optimize(model, passes=[PASS])
    assert report.stats(PASS) == {
        "casts-inserted": 2,
        "clipped-values": 2,
        "converted-constants": 1,
        "converted-nodes": 1,
    }
    half = numpy_helper.to_array(converted.graph.initializer[0])
    assert half.dtype == np.float16
    assert half.tolist() == [65504.0, -65504.0, -np.inf, 1.0]


def test_layernorm_converts_unless_its_float_only_statistics_are_read() -> None:
    scale, bias = np.ones(8, np.float32), np.zeros(8, np.float32)
    plain = make_model(
        [helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"])],
        [vi("x", [2, 8])],
        [vi("y", [2, 8])],
        {"s": scale, "b": bias},
    )
    _, report = optimize(plain, passes=[PASS])
    assert report.stats(PASS) == {
        "casts-inserted": 2,
        "converted-constants": 2,
        "converted-nodes": 1,
    }
    with_mean = make_model(
        [helper.make_node("LayerNormalization", ["x", "s", "b"], ["y", "mean"])],
        [vi("x", [2, 8])],
        [vi("y", [2, 8]), vi("mean", [2, 1])],
        {"s": scale, "b": bias},
    )
    converted, report = optimize(with_mean, passes=[PASS])
    assert report.stats(PASS) == {"skipped:no-fp16-kernel-type": 1}
    assert op_histogram(converted) == op_histogram(with_mean)


def test_keeps_excluded_custom_and_unknown_dtype_nodes_in_float32() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="keep"),
        helper.make_node("Sigmoid", ["a"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [2, 8])], [vi("y", [2, 8])])
    converted, report = optimize(model, passes=[f"{PASS}:exclude=keep"])
    assert report.stats(PASS) == {"casts-inserted": 2, "converted-nodes": 1, "skipped:excluded": 1}
    assert op_histogram(converted) == {"Cast": 2, "Relu": 1, "Sigmoid": 1}
    assert_equivalent(model, converted, atol=1e-2, rtol=1e-2)
    custom = make_model(
        [
            helper.make_node("Mystery", ["x"], ["h"], domain="custom"),
            helper.make_node("Relu", ["h"], ["y"]),
        ],
        [vi("x", [2, 8])],
        [vi("y", [2, 8])],
        extra_opsets={"custom": 1},
        check=False,
    )
    _, report = optimize(custom, passes=[PASS])
    assert report.stats(PASS) == {"skipped:custom-domain": 1, "skipped:unknown-dtype": 1}


def test_nothing_to_do_and_idempotent() -> None:
    ints = make_model(
        [helper.make_node("Add", ["a", "a"], ["y"])],
        [vi("a", [4], TensorProto.INT64)],
        [vi("y", [4], TensorProto.INT64)],
    )
    _, report = optimize(ints, passes=[PASS])
    assert report.stats(PASS) == {}
    assert not report.records[-1].changed
    once, _ = optimize(mlp_model(), passes=[PASS])
    twice, report = optimize(once, passes=[PASS])
    assert not report.records[-1].changed
    assert op_histogram(twice) == op_histogram(once)
