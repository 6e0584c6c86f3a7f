from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxopt.errors import ModelLoadError
from onnxopt.io import load_model, save_model, to_graph, to_model
from onnxopt.testing import make_model, vi


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], [vi("x", ["N", 64])], [vi("y", ["N", 32])],
        {"W": rng.standard_normal((64, 32)).astype(np.float32)},
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"", "file is empty"),
        (b"\x00\xff garbage \x13\x37" * 10, "not a valid ONNX protobuf|not an ONNX model"),
    ],
)
def test_load_errors_are_one_line(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "m.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message) as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_load_directory_and_truncated(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="is a directory"):
        load_model(tmp_path)
    data = _model().SerializeToString()
    (tmp_path / "t.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="not a valid ONNX protobuf"):
        load_model(tmp_path / "t.onnx")


def test_versions_newer_than_onnx_are_refused(tmp_path: Path) -> None:
    m = _model()
    m.ir_version = onnx.IR_VERSION + 1
    onnx.save(m, tmp_path / "ir.onnx")
    with pytest.raises(ModelLoadError, match="IR version"):
        load_model(tmp_path / "ir.onnx")
    m = _model()
    m.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    onnx.save(m, tmp_path / "op.onnx")
    with pytest.raises(ModelLoadError, match="opset"):
        load_model(tmp_path / "op.onnx")


def test_external_data_round_trip_and_missing_file(tmp_path: Path) -> None:
    m = _model()
    save_model(m, tmp_path / "big.onnx", external_data=True)
    assert (tmp_path / "big.onnx.data").exists()
    assert not list(tmp_path.glob(".onnxopt-*"))
    loaded = load_model(tmp_path / "big.onnx")
    np.testing.assert_array_equal(
        onnx.numpy_helper.to_array(loaded.graph.initializer[0]),
        onnx.numpy_helper.to_array(m.graph.initializer[0]),
    )
    # the caller's proto still holds its data after an external-data save
    assert m.graph.initializer[0].raw_data
    (tmp_path / "big.onnx.data").unlink()
    with pytest.raises(ModelLoadError, match="missing external-data file 'big.onnx.data'"):
        load_model(tmp_path / "big.onnx")


def test_save_is_atomic_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous")

    def failing_save(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", failing_save)
    from onnxopt.errors import ModelSaveError

    with pytest.raises(ModelSaveError, match="No space left"):
        save_model(_model(), target)
    assert target.read_bytes() == b"previous"
    assert not list(tmp_path.glob(".onnxopt-*"))


def test_round_trip_keeps_functions_custom_domains_and_opsets() -> None:
    fn = helper.make_function(
        "my.domain", "Double", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    m = make_model(
        [helper.make_node("Double", ["x"], ["t"], domain="my.domain"),
         helper.make_node("Custom", ["t"], ["y"], domain="vendor.ops")],
        [vi("x", [2])], [vi("y", [2])], extra_opsets={"my.domain": 1, "vendor.ops": 3},
        functions=[fn], check=False,
    )
    m.doc_string = "kept"
    out = to_model(to_graph(m), m)
    assert {(i.domain, i.version) for i in out.opset_import} == {("", 17), ("my.domain", 1), ("vendor.ops", 3)}
    assert [f.name for f in out.functions] == ["Double"]
    assert [(n.domain, n.op_type) for n in out.graph.node] == [("my.domain", "Double"), ("vendor.ops", "Custom")]
    assert out.doc_string == "kept"


def test_initializer_backed_inputs_stay_overridable_and_are_not_folded() -> None:
    from onnxopt import optimize
    from onnxopt.runtime import run_model
    from onnxopt.testing import op_histogram

    m = make_model(
        [helper.make_node("Mul", ["w", "two"], ["a"]), helper.make_node("Add", ["x", "a"], ["y"])],
        [vi("x", [2, 3]), vi("w", [2, 3])], [vi("y", [2, 3])],
        {"w": np.ones((2, 3), np.float32), "two": np.full((2, 3), 2, np.float32)},
    )
    out, report = optimize(m)
    assert [i.name for i in out.graph.input] == ["x", "w"]
    assert op_histogram(out) == {"Add": 1, "Mul": 1}
    assert report.stats("fold-constants") == {}
    x = np.zeros((2, 3), np.float32)
    for feed in ({"x": x}, {"x": x, "w": np.full((2, 3), 5, np.float32)}):
        np.testing.assert_array_equal(run_model(out, [feed])[0][0], run_model(m, [feed])[0][0])


def test_a_binary_string_attribute_goes_through_byte_for_byte(tmp_path: Path) -> None:
    """A tokenizer's serialized model is a binary STRING attribute (legal ONNX, not UTF-8).

    graphsurgeon decodes attributes as text; the model used to be refused. Now the rest of
    the graph is rewritten and the bytes come out as they went in, also from the in-memory API.
    """
    from onnx import helper

    import onnxopt
    from onnxopt.api import optimize_file
    from onnxopt.graph_utils import op_histogram

    raw = b"\xba\xff\x00spm" + bytes(range(256))
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Tokenize", ["s"], ["ids"], domain="ai.onnx.contrib", model=raw),
         helper.make_node("Identity", ["x"], ["xi"]), helper.make_node("Relu", ["xi"], ["y"])],
        "g", [helper.make_tensor_value_info("s", onnx.TensorProto.STRING, [1]),
              helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, None]),
         helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.contrib", 1)])
    src, dst = tmp_path / "tok.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    optimize_file(src, dst, validate=False, bench=False)  # onnxruntime has no Tokenize kernel
    out = onnx.load(str(dst))
    assert op_histogram(out) == {"ai.onnx.contrib::Tokenize": 1, "Relu": 1}  # the Identity went
    tok = next(n for n in out.graph.node if n.op_type == "Tokenize")
    assert tok.attribute[0].type == onnx.AttributeProto.STRING
    assert tok.attribute[0].s == raw
    optimized, _ = onnxopt.optimize(model)
    assert next(n for n in optimized.graph.node if n.op_type == "Tokenize").attribute[0].s == raw
    assert model.graph.node[0].attribute[0].s == raw  # the caller's proto is left as it was


def _if_reading(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """An If whose branches both MatMul x by W (a main-graph initializer) and add B."""
    from onnx import TensorProto, helper, numpy_helper

    def branch(tag: str, op: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", "W"], [f"m{tag}"]), helper.make_node("Add", [f"m{tag}", "B"], [f"a{tag}"]),
             helper.make_node(op, [f"a{tag}"], [f"o{tag}"])], tag, [],
            [helper.make_tensor_value_info(f"o{tag}", TensorProto.FLOAT, [1, weights["W"].shape[1]])])

    g = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch("t", "Relu"), else_branch=branch("e", "Neg"))], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weights["W"].shape[0]]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weights["W"].shape[1]])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("n", [16, 600])  # 600 x 600 floats: past the size exported as a shell
