from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt import optimize
from onnxopt.testing import (
    assert_declined,
    assert_equivalent,
    make_model,
    op_histogram,
    run_model,
    run_pass,
    vi,
)

PASS = "fuse-layernorm"
H = 8
SHAPE = ["B", "S", H]
RNG = np.random.default_rng(0)
FEEDS = [{"x": RNG.standard_normal((2, 5, H)).astype(np.float32) * 3 + 1}]
GAMMA = RNG.uniform(0.5, 1.5, H).astype(np.float32)
BETA = RNG.standard_normal(H).astype(np.float32)


def _mean(src: str, out: str, opset: int, axis: int, inits: dict, keepdims: int = 1) -> onnx.NodeProto:
    if opset >= 18:
        inits[f"ax_{out}"] = np.array([axis], np.int64)
        return helper.make_node("ReduceMean", [src, f"ax_{out}"], [out], keepdims=keepdims)
    return helper.make_node("ReduceMean", [src], [out], axes=[axis], keepdims=keepdims)


def decomposed(opset: int = 17, square: str = "Pow", divide: str = "Div", gamma: np.ndarray | None = GAMMA,
               beta: np.ndarray | None = BETA, axis: int = -1, two_subs: bool = False, keepdims: int = 1,
               extra_outputs: tuple[str, ...] = (), shape: list | None = None) -> onnx.ModelProto:
    """x -> Relu -> r -> layer norm of r over ``axis`` -> y."""
    inits: dict[str, np.ndarray] = {"eps": np.float32(1e-5)}
    nodes = [helper.make_node("Identity", ["x"], ["r"]), _mean("r", "m", opset, axis, inits, keepdims),
             helper.make_node("Sub", ["r", "m"], ["d"])]
    sq_src = "d"
    if two_subs:
        nodes.append(helper.make_node("Sub", ["r", "m"], ["d2"]))
        sq_src = "d2"
    if square == "Pow":
        inits["two"] = np.float32(2.0)
        nodes.append(helper.make_node("Pow", [sq_src, "two"], ["sq"]))
    else:
        nodes.append(helper.make_node("Mul", [sq_src, sq_src], ["sq"]))
    nodes += [_mean("sq", "v", opset, axis, inits), helper.make_node("Add", ["v", "eps"], ["ve"]),
              helper.make_node("Sqrt", ["ve"], ["s"])]
    if divide == "Div":
        nodes.append(helper.make_node("Div", ["d", "s"], ["n"]))
    else:
        nodes += [helper.make_node("Reciprocal", ["s"], ["rs"]), helper.make_node("Mul", ["rs", "d"], ["n"])]
    last = "n"
    if gamma is not None:
        inits["gamma"] = gamma
        nodes.append(helper.make_node("Mul", ["gamma", last], ["g"]))
        last = "g"
    if beta is not None:
        inits["beta"] = beta
        nodes.append(helper.make_node("Add", [last, "beta"], ["b"]))
        last = "b"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    shape = shape or SHAPE
    outputs = [vi("y", shape)] + [vi(n, None) for n in extra_outputs]
    return make_model(nodes, [vi("x", shape)], outputs, inits, opset=opset, check=False)


def _numpy_layernorm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    x64 = x.astype(np.float64)
    mu, var = x64.mean(-1, keepdims=True), x64.var(-1, keepdims=True)
    return (x64 - mu) / np.sqrt(var + eps) * gamma + beta


@pytest.mark.parametrize("opset", [17, 18, 21])
@pytest.mark.parametrize(("square", "divide", "two_subs"), [
    ("Pow", "Div", False), ("Mul", "Div", False), ("Pow", "Reciprocal", False), ("Pow", "Div", True),
])
def test_writes_layernormalization(opset: int, square: str, divide: str, two_subs: bool) -> None:
    model = decomposed(opset=opset, square=square, divide=divide, two_subs=two_subs)
    out, stats = run_pass(model, PASS)
    assert op_histogram(out) == {"Identity": 2, "LayerNormalization": 1}
    assert stats == {"fused": 1}
    assert_equivalent(model, out, feeds=FEEDS, atol=1e-5, rtol=1e-5)
    got = run_model(out, FEEDS)[0][0]
    np.testing.assert_allclose(got, _numpy_layernorm(FEEDS[0]["x"], GAMMA, BETA), atol=1e-5)


