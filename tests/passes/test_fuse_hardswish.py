from __future__ import annotations

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

PASS = "fuse-hardswish"
SHAPE = ["N", 3, 5, 5]
FEEDS = [{"x": np.linspace(-5, 5, 2 * 75, dtype=np.float32).reshape(2, 3, 5, 5)}]  # covers both knees


def _clip(src: str, out: str, opset: int, inits: dict) -> onnx.NodeProto:
    if opset < 11:
        return helper.make_node("Clip", [src], [out], min=0.0, max=6.0)
    inits.update(lo=np.float32(0.0), hi=np.float32(6.0))
    return helper.make_node("Clip", [src, "lo", "hi"], [out])


def decomposed(kind: str, opset: int = 14, sixth: str = "Div", three_first: bool = False,
               extra_outputs: tuple[str, ...] = ()) -> onnx.ModelProto:
    """x -> Relu -> r -> <kind pattern over r> -> y (Relu: x is an intermediate, not an input)."""
    inits: dict[str, np.ndarray] = {"three": np.float32(3.0)}
    nodes = [helper.make_node("Relu" if opset >= 6 else "Identity", ["x"], ["r"]),
             helper.make_node("Add", ["three", "r"] if three_first else ["r", "three"], ["a"]),
             _clip("a", "c", opset, inits)]
    pre = "c" if kind == "hardsigmoid" else "m"
    if kind == "hardswish":
        nodes.append(helper.make_node("Mul", ["r", "c"], ["m"]))
    if sixth == "Div":
        inits["six"] = np.float32(6.0)
        nodes.append(helper.make_node("Div", [pre, "six"], ["y"]))
    else:
        inits["sixth"] = np.float32(1 / 6)
        nodes.append(helper.make_node("Mul", ["sixth", pre], ["y"]))
    outputs = [vi("y", SHAPE)] + [vi(n, SHAPE) for n in extra_outputs]
    return make_model(nodes, [vi("x", SHAPE)], outputs, inits, opset=opset)


def via_hardsigmoid(opset: int = 14, alpha: float = 1 / 6, swap: bool = False) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("HardSigmoid", ["r"], ["h"], alpha=alpha, beta=0.5),
             helper.make_node("Mul", ["h", "r"] if swap else ["r", "h"], ["y"])]
    return make_model(nodes, [vi("x", SHAPE)], [vi("y", SHAPE)], opset=opset)


def _numpy_hardswish(x: np.ndarray) -> np.ndarray:
    return x * np.clip(x + 3, 0, 6) / 6


