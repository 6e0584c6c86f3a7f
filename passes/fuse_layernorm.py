"""Recognize a decomposed layer normalization and write LayerNormalization (opset 17).

    m = ReduceMean(x, axes=[-1])           d = Sub(x, m)          (one Sub, or two alike)
    v = ReduceMean(Pow(d, 2), axes=[-1])   (or Mul(d, d))
    n = Div(d, Sqrt(Add(v, eps)))          (or Mul(d, Reciprocal(Sqrt(...))))
    y = Add(Mul(n, gamma), beta)           (gamma and beta optional, either operand order)
 -> y = LayerNormalization(x, gamma or 1, beta, axis=-1, epsilon=eps)

This is what torch's TorchScript exporter writes for ``nn.LayerNorm`` below opset 17 and what
hand-written norms in Keras/TF and Paddle models export to; tf2onnx writes the two means of a
[B, S, H] tensor as GlobalAveragePool (over the last axis at rank 3), recognized too. Keras'
own LayerNormalization comes out of tf2onnx in a "batchnorm" form, also recognized:

    s = gamma * Reciprocal(Sqrt(v + eps))    y = x * s + (beta - m * s)

It rounds differently from ``(x - m) * s + beta`` (float rounding, within the tolerance tests hold). The ReduceMeans must reduce the
last axis only (``axes`` as attribute, or as input from opset 18) with keepdims=1; gamma and
beta must be constants that vary only along the last axis ([H], [1, H], a scalar).

Numerics: the decomposition computes var = mean((x - m)^2) in float32 op by op; onnxruntime's
LayerNormalization (stash_type=1: float32 statistics) differs by float rounding, and against a
float64 reference its error is no larger than the decomposition's, also when the mean is far
from 0 (both lose digits there: at a mean of 100 std, 3e-5 decomposed vs 1.3e-5 fused). Only
float32 is fused: for float16 the fused op computes in float32 (more precise, so not the same
numbers), for float64 in less.

Declined, and counted in stats:
- ``skipped:opset``: the model is below opset 17 (option ``upgrade=true`` raises it first).
- ``skipped:axes``: a reduction over another axis, several axes, or keepdims=0.
- ``skipped:non-constant``: eps, gamma or beta is not a constant (or eps not a scalar).
- ``skipped:broadcast``: gamma or beta varies along an axis other than the last.
- ``skipped:unknown-shape``: the last dim is needed (gamma is a scalar or absent) and not known.
- ``skipped:dtype``: x is not float32.
- ``skipped:shared``: a tensor inside the pattern is read outside it or is a graph output.
Works inside If/Loop/Scan bodies; custom-domain nodes are left alone.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs
from onnxopt.passes._pattern import (
    OpFusionPass,
    fused_node,
    only_read_inside,
    op_is,
    other_input,
    pattern_nodes,
)

from onnxopt.graph_utils import (
    constant_value,
    make_constant,
    producer,
)
from onnxopt.pass_base import NameGenerator, PassContext

LAYERNORM_OPSET = 17


def _last_axis_mean(node: gs.Node | None, opset: int) -> bool | str:
    """True when ``node`` is ReduceMean over the last axis keeping dims; a reason when another one.

    tf2onnx writes the mean of a rank-3 [B, S, H] as GlobalAveragePool, which averages every
    axis after the second: for rank 3, the last one alone."""
    if op_is(node, "GlobalAveragePool"):
        rank = node.inputs[0].shape
        return True if rank is not None and len(rank) == 3 else "axes"
    if not op_is(node, "ReduceMean"):
        return False
    if int(node.attrs.get("keepdims", 1)) != 1:
        return "axes"
    if opset >= 18 and len(node.inputs) > 1 and node.inputs[1].name:
        value = constant_value(node.inputs[1])
        axes = None if value is None else [int(a) for a in value.reshape(-1)]
    else:
        axes = node.attrs.get("axes")
    rank = node.inputs[0].shape
    if axes is None or len(axes) != 1:
        return "axes"
    if axes[0] == -1 or (rank is not None and axes[0] == len(rank) - 1):
        return True
    return "axes"


def _centered(t: gs.Tensor, opset: int) -> tuple[gs.Tensor, gs.Tensor] | str | None:
    """(x, mean) when ``t`` is Sub(x, ReduceMean(x)); a reason for a near miss."""
    sub = producer(t)
    if not op_is(sub, "Sub") or len(sub.inputs) != 2:
        return None
    x, mean = sub.inputs
    if producer(mean) is None or producer(mean).inputs[0] is not x:
        return None
    ok = _last_axis_mean(producer(mean), opset)
    return (x, mean) if ok is True else (ok or None)


def _squared(t: gs.Tensor) -> gs.Tensor | None:
    """d when ``t`` is Pow(d, 2) or Mul(d, d)."""
    node = producer(t)
    if op_is(node, "Pow"):
        two = constant_value(node.inputs[1])
        return node.inputs[0] if two is not None and two.size == 1 and float(two.reshape(())) == 2.0 else None
    if op_is(node, "Mul") and len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]:
        return node.inputs[0]
    return None


def _normalized(n: gs.Tensor, opset: int) -> tuple[gs.Tensor, float] | str | None:
    """(x, eps) when ``n`` is (x - mean) / sqrt(var + eps) in one of the forms; a reason on a near miss."""
    node = producer(n)
    if op_is(node, "Div") and len(node.inputs) == 2:
        d, root = node.inputs
    elif op_is(node, "Mul") and len(node.inputs) == 2:
        recip = next((t for t in node.inputs if op_is(producer(t), "Reciprocal")), None)
        if recip is None:
            return None
        d, root = other_input(node, recip), producer(recip).inputs[0]
    else:
        return None
    sqrt = producer(root) if d is not None else None
    add = producer(sqrt.inputs[0]) if op_is(sqrt, "Sqrt") else None
    if not op_is(add, "Add") or len(add.inputs) != 2:
        return None
    var = next((t for t in add.inputs if op_is(producer(t), "ReduceMean", "GlobalAveragePool")), None)
    if var is None:
        return None
    centered = _centered(d, opset)
    sq = _squared(producer(var).inputs[0])
    if not isinstance(centered, tuple) or sq is None:
        return centered if isinstance(centered, str) else None
    x, mean = centered
    # the squared term is d itself or a second Sub(x, mean) with the same operands
    if sq is not d and not (op_is(producer(sq), "Sub") and producer(sq).inputs[0] is x
                            and producer(sq).inputs[1] is mean):
        return None
    eps = _epsilon(add, var, [var], opset)
    return eps if isinstance(eps, str) or eps is None else (x, eps)


def _epsilon(add: gs.Node, var: gs.Tensor, means: list[gs.Tensor], opset: int) -> float | str | None:
    """The constant eps of ``Add(var, eps)`` once every one of ``means`` is a last-axis mean; else
    a decline reason (or None: not this pattern)."""
    for t in means:
        ok = _last_axis_mean(producer(t), opset)
        if ok is not True:
            return ok or None
    eps = constant_value(other_input(add, var))
    if eps is None or eps.size != 1:
        return "non-constant"
    return float(eps.reshape(()))


def _keras_form(y: gs.Tensor, opset: int) -> tuple[gs.Tensor, float, gs.Tensor, gs.Tensor] | str | None:
    """(x, eps, gamma, beta) when ``y`` is ``x * s + (beta - m * s)``, ``s = gamma * 1/sqrt(v + eps)``,
    ``m`` and ``v`` the last-axis mean and variance of x: Keras' LayerNormalization as tf2onnx
    writes it (its "batchnorm" form); a reason on a near miss."""
    add = producer(y)
    if not op_is(add, "Add") or len(add.inputs) != 2:
        return None
    a, shift = (producer(t) for t in add.inputs)
    if op_is(a, "Sub") and op_is(shift, "Mul"):
        a, shift = shift, a
    if not (op_is(a, "Mul") and op_is(shift, "Sub")) or len(shift.inputs) != 2:
        return None
    beta, ms_t = shift.inputs
    ms = producer(ms_t)
    if constant_value(beta) is None or not op_is(ms, "Mul"):
        return None
    scale = next((t for t in a.inputs if any(t is u for u in ms.inputs)), None)
    sc = producer(scale) if scale is not None else None
    recip = next((t for t in sc.inputs if op_is(producer(t), "Reciprocal")), None) if op_is(sc, "Mul") else None
    if recip is None:
        return None
    x, mean, gamma = other_input(a, scale), other_input(ms, scale), other_input(sc, recip)
    sqrt = producer(producer(recip).inputs[0])
    add_eps = producer(sqrt.inputs[0]) if op_is(sqrt, "Sqrt") else None
    if x is None or mean is None or gamma is None or constant_value(gamma) is None or not op_is(add_eps, "Add"):
        return None
    var = next((t for t in add_eps.inputs if op_is(producer(t), "ReduceMean", "GlobalAveragePool")), None)
    if var is None or producer(mean) is None or producer(mean).inputs[0] is not x:
        return None
    d = _squared(producer(var).inputs[0])
    if d is None or not op_is(producer(d), "Sub") or producer(d).inputs[0] is not x or producer(d).inputs[1] is not mean:
        return None
    eps = _epsilon(add_eps, var, [mean, var], opset)
    return eps if isinstance(eps, str) or eps is None else (x, eps, gamma, beta)


def _affine(n: gs.Tensor) -> tuple[gs.Tensor, gs.Tensor | None, gs.Tensor | None]:
    """(y, gamma, beta): how far a constant Mul and then a constant Add extend the pattern."""
    y, gamma, beta = n, None, None
    reader = y.outputs[0] if len(y.outputs) == 1 else None
    if op_is(reader, "Mul") and (other := other_input(reader, y)) is not None and constant_value(other) is not None:
        y, gamma = reader.outputs[0], other
        reader = y.outputs[0] if len(y.outputs) == 1 else None
    if op_is(reader, "Add") and (other := other_input(reader, y)) is not None and constant_value(other) is not None:
        y, beta = reader.outputs[0], other
    return y, gamma, beta


def _per_last_axis(t: gs.Tensor | None, x: gs.Tensor, name: str, names: NameGenerator,
                   default: float | None) -> gs.Constant | str | None:
    """``t`` as a [H] constant (``default`` filled when absent), or a decline reason."""
    if t is None and default is None:
        return None
    value = np.full((), default, np.float32) if t is None else constant_value(t)
    assert value is not None
    if any(d != 1 for d in value.shape[:-1]):
        return "broadcast"
    if value.ndim > 1 and (x.shape is None or value.ndim > len(x.shape)):
        return "unknown-shape" if x.shape is None else "broadcast"  # would raise the output's rank
    h = _last_dim(x)
    if value.dtype != np.float32:
        return "dtype"
    flat = value.reshape(-1)
    if flat.size == 1:
        if h is None:
            return "unknown-shape"
        flat = np.full(h, flat[0], np.float32)
    elif h is not None and flat.size != h:
        return "broadcast"
    return make_constant(names.fresh(name), flat)


def _last_dim(x: gs.Tensor) -> int | None:
    shape = x.shape
    return shape[-1] if shape and isinstance(shape[-1], int) else None


class FuseLayerNormPass(OpFusionPass):
    """Write a decomposed layer normalization over the last axis as LayerNormalization."""

    name = "fuse-layernorm"

    op_opset = LAYERNORM_OPSET

    def fuse(self, g: gs.Graph, ctx: PassContext, stats: Counter[str]) -> dict[int, gs.Node]:
        replaced: dict[int, gs.Node] = {}
        for node in list(g.nodes):
            if not op_is(node, "Div", "Mul", "Add") or not node.outputs:
                continue  # no outputs: the last node of a pattern fused just now
            y = node.outputs[0]
            if node.op == "Add":  # the last node of Keras' form: (x, eps, gamma, beta)
                found = _keras_form(y, ctx.opset)
                parts = (*found[:2], y, *found[2:]) if isinstance(found, tuple) else None
            else:  # the normalization, before its optional affine Mul and Add: (x, eps)
                found = _normalized(y, ctx.opset)
                parts = (*found, *_affine(y)) if isinstance(found, tuple) else None
            if found is None:
                continue
            new = found if parts is None else self._fuse(g, *parts, ctx)
            if isinstance(new, str):
                stats[f"skipped:{new}"] += 1
                continue
            replaced[id(new[0])] = new[1]
            stats["fused"] += 1
        return replaced

    @staticmethod
    def _fuse(g: gs.Graph, x: gs.Tensor, eps: float, y: gs.Tensor, gamma: gs.Tensor | None,
              beta: gs.Tensor | None, ctx: PassContext) -> tuple[gs.Node, gs.Node] | str:
        """(the pattern's last node, the LayerNormalization to put in its place), or a reason."""
        if ctx.opset < LAYERNORM_OPSET:
            return "opset"
        if x.dtype is not None and np.dtype(x.dtype) != np.float32:
            return "dtype"
        if not only_read_inside(g, pattern_nodes(x, y), y):
            return "shared"
        scale = _per_last_axis(gamma, x, "ln_scale", ctx.names, 1.0)
        bias = _per_last_axis(beta, x, "ln_bias", ctx.names, None)
        for part in (scale, bias):
            if isinstance(part, str):
                return part
        last = producer(y)
        assert last is not None
        assert isinstance(scale, gs.Constant)
        inputs = [x, scale] + ([bias] if isinstance(bias, gs.Constant) else [])
        return last, fused_node(last, "LayerNormalization", inputs, {"axis": -1, "epsilon": eps},
                                ctx.names.fresh(f"{last.name or 'ln'}_layernorm"))