def test_fused_is_no_less_accurate_when_the_mean_is_far_from_zero() -> None:
    model = decomposed()
    out, _ = run_pass(model, PASS)
    x = (np.random.default_rng(1).standard_normal((4, 64, H)) + 100).astype(np.float32)
    ref = _numpy_layernorm(x, GAMMA, BETA)
    err_decomposed = np.abs(run_model(model, [{"x": x}])[0][0] - ref).max()
    err_fused = np.abs(run_model(out, [{"x": x}])[0][0] - ref).max()
    assert err_fused <= err_decomposed


@pytest.mark.parametrize(("gamma", "beta"), [(None, None), (GAMMA, None), (None, BETA),
                                             (np.float32(2.0), np.float32(0.5)),
                                             (GAMMA.reshape(1, 1, H), BETA.reshape(1, H))])
def test_optional_and_broadcast_affine(gamma: np.ndarray | None, beta: np.ndarray | None) -> None:
    model = decomposed(gamma=gamma, beta=beta)
    out, stats = run_pass(model, PASS)
    assert stats == {"fused": 1}
    assert op_histogram(out) == {"Identity": 2, "LayerNormalization": 1}
    assert_equivalent(model, out, feeds=FEEDS, atol=1e-5, rtol=1e-5)


def test_positive_last_axis_with_known_rank() -> None:
    model = decomposed(axis=2)
    out, stats = run_pass(model, PASS)
    assert stats == {"fused": 1}
    assert_equivalent(model, out, feeds=FEEDS, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_export_of_nn_layernorm() -> None:
    torch = pytest.importorskip("torch")
    ln = torch.nn.LayerNorm(H)
    with torch.no_grad():
        ln.weight.copy_(torch.from_numpy(GAMMA))
        ln.bias.copy_(torch.from_numpy(BETA))
    buf = io.BytesIO()
    # opset 16: the TorchScript exporter writes the decomposition (17 would write the op)
    torch.onnx.export(ln, (torch.zeros(2, 5, H),), buf, opset_version=16, dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "B", 1: "S"}})
    model = onnx.load_from_string(buf.getvalue())
    assert "LayerNormalization" not in op_histogram(model)
    assert_declined(model, PASS, "opset")
    upgraded, report = optimize(model, passes=[f"{PASS}:upgrade=true"])  # the converter raises it to 17
    assert report.stats(PASS) == {"fused": 1}
    assert op_histogram(upgraded) == {"LayerNormalization": 1}
    assert_equivalent(model, upgraded, feeds=FEEDS, atol=1e-5, rtol=1e-5)
    model.opset_import[0].version = 17  # same ops, same meaning at 17
    out, stats = run_pass(model, PASS)
    assert stats == {"fused": 1}
    assert op_histogram(out) == {"LayerNormalization": 1}
    assert_equivalent(model, out, feeds=FEEDS, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kw", "reason"), [
    ({"opset": 16}, "opset"),
    ({"axis": 1}, "axes"),
    ({"keepdims": 0, "shape": [2, 5, H]}, "axes"),
    ({"extra_outputs": ("d",)}, "shared"),
    ({"extra_outputs": ("s",)}, "shared"),
    ({"gamma": GAMMA.reshape(1, 1, 1, H)}, "broadcast"),
    ({"gamma": np.ones((5, H), np.float32)}, "broadcast"),
    ({"gamma": np.float32(2.0), "shape": ["B", "S", "H"]}, "unknown-shape"),
])
def test_declines(kw: dict, reason: str) -> None:
    assert_declined(decomposed(**kw), PASS, reason)


def test_declines_float64() -> None:
    model = decomposed(gamma=None, beta=None)
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    for t in model.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float64), t.name))
    assert_declined(model, PASS, "dtype")


