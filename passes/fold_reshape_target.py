"""Replace a Reshape target computed from runtime shapes by a constant with 0 and -1.

    t = Concat(Slice(Shape(x), 0, 1), [-1])             Reshape(x, t)   ->  Reshape(x, [0, -1])
    t = Concat(Unsqueeze(Gather(Shape(x), 0)), [4, 6])  Reshape(x, t)   ->  Reshape(x, [0, 4, 6])
    t = Concat(Shape(y, start=0, end=1), [1280])        Reshape(z, t)   ->  Reshape(z, [-1, 1280])

Exporters write a flatten with a dynamic batch this way (torch ``x.view(x.size(0), -1)``,
Paddle's flatten); onnxsim and onnxslim fold it with symbolic shapes. The target is read
entry by entry: a constant part gives literal entries; a part built from a shape (``Shape``
with or without start/end, ``Slice`` of it with constant bounds and step 1, ``Gather`` of it
with constant indices, ``Unsqueeze`` of a gathered scalar) gives "dim i of tensor s". Then,
for target position p:
- dim p of the Reshape's own input becomes 0 (Reshape copies that dim), also when the entry is
  a dim of another tensor that shape inference gave the same symbol (e.g. ``batch``);
- a dim that shape inference knows as a number becomes that number;
- one remaining unknown dim becomes -1 when every other entry is a nonzero number: the
  element count is the same, so Reshape infers exactly the value the shape computation
  produced (with a copied dim beside it the count could be 0 and -1 undefined: declined).
The rewrite is exact whenever the original Reshape is valid. With ``allowzero=1`` the new
target uses 0 only when no other entry is 0 (allowzero is then set to 0, same meaning).

Declined, and counted in stats (Reshapes with a constant target, or whose target is not
built from shapes, are ignored):
- ``skipped:dynamic``: two or more entries stay unknown, or one beside a -1, a 0 or a copied dim.
- ``skipped:unknown-rank``: a part needs the rank of the shaped tensor (end, negative index).
Works inside If/Loop/Scan bodies.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs
from onnxopt.passes._pattern import op_is

from onnxopt.graph_utils import (
    constant_value,
    iter_graphs,
    make_constant,
    producer,
)
from onnxopt.pass_base import Pass, PassContext, PassResult

# an entry: ("lit", value) or ("dim", tensor, index)
Entry = tuple


def _rank(t: gs.Tensor) -> int | None:
    return None if t.shape is None else len(t.shape)


def _shape_dims(node: gs.Node) -> list[Entry] | str | None:
    """Entries of Shape(src) (start/end from opset 15)."""
    src = node.inputs[0]
    start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
    rank = _rank(src)
    if rank is None:
        return "unknown-rank"
    lo = max(0, start + rank if start < 0 else start)
    hi = rank if end is None else min(rank, end + rank if end < 0 else end)
    return [("dim", src, i) for i in range(lo, hi)]


def _ints(node: gs.Node, index: int, attr: str) -> list[int] | None:
    if len(node.inputs) > index and node.inputs[index].name:
        value = constant_value(node.inputs[index])
        return None if value is None else [int(v) for v in value.reshape(-1)]
    raw = node.attrs.get(attr)
    return None if raw is None else [int(v) for v in raw]


def _part(t: gs.Tensor) -> list[Entry] | str | None:
    """The entries a 1-D int64 tensor holds, a decline reason, or None when not understood."""
    value = constant_value(t)
    if value is not None:
        return [("lit", int(v)) for v in value.reshape(-1)] if value.ndim <= 1 else None
    node = producer(t)
    if op_is(node, "Shape"):
        return _shape_dims(node)
    if op_is(node, "Unsqueeze"):  # a gathered scalar made 1-D
        axes = _ints(node, 1, "axes")
        inner = _part(node.inputs[0]) if axes in ([0], [-1]) else None
        return inner if isinstance(inner, (str, type(None))) or len(inner) == 1 else None
    if not (op_is(node, "Slice") or op_is(node, "Gather")) or not op_is(producer(node.inputs[0]), "Shape"):
        return None
    dims = _shape_dims(producer(node.inputs[0]))
    if isinstance(dims, str):
        return dims
    assert dims is not None
    n = len(dims)
    if op_is(node, "Gather"):
        idx = constant_value(node.inputs[1])
        if idx is None or idx.ndim > 1 or int(node.attrs.get("axis", 0)) != 0:
            return None
        if any(not -n <= int(i) < n for i in idx.reshape(-1)):
            return None  # out of range: the original fails, nothing to fold
        return [dims[int(i) % n] for i in idx.reshape(-1)]
    starts, ends = _ints(node, 1, "starts"), _ints(node, 2, "ends")
    axes, steps = _ints(node, 3, "axes"), _ints(node, 4, "steps")
    if starts is None or ends is None or len(starts) != 1 or axes not in (None, [0], [-1]) \
            or steps not in (None, [1]):
        return None
    lo, hi = (v + n if v < 0 else v for v in (starts[0], ends[0]))
    return dims[max(0, lo):max(0, min(n, hi))]


def _entries(target: gs.Tensor) -> list[Entry] | str | None:
    node = producer(target)
    if op_is(node, "Concat"):
        out: list[Entry] = []
        for t in node.inputs:
            part = _part(t)
            if part is None or isinstance(part, str):
                return part
            out.extend(part)
        return out
    return _part(target) if op_is(node, "Shape") else None


def _resolve(reshape: gs.Node, entries: list[Entry]) -> list[int] | str:
    """The constant target, or a decline reason."""
    data = reshape.inputs[0]
    allowzero = int(reshape.attrs.get("allowzero", 0))
    values: list[int | None] = []
    zero_copy = False
    for p, e in enumerate(entries):
        if e[0] == "lit":
            values.append(e[1])
            continue
        _, src, i = e
        dim = src.shape[i] if src.shape is not None and i < len(src.shape) else None
        if isinstance(dim, (int, np.integer)) and dim >= 0:
            values.append(int(dim))  # the value the shape computation yields: same meaning
        elif _same_dim(src, i, data, p) and not (allowzero and _has_zero(entries)):
            values.append(0)  # copies dim p of the input
            zero_copy = True
        else:
            values.append(None)
    unknown = [p for p, v in enumerate(values) if v is None]
    # -1 is inferred from the element count: only when no other entry is -1, and none can be 0
    # (a copied dim may be 0 at run time; then the count is 0 and -1 has no value)
    if len(unknown) > 1 or (unknown and (-1 in values or zero_copy or 0 in values)):
        return "dynamic"
    if unknown:
        values[unknown[0]] = -1  # the one unknown: the element count determines it
    if zero_copy and allowzero:
        reshape.attrs["allowzero"] = 0  # no other entry is 0, so both readings agree
    return [int(v) for v in values if v is not None]


def _same_dim(src: gs.Tensor, i: int, data: gs.Tensor, p: int) -> bool:
    """Whether dim i of ``src`` is dim p of ``data``: the same tensor and axis, or the same
    symbol from shape inference (which gives one symbol to dims it proved equal)."""
    if src is data:
        return i == p
    a = src.shape[i] if src.shape is not None and i < len(src.shape) else None
    b = data.shape[p] if data.shape is not None and p < len(data.shape) else None
    return isinstance(a, str) and bool(a) and a == b


def _has_zero(entries: list[Entry]) -> bool:
    """Whether an entry is a literal or known 0 (it would turn into "copy" without allowzero)."""
    for e in entries:
        if e[0] == "lit" and e[1] == 0:
            return True
        if e[0] == "dim" and e[1].shape is not None and e[2] < len(e[1].shape) and e[1].shape[e[2]] == 0:
            return True
    return False


class FoldReshapeTargetPass(Pass):
    """Replace a Reshape target computed from Shape ops by a constant with 0 and -1."""

    name = "fold-reshape-target"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        for g in list(iter_graphs(graph)):
            for node in g.nodes:
                if not op_is(node, "Reshape") or len(node.inputs) != 2 or constant_value(node.inputs[1]) is not None:
                    continue
                entries = _entries(node.inputs[1])
                if isinstance(entries, str):
                    stats[f"skipped:{entries}"] += 1
                    continue
                if entries is None or not any(e[0] == "dim" for e in entries):
                    continue  # not a shape computation, or one with no dim to fold
                target = _resolve(node, entries)
                if isinstance(target, str):
                    stats[f"skipped:{target}"] += 1
                    continue
                node.inputs[1] = make_constant(ctx.names.fresh(f"{node.name or 'reshape'}_target"),
                                               np.array(target, dtype=np.int64))
                stats["folded"] += 1
        if stats["folded"]:
            graph.cleanup()
        return PassResult(changed=stats["folded"] > 0, stats=dict(stats))
