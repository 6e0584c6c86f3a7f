from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper

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

PASS = "fuse-gelu"
SHAPE = ["B", "S", 16]
FEEDS = [{"x": np.linspace(-6, 6, 2 * 3 * 16, dtype=np.float32).reshape(2, 3, 16)}]


def erf_form(opset: int = 20, div: bool = True, half_first: bool = False, sqrt2: float = math.sqrt(2),
             extra_outputs: tuple[str, ...] = ()) -> onnx.ModelProto:
    """x -> MatMul -> h -> 0.5 * h * (1 + erf(h / sqrt 2)) -> y."""
    inits = {"W": np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32) * 0.3,
             "one": np.float32(1.0), "half": np.float32(0.5)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"])]
    if div:
        inits["r2"] = np.float32(sqrt2)
        nodes.append(helper.make_node("Div", ["h", "r2"], ["s"]))
    else:
        inits["r2"] = np.float32(1 / sqrt2)
        nodes.append(helper.make_node("Mul", ["h", "r2"], ["s"]))
    nodes += [helper.make_node("Erf", ["s"], ["e"]), helper.make_node("Add", ["e", "one"], ["a"])]
    if half_first:
        nodes += [helper.make_node("Mul", ["h", "half"], ["hh"]), helper.make_node("Mul", ["hh", "a"], ["y"])]
    else:
        nodes += [helper.make_node("Mul", ["h", "a"], ["m"]), helper.make_node("Mul", ["m", "half"], ["y"])]
    outputs = [vi("y", SHAPE)] + [vi(n, SHAPE) for n in extra_outputs]
    return make_model(nodes, [vi("x", SHAPE)], outputs, inits, opset=opset)


def tanh_form(opset: int = 20, pow_cube: bool = True) -> onnx.ModelProto:
    inits = {"W": np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32) * 0.3,
             "k": np.float32(0.044715), "c": np.float32(math.sqrt(2 / math.pi)),
             "one": np.float32(1.0), "half": np.float32(0.5)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"])]
    if pow_cube:
        inits["three"] = np.float32(3.0)
        nodes.append(helper.make_node("Pow", ["h", "three"], ["cube"]))
    else:
        nodes += [helper.make_node("Mul", ["h", "h"], ["sq"]), helper.make_node("Mul", ["sq", "h"], ["cube"])]
    nodes += [helper.make_node("Mul", ["cube", "k"], ["kc"]), helper.make_node("Add", ["h", "kc"], ["in"]),
              helper.make_node("Mul", ["in", "c"], ["arg"]), helper.make_node("Tanh", ["arg"], ["t"]),
              helper.make_node("Add", ["t", "one"], ["a"]), helper.make_node("Mul", ["h", "a"], ["m"]),
              helper.make_node("Mul", ["m", "half"], ["y"])]
    return make_model(nodes, [vi("x", SHAPE)], [vi("y", SHAPE)], inits, opset=opset)


def _gelu_attr(model: onnx.ModelProto) -> str:
    node = next(n for n in model.graph.node if n.op_type == "Gelu")
    return next((helper.get_attribute_value(a).decode() for a in node.attribute if a.name == "approximate"), "none")


@pytest.mark.parametrize("div", [True, False])
@pytest.mark.parametrize("half_first", [False, True])
@pytest.mark.parametrize("opset", [20, 21])
def test_writes_gelu_from_erf_form(div: bool, half_first: bool, opset: int) -> None:
    model = erf_form(opset=opset, div=div, half_first=half_first)
    out, stats = run_pass(model, PASS)
    assert op_histogram(out) == {"Gelu": 1, "MatMul": 1}
    assert stats == {"fused-erf": 1}
    assert _gelu_attr(out) == "none"
    assert_equivalent(model, out, feeds=FEEDS, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pow_cube", [True, False])
def test_writes_tanh_gelu(pow_cube: bool) -> None:
    model = tanh_form(pow_cube=pow_cube)
    out, stats = run_pass(model, PASS)
    assert op_histogram(out) == {"Gelu": 1, "MatMul": 1}
    assert stats == {"fused-tanh": 1}
    assert _gelu_attr(out) == "tanh"
    assert_equivalent(model, out, feeds=FEEDS, atol=1e-6, rtol=1e-5)


def test_rounded_sqrt2_is_within_the_stated_tolerance() -> None:
    model = erf_form(sqrt2=1.4142)
    out, stats = run_pass(model, PASS)
    assert stats == {"fused-erf": 1}
    ref, got = run_model(model, FEEDS)[0][0], run_model(out, FEEDS)[0][0]
    h = FEEDS[0]["x"].astype(np.float64) @ onnx.numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    # the bound in the module docstring: 4e-6 |x| (plus float32 rounding)
    assert np.all(np.abs(got - ref) <= 4e-6 * np.abs(h) + 1e-6)
    # the fused result is the true Gelu (erf from math), the decomposition is the one off
    true = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    assert np.abs(got - true).max() <= np.abs(ref - true).max()


def test_declines_below_opset_20() -> None:
    assert_declined(erf_form(opset=18), PASS, "opset")


def test_declines_shared_intermediate() -> None:
    assert_declined(erf_form(extra_outputs=("e",)), PASS, "shared")


def test_leaves_wrong_constant_and_standard_gelu_alone() -> None:
    model = erf_form(sqrt2=1.5)
    out, stats = run_pass(model, PASS)
    assert stats == {}
    assert op_histogram(out) == op_histogram(model)
    fused, _ = run_pass(erf_form(), PASS)
    _, report = optimize(fused, passes=[PASS])
    assert report.records[-1].changed is False
    assert report.stats(PASS) == {}


def test_level1_fuses_before_a_following_scale_is_merged_into_the_half() -> None:
    model = erf_form()
    model.graph.node[-1].output[0] = "g"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.float32(3.0), "k"))
    model.graph.node.append(helper.make_node("Mul", ["g", "k"], ["y"]))
    out, report = optimize(model, level=1)
    assert op_histogram(out) == {"Gelu": 1, "MatMul": 1, "Mul": 1}
    assert report.stats(PASS) == {"fused-erf": 1}
    assert_equivalent(model, out, feeds=FEEDS, atol=1e-6, rtol=1e-5)


def test_upgrade_option_raises_the_opset_and_fuses() -> None:
    model = erf_form(opset=17)
    out, report = optimize(model, passes=[f"{PASS}:upgrade=true"])
    assert report.stats(PASS) == {"fused-erf": 1}
    assert next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx")) == 20
    assert_equivalent(model, out, feeds=FEEDS, atol=1e-6, rtol=1e-5)
