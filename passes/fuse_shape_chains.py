"""Fuse two consecutive layout/shape ops into one (or none).

    Transpose(Transpose(x, p1), p2)     -> Transpose(x, p)    p[i] = p1[p2[i]]; none if identity
    Reshape(Reshape(x, s1), s2)         -> Reshape(x, s2)     s2's 0s resolved, see below
    Squeeze(Squeeze(x, a1), a2)         -> Squeeze(x, a1 + a2 mapped to x's axes)
    Unsqueeze(Unsqueeze(x, a1), a2)     -> Unsqueeze(x, a2 + a1 mapped to the output's axes)
    any two of Reshape/Squeeze/Unsqueeze/Flatten with a static intermediate shape
                                        -> Reshape(x, final shape); none if it equals x's shape

Reshape's ``0`` (with ``allowzero=0``) copies a dim of *its input*, here the first
Reshape's output: it is replaced by that dim when shape inference knows it as a
positive integer; otherwise declined. ``-1`` means "the rest" for x just as for the
intermediate, so it is kept. Squeeze axes index the input; a2 indexes the squeezed
tensor, so a2[j] becomes the j-th axis of x not in a1. Unsqueeze axes index the output;
a1 indexes the intermediate, whose axes are the output's axes not inserted by a2, in
order. Negative axes are normalized with the known rank (declined if unknown). Axes are
attributes before opset 13 and constant inputs from 13 on; the rewrite keeps the form.
The second node is rewritten in place (it keeps its output tensor and name), the first
node is removed; longer chains fuse step by step in one run.

Declined, and counted in stats (pairs of other ops are ignored):
- ``skipped:intermediate-shared``: the first node's output has another consumer or is a
  graph output (fusing would need to keep the first node anyway).
- ``skipped:non-constant``: a shape or axes input is not a constant.
- ``skipped:unknown-shape``: a Reshape ``0`` or a mixed chain needs an intermediate dim
  (or the whole shape) that is not a known integer.
- ``skipped:unknown-rank``: a negative axis or a default Transpose perm needs a rank that
  is not known.
- ``skipped:no-axes``: Squeeze without axes (depends on run-time dims) and no static shape.
- ``skipped:empty-dim``: the fused Reshape target would contain a 0 dim.
Reshape before opset 5 (shape as an attribute) is left alone. Works inside If/Loop/Scan.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph_utils import (
    bypass,
    constant_value,
    is_default_domain,
    is_graph_output,
    iter_graphs,
    make_constant,
)
from onnxopt.pass_base import NameGenerator, Pass, PassContext, PassResult

_RESHAPE_LIKE = ("Reshape", "Squeeze", "Unsqueeze", "Flatten")


class _DeclineError(Exception):
    """Carries a decline reason out of nested helpers."""


def _rank(tensor: gs.Tensor) -> int | None:
    return None if tensor.shape is None else len(tensor.shape)


def _static(tensor: gs.Tensor) -> list[int] | None:
    shape = tensor.shape
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return [int(d) for d in shape]


def _axes(node: gs.Node, opset: int) -> list[int] | None:
    """Squeeze/Unsqueeze axes; None when absent; raises when not a constant."""
    if opset < 13:
        axes = node.attrs.get("axes")
        return None if axes is None else [int(a) for a in axes]
    if len(node.inputs) < 2 or not node.inputs[1].name:
        return None
    value = constant_value(node.inputs[1])
    if value is None:
        raise _DeclineError("non-constant")
    return [int(a) for a in np.asarray(value).reshape(-1)]


def _normalize(axes: Sequence[int], rank: int | None) -> list[int]:
    if any(a < 0 for a in axes):
        if rank is None:
            raise _DeclineError("unknown-rank")
        axes = [a + rank if a < 0 else a for a in axes]
    return sorted(axes)


def _nth_free(taken: set[int], count: int) -> list[int]:
    """The first ``count`` non-negative integers not in ``taken``, in order."""
    out, k = [], 0
    while len(out) < count:
        if k not in taken:
            out.append(k)
        k += 1
    return out


def _compose_axes(a: gs.Node, b: gs.Node, x: gs.Tensor, opset: int) -> list[int]:
    a1, a2 = _axes(a, opset), _axes(b, opset)
    if a1 is None or a2 is None:
        raise _DeclineError("no-axes")
    r = _rank(x)
    if a.op == "Squeeze":
        n1 = _normalize(a1, r)
        n2 = _normalize(a2, None if r is None else r - len(n1))
        kept = _nth_free(set(n1), max(n2, default=-1) + 1)
        return sorted(set(n1) | {kept[j] for j in n2})
    out_rank = None if r is None else r + len(a1) + len(a2)
    n2 = _normalize(a2, out_rank)
    n1 = _normalize(a1, None if r is None else r + len(a1))
    rest = _nth_free(set(n2), max(n1, default=-1) + 1)
    return sorted(set(n2) | {rest[i] for i in n1})


def _resolve_reshape(b: gs.Node, t: gs.Tensor) -> np.ndarray:
    """Second Reshape's target with its copy-dims (0) taken from the intermediate ``t``."""
    s2 = constant_value(b.inputs[1])
    if s2 is None:
        raise _DeclineError("non-constant")
    s2 = np.asarray(s2, dtype=np.int64).copy()
    if int(b.attrs.get("allowzero", 0)) == 0:
        for i in np.flatnonzero(s2 == 0):
            dim = t.shape[i] if t.shape is not None and i < len(t.shape) else None
            if not isinstance(dim, int) or dim <= 0:
                raise _DeclineError("unknown-shape")
            s2[i] = dim
    return s2


