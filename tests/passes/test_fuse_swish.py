from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxopt import optimize
from onnxopt.manager import PRESETS
from onnxopt.testing import (
    assert_declined,
    assert_equivalent,
    make_model,
    op_histogram,
    run_model,
    run_pass,
    vi,
)

PASS = "fuse-swish"
SHAPE = ["N", 8]
FEEDS = [{"x": np.linspace(-8, 8, 32, dtype=np.float32).reshape(4, 8)}]


def silu(opset: int = 24, alpha: float | None = None, swap: bool = False,
         extra_outputs: tuple[str, ...] = ()) -> onnx.ModelProto:
    """x -> Relu-free SiLU: x * Sigmoid(alpha * x) -> y."""
    inits = {}
    nodes = []
    arg = "x"
    if alpha is not None:
        inits["a"] = np.float32(alpha)
        nodes.append(helper.make_node("Mul", ["a", "x"], ["ax"]))
        arg = "ax"
    nodes += [helper.make_node("Sigmoid", [arg], ["s"]),
              helper.make_node("Mul", ["s", "x"] if swap else ["x", "s"], ["y"])]
    outputs = [vi("y", SHAPE)] + [vi(n, SHAPE) for n in extra_outputs]
    return make_model(nodes, [vi("x", SHAPE)], outputs, inits, opset=opset)


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("alpha", [None, 1.702])
def test_writes_swish(swap: bool, alpha: float | None) -> None:
    model = silu(alpha=alpha, swap=swap)
    out, stats = run_pass(model, PASS)
    assert op_histogram(out) == {"Swish": 1}
    assert stats == {"fused": 1}
    assert_equivalent(model, out, feeds=FEEDS, atol=1e-6, rtol=1e-5)
    x = FEEDS[0]["x"].astype(np.float64)
    a = 1.0 if alpha is None else alpha
    np.testing.assert_allclose(run_model(out, FEEDS)[0][0], x / (1 + np.exp(-a * x)), atol=1e-5)


def test_declines_below_opset_24_and_shared_sigmoid() -> None:
    assert_declined(silu(opset=23), PASS, "opset")
    assert_declined(silu(extra_outputs=("s",)), PASS, "shared")


def test_leaves_other_products_alone_and_is_idempotent() -> None:
    model = silu()
    model.graph.node[1].input[0] = "s"  # s * s is no SiLU
    model.graph.node[1].input[1] = "s"
    out, stats = run_pass(model, PASS)
    assert stats == {}
    assert op_histogram(out) == op_histogram(model)
    once, _ = run_pass(silu(), PASS)
    _, report = optimize(once, passes=[PASS])
    assert report.records[-1].changed is False


def test_upgrade_option_raises_the_opset_and_fuses() -> None:
    model = silu(opset=18)
    out, report = optimize(model, passes=[f"{PASS}:upgrade=true"])
    assert report.stats(PASS) == {"fused": 1}
    assert next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx")) == 24
    assert_equivalent(model, out, feeds=FEEDS, atol=1e-6, rtol=1e-5)


def test_not_in_level_1() -> None:
    """Swish-24 measured 1.8x slower than Mul + Sigmoid in onnxruntime 1.32 (bench/LOSSLESS_REWRITES.md)."""
    assert PASS not in PRESETS[1]
