"""The default pipeline across opsets and model features it must leave alone.

Opsets 7 to the newest the installed onnx knows; custom-domain ops and model-local
functions kept as they are; dynamic dims kept dynamic; model metadata kept; sequence
and optional values (whose value_info graphsurgeon cannot type) kept working.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt import optimize
from onnxopt.errors import OnnxoptError
from onnxopt.runtime import session
from onnxopt.testing import assert_equivalent, make_model, op_histogram, vi

NEWEST = onnx.defs.onnx_opset_version()
rng = np.random.default_rng(0)


def _conv_gemm(opset: int, batch: int | str = 1) -> onnx.ModelProto:
    """x[batch,3,8,8] -> Conv -> BN -> Identity -> Relu -> Flatten -> Gemm -> Dropout -> y."""
    inits = {
        "W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3,
        "g": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "b": rng.standard_normal(4).astype(np.float32),
        "m": rng.standard_normal(4).astype(np.float32),
        "v": rng.uniform(0.5, 2.0, 4).astype(np.float32),
        "G": rng.standard_normal((10, 256)).astype(np.float32) * 0.1,
        "gb": rng.standard_normal(10).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"]),
        helper.make_node("Identity", ["bn"], ["id"]),
        helper.make_node("Relu", ["id"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "G", "gb"], ["gemm"], transB=1),
        helper.make_node("Dropout", ["gemm"], ["y"]),
    ]
    inputs = [vi("x", [batch, 3, 8, 8])]
    if opset < 9:  # IR 3: every initializer is also a graph input
        inputs += [vi(k, list(v.shape)) for k, v in inits.items()]
    return make_model(nodes, inputs, [vi("y", [batch, 10])], inits, opset=opset)


@pytest.mark.parametrize("opset", range(7, NEWEST + 1))
def test_conv_gemm_model_at_every_opset(opset: int) -> None:
    model = _conv_gemm(opset)
    try:
        session(model)
    except OnnxoptError as e:
        pytest.skip(f"onnxruntime cannot run opset {opset}: {e}")
    optimized, _ = optimize(model)
    onnx.checker.check_model(optimized, full_check=True)
    assert {i.domain: i.version for i in optimized.opset_import} == {"": opset}
    assert optimized.ir_version == model.ir_version
    ops = op_histogram(optimized)
    assert "Identity" not in ops and "Dropout" not in ops
    if opset >= 9:
        assert "BatchNormalization" not in ops  # folded into the Conv
    else:  # IR 3: BN parameters are graph inputs a caller may override, so no folding
        assert ops["BatchNormalization"] == 1
        assert [i.name for i in optimized.graph.input] == [i.name for i in model.graph.input]
    assert_equivalent(model, optimized, atol=1e-4, rtol=1e-3)


def test_dynamic_dims_stay_dynamic() -> None:
    model = _conv_gemm(17, batch="batch")
    optimized, _ = optimize(model)
    assert list(optimized.graph.input) == list(model.graph.input)
    assert list(optimized.graph.output) == list(model.graph.output)
    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    assert_equivalent(model, optimized, atol=1e-4, rtol=1e-3, feeds=[{"x": x}])


def test_metadata_survives() -> None:
    model = _conv_gemm(17)
    model.doc_string = "a model with history"
    model.graph.doc_string = "the graph"
    model.model_version = 42
    model.producer_name, model.producer_version = "tester", "9.9"
    model.domain = "com.example.models"
    onnx.helper.set_model_props(model, {"author": "me", "license": "MIT"})
    optimized, _ = optimize(model)
    assert optimized.doc_string == "a model with history"
    assert optimized.graph.doc_string == "the graph"
    assert optimized.model_version == 42
    assert (optimized.producer_name, optimized.producer_version) == ("tester", "9.9")
    assert optimized.domain == "com.example.models"
    meta = {p.key: p.value for p in optimized.metadata_props}
    assert meta["author"] == "me" and meta["license"] == "MIT"
    assert "onnxopt.pipeline" in meta and "onnxopt.version" in meta


def _function_model() -> onnx.ModelProto:
    # custom.fn::ScaledRelu(X) = Relu(X) * 2, built from standard ops; ORT inlines it
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    fn = helper.make_function(
        "custom.fn", "ScaledRelu", ["X"], ["Y"],
        [helper.make_node("Constant", [], ["k"], value=two),
         helper.make_node("Identity", ["X"], ["Xi"]),
         helper.make_node("Relu", ["Xi"], ["R"]),
         helper.make_node("Mul", ["R", "k"], ["Y"])],
        opset_imports=[helper.make_opsetid("", 17)],
    )
    nodes = [
        helper.make_node("Identity", ["x"], ["a"]),
        helper.make_node("ScaledRelu", ["a"], ["b"], domain="custom.fn"),
        helper.make_node("Identity", ["b"], ["c"]),
        helper.make_node("Add", ["c", "c"], ["y"]),
    ]
    return make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], extra_opsets={"custom.fn": 1},
                      functions=[fn])


def test_model_local_function_is_kept_intact() -> None:
    model = _function_model()
    optimized, _ = optimize(model)
    onnx.checker.check_model(optimized, full_check=True)
    assert list(optimized.functions) == list(model.functions)  # body untouched, Identity too
    assert op_histogram(optimized) == {"Add": 1, "custom.fn::ScaledRelu": 1}
    call = next(n for n in optimized.graph.node if n.domain == "custom.fn")
    assert (call.op_type, list(call.input)) == ("ScaledRelu", ["x"])
    assert {i.domain: i.version for i in optimized.opset_import} == {"": 17, "custom.fn": 1}
    assert_equivalent(model, optimized, atol=1e-6, rtol=1e-6)


def test_custom_domain_op_is_left_alone() -> None:
    nodes = [
        helper.make_node("Identity", ["x"], ["a"]),
        helper.make_node("Frob", ["a", "w"], ["b"], domain="com.example", mode="fast"),
        helper.make_node("Frob", ["a", "w"], ["c"], domain="com.example", mode="fast"),  # a "duplicate"
        helper.make_node("Add", ["b", "c"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [2])], [vi("y", [2])], {"w": np.ones(2, np.float32)},
                       extra_opsets={"com.example": 3})
    optimized, _ = optimize(model)
    customs = [n for n in optimized.graph.node if n.domain == "com.example"]
    assert [(n.op_type, list(n.output), list(n.attribute)) for n in customs] == [
        (n.op_type, list(n.output), list(n.attribute)) for n in model.graph.node if n.domain == "com.example"]
    assert {i.domain: i.version for i in optimized.opset_import}["com.example"] == 3
    assert [t.name for t in optimized.graph.initializer] == ["w"]


def test_sequence_values_survive() -> None:
    seq_type = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2]))
    nodes = [
        helper.make_node("Identity", ["x"], ["xi"]),
        helper.make_node("Relu", ["xi"], ["r"]),
        helper.make_node("SequenceConstruct", ["xi", "r"], ["seq"]),
        helper.make_node("Identity", ["seq"], ["seq2"]),
        helper.make_node("SequenceAt", ["seq2", "one"], ["at"]),
        helper.make_node("Add", ["at", "xi"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [2])], [vi("y", [2])], {"one": np.array(1, np.int64)},
                       opset=18, value_info=[helper.make_value_info("seq", seq_type)])
    optimized, _ = optimize(model)
    onnx.checker.check_model(optimized, full_check=True)
    assert op_histogram(optimized) == {"Add": 1, "Relu": 1, "SequenceAt": 1, "SequenceConstruct": 1}
    # no value_info may claim a tensor type for the sequence values
    for v in optimized.graph.value_info:
        if v.name in ("seq", "seq2"):
            assert v.type.WhichOneof("value") in ("sequence_type", None), v
    assert_equivalent(model, optimized, atol=1e-6, rtol=1e-6)


def test_optional_values_are_refused_clearly() -> None:
    # graphsurgeon cannot export optional types: the manager refuses before touching anything
    opt_type = helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2]))
    nodes = [
        helper.make_node("Identity", ["x"], ["xi"]),
        helper.make_node("Optional", ["xi"], ["opt"]),
        helper.make_node("OptionalGetElement", ["opt"], ["got"]),
        helper.make_node("Add", ["got", "xi"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [2])], [vi("y", [2])], opset=18,
                       value_info=[helper.make_value_info("opt", opt_type)])
    before = model.SerializeToString()
    with pytest.raises(OnnxoptError, match=r"'opt'.*optional"):
        optimize(model)
    assert model.SerializeToString() == before


def test_sequence_graph_output_keeps_its_type() -> None:
    seq_type = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2]))
    nodes = [
        helper.make_node("Identity", ["x"], ["xi"]),
        helper.make_node("SequenceConstruct", ["xi", "xi"], ["seq"]),
    ]
    model = make_model(nodes, [vi("x", [2])], [helper.make_value_info("seq", seq_type)])
    optimized, _ = optimize(model)
    onnx.checker.check_model(optimized, full_check=True)
    assert list(optimized.graph.output) == list(model.graph.output)
    assert_equivalent(model, optimized, atol=1e-6, rtol=1e-6)


def test_big_weights_round_trip_with_their_bytes() -> None:
    # weights over 1 MiB are exported as shells and their bytes copied in afterwards
    w = rng.standard_normal((1024, 512)).astype(np.float32)
    nodes = [helper.make_node("Identity", ["x"], ["xi"]), helper.make_node("MatMul", ["xi", "W"], ["y"])]
    model = make_model(nodes, [vi("x", [2, 1024])], [vi("y", [2, 512])], {"W": w})
    optimized, _ = optimize(model)
    assert op_histogram(optimized) == {"MatMul": 1}
    (init,) = optimized.graph.initializer
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(init), w)
    assert model.graph.initializer[0].name == "W"  # the source proto is untouched
    assert_equivalent(model, optimized, atol=1e-5, rtol=1e-5)


def test_big_models_are_validated_one_session_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # past the threshold the reference runs first and its session is freed before the
    # candidate's is created; the verdict is the same
    from onnxopt import validate
    from onnxopt.data import generate

    model = _conv_gemm(17)
    optimized, _ = optimize(model)
    onnx.save(model, tmp_path / "a.onnx")
    onnx.save(optimized, tmp_path / "b.onnx")
    created: list[str] = []
    real_session = validate.session

    def tracking(m: object, **kwargs: object) -> object:
        created.append(str(m))
        return real_session(m, **kwargs)

    monkeypatch.setattr(validate, "session", tracking)
    monkeypatch.setattr(validate, "_ONE_AT_A_TIME", 0)
    data = generate(model, count=3)
    report = validate.compare(tmp_path / "a.onnx", tmp_path / "b.onnx", data)
    assert report and report.samples == 3
    assert created == [str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")]
    wrong = _conv_gemm(17)  # other random weights: must fail the same way
    onnx.save(wrong, tmp_path / "c.onnx")
    assert not validate.compare(tmp_path / "a.onnx", tmp_path / "c.onnx", data)
