"""Recognize SiLU (x * Sigmoid(x)) and write the standard Swish op (opset 24).

    y = Mul(x, Sigmoid(x))        (either operand order)    ->  y = Swish(x)              alpha = 1
    y = Mul(x, Sigmoid(a * x))    (a a scalar constant)     ->  y = Swish(x, alpha=a)

Swish(x) = x * sigmoid(alpha * x), so the rewrite is the definition; the fused kernel rounds
once where the pair rounds twice (float rounding apart). Swish is new in opset 24: torch and
Keras exports below it keep the pair (``skipped:opset``) unless option ``upgrade=true`` raises
the model to opset 24 first. YOLOv5/v8, EfficientNet and most diffusion U-Nets use SiLU.

Declined, and counted in stats:
- ``skipped:opset``: the model is below opset 24.
- ``skipped:shared``: the Sigmoid (or ``a * x``) output is read elsewhere or is a graph output.
Works inside If/Loop/Scan bodies; custom-domain nodes are left alone.
"""

from __future__ import annotations

from collections import Counter

import onnx_graphsurgeon as gs
from onnxopt.passes._ort_patterns import scalar
from onnxopt.passes._pattern import OpFusionPass, fused_node, op_is, other_input

from onnxopt.graph_utils import is_graph_output, producer
from onnxopt.pass_base import PassContext

SWISH_OPSET = 24


def _scaled(t: gs.Tensor, x: gs.Tensor) -> float | None:
    """1.0 when ``t`` is x, ``a`` when ``t`` is Mul(x, a) with a scalar float constant a."""
    if t is x:
        return 1.0
    node = producer(t)
    if not op_is(node, "Mul"):
        return None
    other = other_input(node, x)
    return None if other is None else scalar(other)


def _match(mul: gs.Node) -> tuple[gs.Tensor, float, list[gs.Tensor]] | None:
    """(x, alpha, intermediates) when ``mul`` is x * Sigmoid(alpha * x)."""
    if not op_is(mul, "Mul") or len(mul.inputs) != 2:
        return None
    for x, s in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
        sig = producer(s)
        if op_is(sig, "Sigmoid") and (alpha := _scaled(sig.inputs[0], x)) is not None:
            inner = [s] if sig.inputs[0] is x else [s, sig.inputs[0]]
            return x, alpha, inner
    return None


class FuseSwishPass(OpFusionPass):
    """Write SiLU/Swish (x * Sigmoid(alpha * x)) as the standard Swish op."""

    name = "fuse-swish"

    op_opset = SWISH_OPSET

    def fuse(self, g: gs.Graph, ctx: PassContext, stats: Counter[str]) -> dict[int, gs.Node]:
        replaced: dict[int, gs.Node] = {}
        for node in list(g.nodes):
            found = _match(node)
            if found is None:
                continue
            x, alpha, inner = found
            if ctx.opset < SWISH_OPSET:
                stats["skipped:opset"] += 1
                continue
            if any(len(t.outputs) != 1 or is_graph_output(g, t) for t in inner):
                stats["skipped:shared"] += 1
                continue
            attrs = {} if alpha == 1.0 else {"alpha": alpha}
            replaced[id(node)] = fused_node(node, "Swish", [x], attrs, ctx.names.fresh(f"{node.name or 'mul'}_swish"))
            stats["fused"] += 1
        return replaced
