"""Remove nodes that provably return their first input unchanged.

    y = Cast(x, to=dtype(x))                   y = CastLike(x, like), dtype(like) == dtype(x)
    y = Reshape(x, s)     s == shape(x) entry by entry: s[i] == 0 copies dim i (allowzero=0),
                          s[i] == x.shape[i] (static), at most one s[i] == -1 (then it is
                          x.shape[i], because every other dim and the element count agree)
    y = Transpose(x, perm=[0, 1, ..., n-1])    (no perm: only rank <= 1)
    y = Pad(x, pads=0...)                      every mode copies x when no element is added
    y = Slice(x, ...)     per sliced axis: step 1, start 0 (or <= -dim), end >= dim (or INT32_MAX)
    y = Expand(x, s)      broadcast(shape(x), s) == shape(x): len(s) <= rank, s[i] in (1, dim i)
    y = Tile(x, repeats=1...)                  y = Concat(x) (one input)
    y = Squeeze(x)        no axes, every dim of x static and != 1
    y = Flatten(x, axis=1)                     rank(x) == 2
->  readers of y read x  (``graph_utils.bypass``)

Pad covers opset < 11 (``pads``/``paddings`` attributes) and >= 11 (``pads`` input, with
the ``axes`` input of opset 18). Slice covers opset < 10 (attributes) and >= 10 (inputs).
Unsqueeze is never a no-op; Squeeze/Unsqueeze with explicit axes change the rank.

Declined, and counted in stats:
- ``skipped:graph-output``: ``y`` is a graph output and ``x`` cannot take over its name.
- ``skipped:unknown-shape``: proving the no-op needs a dim (or the rank) that is not
  statically known (declared shapes of graph outputs are never used).
- ``skipped:unknown-dtype``: a Cast whose input dtype is unknown.
- ``skipped:non-constant``: the shape/pads/starts/... operand is not a constant.
Works inside If/Loop/Scan bodies; custom-domain nodes are left alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.graph_utils import (
    bypass,
    constant_value,
    is_default_domain,
    is_graph_output,
    iter_graphs,
)
from onnxopt.pass_base import Pass, PassContext, PassResult

INT32_MAX = 2**31 - 1

# A check returns True (no-op), False (not a no-op: silently kept) or a decline reason.
Verdict = bool | str


def _shape(graph: gs.Graph, t: gs.Tensor) -> list[int | str | None] | None:
    if is_graph_output(graph, t) or t.shape is None:
        return None  # declared output shapes may be stale
    return list(t.shape)


def _static(dim: object) -> bool:
    return isinstance(dim, (int, np.integer)) and not isinstance(dim, bool) and dim >= 0


def _operand(node: gs.Node, index: int, attr: str) -> np.ndarray | str | None:
    """An operand given as input ``index`` (newer opsets) or attribute ``attr`` (older)."""
    if len(node.inputs) > index and node.inputs[index].name:
        value = constant_value(node.inputs[index])
        return "non-constant" if value is None else value.astype(np.int64).reshape(-1)
    if attr in node.attrs:
        return np.asarray(node.attrs[attr], dtype=np.int64).reshape(-1)
    return None


def _cast(g: gs.Graph, node: gs.Node) -> Verdict:
    x = node.inputs[0]
    if x.dtype is None:
        return "unknown-dtype"
    if node.op == "CastLike":
        like = node.inputs[1]
        target = like.values.dtype if isinstance(like, gs.Constant) else like.dtype
        if target is None:
            return "unknown-dtype"
    else:
        target = onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"]))
    try:
        return np.dtype(x.dtype) == np.dtype(target)
    except TypeError:  # exotic dtypes graphsurgeon keeps as onnx enums
        return "unknown-dtype"


def _reshape(g: gs.Graph, node: gs.Node) -> Verdict:
    target = constant_value(node.inputs[1])
    if target is None:
        return "non-constant"
    target = target.astype(np.int64).reshape(-1)
    allowzero = int(node.attrs.get("allowzero", 0))
    shape = _shape(g, node.inputs[0])
    if shape is None:
        return "unknown-shape"
    if len(target) != len(shape):
        return False
    for s, d in zip(target.tolist(), shape, strict=True):
        if s == -1 or (s == 0 and not allowzero):
            continue  # -1 is d once the others agree; 0 copies d
        if not _static(d):
            return "unknown-shape"
        if s != d:
            return False
    return True


def _transpose(g: gs.Graph, node: gs.Node) -> Verdict:
    perm = node.attrs.get("perm")
    if perm is not None:
        return list(perm) == list(range(len(perm)))
    shape = _shape(g, node.inputs[0])
    if shape is None:
        return "unknown-shape"
    return len(shape) <= 1


def _pad(g: gs.Graph, node: gs.Node) -> Verdict:
    pads = _operand(node, 1, "pads")
    if pads is None and "paddings" in node.attrs:  # opset 1
        pads = np.asarray(node.attrs["paddings"], dtype=np.int64)
    if isinstance(pads, str):
        return pads
    return pads is not None and not pads.any()  # zero pads copy x in every mode


def _slice(g: gs.Graph, node: gs.Node) -> Verdict:
    operands = [
        _operand(node, i, a) for i, a in ((1, "starts"), (2, "ends"), (3, "axes"), (4, "steps"))
    ]
    for op in operands:
        if isinstance(op, str):
            return op
    starts, ends, axes, steps = operands
    if starts is None or ends is None:
        return False
    n = len(starts)
    axes = np.arange(n) if axes is None else axes
    steps = np.ones(n, dtype=np.int64) if steps is None else steps
    shape = _shape(g, node.inputs[0])
    if (axes < 0).any() and shape is None:
        return "unknown-shape"
    verdict: Verdict = True
    rows = zip(starts.tolist(), ends.tolist(), axes.tolist(), steps.tolist(), strict=True)
    for start, end, axis, step in rows:
        if step != 1:
            return False
        dim = shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None
        whole_start = start == 0 or (_static(dim) and start <= -dim)
        whole_end = end >= INT32_MAX or (_static(dim) and end >= dim)
        if whole_start and whole_end:
            continue
        if not _static(dim) and start <= 0 and end > 0:
            verdict = "unknown-shape"  # could be the whole axis for some dims
            continue
        return False
    return verdict


def _expand(g: gs.Graph, node: gs.Node) -> Verdict:
    target = constant_value(node.inputs[1])
    if target is None:
        return "non-constant"
    shape = _shape(g, node.inputs[0])
    if shape is None:
        return "unknown-shape"
    target = target.astype(np.int64).reshape(-1).tolist()
    if len(target) > len(shape):
        return False
    verdict: Verdict = True
    for s, d in zip(reversed(target), reversed(shape), strict=False):
        if s == 1 or (_static(d) and s == d):
            continue
        if not _static(d):
            verdict = "unknown-shape"  # d may be 1 at run time, broadcasting to s
            continue
        return False
    return verdict


def _tile(g: gs.Graph, node: gs.Node) -> Verdict:
    repeats = constant_value(node.inputs[1])
    if repeats is None:
        return "non-constant"
    return bool((repeats == 1).all())


def _squeeze(g: gs.Graph, node: gs.Node) -> Verdict:
    axes = _operand(node, 1, "axes")
    if isinstance(axes, str):
        return axes
    if axes is not None and len(axes):
        return False  # explicit axes always drop dims
    shape = _shape(g, node.inputs[0])
    if shape is None or any(d == 1 for d in shape):
        return "unknown-shape" if shape is None else False
    return True if all(_static(d) for d in shape) else "unknown-shape"


def _flatten(g: gs.Graph, node: gs.Node) -> Verdict:
    shape = _shape(g, node.inputs[0])
    if shape is None:
        return "unknown-shape"
    axis = int(node.attrs.get("axis", 1))
    return len(shape) == 2 and axis in (1, -1)


def _concat(g: gs.Graph, node: gs.Node) -> Verdict:
    return len(node.inputs) == 1


_CHECKS: dict[str, Callable[[gs.Graph, gs.Node], Verdict]] = {
    "Cast": _cast,
    "CastLike": _cast,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Pad": _pad,
    "Slice": _slice,
    "Expand": _expand,
    "Tile": _tile,
    "Squeeze": _squeeze,
    "Flatten": _flatten,
    "Concat": _concat,
}


def _well_formed(node: gs.Node, needed: Sequence[int]) -> bool:
    return (
        len(node.outputs) == 1
        and bool(node.inputs)
        and bool(node.inputs[0].name)
        and all(len(node.inputs) > i and node.inputs[i].name for i in needed)
    )


_NEEDED_INPUTS = {"Reshape": (1,), "Expand": (1,), "Tile": (1,), "CastLike": (1,)}


class EliminateNoopPass(Pass):
    """Remove Cast, Reshape, Transpose, Pad, Slice, Expand, ... nodes that change nothing."""

    name = "eliminate-noop"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        for g in list(iter_graphs(graph)):
            removed: set[int] = set()
            for node in list(g.nodes):
                check = _CHECKS.get(node.op)
                if check is None or not is_default_domain(node):
                    continue
                if not _well_formed(node, _NEEDED_INPUTS.get(node.op, ())):
                    continue
                verdict = check(g, node)
                if verdict is False:
                    continue
                if isinstance(verdict, str):
                    stats[f"skipped:{verdict}"] += 1
                    continue
                if reason := bypass(g, node.inputs[0], node.outputs[0]):
                    stats[f"skipped:{reason}"] += 1
                    continue
                node.inputs.clear()
                node.outputs.clear()
                removed.add(id(node))
                stats[f"removed-{node.op.lower()}"] += 1
            if removed:
                g.nodes = [n for n in g.nodes if id(n) not in removed]
        changed = any(k.startswith("removed") for k in stats)
        return PassResult(changed=changed, stats=dict(stats))
