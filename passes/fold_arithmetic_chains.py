"""Merge a chain of two elementwise ops with constant operands into one op.

Additive chains (Add, Sub; any numeric dtype), each step read as ``y = s*x + c``:

    Add(x, c) = Add(c, x) -> (+1, c)      Sub(x, c) -> (+1, -c)      Sub(c, x) -> (-1, c)
    outer(inner(x)) = s2*(s1*x + c1) + c2 = (s2*s1)*x + (s2*c1 + c2)
    -> Add(x, s2*c1 + c2)   or   Sub(s2*c1 + c2, x)   when s2*s1 = -1

Multiplicative chains (Mul, and Div by a constant for floats), each step ``y = x * n / d``:

    Mul(x, c) = Mul(c, x) -> (c, 1)       Div(x, c) -> (1, c)        (Div(c, x) never matches)
    -> Div(x, d1*d2) when both steps divide, else Mul(x, n1*n2 / (d1*d2))

Broadcasting is associative, so ``broadcast(broadcast(x, c1), c2)`` is the shape of
``broadcast(x, broadcast(c1, c2))``: the output shape never changes.

Exactness. Integers: two's-complement Add/Sub/Mul are arithmetic modulo 2^bits, which is
associative, so the merged constant is computed in the integer dtype itself (wrapping) and
the outputs are bit-identical; integer Div truncates and is never merged. Floats: the
constants are combined in float64 and rounded once to the dtype, so the merged op differs
from the chain by float rounding only: at most a few ulp of the result for Mul/Div chains
(one rounding of the constant plus one of the op instead of two ops), and for Add/Sub
chains at most one ulp of the larger of |x + c1| and |c2| (the chain's own rounding). A
chain whose intermediate overflowed (inf) or underflowed may give a finite result merged.
A single ``x - c`` or ``x / c`` is left as it is: onnxruntime runs Sub like Add and Div
like Mul, and ``x * (1/c)`` differs from ``x / c`` by an ulp unless c is a power of two.

Declined, and counted in stats (only chains where both ops have exactly one constant input):
- ``skipped:graph-output``: the inner op's output is also a graph output.
- ``skipped:shared``: the inner op's output has another consumer.
- ``skipped:integer-div``: a Div on integers (truncating division does not compose).
- ``skipped:dtype``: the two constants' dtypes differ (not a valid model).
- ``skipped:constant-growth``: the merged constant has more elements than the two together
  (e.g. [4, 1] and [1, 5] make [4, 5]).
- ``skipped:range``: a float constant overflows to inf or underflows to 0 when merged.
Works inside If/Loop/Scan bodies; custom-domain nodes are left alone.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph_utils import (
    constant_value,
    is_default_domain,
    is_graph_output,
    iter_graphs,
    make_constant,
)
from onnxopt.pass_base import NameGenerator, Pass, PassContext, PassResult

_ADDITIVE = ("Add", "Sub")
_MULTIPLICATIVE = ("Mul", "Div")


@dataclasses.dataclass
class _Step:
    """One op as ``y = sign*x + c`` (additive) or ``y = x * num / den`` (multiplicative)."""

    node: gs.Node
    x: gs.Tensor
    additive: bool
    dtype: np.dtype
    sign: int = 1
    c: np.ndarray | None = None        # additive constant (dtype of the model)
    num: np.ndarray | None = None      # multiplicative numerator, or None for 1
    den: np.ndarray | None = None      # multiplicative denominator, or None for 1
    decline: str | None = None         # why this step never merges (integer Div)


def _step(node: gs.Node) -> _Step | None:
    """The node as a step, or None when it is no candidate at all."""
    if node.op not in _ADDITIVE + _MULTIPLICATIVE or not is_default_domain(node):
        return None
    if len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    values = [constant_value(t) for t in node.inputs]
    if (values[0] is None) == (values[1] is None):
        return None  # no constant (nothing to fold) or two (fold-constants' job)
    k = 0 if values[0] is not None else 1
    value = values[k]
    assert value is not None
    x = node.inputs[1 - k]
    if value.dtype.kind not in "iuf":
        return None
    if node.op == "Add":
        return _Step(node, x, True, value.dtype, 1, value)
    if node.op == "Sub":
        if k == 1:  # x - c
            with np.errstate(over="ignore"):
                return _Step(node, x, True, value.dtype, 1, np.negative(value))
        return _Step(node, x, True, value.dtype, -1, value)  # c - x
    if node.op == "Mul":
        return _Step(node, x, False, value.dtype, num=value)
    if k == 0:
        return None  # c / x is no scaling of x
    decline = None if value.dtype.kind == "f" else "integer-div"
    return _Step(node, x, False, value.dtype, den=value, decline=decline)


def _combine(inner: _Step, outer: _Step) -> tuple[str, np.ndarray, bool] | str:
    """(op, constant, constant-first) of the merged node, or a decline reason."""
    if inner.dtype != outer.dtype:
        return "dtype"
    dtype = inner.dtype
    floating = dtype.kind == "f"
    wide = np.float64 if floating else dtype
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        if inner.additive:
            c1, c2 = (np.asarray(s.c, dtype=wide) for s in (inner, outer))
            exact = (c1 if outer.sign == 1 else np.negative(c1)) + c2
            op, first = ("Add", False) if inner.sign * outer.sign == 1 else ("Sub", True)
        else:
            num = _product(inner.num, outer.num, wide)
            den = _product(inner.den, outer.den, wide)
            if num is None and den is not None:
                exact, op = den, "Div"
            else:
                exact = num if den is None else num / den
                op = "Mul"
            first = False
        merged = np.asarray(exact).astype(dtype)
    sizes = [np.asarray(s.c if s.additive else (s.num if s.num is not None else s.den)).size
             for s in (inner, outer)]
    if merged.size > sum(sizes):
        return "constant-growth"
    if floating:
        exact = np.asarray(exact)
        overflow = np.isfinite(exact) & ~np.isfinite(merged)
        if np.any(overflow) or np.any((exact != 0) & (merged == 0)):
            return "range"
    return op, merged, first


def _product(a: np.ndarray | None, b: np.ndarray | None, wide: type) -> np.ndarray | None:
    if a is None or b is None:
        other = a if b is None else b
        return None if other is None else np.asarray(other, dtype=wide)
    return np.asarray(a, dtype=wide) * np.asarray(b, dtype=wide)


def _merge(inner: _Step, outer: _Step, merged: tuple[str, np.ndarray, bool],
           names: NameGenerator) -> None:
    """Rewrite ``outer`` in place to read ``inner``'s input; ``inner`` is left dangling."""
    op, value, constant_first = merged
    node = outer.node
    const = make_constant(names.fresh(f"{node.name or node.op}_merged"), value)
    node.op = op
    node.inputs.clear()
    node.inputs.extend([const, inner.x] if constant_first else [inner.x, const])
    inner.node.inputs.clear()
    inner.node.outputs.clear()


