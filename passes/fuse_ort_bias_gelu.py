"""Fuse a bias Add and the Gelu after it into onnxruntime's BiasGelu (erf) or FastGelu (tanh).

    y = Gelu(x + b)                               b: a constant [H], x: [..., H]
 -> y = com.microsoft.BiasGelu(x, b)              Gelu exact (erf)
 -> y = com.microsoft.FastGelu(x, b)              Gelu approximate="tanh"

Gelu is the standard op (opset 20) or the erf form the exporters write below opset 20:

    g = x * 0.5 * (1 + Erf(x / sqrt(2)))          (any order of the two Muls; x * (1/sqrt(2))
                                                   for the Div)

and the tanh form ``0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`` (``x^3`` as
``Pow(x, 3)`` or ``x * x * x``) is recognised for FastGelu. Without a bias Add before it, a
decomposed erf Gelu becomes com.microsoft's Gelu, and a tanh one (standard or decomposed)
FastGelu without its bias input; a standard erf Gelu without a bias is already one op and is
left alone. The constants are checked to 1e-4 relative (exporters round sqrt(2) and
sqrt(2/pi) differently).

Declined: ``skipped:bias-shape`` (the Add is not of a [H] constant on the last axis),
``skipped:shared-bias-sum`` (x + b is read elsewhere too), ``skipped:not-float32``.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs
from onnxopt.passes._ort_patterns import REQUIRES, ms_node, op_is, scalar, vector

from onnxopt.graph_utils import is_graph_output, producer
from onnxopt.pass_base import Pass, PassContext, PassResult

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _near(value: float | None, target: float) -> bool:
    return value is not None and abs(value - target) <= 1e-4 * abs(target)


def _other(node: gs.Node, t: gs.Tensor) -> gs.Tensor | None:
    """The input of a binary ``node`` that is not ``t`` (None if both or neither are)."""
    a, b = node.inputs
    if (a is t) == (b is t):
        return None
    return b if a is t else a


def _scaled_by(node: gs.Node, t: gs.Tensor, factor: float) -> bool:
    """Whether ``node`` computes ``t * factor`` (as Mul by factor or Div by 1/factor)."""
    if op_is(node, "Mul"):
        other = _other(node, t)
        return other is not None and _near(scalar(other), factor)
    return op_is(node, "Div") and node.inputs[0] is t and _near(scalar(node.inputs[1]), 1.0 / factor)


def _plus_one(t: gs.Tensor) -> gs.Tensor | None:
    """The reader of ``t`` computing ``t + 1``, its output."""
    if len(t.outputs) != 1 or not op_is(t.outputs[0], "Add"):
        return None
    add = t.outputs[0]
    other = _other(add, t)
    return add.outputs[0] if other is not None and _near(scalar(other), 1.0) else None


def _half_x_times(x: gs.Tensor, t: gs.Tensor) -> gs.Tensor | None:
    """The output of ``0.5 * x * t`` built from Muls in any order, reading ``t``, else None."""
    if len(t.outputs) != 1 or not op_is(t.outputs[0], "Mul"):
        return None
    mul = t.outputs[0]
    other = _other(mul, t)
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
    inner = next((t for t in outer.inputs if _near(scalar(_other(outer, t) or t), SQRT_2_OVER_PI)), None)
    add = producer(inner) if inner is not None else None
    if not op_is(add, "Add"):
        return None
    for x in add.inputs:
        cube_term = producer(_other(add, x) or x)
        if cube_term is None or not op_is(cube_term, "Mul"):
            continue
        for c in cube_term.inputs:
            if _cubed_from(c) is x and _near(scalar(_other(cube_term, c) or c), 0.044715):
                one = _plus_one(tanh.outputs[0])
                y = _half_x_times(x, one) if one is not None else None
                if y is not None:
                    return x, y
    return None


def _gelus(graph: gs.Graph) -> list[tuple[gs.Tensor, gs.Tensor, str]]:
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


def _bias(x: gs.Tensor) -> tuple[gs.Tensor, gs.Tensor] | str | None:
    """(input, bias) when ``x`` is ``input + b`` of a [H] constant, a reason, or None (no Add)."""
    add = producer(x)
    if not op_is(add, "Add"):
        return None
    for i in (0, 1):
        inp, b = add.inputs[i], add.inputs[1 - i]
        if vector(b) is None:
            continue
        width = inp.shape[-1] if inp.shape else None
        if not isinstance(width, int) or vector(b, width) is None:
            return "bias-shape"
        return inp, b
    return None


class FuseOrtBiasGeluPass(Pass):
    """Fuse bias Add + Gelu (erf or tanh, standard or decomposed) into onnxruntime's BiasGelu / FastGelu."""

    name = "fuse-ort-bias-gelu"
    requires_runtime = REQUIRES

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        for x, y, kind in _gelus(graph):
            if x.dtype is not None and np.dtype(x.dtype) != np.float32:
                stats["skipped:not-float32"] += 1
                continue
            found = _bias(x)
            if isinstance(found, str):
                stats[f"skipped:{found}"] += 1
                continue
            if found is not None and not _only_read_by_gelu(graph, x, y):
                stats["skipped:shared-bias-sum"] += 1
                continue
            tanh = kind in ("FastGelu", "tanh")
            if found is None and kind == "Gelu":
                continue  # a standard Gelu without a bias: already one op
            # com.microsoft.Gelu is BiasGelu without the bias; FastGelu's bias is optional
            op = "FastGelu" if tanh else ("BiasGelu" if found is not None else "Gelu")
            y_producer = producer(y)
            assert y_producer is not None
            y_producer.outputs.clear()
            ms_node(graph, op, list(found) if found is not None else [x], [y], {}, ctx.names.fresh(op))
            stats[f"fused-{op.lower()}"] += 1
        changed = any(k.startswith("fused-") for k in stats)
        if changed:
            graph.cleanup().toposort()
        return PassResult(changed=changed, stats=dict(stats))


def _only_read_by_gelu(graph: gs.Graph, x: gs.Tensor, y: gs.Tensor) -> bool:
    """Whether every reader of ``x`` is a node of the Gelu pattern ending in ``y``."""
    if is_graph_output(graph, x):
        return False
    inside: set[int] = set()
    stack = [y]
    while stack:  # walk back from y to x: the pattern's nodes
        node = producer(stack.pop())
        if node is None or id(node) in inside:
            continue
        inside.add(id(node))
        stack.extend(t for t in node.inputs if t is not x and not isinstance(t, gs.Constant) and producer(t))
    return all(id(r) in inside for r in x.outputs)