def _out_shape(node: gs.Node, d: list[int], opset: int) -> list[int]:
    """Static output shape of a Reshape/Squeeze/Unsqueeze/Flatten with input shape ``d``."""
    if node.op == "Flatten":
        axis = int(node.attrs.get("axis", 1))
        axis = axis + len(d) if axis < 0 else axis
        return [math.prod(d[:axis]), math.prod(d[axis:])]
    if node.op == "Reshape":
        s = constant_value(node.inputs[1])
        if s is None:
            raise _DeclineError("non-constant")
        allowzero = int(node.attrs.get("allowzero", 0))
        if not allowzero and any(v == 0 and i >= len(d) for i, v in enumerate(s.reshape(-1))):
            raise _DeclineError("unknown-shape")  # invalid copy-dim: leave the error to the runtime
        out = [d[i] if v == 0 and not allowzero else int(v) for i, v in enumerate(s.reshape(-1))]
        if -1 in out:
            known = math.prod(v for v in out if v != -1)
            out[out.index(-1)] = math.prod(d) // known if known else 0
        return out
    axes = _axes(node, opset)
    if node.op == "Squeeze":
        gone = set(_normalize(axes, len(d))) if axes is not None else {
            i for i, v in enumerate(d) if v == 1}
        return [v for i, v in enumerate(d) if i not in gone]
    if axes is None:  # Unsqueeze axes are required: malformed, leave it alone
        raise _DeclineError("no-axes")
    inserted = set(_normalize(axes, len(d) + len(axes)))
    it = iter(d)
    return [1 if i in inserted else next(it) for i in range(len(d) + len(inserted))]


def _set_axes(node: gs.Node, axes: list[int], opset: int, names: NameGenerator) -> None:
    if opset < 13:
        node.attrs["axes"] = axes
    else:
        node.inputs = [node.inputs[0], make_constant(names.fresh("axes_fused"),
                                                     np.array(axes, dtype=np.int64))]


def _to_reshape(node: gs.Node, x: gs.Tensor, shape: Sequence[int], names: NameGenerator) -> None:
    node.op = "Reshape"
    node.attrs = {}
    node.inputs = [x, make_constant(names.fresh("shape_fused"), np.array(shape, dtype=np.int64))]