class FoldArithmeticChainsPass(Pass):
    """Merge two chained Add/Sub or Mul/Div ops with constant operands into one op."""

    name = "fold-arithmetic-chains"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        for g in list(iter_graphs(graph)):
            alive = {id(n) for n in g.nodes}
            removed: set[int] = set()
            for node in list(g.nodes):  # topological: an outer op sees its inner already merged
                outer = _step(node)
                if outer is None or len(outer.x.inputs) != 1:
                    continue
                prev = outer.x.inputs[0]
                if id(prev) not in alive:
                    continue  # produced in an outer graph: not ours to rewrite
                inner = _step(prev)
                if inner is None or inner.additive != outer.additive:
                    continue
                reason = inner.decline or outer.decline or _decline(g, inner)
                combined = reason or _combine(inner, outer)
                if isinstance(combined, str):
                    stats[f"skipped:{combined}"] += 1
                    continue
                _merge(inner, outer, combined, ctx.names)
                removed.add(id(prev))
                stats["merged"] += 1
            if removed:
                g.nodes = [n for n in g.nodes if id(n) not in removed]
        if stats["merged"]:
            graph.cleanup()
        return PassResult(changed=stats["merged"] > 0, stats=dict(stats))


def _decline(graph: gs.Graph, inner: _Step) -> str | None:
    out = inner.node.outputs[0]
    if is_graph_output(graph, out):
        return "graph-output"
    if len(out.outputs) != 1:
        return "shared"
    return None
