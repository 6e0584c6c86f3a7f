"""Recognizers of decomposed Gelu (erf and tanh forms) and the standard op (not a pass).

Shared by fuse-gelu (writes the standard Gelu) and fuse-ort-bias-gelu (writes onnxruntime's
BiasGelu/FastGelu): one definition of which subgraphs are a Gelu. The constants are checked
to 1e-4 relative (exporters round sqrt(2) and sqrt(2/pi) differently).
"""

from __future__ import annotations

import math

import onnx_graphsurgeon as gs
from onnxopt.passes._ort_patterns import scalar
from onnxopt.passes._pattern import op_is, other_input

from onnxopt.graph_utils import producer

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _near(value: float | None, target: float) -> bool:
    return value is not None and abs(value - target) <= 1e-4 * abs(target)


def _scaled_by(node: gs.Node, t: gs.Tensor, factor: float) -> bool:
    """Whether ``node`` computes ``t * factor`` (as Mul by factor or Div by 1/factor)."""
    if op_is(node, "Mul"):
        other = other_input(node, t)
        return other is not None and _near(scalar(other), factor)
    return op_is(node, "Div") and node.inputs[0] is t and _near(scalar(node.inputs[1]), 1.0 / factor)


def _plus_one(t: gs.Tensor) -> gs.Tensor | None:
    """The reader of ``t`` computing ``t + 1``, its output."""
    if len(t.outputs) != 1 or not op_is(t.outputs[0], "Add"):
        return None
    add = t.outputs[0]
    other = other_input(add, t)
    return add.outputs[0] if other is not None and _near(scalar(other), 1.0) else None


def _half_x_times(x: gs.Tensor, t: gs.Tensor) -> gs.Tensor | None:
    """The output of ``0.5 * x * t`` built from Muls in any order, reading ``t``, else None."""
    if len(t.outputs) != 1 or not op_is(t.outputs[0], "Mul"):
        return None
    mul = t.outputs[0]
    other = other_input(mul, t)
    if other is None:
        return None
    out = mul.outputs[0]
    if other is x:  # x * t, then * 0.5
        nxt = out.outputs[0] if len(out.outputs) == 1 else None
        return nxt.outputs[0] if nxt is not None and _scaled_by(nxt, out, 0.5) else None
    half = producer(other)  # (x * 0.5) * t
    return out if half is not None and _scaled_by(half, x, 0.5) else None


def _erf_gelu(erf: gs.Node) -> tuple[gs.Tensor, gs.Tensor] | None:
    """(x, y) of ``y = 0.5 * x * (1 + Erf(x / sqrt 2))`` around ``erf``."""
    scaled = producer(erf.inputs[0])
    if scaled is None or not op_is(scaled, "Mul", "Div"):
        return None
    for x in scaled.inputs:
        if _scaled_by(scaled, x, 1.0 / SQRT2):
            one = _plus_one(erf.outputs[0])
            y = _half_x_times(x, one) if one is not None else None
            return (x, y) if y is not None else None
    return None


def _cubed_from(t: gs.Tensor) -> gs.Tensor | None:
    """x when ``t`` is Pow(x, 3) or x * x * x."""
    node = producer(t)
    if op_is(node, "Pow") and _near(scalar(node.inputs[1]), 3.0):
        return node.inputs[0]
    if op_is(node, "Mul"):
        inner = producer(node.inputs[0])
        if op_is(inner, "Mul") and inner.inputs[0] is inner.inputs[1] is node.inputs[1]:
            return node.inputs[1]
    return None


def _tanh_gelu(tanh: gs.Node) -> tuple[gs.Tensor, gs.Tensor] | None:
    """(x, y) of ``y = 0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`` around ``tanh``."""
    outer = producer(tanh.inputs[0])
    if not op_is(outer, "Mul"):
        return None
    inner = next((t for t in outer.inputs if _near(scalar(other_input(outer, t) or t), SQRT_2_OVER_PI)), None)
    add = producer(inner) if inner is not None else None
    if not op_is(add, "Add"):
        return None
    for x in add.inputs:
        cube_term = producer(other_input(add, x) or x)
        if cube_term is None or not op_is(cube_term, "Mul"):
            continue
        for c in cube_term.inputs:
            if _cubed_from(c) is x and _near(scalar(other_input(cube_term, c) or c), 0.044715):
                one = _plus_one(tanh.outputs[0])
                y = _half_x_times(x, one) if one is not None else None
                if y is not None:
                    return x, y
    return None


def gelus(graph: gs.Graph) -> list[tuple[gs.Tensor, gs.Tensor, str]]:
    """(x, y, kind) of every Gelu: kind "Gelu" / "FastGelu" for the standard op, "erf" / "tanh"
    for the decomposed forms."""
    found = []
    for node in graph.nodes:
        if op_is(node, "Gelu"):
            approx = node.attrs.get("approximate", "none")
            approx = approx.decode() if isinstance(approx, bytes) else approx
            found.append((node.inputs[0], node.outputs[0], "FastGelu" if approx == "tanh" else "Gelu"))
        elif op_is(node, "Erf") and (m := _erf_gelu(node)):
            found.append((*m, "erf"))
        elif op_is(node, "Tanh") and (m := _tanh_gelu(node)):
            found.append((*m, "tanh"))
    return found