def test_weights_both_branches_read_are_written_once(n: int) -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    model = _if_reading({"W": rng.standard_normal((n, n)).astype(np.float32),
                         "B": rng.standard_normal(n).astype(np.float32)})
    out = to_model(to_graph(model), model)
    onnx.checker.check_model(out)
    assert sorted(t.name for t in out.graph.initializer) == ["B", "W"]
    assert [len(a.g.initializer) for a in out.graph.node[0].attribute] == [0, 0]
    assert out.ByteSize() < model.ByteSize() * 1.05 + 512  # not one copy per branch
    x = rng.standard_normal((1, n)).astype(np.float32)
    for c in (True, False):
        feed = {"x": x, "c": np.array(c)}
        want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
        got = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
        np.testing.assert_array_equal(got[0], want[0])


def test_a_model_without_the_default_domain_is_not_given_one(tmp_path: Path) -> None:
    """skl2onnx's ai.onnx.ml-only models import no default domain; writing one back used to add it."""
    from onnx import helper

    from onnxopt.api import optimize_file
    from onnxopt.runtime import run_model

    model = helper.make_model(helper.make_graph(
        [helper.make_node("Normalizer", ["x"], ["y"], domain="ai.onnx.ml", norm="L2")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 2])]),
        opset_imports=[helper.make_opsetid("ai.onnx.ml", 1)])
    model.ir_version = 8
    src, dst = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    result = optimize_file(src, dst, bench=False)
    assert bool(result.validation)
    written = onnx.load(str(dst))
    assert [(i.domain, i.version) for i in written.opset_import] == [("ai.onnx.ml", 1)]
    x = np.array([[3, 4], [1, 0], [0, 2]], np.float32)
    np.testing.assert_allclose(run_model(written, [{"x": x}])[0][0], x / np.linalg.norm(x, axis=1, keepdims=True))