@pytest.mark.parametrize("opset", [9, 11, 13, 17])
@pytest.mark.parametrize("sixth", ["Div", "Mul"])
def test_writes_hardsigmoid_from_clip_form(opset: int, sixth: str) -> None:
    model = decomposed("hardsigmoid", opset=opset, sixth=sixth, three_first=opset == 13)
    out, stats = run_pass(model, PASS)
    assert op_histogram(out) == {"HardSigmoid": 1, "Relu": 1}
    assert stats == {"fused-hardsigmoid": 1}
    assert_equivalent(model, out, feeds=FEEDS, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("opset", [14, 18, 21])
@pytest.mark.parametrize("sixth", ["Div", "Mul"])
def test_writes_hardswish_from_clip_product(opset: int, sixth: str) -> None:
    model = decomposed("hardswish", opset=opset, sixth=sixth)
    out, stats = run_pass(model, PASS)
    assert op_histogram(out) == {"HardSwish": 1, "Relu": 1}
    assert stats == {"fused-hardswish": 1}
    assert_equivalent(model, out, feeds=FEEDS, atol=1e-6, rtol=1e-6)
    # independent oracle: numpy's x * clip(x + 3, 0, 6) / 6 on relu(x)
    r = np.maximum(FEEDS[0]["x"], 0)
    np.testing.assert_allclose(run_model(out, FEEDS)[0][0], _numpy_hardswish(r), atol=1e-6)


@pytest.mark.parametrize("swap", [False, True])
def test_writes_hardswish_from_hardsigmoid_product(swap: bool) -> None:
    model = via_hardsigmoid(swap=swap)
    out, stats = run_pass(model, PASS)
    assert op_histogram(out) == {"HardSwish": 1, "Relu": 1}
    assert stats == {"fused-hardswish": 1}
    assert_equivalent(model, out, feeds=FEEDS, atol=1e-6, rtol=1e-6)


def test_clip_then_product_becomes_one_hardswish() -> None:
    """x * (Clip(x + 3, 0, 6) / 6): HardSigmoid first, then the product is a HardSwish."""
    model = decomposed("hardsigmoid", opset=14)
    model.graph.node[-1].output[0] = "hs"
    model.graph.node.append(helper.make_node("Mul", ["r", "hs"], ["y"]))
    out, stats = run_pass(model, PASS)
    assert op_histogram(out) == {"HardSwish": 1, "Relu": 1}
    assert stats == {"fused-hardsigmoid": 1, "fused-hardswish": 1}
    assert_equivalent(model, out, feeds=FEEDS, atol=1e-6, rtol=1e-6)


def test_dynamic_batch() -> None:
    model = decomposed("hardswish", opset=14)
    out, _ = run_pass(model, PASS)
    feeds = [{"x": np.random.default_rng(0).uniform(-6, 6, (5, 3, 5, 5)).astype(np.float32)}]
    assert_equivalent(model, out, feeds=feeds, atol=1e-6, rtol=1e-6)


def test_declines_hardswish_below_opset_14() -> None:
    model = via_hardsigmoid(opset=13)
    assert_declined(model, PASS, "opset")
    model = decomposed("hardswish", opset=13)
    assert_declined(model, PASS, "opset")


def test_declines_shared_intermediates() -> None:
    assert_declined(decomposed("hardswish", extra_outputs=("c",)), PASS, "shared")
    model = decomposed("hardsigmoid")
    model.graph.node.append(helper.make_node("Neg", ["a"], ["z"]))
    model.graph.output.append(vi("z", SHAPE))
    assert_declined(model, PASS, "shared")


@pytest.mark.parametrize("change", ["three", "alpha", "bound", "x-differs"])
def test_leaves_other_constants_alone(change: str) -> None:
    if change == "alpha":
        model = via_hardsigmoid(alpha=0.2)
    else:
        model = decomposed("hardswish")
        if change == "three":
            model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.float32(2.5), "three"))
        elif change == "bound":
            hi = next(t for t in model.graph.initializer if t.name == "hi")
            hi.CopyFrom(onnx.numpy_helper.from_array(np.float32(5.0), "hi"))
        else:
            model.graph.node[3].input[0] = "x"  # x * Clip(relu(x) + 3, 0, 6) / 6 is not a HardSwish
    out, stats = run_pass(model, PASS)
    assert stats == {}
    assert op_histogram(out) == op_histogram(model)


def test_idempotent() -> None:
    once, _ = run_pass(decomposed("hardswish"), PASS)
    _, report = optimize(once, passes=[PASS])
    assert report.records[-1].changed is False


def test_level1_fuses_before_a_following_scale_is_merged_into_the_sixth() -> None:
    """Paddle writes HardSwish then a constant Mul: level 1 must not merge the / 6 into it first."""
    model = decomposed("hardswish", opset=14)
    model.graph.node[-1].output[0] = "hw"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.float32(0.47), "k"))
    model.graph.node.append(helper.make_node("Mul", ["k", "hw"], ["y"]))
    out, report = optimize(model, level=1)
    assert op_histogram(out) == {"HardSwish": 1, "Mul": 1, "Relu": 1}
    assert report.stats(PASS) == {"fused-hardswish": 1}
    assert_equivalent(model, out, feeds=FEEDS, atol=1e-6, rtol=1e-6)


def test_upgrade_option_raises_the_opset_and_fuses() -> None:
    model = decomposed("hardswish", opset=11)
    out, report = optimize(model, passes=[f"{PASS}:upgrade=true"])
    assert report.stats(PASS) == {"fused-hardswish": 1}
    assert op_histogram(out) == {"HardSwish": 1, "Relu": 1}
    assert next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx")) == 14
    assert_equivalent(model, out, feeds=FEEDS, atol=1e-6, rtol=1e-6)