class FuseShapeChainsPass(Pass):
    """Fuse consecutive Transpose, Reshape, Squeeze, Unsqueeze and Flatten nodes."""

    name = "fuse-shape-chains"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        for g in list(iter_graphs(graph)):
            alive = {id(n) for n in g.nodes}
            removed: set[int] = set()
            for b in list(g.nodes):
                if id(b) in removed or not is_default_domain(b) or not b.inputs or not b.outputs:
                    continue
                t = b.inputs[0]
                a = t.inputs[0] if len(t.inputs) == 1 else None
                if a is None or id(a) not in alive or not is_default_domain(a) or not a.inputs:
                    continue
                if not self._is_pair(a, b, ctx.opset):
                    continue
                if is_graph_output(g, t) or len(t.outputs) != 1:
                    stats["skipped:intermediate-shared"] += 1
                    continue
                try:
                    done = self._fuse(g, a, b, ctx)
                except _DeclineError as e:
                    stats[f"skipped:{e.args[0]}"] += 1
                    continue
                stats[done] += 1
                a.inputs.clear()
                a.outputs.clear()
                removed.add(id(a))
                if not b.outputs:  # both nodes were the identity
                    b.inputs.clear()
                    removed.add(id(b))
            if removed:
                g.nodes = [n for n in g.nodes if id(n) not in removed]
        changed = any(not k.startswith("skipped:") for k in stats)
        if changed:
            graph.cleanup()
        return PassResult(changed=changed, stats=dict(stats))

    @staticmethod
    def _is_pair(a: gs.Node, b: gs.Node, opset: int) -> bool:
        if a.op == b.op == "Transpose":
            return True
        if a.op not in _RESHAPE_LIKE or b.op not in _RESHAPE_LIKE:
            return False
        return opset >= 5 or "Reshape" not in (a.op, b.op)  # Reshape-1: shape attribute

    def _fuse(self, g: gs.Graph, a: gs.Node, b: gs.Node, ctx: PassContext) -> str:
        """Rewrite ``b`` to read ``a``'s input directly; returns the stats key."""
        x, t = a.inputs[0], a.outputs[0]
        if a.op == "Transpose":
            rank = _rank(x) if _rank(x) is not None else _rank(t)
            p1, p2 = a.attrs.get("perm"), b.attrs.get("perm")
            if (p1 is None or p2 is None) and rank is None:
                raise _DeclineError("unknown-rank")
            p1 = list(p1) if p1 is not None else list(range(rank))[::-1]
            p2 = list(p2) if p2 is not None else list(range(rank))[::-1]
            perm = [int(p1[i]) for i in p2]
            if perm == sorted(perm):
                return self._identity(g, b, x)
            b.inputs[0] = x
            b.attrs["perm"] = perm
            return "fused-transpose"
        first_reason = None
        if a.op == b.op and a.op in ("Reshape", "Squeeze", "Unsqueeze"):
            try:
                if a.op == "Reshape":
                    target = _resolve_reshape(b, t)
                    b.inputs = [x, make_constant(ctx.names.fresh("shape_fused"), target)]
                else:
                    axes = _compose_axes(a, b, x, ctx.opset)
                    b.inputs[0] = x
                    _set_axes(b, axes, ctx.opset, ctx.names)
                return f"fused-{a.op.lower()}"
            except _DeclineError as e:
                first_reason = e.args[0]
        # mixed chain: compute the final shape from the static intermediate shape
        d = _static(t)
        if d is None:
            raise _DeclineError(first_reason or "unknown-shape")
        try:
            final = _out_shape(b, d, ctx.opset)
        except _DeclineError as e:
            raise _DeclineError(first_reason or e.args[0]) from None
        if _static(x) == final:
            return self._identity(g, b, x)
        if 0 in final:
            raise _DeclineError("empty-dim")
        _to_reshape(b, x, final, ctx.names)
        return "fused-to-reshape"

    @staticmethod
    def _identity(g: gs.Graph, b: gs.Node, x: gs.Tensor) -> str:
        """The pair computes ``x``: drop both, or keep one Identity to hold an output name."""
        if bypass(g, x, b.outputs[0]) is None:
            return "removed-pair"
        b.op = "Identity"
        b.attrs = {}
        b.inputs = [x]
        return "fused-to-identity"
