"""Recognize decomposed HardSigmoid and HardSwish and write the standard op.

    Clip(x + 3, 0, 6) / 6            (or * 1/6)        ->  HardSigmoid(x, alpha=1/6, beta=0.5)  opset >= 6
    x * HardSigmoid(x, 1/6, 0.5)     (either order)    ->  HardSwish(x)                          opset >= 14
    (x * Clip(x + 3, 0, 6)) / 6      (or * 1/6)        ->  HardSwish(x)                          opset >= 14

HardSigmoid(x) = max(0, min(1, alpha*x + beta)); with alpha = 1/6, beta = 1/2 that is
clip(x + 3, 0, 6) / 6, and HardSwish(x) = x * HardSigmoid(x) with exactly those constants.
The forms differ only by float rounding (x/6 + 0.5 rounds differently from (x + 3)/6): a few
ulp of the result. The Add's 3 may be on either side; Clip bounds come from attributes
(opset < 11) or constant inputs. Constants are compared to 1e-6 relative (1/6 in float32 is
0.16666667). Paddle, Keras and older torch exports write these forms.

Below opset 14 a HardSwish pattern is left as it is (the HardSigmoid part is still written,
opset 6), unless option ``upgrade=true`` raises the model to opset 14 first.

Declined, and counted in stats:
- ``skipped:opset``: a HardSwish pattern in a model below opset 14.
- ``skipped:shared``: an intermediate (x + 3, the Clip, the product) has another reader or
  is a graph output; fusing would keep it and add a node.
Works inside If/Loop/Scan bodies; custom-domain nodes are left alone.
"""

from __future__ import annotations

from collections import Counter

import onnx_graphsurgeon as gs
from onnxopt.passes._ort_patterns import scalar
from onnxopt.passes._pattern import OpFusionPass, fused_node, op_is, other_input

from onnxopt.graph_utils import constant_value, is_graph_output, producer
from onnxopt.pass_base import NameGenerator, PassContext

_TOL = 1e-6
HARDSWISH_OPSET = 14


def _near(t: gs.Tensor | None, target: float) -> bool:
    v = None if t is None else scalar(t)
    return v is not None and abs(v - target) <= _TOL * max(abs(target), 1.0)


def _only_reader(t: gs.Tensor) -> gs.Node | None:
    return t.outputs[0] if len(t.outputs) == 1 else None


def _sixth_of(node: gs.Node | None, t: gs.Tensor) -> bool:
    """Whether ``node`` computes ``t / 6`` (Div by 6 or Mul by 1/6)."""
    if op_is(node, "Div"):
        return node.inputs[0] is t and _near(node.inputs[1], 6.0)
    return op_is(node, "Mul") and _near(other_input(node, t), 1.0 / 6.0)


def _relu6_of_plus3(clip: gs.Node, opset: int) -> gs.Tensor | None:
    """x when ``clip`` is Clip(x + 3, 0, 6)."""
    if opset < 11:
        lo, hi = clip.attrs.get("min"), clip.attrs.get("max")
        bounds = lo is not None and hi is not None and abs(lo) <= _TOL and abs(hi - 6.0) <= 6 * _TOL
    else:
        bounds = len(clip.inputs) == 3 and _near(clip.inputs[1], 0.0) and _near(clip.inputs[2], 6.0)
    add = producer(clip.inputs[0])
    if not bounds or not op_is(add, "Add") or len(add.inputs) != 2:
        return None
    for x in add.inputs:
        if _near(other_input(add, x), 3.0) and constant_value(x) is None:
            return x
    return None


def _is_hardsigmoid_of(node: gs.Node | None, x: gs.Tensor) -> bool:
    return (op_is(node, "HardSigmoid") and node.inputs[0] is x
            and abs(float(node.attrs.get("alpha", 0.2)) - 1 / 6) <= _TOL
            and abs(float(node.attrs.get("beta", 0.5)) - 0.5) <= _TOL)


def _match(node: gs.Node, opset: int) -> tuple[str, gs.Tensor, gs.Node, list[gs.Tensor]] | None:
    """(op to write, x, last node of the pattern, intermediates) for a pattern ending at ``node``."""
    if op_is(node, "Mul") and len(node.inputs) == 2:
        for x in node.inputs:
            hs = producer(other_input(node, x) or x)
            if _is_hardsigmoid_of(hs, x):  # x * HardSigmoid(x)
                return "HardSwish", x, node, [hs.outputs[0]]
    for t in node.inputs[:2]:
        inner = producer(t)
        if not _sixth_of(node, t) or inner is None:
            continue
        if op_is(inner, "Clip") and (x := _relu6_of_plus3(inner, opset)) is not None:
            return "HardSigmoid", x, node, [inner.inputs[0], t]
        if op_is(inner, "Mul") and len(inner.inputs) == 2:  # (x * Clip(x + 3, 0, 6)) / 6
            for x in inner.inputs:
                clip = producer(other_input(inner, x) or x)
                if op_is(clip, "Clip") and _relu6_of_plus3(clip, opset) is x:
                    return "HardSwish", x, node, [clip.inputs[0], clip.outputs[0], t]
    return None


def _replace(op: str, x: gs.Tensor, last: gs.Node, names: NameGenerator) -> gs.Node:
    attrs = {"alpha": 1.0 / 6.0, "beta": 0.5} if op == "HardSigmoid" else {}
    return fused_node(last, op, [x], attrs, names.fresh(f"{last.name or op}_{op.lower()}"))


class FuseHardSwishPass(OpFusionPass):
    """Write decomposed HardSigmoid and HardSwish as the standard ops."""

    name = "fuse-hardswish"

    op_opset = HARDSWISH_OPSET

    def fuse(self, g: gs.Graph, ctx: PassContext, stats: Counter[str]) -> dict[int, gs.Node]:
        replaced: dict[int, gs.Node] = {}
        for node in list(g.nodes):  # topological: a HardSigmoid written here feeds a later Mul
            found = _match(node, ctx.opset)
            if found is None:
                continue
            op, x, last, inner = found
            if op == "HardSwish" and ctx.opset < HARDSWISH_OPSET:
                stats["skipped:opset"] += 1
                continue
            if any(len(t.outputs) != 1 or is_graph_output(g, t) for t in inner):
                stats["skipped:shared"] += 1
                continue
            new = _replace(op, x, last, ctx.names)
            replaced[id(last)] = new
            stats[f"fused-{op.lower()}"] += 1
        return replaced