def test_idempotent_and_unchanged_without_pattern() -> None:
    once, _ = run_pass(decomposed(), PASS)
    _, report = optimize(once, passes=[PASS])
    assert report.records[-1].changed is False
    assert report.stats(PASS) == {}


@pytest.mark.parametrize("rank", [3, 4])
def test_tf2onnx_means_as_global_average_pool(rank: int) -> None:
    """tf2onnx writes the means of a [B, S, H] LayerNorm as GlobalAveragePool, which averages every
    axis after the second: the last one alone at rank 3 (fused), two of them at rank 4 (declined)."""
    model = decomposed()
    for node in model.graph.node:
        if node.op_type == "ReduceMean":
            node.op_type = "GlobalAveragePool"
            del node.attribute[:]
    if rank == 4:
        for v in (model.graph.input[0], model.graph.output[0]):
            v.CopyFrom(vi(v.name, [2, 3, 5, H]))
        assert_declined(model, PASS, "axes")
        return
    out, stats = run_pass(model, PASS)
    assert stats == {"fused": 1}
    assert op_histogram(out) == {"Identity": 2, "LayerNormalization": 1}
    np.testing.assert_allclose(run_model(out, FEEDS)[0][0], _numpy_layernorm(FEEDS[0]["x"], GAMMA, BETA), atol=1e-5)
    assert_equivalent(model, out, feeds=FEEDS, atol=1e-5, rtol=1e-5)


def keras_form(mean_op: str = "GlobalAveragePool", shared_scale: bool = False) -> onnx.ModelProto:
    """Keras' LayerNormalization as tf2onnx writes it: y = x * s + (beta - m * s),
    s = gamma * Reciprocal(Sqrt(v + eps)); the means as GlobalAveragePool (rank 3) or ReduceMean."""
    inits: dict[str, np.ndarray] = {"eps": np.float32(1e-3), "gamma": GAMMA, "beta": BETA}

    def mean(src: str, out: str) -> onnx.NodeProto:
        if mean_op == "GlobalAveragePool":
            return helper.make_node("GlobalAveragePool", [src], [out])
        return _mean(src, out, 17, -1, inits)

    nodes = [helper.make_node("Identity", ["x"], ["r"]), mean("r", "m"),
             helper.make_node("Sub", ["r", "m"], ["d"]), helper.make_node("Mul", ["d", "d"], ["sq"]),
             mean("sq", "v"), helper.make_node("Add", ["v", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["s"]), helper.make_node("Reciprocal", ["s"], ["rs"]),
             helper.make_node("Mul", ["rs", "gamma"], ["scale"]), helper.make_node("Mul", ["r", "scale"], ["a"]),
             helper.make_node("Mul", ["m", "scale"], ["ms"]), helper.make_node("Sub", ["beta", "ms"], ["shift"]),
             helper.make_node("Add", ["a", "shift"], ["y"])]
    outputs = [vi("y", SHAPE)] + ([vi("scale", [H])] if shared_scale else [])
    return make_model(nodes, [vi("x", SHAPE)], outputs, inits, opset=17, check=False)


@pytest.mark.parametrize("mean_op", ["GlobalAveragePool", "ReduceMean"])
def test_keras_batchnorm_form(mean_op: str) -> None:
    model = keras_form(mean_op)
    out, stats = run_pass(model, PASS)
    assert stats == {"fused": 1}
    assert op_histogram(out) == {"Identity": 1, "LayerNormalization": 1}
    ln = next(n for n in out.graph.node if n.op_type == "LayerNormalization")
    assert onnx.helper.get_attribute_value(next(a for a in ln.attribute if a.name == "epsilon")) == pytest.approx(1e-3)
    np.testing.assert_allclose(run_model(out, FEEDS)[0][0],
                               _numpy_layernorm(FEEDS[0]["x"], GAMMA, BETA, eps=1e-3), atol=1e-5)
    assert_equivalent(model, out, feeds=FEEDS, atol=1e-5, rtol=1e-5)


def test_keras_form_with_its_scale_read_outside_is_declined() -> None:
    assert_declined(keras_form(shared_scale=True), PASS, "shared")
