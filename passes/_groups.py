"""Channel dependency groups over a graphsurgeon graph, and their physical removal.

A *group* is a set of channel-indexed tensor axes that must lose the same indices together
(Torch-Pruning's DepGraph, rebuilt over ONNX). Groups are born at the ops that create
channels, a Conv's output channels and the output units of a MatMul/Gemm with a constant
2-D weight, and follow the channel axis forward:

- producer weight axis 0 (Conv) or N (MatMul/Gemm), its bias, the parameters of a following
  BatchNormalization/InstanceNormalization, per-channel constants of element-wise ops
  (``Mul`` by ``[1, C, 1, 1]``, PRelu slopes, bias ``Add``), unary activations, pooling,
  Dropout/Identity/Cast, Transpose/Squeeze/Unsqueeze (the axis is re-numbered);
- the input channels of every consumer: Conv weight axis 1, MatMul rows (K), Gemm's K axis;
- depthwise Conv (``group == C == M``) passes the channels through: its weight axis 0 and
  bias join the group and its ``group`` attribute follows the kept count;
- grouped Conv: every conv group must keep the same number of channels, so the group is
  split into ``chunks`` equal parts that each lose the same count (a group that cannot be
  split that way is frozen, ``grouped-conv``);
- element-wise partners (residual Add, SE-style Mul, Concat along another axis) merge
  groups by union-find: both sides lose the same indices;
- Concat on the channel axis lays the inputs' channels side by side (each input's group
  at its offset); Split/Slice on the channel axis take sub-ranges;
- Flatten (and a Reshape equivalent to one) of ``[N, C, H, W]`` into ``[N, C*H*W]``: each
  channel owns ``H*W`` consecutive positions (``block``); a Reshape that keeps the channel
  axis in place is followed too.

A tensor's channel axis is described by a *layout*: the axis (counted from the end) and
segments ``(group, start, length, block)`` laid side by side. What is not understood
freezes every group that reaches it, with a reason (``frozen``): ``graph-output``,
``unknown-op``, ``unknown-shape``, ``subgraph`` (an If/Loop/Scan reads the tensor),
``shared-weight``, ``non-constant-weight``, ``grouped-conv``, ``reshape-layout``,
``flatten-layout``, ``broadcast``, ``elementwise-misaligned``, ``unprunable-partner``
(added to or concatenated with channels nothing can prune), ``channel-reduction``
(normalization, softmax or a reduction over the channel axis), ``training-mode``,
``matmul-activation`` (a MatMul of two activations, as in attention), and
``attention heads not supported yet`` (a Reshape that splits the channel axis into heads).
Only the main graph is analysed; subgraphs are never rewritten.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph_utils import (
    constant_value,
    is_default_domain,
    is_graph_output,
    make_constant,
    node_subgraphs,
)
from onnxopt.pass_base import NameGenerator

# ops that apply to each element alone, one data input: channels pass through unchanged
_UNARY = frozenset({
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
    "Celu", "Gelu", "Mish", "Softplus", "Softsign", "ThresholdedRelu", "Identity", "Neg", "Abs",
    "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign",
    "Cast", "Dropout", "Not",
})
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "PRelu",
                     "Where"})
# spatial ops over NCHW: the channel axis (1) is kept
_POOL = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
                   "GlobalLpPool"})
_NORM = frozenset({"BatchNormalization", "InstanceNormalization"})
_CHANNEL_REDUCERS = frozenset({"LayerNormalization", "GroupNormalization", "Softmax",
                               "LogSoftmax", "Hardmax", "LRN", "MeanVarianceNormalization"})
WEIGHT_ROLES = frozenset({"weight-out", "weight-in", "grouped-in", "dw-weight"})


@dataclasses.dataclass(frozen=True)
class Seg:
    """``length`` channels of ``group`` from ``start``, each ``block`` consecutive positions."""

    group: int | None  # None: positions no group owns
    start: int
    length: int
    block: int = 1

    @property
    def positions(self) -> int:
        return self.length * self.block


@dataclasses.dataclass(frozen=True)
class Layout:
    axis: int  # negative: counted from the last axis, so broadcasting keeps it
    segs: tuple[Seg, ...]

    @property
    def positions(self) -> int:
        return sum(s.positions for s in self.segs)

    def offsets(self) -> Iterable[tuple[int, Seg]]:
        pos = 0
        for s in self.segs:
            yield pos, s
            pos += s.positions


@dataclasses.dataclass(frozen=True)
class Member:
    """Positions ``offset + (c - start) * block + [0, block)`` of ``tensor``'s ``axis`` hold
    channel ``c`` of the group, for ``c`` in ``[start, start + length)``."""

    tensor: str
    axis: int  # non-negative
    offset: int
    start: int
    length: int
    block: int = 1
    # weight-out | weight-in | grouped-in | dw-weight | bias | norm-scale | norm | param |
    # activation
    role: str = "param"
    node: str = ""  # the node reading (or, for activations, producing) the tensor
    conv_groups: int = 1  # grouped-in: the Conv's ``group``
    params_per_channel: float = 0.0
    macs_per_channel: float = 0.0


@dataclasses.dataclass
class Group:
    key: str
    channels: int
    members: list[Member]
    frozen: str | None = None
    detail: str = ""
    chunks: int = 1  # the channels split into this many equal parts that lose equal counts
    heads: HeadBlock | None = None  # an attention head group: its channels are heads

    @property
    def params(self) -> int:
        return round(sum(m.params_per_channel for m in self.members) * self.channels)

    @property
    def macs(self) -> int:
        return round(sum(m.macs_per_channel for m in self.members) * self.channels)


# ---- attention heads: matched as blocks before the walk ----

@dataclasses.dataclass(frozen=True)
class HeadBlock:
    """How a head group's shapes are rewritten: the Reshapes that split the projections into
    ``[..., (parts,) heads, head_dim]`` and the one that merges the heads back, and the
    tensors in between whose shapes change."""

    heads: int
    head_dim: int
    # (Reshape output, parts: 3 for a fused QKV, leading dims kept): [*lead, (parts,) H, dh]
    splits: tuple[tuple[str, int, int], ...]
    merge: tuple[str, int]  # (Reshape output, leading dims kept): [*lead, H*dh]
    interior: tuple[str, ...]  # activations whose shapes change


@dataclasses.dataclass(eq=False)
class _Source:
    """A projection ``MatMul(x, W[D, parts*H*dh]) (+ bias)`` split into heads by a Reshape."""

    matmul: gs.Node
    add: gs.Node | None
    split: gs.Node
    parts: int
    heads: int
    head_dim: int


@dataclasses.dataclass(eq=False)
class _Block:
    sources: list[_Source]
    nodes: list[gs.Node]  # data nodes between the splits and the merge (splits included)
    exits: list[tuple[gs.Node, gs.Tensor]] = dataclasses.field(default_factory=list)
    reason: str | None = None
    detail: str = ""
    merge: gs.Node | None = None
    out_proj: gs.Node | None = None


# element-wise ops that may sit between the splits and the merge (scaling, masking)
_HEAD_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Pow", "Max", "Min"})
_HEAD_UNARY = frozenset({"IsNaN", "Cast", "Dropout", "Identity", "Not", "Neg", "Exp", "Relu",
                         "Tanh", "Sigmoid", "Erf", "Sqrt", "Abs"})
_Dim = tuple[str, int]  # (tensor name, axis counted from the end): a dim read with Shape


def _shape_expr(t: gs.Tensor, depth: int = 0) -> list[int | _Dim] | None:
    """The elements of a 1-D shape tensor: ints and ``(tensor, axis)`` dims read with Shape,
    through Gather/Slice/Concat/Unsqueeze/Squeeze/Cast/Reshape (what exporters emit); None
    when it cannot be followed."""
    value = constant_value(t)
    if value is not None:
        return [int(v) for v in value.reshape(-1)]
    if depth > 12 or len(t.inputs) != 1:
        return None
    n = t.inputs[0]
    if n.op == "Shape":
        rank = _rank(n.inputs[0])
        if rank is None:
            return None
        lo, hi = _clamp_range(int(n.attrs.get("start", 0)), int(n.attrs.get("end", rank)), rank)
        return [(n.inputs[0].name, i - rank) for i in range(lo, hi)]  # axes from the end
    if n.op in ("Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape"):
        return _shape_expr(n.inputs[0], depth + 1)
    if n.op == "Concat":
        out: list[int | _Dim] = []
        for i in n.inputs:
            part = _shape_expr(i, depth + 1)
            if part is None:
                return None
            out.extend(part)
        return out
    if n.op == "Gather" and int(n.attrs.get("axis", 0)) == 0:
        data, idx = _shape_expr(n.inputs[0], depth + 1), constant_value(n.inputs[1])
        if data is None or idx is None:
            return None
        return [data[int(i)] for i in idx.reshape(-1)]
    if n.op == "Slice":
        data, spec = _shape_expr(n.inputs[0], depth + 1), slice_spec(n)
        if data is None or spec is None or spec[2] != [0] or spec[3] != [1]:
            return None
        lo, hi = _clamp_range(spec[0][0], spec[1][0], len(data))
        return data[lo:hi]
    return None


def _projection(x: gs.Tensor) -> tuple[gs.Node, gs.Node | None] | None:
    """The MatMul with a constant 2-D weight (and its constant bias Add) producing ``x``."""
    if len(x.inputs) != 1:
        return None
    p = x.inputs[0]
    add = None
    if p.op == "Add" and is_default_domain(p):
        consts = [i for i in p.inputs if constant_value(i) is not None]
        acts = [i for i in p.inputs if constant_value(i) is None]
        if len(consts) != 1 or len(acts) != 1 or len(acts[0].inputs) != 1:
            return None
        add, p = p, acts[0].inputs[0]
    if p.op != "MatMul" or not is_default_domain(p):
        return None
    w = constant_value(p.inputs[1])
    if w is None or w.ndim != 2 or constant_value(p.inputs[0]) is not None:
        return None
    return p, add


def _head_source(node: gs.Node) -> _Source | None:
    """A Reshape ``[..., parts*H*dh] -> [..., (parts,) H, dh]`` of a projection's output."""
    x = node.inputs[0]
    proj = _projection(x)
    rank = _rank(x)
    target = _shape_expr(node.inputs[1]) if len(node.inputs) > 1 else None
    if proj is None or rank is None or target is None:
        return None
    w = constant_value(proj[0].inputs[1])
    assert w is not None
    n = int(w.shape[1])
    extra = len(target) - rank
    dh = target[-1]
    if extra not in (1, 2) or not isinstance(dh, int) or dh <= 0 or n % dh:
        return None
    parts = 1
    if extra == 2:
        p = target[-3]
        if not isinstance(p, int) or p <= 0:
            return None
        parts = p
    if n % (parts * dh):
        return None
    h = n // (parts * dh)
    if isinstance(target[-2], int) and target[-2] not in (-1, h):
        return None
    lead = target[:rank - 1]
    if sum(1 for v in target if v == -1) > 1 or (
            -1 in lead and target[-2] == -1) or (0 in lead and int(node.attrs.get("allowzero", 0))):
        return None
    return _Source(proj[0], proj[1], node, parts, h, dh)


def match_heads(graph: gs.Graph) -> tuple[list[_Block], list[_Block]]:
    """Attention blocks over the main graph: (accepted, declined with a reason).

    A block is found from the Reshapes that split a projection into heads, extended forward
    over every node that reads its tensors (a Shape read is fine: it adapts), up to the
    MatMul with a constant weight that reads the merged heads (the output projection).
    Blocks whose closures meet (Q, K and V meet at the two attention MatMuls) are one block.
    """
    sources = [s for n in graph.nodes if n.op == "Reshape" and is_default_domain(n)
               and (s := _head_source(n)) is not None]
    owner: dict[int, int] = {}  # node id -> block index (union-find over blocks)
    parent = list(range(len(sources)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    closures: list[dict[int, gs.Node]] = []
    exits: list[list[tuple[gs.Node, gs.Tensor]]] = []
    outputs: list[bool] = []
    for i, s in enumerate(sources):
        seen: dict[int, gs.Node] = {id(s.split): s.split}
        ex: list[tuple[gs.Node, gs.Tensor]] = []
        stack = list(s.split.outputs)
        out = False
        while stack:
            t = stack.pop()
            out |= is_graph_output(graph, t)
            for c in t.outputs:
                if c.op == "Shape" or id(c) in seen:
                    continue
                if c.op == "MatMul" and c.inputs[0] is t and (
                        constant_value(c.inputs[1]) is not None):
                    if not any(e[0] is c for e in ex):
                        ex.append((c, t))
                    continue
                seen[id(c)] = c
                stack.extend(c.outputs)
        closures.append(seen)
        exits.append(ex)
        outputs.append(out)
        for nid in seen:
            if nid in owner:
                a, b = find(owner[nid]), find(i)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                owner[nid] = i
    order = {id(n): k for k, n in enumerate(graph.nodes)}
    blocks: dict[int, _Block] = {}
    for i, s in enumerate(sources):
        r = find(i)
        b = blocks.setdefault(r, _Block([], []))
        b.sources.append(s)
        have = {id(n) for n in b.nodes}
        b.nodes.extend(n for k, n in closures[i].items() if k not in have)
        for e in exits[i]:
            if not any(x[0] is e[0] for x in b.exits):
                b.exits.append(e)
        if outputs[i] and b.reason is None:
            b.reason, b.detail = "attention-graph-output", s.split.name
    for b in blocks.values():
        b.nodes.sort(key=lambda n: order[id(n)])
        if b.reason is None:
            _check_block(graph, b)
    done = list(blocks.values())
    return [b for b in done if b.reason is None], [b for b in done if b.reason is not None]


def _check_block(graph: gs.Graph, b: _Block) -> None:
    def decline(reason: str, detail: str) -> None:
        b.reason, b.detail = f"attention-{reason}", detail

    s0 = b.sources[0]
    h, dh = s0.heads, s0.head_dim
    if any((s.heads, s.head_dim) != (h, dh) for s in b.sources):
        decline("head-mismatch", ", ".join(f"{s.split.name}: {s.heads}x{s.head_dim}"
                                           for s in b.sources))
        return
    for s in b.sources:
        x = s.split.inputs[0]
        mm_out = s.matmul.outputs[0]
        if len(x.outputs) != 1 or (s.add is not None and len(mm_out.outputs) != 1):
            decline("shared-projection", s.matmul.name)
            return
        w_t = s.matmul.inputs[1]
        if len(w_t.outputs) != 1:
            decline("shared-weight", w_t.name)
            return
        if s.add is not None:
            bias_t = next(i for i in s.add.inputs if constant_value(i) is not None)
            bias = constant_value(bias_t)
            assert bias is not None
            if len(bias_t.outputs) != 1:
                decline("shared-weight", bias_t.name)
                return
            if bias.ndim != 1 or bias.shape[0] != s.parts * h * dh:
                decline("broadcast", bias_t.name)
                return
    if len(b.exits) != 1:
        decline("no-output-projection" if not b.exits else "several-outputs",
                ", ".join(e[0].name for e in b.exits) or s0.split.name)
        return
    out_proj, merged = b.exits[0]
    w_o = constant_value(out_proj.inputs[1])
    assert w_o is not None
    if w_o.ndim != 2 or w_o.shape[0] != h * dh or len(out_proj.inputs[1].outputs) != 1:
        decline("output-projection", out_proj.name)
        return
    if len(merged.inputs) != 1 or merged.inputs[0].op != "Reshape" or len(merged.outputs) != 1:
        decline("merge", out_proj.name)
        return
    b.merge, b.out_proj = merged.inputs[0], out_proj
    # the head axis (and the QKV part axis), counted from the end, of every tensor inside
    axes: dict[str, tuple[int | None, int | None]] = {}
    splits = {id(s.split): s for s in b.sources}
    inside = {id(n) for n in b.nodes}
    for n in b.nodes:
        ins = [axes.get(t.name) for t in n.inputs]
        why = _propagate(n, ins, axes, splits, h, dh, n is b.merge)
        if why is not None:
            decline(why, f"{n.op} {n.name}")
            return
    for n in b.nodes:
        for o in n.outputs:
            if any(id(c) not in inside and c.op != "Shape" and c is not out_proj
                   for c in o.outputs):
                decline("escape", o.name)
                return


def _propagate(n: gs.Node, ins: list[tuple[int | None, int | None] | None],
               axes: dict[str, tuple[int | None, int | None]], splits: Mapping[int, _Source],
               h: int, dh: int, is_merge: bool) -> str | None:
    """Set the head axis of ``n``'s outputs; a reason when ``n`` mixes or hard-codes heads."""
    out = n.outputs[0]
    if id(n) in splits:
        axes[out.name] = (-2, -3 if splits[id(n)].parts > 1 else None)
        return None
    state = ins[0]
    if state is None and n.op not in _HEAD_BINARY:
        return "op"
    if is_merge:
        rank = _rank(n.inputs[0])
        if state != (-2, None) or rank is None or rank < 3:
            return "merge"
        target = _shape_expr(n.inputs[1])
        if target is None or len(target) != rank - 1 or (
                int(n.attrs.get("allowzero", 0)) and 0 in target[:-1]):
            return "merge"
        return None
    if n.op == "Transpose":
        rank = _rank(n.inputs[0])
        if rank is None:
            return "unknown-shape"
        perm = list(n.attrs.get("perm", list(range(rank - 1, -1, -1))))
        head, part = state
        def move(a: int | None) -> int | None:
            return None if a is None else perm.index(rank + a) - rank
        axes[out.name] = (move(head), move(part))
        return None
    if n.op == "Gather":
        head, part = state
        idx = constant_value(n.inputs[1])
        rank = _rank(n.inputs[0])
        axis = int(n.attrs.get("axis", 0))
        if rank is None or idx is None or idx.ndim != 0 or part is None or axis - rank != part:
            return "gather"
        assert head is not None
        axes[out.name] = (head + 1 if part > head else head, None)  # from the end
        return None
    if n.op in _HEAD_UNARY:
        axes[out.name] = state
        if n.op == "Dropout" and len(n.outputs) > 1 and n.outputs[1].outputs:
            return "op"
        return None
    if n.op in ("Softmax", "LogSoftmax"):
        head = state[0]
        rank = _rank(n.inputs[0])
        axis = int(n.attrs.get("axis", -1))  # opset 13 default; older exports name it
        if head is None or state[1] is not None or rank is None or axis not in (-1, rank - 1):
            return "softmax"
        axes[out.name] = state
        return None
    if n.op == "MatMul":
        if ins[0] is None or ins[1] is None or ins[0] != ins[1] or ins[0][1] is not None:
            return "matmul"
        head = ins[0][0]
        if head is None or head > -3:
            return "matmul"
        axes[out.name] = ins[0]
        return None
    if n.op in _HEAD_BINARY:
        known = [s for s in ins if s is not None]
        if not known or any(s != known[0] for s in known) or known[0][1] is not None:
            return "elementwise"
        head = known[0][0]
        for t, s in zip(n.inputs, ins, strict=True):
            if s is not None:
                continue
            value = constant_value(t)
            shape = list(value.shape) if value is not None else t.shape
            if shape is None:
                return "unknown-shape"
            if value is None and head is not None and len(shape) >= -head and not isinstance(
                    shape[len(shape) + head], int):
                # a mask whose dims inference left symbolic ([B, 1, S, S] built by Expand)
                if not _head_free(t, h):
                    return "broadcast"
                continue
            if head is None:
                if math.prod(d if isinstance(d, int) else 2 for d in shape) != 1:
                    return "broadcast"
                continue
            if len(shape) >= -head and shape[len(shape) + head] != 1:
                return "broadcast"  # e.g. a per-head bias: not sliced yet
        axes[out.name] = known[0]
        return None
    if n.op == "Reshape":
        return _propagate_reshape(n, state, axes)
    return "op"


def _head_free(t: gs.Tensor, h: int, limit: int = 400) -> bool:
    """No float constant with a dim of ``h`` among ``t``'s ancestors: it cannot hold one
    value per head (a per-head bias would), so it broadcasts along the heads."""
    stack, seen = [t], set()
    while stack and len(seen) < limit:
        x = stack.pop()
        if x.name in seen:
            continue
        seen.add(x.name)
        value = constant_value(x)
        if value is not None:
            if np.issubdtype(value.dtype, np.floating) and h > 1 and h in value.shape:
                return False
            continue
        for n in x.inputs:
            stack.extend(n.inputs)
    return not stack


def _propagate_reshape(n: gs.Node, state: tuple[int | None, int | None],
                       axes: dict[str, tuple[int | None, int | None]]) -> str | None:
    """A Reshape between the split and the merge must adapt to the head count by itself: it
    keeps the head axis (``-1`` or a Shape read in its place), folds it into a leading ``-1``
    with the batch, or restores it from a Shape read of a tensor inside."""
    out = n.outputs[0]
    rank = _rank(n.inputs[0])
    target = _shape_expr(n.inputs[1])
    head, part = state
    if rank is None or target is None or part is not None:
        return "reshape"

    def is_head(v: int | _Dim) -> bool:
        if isinstance(v, int):
            return False
        s = axes.get(v[0])
        return s is not None and s[0] is not None and v[1] == s[0]

    if head is not None:
        a = rank + head
        if len(target) == rank and (target[a] == -1 or is_head(target[a])) and not any(
                is_head(v) for i, v in enumerate(target) if i != a):
            axes[out.name] = (head, None)
            return None
        if len(target) == rank - 1 and a == 1 and target[0] == -1 and not any(
                is_head(v) for v in target):
            axes[out.name] = (None, None)  # [B, H, ...] -> [B*H, ...]
            return None
        return "reshape"
    heads = [i for i, v in enumerate(target) if is_head(v)]
    if len(heads) == 1 and -1 not in target:
        axes[out.name] = (heads[0] - len(target), None)
        return None
    return "reshape"


class _Builder:
    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.parent: list[int] = []
        self.channels: list[int] = []
        self.keys: list[str] = []
        self.frozen: list[tuple[str, str] | None] = []
        self.chunks: list[int] = []
        self.members: list[list[Member]] = []
        self.layout: dict[str, Layout] = {}
        self.used_keys: set[str] = set()
        self.main_nodes = {id(n) for n in graph.nodes}

    # ---- union-find ----
    def new_group(self, key: str, channels: int) -> int:
        gid = len(self.parent)
        if key in self.used_keys:  # node names are not always unique
            key = f"{key}#{gid}"
        self.used_keys.add(key)
        self.parent.append(gid)
        self.channels.append(channels)
        self.keys.append(key)
        self.frozen.append(None)
        self.chunks.append(1)
        self.members.append([])
        return gid

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb < ra:  # the older group keeps its key
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.members[ra].extend(self.members[rb])
        self.members[rb] = []
        self.chunks[ra] = math.lcm(self.chunks[ra], self.chunks[rb])
        if self.frozen[ra] is None:
            self.frozen[ra] = self.frozen[rb]

    def freeze(self, layout: Layout | None, reason: str, detail: str = "") -> None:
        if layout is None:
            return
        for s in layout.segs:
            if s.group is not None:
                r = self.find(s.group)
                if self.frozen[r] is None:
                    self.frozen[r] = (reason, detail)

    def freeze_inputs(self, node: gs.Node, reason: str) -> None:
        for t in node.inputs:
            self.freeze(self.layout.get(t.name), reason, f"{node.op} {node.name}")

    # ---- members ----
    def add_members(self, layout: Layout, tensor: gs.Tensor, axis: int, role: str, node: gs.Node,
                    params_total: float = 0.0, macs_total: float = 0.0) -> None:
        """One member per segment of ``layout`` on ``tensor``'s ``axis``; ``*_total`` are the
        tensor's parameters and the node's MACs, spread evenly over the axis positions."""
        npos = layout.positions
        for off, s in layout.offsets():
            if s.group is None:
                continue
            self.members[self.find(s.group)].append(Member(
                tensor.name, axis, off, s.start, s.length, s.block, role, node.name,
                params_per_channel=params_total * s.block / npos,
                macs_per_channel=macs_total * s.block / npos,
            ))

    def add_activation(self, tensor: gs.Tensor, layout: Layout, node: gs.Node) -> None:
        self.layout[tensor.name] = layout
        rank = _rank(tensor)
        axis = rank + layout.axis if rank is not None else layout.axis
        for off, s in layout.offsets():
            if s.group is not None:
                self.members[self.find(s.group)].append(Member(
                    tensor.name, axis, off, s.start, s.length, s.block, "activation", node.name))

    def add_constant(self, layout: Layout, tensor: gs.Tensor, role: str, node: gs.Node,
                     macs_total: float = 0.0) -> bool:
        """A constant broadcast against ``layout``: a member when it spans the channel axis.

        Returns False (and freezes) when it cannot be sliced with the channels.
        """
        value = constant_value(tensor)
        if value is None:
            self.freeze(layout, "non-constant-weight", f"{node.op} {node.name}")
            return False
        axis = value.ndim + layout.axis
        if axis < 0 or value.shape[axis] == 1:
            return True  # broadcast along the channels: nothing to slice
        if value.shape[axis] != layout.positions:
            self.freeze(layout, "broadcast", f"{tensor.name} in {node.name}")
            return False
        if len(tensor.outputs) > 1:
            self.freeze(layout, "shared-weight", tensor.name)
            return False
        self.add_members(layout, tensor, axis, role, node, float(value.size), macs_total)
        return True

    # ---- the walk ----
    def run(self) -> list[Group]:
        blocks, declined = match_heads(self.graph)
        self.head_skip = {id(n) for b in blocks for n in b.nodes} | {
            id(s.add) for b in blocks for s in b.sources if s.add is not None}
        self.head_proj = {id(s.matmul): b for b in blocks for s in b.sources}
        self.head_declined = {id(s.split): b for b in declined for s in b.sources}
        self.head_gid: dict[int, int] = {}
        self.heads: dict[int, HeadBlock] = {}
        for node in self.graph.nodes:
            if id(node) in self.head_skip:
                continue
            if id(node) in self.head_proj:
                self.head_projection(node, self.head_proj[id(node)])
                continue
            ins = [self.layout.get(t.name) for t in node.inputs]
            if node_subgraphs(node):
                self.freeze_inputs(node, "subgraph")
                continue
            if not any(ins):
                self.source(node)
                continue
            if not is_default_domain(node):
                self.freeze_inputs(node, "unknown-op")
                continue
            handler = getattr(self, f"op_{node.op}", None)
            if handler is None:
                for names, h in ((_UNARY, self.unary), (_BINARY, self.binary),
                                 (_POOL, self.pool), (_NORM, self.norm)):
                    if node.op in names:
                        handler = h
                        break
            if handler is None:
                reason = "channel-reduction" if node.op in _CHANNEL_REDUCERS else "unknown-op"
                self.freeze_inputs(node, reason)
                continue
            handler(node)
        self.finish()
        return self.groups()

    def finish(self) -> None:
        tensors = self.graph.tensors()
        for name, layout in self.layout.items():
            t = tensors.get(name)
            if t is None:
                continue
            if is_graph_output(self.graph, t):
                self.freeze(layout, "graph-output", name)
            # a reader in a subgraph (an outer-scope reference) sees every channel
            if any(id(n) not in self.main_nodes for n in t.outputs):
                self.freeze(layout, "subgraph", name)
        for r in range(len(self.parent)):
            if self.find(r) != r or self.frozen[r] is not None:
                continue
            c, k = self.channels[r], self.chunks[r]
            if k > 1 and (c % k or c // k < 2):
                self.frozen[r] = ("grouped-conv", f"{c} channels in {k} conv groups")
            elif c < 2:
                self.frozen[r] = ("too-few-channels", f"{c} channel")

    def groups(self) -> list[Group]:
        out = []
        for r in range(len(self.parent)):
            if self.find(r) != r:
                continue
            fr = self.frozen[r]
            out.append(Group(self.keys[r], self.channels[r], list(self.members[r]),
                             fr[0] if fr else None, fr[1] if fr else "", self.chunks[r],
                             self.heads.get(r)))
        return out

    # ---- attention heads ----
    def head_projection(self, node: gs.Node, block: _Block) -> None:
        """A Q/K/V projection of a matched block: its rows read the input channels (as any
        MatMul's); its columns belong to the block's head group."""
        w_t = node.inputs[1]
        w = constant_value(w_t)
        assert w is not None
        lx = self.layout.get(node.inputs[0].name)
        if lx is not None:
            if lx.axis != -1 or lx.positions != w.shape[0]:
                self.freeze(lx, "unknown-op", f"MatMul {node.name} reads a non-channel axis")
            else:
                self.add_members(lx, w_t, 0, "weight-in", node, float(w.size),
                                 float(w.size) * _rows(node.outputs[0]))
        if id(block) not in self.head_gid:
            self.head_gid[id(block)] = self.head_group(block)

    def head_group(self, block: _Block) -> int:
        """One group whose channels are the block's heads, each ``head_dim`` wide: the Q/K/V
        columns and biases, the output projection's rows."""
        out_proj, merge = block.out_proj, block.merge
        assert out_proj is not None
        assert merge is not None
        s0 = block.sources[0]
        h, dh = s0.heads, s0.head_dim
        gid = self.new_group(f"{out_proj.name or out_proj.outputs[0].name}:heads", h)
        members = self.members[gid]
        for s in block.sources:
            w_t = s.matmul.inputs[1]
            w = constant_value(w_t)
            assert w is not None
            k, rows = int(w.shape[0]), _rows(s.matmul.outputs[0])
            bias_t = None if s.add is None else next(
                i for i in s.add.inputs if constant_value(i) is not None)
            acts = [(s.matmul.outputs[0], s.matmul)]
            if s.add is not None:
                acts.append((s.add.outputs[0], s.add))
            for p in range(s.parts):
                off = p * h * dh
                members.append(Member(w_t.name, 1, off, 0, h, dh, "weight-out", s.matmul.name,
                                      params_per_channel=k * dh, macs_per_channel=k * dh * rows))
                if bias_t is not None and s.add is not None:
                    members.append(Member(bias_t.name, 0, off, 0, h, dh, "bias", s.add.name,
                                          params_per_channel=dh))
                for t, n in acts:
                    rank = _rank(t)
                    if rank is not None:
                        members.append(Member(t.name, rank - 1, off, 0, h, dh, "activation",
                                              n.name))
        w_o = constant_value(out_proj.inputs[1])
        assert w_o is not None
        d_out, rows = int(w_o.shape[1]), _rows(out_proj.outputs[0])
        members.append(Member(out_proj.inputs[1].name, 0, 0, 0, h, dh, "weight-in", out_proj.name,
                              params_per_channel=dh * d_out, macs_per_channel=dh * d_out * rows))
        merged = merge.outputs[0]
        rank = _rank(merged)
        if rank is not None:
            members.append(Member(merged.name, rank - 1, 0, 0, h, dh, "activation", merge.name))
        self.heads[gid] = HeadBlock(
            h, dh,
            tuple((s.split.outputs[0].name, s.parts, (_rank(s.split.inputs[0]) or 1) - 1)
                  for s in block.sources),
            (merged.name, (_rank(merged) or 1) - 1),
            tuple(o.name for n in block.nodes for o in n.outputs))
        return gid

    # ---- sources: ops that create channels ----
    def source(self, node: gs.Node) -> None:
        if not is_default_domain(node):
            return
        if node.op == "Conv":
            self.op_Conv(node)
        elif node.op in ("MatMul", "Gemm"):
            self.linear(node)

    def op_Conv(self, node: gs.Node) -> None:  # noqa: N802 (op name)
        x = node.inputs[0]
        lx = self.layout.get(x.name)
        w_t = node.inputs[1] if len(node.inputs) > 1 else None
        w = constant_value(w_t)
        if w is None or w.ndim < 3:
            self.freeze(lx, "non-constant-weight", node.name)
            return
        assert w_t is not None
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        if bias is not None and constant_value(bias) is None:
            self.freeze(lx, "non-constant-weight", node.name)
            return
        rank = w.ndim
        if lx is not None and lx.axis + rank != 1:
            self.freeze(lx, "unknown-op", f"Conv {node.name} reads a non-channel axis")
            return
        shared = len(w_t.outputs) > 1 or (bias is not None and len(bias.outputs) > 1)
        m, cpg = int(w.shape[0]), int(w.shape[1])
        g = int(node.attrs.get("group", 1))
        cin = cpg * g
        y = node.outputs[0]
        macs = float(w.size) * _spatial(y)
        if lx is not None and lx.positions != cin:
            self.freeze(lx, "unknown-shape", f"Conv {node.name} input channels")
            lx = None
        if g > 1 and g == cin and m == cin:  # depthwise: channels pass through
            if lx is None:
                return
            if shared:
                self.freeze(lx, "shared-weight", w_t.name)
            self.add_members(lx, w_t, 0, "dw-weight", node, float(w.size), macs)
            if bias is not None:
                self.add_members(lx, bias, 0, "bias", node, float(m))
            self.add_activation(y, lx, node)
            return
        if lx is not None:
            if shared:
                self.freeze(lx, "shared-weight", w_t.name)
            if g == 1:
                if any(s.block != 1 for s in lx.segs):
                    self.freeze(lx, "reshape-layout", node.name)
                self.add_members(lx, w_t, 1, "weight-in", node, float(w.size), macs)
            else:
                s = lx.segs[0]
                if (len(lx.segs) != 1 or s.group is None or s.start != 0 or s.block != 1
                        or s.length != self.channels[self.find(s.group)]):
                    self.freeze(lx, "grouped-conv", f"{node.name}: input is not one whole group")
                else:
                    r = self.find(s.group)
                    self.chunks[r] = math.lcm(self.chunks[r], g)
                    self.members[r].append(Member(
                        w_t.name, 1, 0, 0, cin, 1, "grouped-in", node.name, conv_groups=g,
                        params_per_channel=w.size / cin, macs_per_channel=macs / cin))
        gid = self.new_group(node.name or y.name, m)
        out = Layout(1 - rank, (Seg(gid, 0, m),))
        if shared:
            self.freeze(out, "shared-weight", w_t.name)
        if g > 1:
            self.chunks[gid] = g
        self.add_members(out, w_t, 0, "weight-out", node, float(w.size), macs)
        if bias is not None:
            self.add_members(out, bias, 0, "bias", node, float(m))
        self.add_activation(y, out, node)

    def linear(self, node: gs.Node) -> None:
        """MatMul/Gemm: rows of the constant weight read the input channels (K); its
        columns (N) start a group."""
        a, b_t = node.inputs[0], node.inputs[1]
        la, lb = self.layout.get(a.name), self.layout.get(b_t.name)
        b = constant_value(b_t)
        gemm = node.op == "Gemm"
        if lb is not None or b is None or b.ndim != 2:
            reason = "matmul-activation" if b is None else "unknown-op"
            self.freeze(la, reason, node.name)
            self.freeze(lb, reason, node.name)
            return
        if gemm and int(node.attrs.get("transA", 0)):
            self.freeze(la, "unknown-op", f"Gemm {node.name} with transA")
            return
        trans_b = gemm and int(node.attrs.get("transB", 0))
        k_axis, n_axis = (1, 0) if trans_b else (0, 1)
        k, n = int(b.shape[k_axis]), int(b.shape[n_axis])
        y = node.outputs[0]
        shared = len(b_t.outputs) > 1
        rows = _rows(y)
        macs = float(k * n) * rows
        c_t = node.inputs[2] if gemm and len(node.inputs) > 2 and node.inputs[2].name else None
        if la is not None:
            if la.axis != -1 or la.positions != k:
                self.freeze(la, "unknown-op", f"{node.op} {node.name} reads a non-channel axis")
            else:
                if shared:
                    self.freeze(la, "shared-weight", b_t.name)
                self.add_members(la, b_t, k_axis, "weight-in", node, float(b.size), macs)
        gid = self.new_group(node.name or y.name, n)
        out = Layout(-1, (Seg(gid, 0, n),))
        if shared:
            self.freeze(out, "shared-weight", b_t.name)
        self.add_members(out, b_t, n_axis, "weight-out", node, float(b.size), macs)
        if c_t is not None:
            self.add_constant(out, c_t, "bias", node)
        self.add_activation(y, out, node)

    def op_MatMul(self, node: gs.Node) -> None:  # noqa: N802
        self.linear(node)

    def op_Gemm(self, node: gs.Node) -> None:  # noqa: N802
        self.linear(node)

    # ---- pass-through ops ----
    def unary(self, node: gs.Node) -> None:
        lx = self.layout.get(node.inputs[0].name)
        if lx is None or any(self.layout.get(t.name) for t in node.inputs[1:]):
            self.freeze_inputs(node, "unknown-op")
            return
        if node.op == "Dropout" and len(node.outputs) > 1 and (
                node.outputs[1].outputs or is_graph_output(self.graph, node.outputs[1])):
            self.freeze(lx, "training-mode", f"Dropout {node.name} mask is read")
            return
        self.add_activation(node.outputs[0], lx, node)

    def pool(self, node: gs.Node) -> None:
        lx = self.layout.get(node.inputs[0].name)
        rank = _rank(node.inputs[0])
        if lx is None or rank is None or lx.axis + rank != 1:
            self.freeze(lx, "unknown-shape" if rank is None else "unknown-op", node.name)
            return
        if len(node.outputs) > 1 and node.outputs[1].outputs:
            self.freeze(lx, "unknown-op", f"{node.name} indices are read")
            return
        self.add_activation(node.outputs[0], lx, node)

    def norm(self, node: gs.Node) -> None:
        lx = self.layout.get(node.inputs[0].name)
        rank = _rank(node.inputs[0])
        if lx is None or rank is None or lx.axis + rank != 1:
            self.freeze(lx, "unknown-shape" if rank is None else "channel-reduction", node.name)
            return
        if any(self.layout.get(t.name) for t in node.inputs[1:]):
            self.freeze_inputs(node, "unknown-op")
            return
        if node.op == "BatchNormalization" and (int(node.attrs.get("training_mode", 0)) or any(
                o.outputs or is_graph_output(self.graph, o) for o in node.outputs[1:])):
            self.freeze(lx, "training-mode", node.name)
            return
        params = list(node.inputs[1:])
        one = Layout(-1, lx.segs)  # the parameters are 1-D [C]
        for i, p in enumerate(params):
            value = constant_value(p)
            if value is None or value.ndim != 1 or value.shape[0] != lx.positions:
                self.freeze(lx, "non-constant-weight" if value is None else "broadcast",
                            node.name)
                return
            if len(p.outputs) > 1:
                self.freeze(lx, "shared-weight", p.name)
                return
            self.add_members(one, p, 0, "norm-scale" if i == 0 else "norm", node,
                             float(value.size))
        self.add_activation(node.outputs[0], lx, node)

    def binary(self, node: gs.Node) -> None:
        """Element-wise ops with broadcasting: channel inputs are merged, constants sliced."""
        data = list(node.inputs)
        layouts = [(t, self.layout[t.name]) for t in data if t.name in self.layout]
        ref = layouts[0][1]
        for _, lay in layouts[1:]:
            if not self.align(ref, lay, node):
                return
        ref = self.rooted(ref)
        for t in data:
            if t.name in self.layout:
                continue
            if constant_value(t) is not None:
                if not self.add_constant(ref, t, "param", node):
                    return
                continue
            rank = _rank(t)
            if rank is None:
                self.freeze(ref, "unknown-shape", f"{t.name} in {node.op} {node.name}")
                return
            axis = rank + ref.axis
            if axis >= 0 and t.shape[axis] != 1:
                self.freeze(ref, "unprunable-partner", f"{t.name} in {node.op} {node.name}")
                return
        self.add_activation(node.outputs[0], ref, node)

    def rooted(self, layout: Layout) -> Layout:
        return Layout(layout.axis, tuple(
            dataclasses.replace(s, group=None if s.group is None else self.find(s.group))
            for s in layout.segs))

    def align(self, a: Layout, b: Layout, node: gs.Node) -> bool:
        """Merge the groups of two layouts that must keep the same channel indices."""
        ok = a.axis == b.axis and len(a.segs) == len(b.segs)
        pairs = list(zip(a.segs, b.segs, strict=True)) if ok else []
        for sa, sb in pairs:
            same = (sa.start, sa.length, sa.block) == (sb.start, sb.length, sb.block)
            if sa.group is None or sb.group is None:
                ok &= same and sa.group is None and sb.group is None
            else:
                ok &= same and self.channels[sa.group] == self.channels[sb.group]
        if not ok:
            self.freeze(a, "elementwise-misaligned", f"{node.op} {node.name}")
            self.freeze(b, "elementwise-misaligned", f"{node.op} {node.name}")
            return False
        for sa, sb in pairs:
            if sa.group is not None and sb.group is not None:
                self.union(sa.group, sb.group)
        return True

    def op_Concat(self, node: gs.Node) -> None:  # noqa: N802
        y = node.outputs[0]
        rank = _rank(y) or next((r for t in node.inputs if (r := _rank(t))), None)
        channel = [self.layout[t.name] for t in node.inputs if t.name in self.layout]
        if rank is None:
            for lay in channel:
                self.freeze(lay, "unknown-shape", node.name)
            return
        axis = int(node.attrs.get("axis", 0))
        axis = axis - rank if axis >= 0 else axis
        if all(lay.axis != axis for lay in channel):
            self.binary(node)  # concatenated along another axis: channels must match
            return
        segs: list[Seg] = []
        for t in node.inputs:
            lay = self.layout.get(t.name)
            if lay is not None and lay.axis == axis:
                segs.extend(lay.segs)
                continue
            if lay is None and t.shape is not None and isinstance(t.shape[axis], int):
                segs.append(Seg(None, 0, int(t.shape[axis])))
                continue
            for other in channel:
                self.freeze(other, "unknown-shape" if lay is None else "unknown-op", node.name)
            return
        self.add_activation(y, Layout(axis, tuple(segs)), node)

    def op_Split(self, node: gs.Node) -> None:  # noqa: N802
        x = node.inputs[0]
        lx = self.layout[x.name]
        rank = _rank(x)
        if rank is None:
            self.freeze(lx, "unknown-shape", node.name)
            return
        axis = int(node.attrs.get("axis", 0))
        axis = axis - rank if axis >= 0 else axis
        if axis != lx.axis:
            for o in node.outputs:
                self.add_activation(o, lx, node)
            return
        sizes = split_sizes(node, lx.positions)
        if sizes is None:
            self.freeze(lx, "unknown-op", f"Split {node.name} sizes")
            return
        pos = 0
        parts = []
        for size in sizes:
            part = _cut(lx, pos, pos + size)
            if part is None:
                self.freeze(lx, "reshape-layout", f"Split {node.name} cuts a block")
                return
            parts.append(part)
            pos += size
        for o, part in zip(node.outputs, parts, strict=True):
            self.add_activation(o, part, node)

    def op_Slice(self, node: gs.Node) -> None:  # noqa: N802
        x = node.inputs[0]
        lx = self.layout[x.name]
        rank = _rank(x)
        spec = slice_spec(node)
        if rank is None or spec is None:
            self.freeze(lx, "unknown-shape" if rank is None else "unknown-op", node.name)
            return
        starts, ends, axes, steps = spec
        axes = [a - rank if a >= 0 else a for a in axes]
        if lx.axis not in axes:
            self.add_activation(node.outputs[0], lx, node)
            return
        i = axes.index(lx.axis)
        if steps[i] != 1:
            self.freeze(lx, "unknown-op", f"Slice {node.name} with step {steps[i]}")
            return
        lo, hi = _clamp_range(starts[i], ends[i], lx.positions)
        part = _cut(lx, lo, max(lo, hi))
        if part is None or not part.segs:
            self.freeze(lx, "reshape-layout", f"Slice {node.name}")
            return
        self.add_activation(node.outputs[0], part, node)

    def op_Flatten(self, node: gs.Node) -> None:  # noqa: N802
        x = node.inputs[0]
        lx = self.layout[x.name]
        shape = x.shape
        if shape is None:
            self.freeze(lx, "unknown-shape", node.name)
            return
        rank = len(shape)
        k = int(node.attrs.get("axis", 1))
        k = k + rank if k < 0 else k
        self.flatten_like(node, lx, shape, k)

    def flatten_like(self, node: gs.Node, lx: Layout, shape: Sequence[object], k: int) -> None:
        rank = len(shape)
        a = rank + lx.axis
        if a < k:
            self.freeze(lx, "flatten-layout", f"{node.op} {node.name} folds the channels outward")
            return
        between, after = shape[k:a], shape[a + 1:]
        if not all(isinstance(d, int) for d in (*between, *after)):
            self.freeze(lx, "unknown-shape", node.name)
            return
        if math.prod(between) != 1:  # type: ignore[arg-type]
            self.freeze(lx, "flatten-layout", f"{node.op} {node.name} repeats the channels")
            return
        inner = math.prod(after)  # type: ignore[arg-type]
        segs = tuple(dataclasses.replace(s, block=s.block * inner) for s in lx.segs)
        self.add_activation(node.outputs[0], Layout(-1, segs), node)

    def op_Reshape(self, node: gs.Node) -> None:  # noqa: N802
        x = node.inputs[0]
        lx = self.layout[x.name]
        if id(node) in self.head_declined:  # splits a projection into heads: not matched
            block = self.head_declined[id(node)]
            self.freeze(lx, block.reason or "attention", block.detail)
            return
        target = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        shape = x.shape
        if target is None or shape is None:
            self.freeze(lx, "reshape-layout" if shape else "unknown-shape", node.name)
            return
        target = [int(v) for v in target.reshape(-1)]
        rank = len(shape)
        a = rank + lx.axis
        c = lx.positions
        lead = shape[:a]
        if int(node.attrs.get("allowzero", 0)) and 0 in target:
            self.freeze(lx, "reshape-layout", node.name)
            return
        # the dims before the channel axis stay as they are: [N, C, H, W] -> [N, C, H*W]
        same_lead = len(target) > a and all(
            t == 0 or (isinstance(d, int) and t == d)
            for t, d in zip(target[:a], lead, strict=False))
        if same_lead and target[a] in (0, c) and -1 not in target[:a + 1]:
            rest = target[a + 1:]
            tail = shape[a + 1:]
            if all(isinstance(d, int) for d in tail) and (
                    -1 in rest or math.prod(rest) == math.prod(tail)):  # type: ignore[arg-type]
                self.add_activation(node.outputs[0], Layout(a - len(target), lx.segs), node)
                return
        # [N, C, H, W] -> [N, C*H*W] (or [N, -1], [-1, C*H*W]): a Flatten at axis a
        flat = math.prod(shape[a:]) if all(isinstance(d, int) for d in shape[a:]) else None
        if (len(target) == a + 1 and flat is not None and target[a] in (-1, flat)
                and all(t == 0 or t == d for t, d in zip(target[:a], lead, strict=True))):
            self.flatten_like(node, lx, shape, a)
            return
        if (lx.axis == -1 and len(target) == rank + 1 and target[-2] > 0 and target[-1] > 0
                and target[-2] * target[-1] == c) or (lx.axis == -1 and len(target) == rank + 1
                                                      and -1 in target[-2:]):
            self.freeze(lx, "attention heads not supported yet", node.name)
            return
        self.freeze(lx, "reshape-layout", node.name)

    def op_Transpose(self, node: gs.Node) -> None:  # noqa: N802
        x = node.inputs[0]
        lx = self.layout[x.name]
        rank = _rank(x)
        if rank is None:
            self.freeze(lx, "unknown-shape", node.name)
            return
        perm = list(node.attrs.get("perm", list(range(rank - 1, -1, -1))))
        new = perm.index(rank + lx.axis)
        self.add_activation(node.outputs[0], Layout(new - rank, lx.segs), node)

    def op_Squeeze(self, node: gs.Node) -> None:  # noqa: N802
        self.squeeze(node, unsqueeze=False)

    def op_Unsqueeze(self, node: gs.Node) -> None:  # noqa: N802
        self.squeeze(node, unsqueeze=True)

    def squeeze(self, node: gs.Node, unsqueeze: bool) -> None:
        x = node.inputs[0]
        lx = self.layout[x.name]
        rank = _rank(x)
        axes_v = node.attrs.get("axes")
        if axes_v is None and len(node.inputs) > 1:
            value = constant_value(node.inputs[1])
            axes_v = None if value is None else [int(v) for v in value.reshape(-1)]
        if rank is None or axes_v is None:
            self.freeze(lx, "unknown-shape", node.name)
            return
        a = rank + lx.axis
        if unsqueeze:
            out_rank = rank + len(axes_v)
            inserted = {v + out_rank if v < 0 else v for v in axes_v}
            kept = [i for i in range(out_rank) if i not in inserted]
            new, new_rank = kept[a], out_rank
        else:
            axes = {v + rank if v < 0 else v for v in axes_v}
            if a in axes:
                self.freeze(lx, "unknown-op", node.name)
                return
            new, new_rank = a - sum(1 for v in axes if v < a), rank - len(axes)
        self.add_activation(node.outputs[0], Layout(new - new_rank, lx.segs), node)

    def op_Pad(self, node: gs.Node) -> None:  # noqa: N802
        x = node.inputs[0]
        lx = self.layout[x.name]
        rank = _rank(x)
        pads = node.attrs.get("pads")
        if pads is None and len(node.inputs) > 1:
            value = constant_value(node.inputs[1])
            pads = None if value is None else [int(v) for v in value.reshape(-1)]
        has_axes = len(node.inputs) > 3 and node.inputs[3].name
        if rank is None or pads is None or has_axes or len(pads) != 2 * rank:
            self.freeze(lx, "unknown-op", f"Pad {node.name}")
            return
        a = rank + lx.axis
        if pads[a] or pads[a + rank]:
            self.freeze(lx, "unknown-op", f"Pad {node.name} pads the channels")
            return
        self.add_activation(node.outputs[0], lx, node)


def build_groups(graph: gs.Graph) -> list[Group]:
    """The channel dependency groups of ``graph``'s main graph, frozen ones included.

    Args:
        graph: a graphsurgeon graph with inferred shapes (``onnxopt.shapes.apply_shapes``);
            its nodes are put in topological order.

    Returns:
        One group per independent set of channels, in the order their first producer runs.
    """
    graph.toposort()
    return _Builder(graph).run()


# ---- helpers shared with the removal ----

def _rank(t: gs.Tensor) -> int | None:
    value = constant_value(t)
    if value is not None:
        return int(value.ndim)
    return None if t.shape is None else len(t.shape)


def _spatial(t: gs.Tensor) -> float:
    """Static product of an NCHW tensor's spatial dims (MACs per output channel per kernel)."""
    if t.shape is None:
        return 0.0
    return float(math.prod(d if isinstance(d, int) and d > 0 else 1 for d in t.shape[2:]))


def _rows(t: gs.Tensor) -> float:
    """Rows a MatMul/Gemm computes per run, dynamic dims counted as 1."""
    if t.shape is None:
        return 0.0
    return float(math.prod(d if isinstance(d, int) and d > 0 else 1 for d in t.shape[:-1]))


def _cut(layout: Layout, lo: int, hi: int) -> Layout | None:
    """Positions ``[lo, hi)`` of a layout, or None when a cut falls inside a block."""
    segs = []
    for off, s in layout.offsets():
        a, b = max(lo, off), min(hi, off + s.positions)
        if a >= b:
            continue
        if (a - off) % s.block or (b - off) % s.block:
            return None
        segs.append(Seg(s.group, s.start + (a - off) // s.block, (b - a) // s.block, s.block))
    return Layout(layout.axis, tuple(segs))


def _clamp_range(start: int, end: int, dim: int) -> tuple[int, int]:
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    return min(max(start, 0), dim), min(max(end, 0), dim)


def split_sizes(node: gs.Node, dim: int) -> list[int] | None:
    sizes = node.attrs.get("split")
    if sizes is None and len(node.inputs) > 1 and node.inputs[1].name:
        value = constant_value(node.inputs[1])
        if value is None:
            return None
        sizes = value.reshape(-1).tolist()
    if sizes is not None:
        return [int(s) for s in sizes]
    n = int(node.attrs.get("num_outputs", len(node.outputs)))
    chunk = -(-dim // n)  # opset 18: the last part may be smaller
    return [min(chunk, dim - i * chunk) for i in range(n)]


def slice_spec(node: gs.Node) -> tuple[list[int], list[int], list[int], list[int]] | None:
    """(starts, ends, axes, steps) of a Slice, from attributes (opset < 10) or constants."""
    if "starts" in node.attrs:
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes = list(node.attrs.get("axes", range(len(starts))))
        return starts, ends, axes, [1] * len(starts)
    vals: list[list[int] | None] = []
    for i in range(1, 5):
        if len(node.inputs) > i and node.inputs[i].name:
            v = constant_value(node.inputs[i])
            vals.append(None if v is None else [int(x) for x in v.reshape(-1)])
            if v is None:
                return None
        else:
            vals.append(None)
    starts, ends, axes, steps = vals
    if starts is None or ends is None:
        return None
    return (starts, ends, axes if axes is not None else list(range(len(starts))),
            steps if steps is not None else [1] * len(starts))


# ---- removal ----

def removed_positions(groups: Sequence[Group], removed: Mapping[str, np.ndarray]
                      ) -> dict[tuple[str, int, str], np.ndarray]:
    """(tensor, axis, kind) -> sorted positions to delete; kind is "grouped" for the input
    axis of a grouped Conv (sliced per conv group), else "axis"."""
    out: dict[tuple[str, int, str], list[int]] = {}
    for g in groups:
        chans = removed.get(g.key)
        if chans is None or not len(chans):
            continue
        for m in g.members:
            sel = chans[(chans >= m.start) & (chans < m.start + m.length)] - m.start
            if not len(sel):
                continue
            pos = (m.offset + sel[:, None] * m.block + np.arange(m.block)[None, :]).reshape(-1)
            kind = "grouped" if m.role == "grouped-in" else "axis"
            out.setdefault((m.tensor, m.axis, kind), []).extend(pos.tolist())
    return {k: np.unique(np.asarray(v, dtype=np.int64)) for k, v in out.items()}


def remove_channels(graph: gs.Graph, groups: Sequence[Group],
                    removed: Mapping[str, np.ndarray], names: NameGenerator,
                    opset: int) -> set[str]:
    """Delete the ``removed`` channels (group key -> channel indices) from ``graph``.

    Slices every constant member, fixes the attributes and shape constants of the nodes
    on the way (depthwise ``group``, Split sizes, Slice bounds, Reshape targets) and
    clears the shapes of the activations that shrank. Returns the names of those
    activations; the caller re-runs shape inference.
    """
    positions = removed_positions(groups, removed)
    tensors = graph.tensors()
    grouped_in = {m.tensor: m.conv_groups for g in groups for m in g.members
                  if m.role == "grouped-in"}
    activations = {m.tensor for g in groups for m in g.members if m.role == "activation"}
    depthwise = {m.node for g in groups if len(removed.get(g.key, ())) for m in g.members
                 if m.role == "dw-weight"}
    by_tensor: dict[str, list[tuple[int, str, np.ndarray]]] = {}
    for (name, axis, kind), pos in positions.items():
        by_tensor.setdefault(name, []).append((axis, kind, pos))
    act_removed: dict[str, tuple[int, np.ndarray]] = {}
    for name, cuts in by_tensor.items():
        if name in activations:
            act_removed[name] = (cuts[0][0], cuts[0][2])
            continue
        t = tensors[name]
        value = constant_value(t)
        assert value is not None, name
        # the grouped input axis first: it indexes rows of the weight as it was
        for axis, kind, pos in sorted(cuts, key=lambda c: c[1] != "grouped"):
            if kind == "grouped":
                value = _cut_grouped_in(value, pos, grouped_in[name])
            else:
                value = np.delete(value, pos, axis=axis)
        _set_constant(t, value, names)
    for node in list(graph.nodes):
        if node.op == "Conv" and node.name in depthwise:
            w = constant_value(node.inputs[1])
            assert w is not None
            node.attrs["group"] = int(w.shape[0])
        elif node.inputs and node.inputs[0].name in act_removed:
            _fix_node(node, act_removed, names, opset)
    producer = {o.name: n for n in graph.nodes for o in n.outputs}
    for g in groups:
        gone = len(removed.get(g.key, ()))
        if g.heads is None or not gone:
            continue
        hb, kept = g.heads, g.heads.heads - gone
        for out, parts, lead in hb.splits:
            _set_target(graph, producer[out], lead,
                        ([parts] if parts > 1 else []) + [kept, hb.head_dim], names, opset)
        _set_target(graph, producer[hb.merge[0]], hb.merge[1], [kept * hb.head_dim], names,
                    opset)
        for name in hb.interior:
            act_removed.setdefault(name, (-1, np.zeros(0, np.int64)))
    for name in act_removed:
        t = tensors[name]
        if not isinstance(t, gs.Constant) and not is_graph_output(graph, t):
            t.shape = None
    return set(act_removed)


def _set_target(graph: gs.Graph, node: gs.Node, lead: int, tail: list[int],
                names: NameGenerator, opset: int) -> None:
    """A Reshape's target keeps its first ``lead`` elements (batch, sequence) and ends in
    ``tail`` (the kept heads).

    A constant target stays a constant. A computed one (a Concat of Shape reads, as exporters
    write) becomes ``Concat(Slice(target, 0, lead), tail)``: shape inference follows that
    chain (data propagation) to concrete dims once the inputs' shapes are pinned, as it did
    on the original, where a ``0`` would copy the input's dim, which may be a symbol it cannot
    resolve (on MiniLM, the mask's ``batch``: ``estimate_macs`` then lost every layer after
    the first pruned attention block). Before opset 10 (Slice by attributes) the lead is ``0``.
    """
    node.attrs["allowzero"] = 0
    base = node.name or "reshape"
    old = constant_value(node.inputs[1])
    if old is not None or opset < 10:
        head = [int(v) for v in old.reshape(-1)[:lead]] if old is not None else [0] * lead
        node.inputs[1] = make_constant(names.fresh(f"{base}_heads"),
                                       np.asarray(head + tail, dtype=np.int64))
        return
    lead_t = gs.Variable(names.fresh(f"{base}_lead"), dtype=np.int64, shape=[lead])
    target = gs.Variable(names.fresh(f"{base}_heads"), dtype=np.int64, shape=[lead + len(tail)])
    cut = [make_constant(names.fresh(f"{base}_lead_{k}"), np.asarray([v], dtype=np.int64))
           for k, v in (("start", 0), ("end", lead), ("axis", 0))]
    graph.nodes += [
        gs.Node("Slice", names.fresh(f"{base}_lead"), inputs=[node.inputs[1], *cut],
                outputs=[lead_t]),
        gs.Node("Concat", names.fresh(f"{base}_heads"), {"axis": 0},
                inputs=[lead_t, make_constant(names.fresh(f"{base}_tail"),
                                              np.asarray(tail, dtype=np.int64))],
                outputs=[target]),
    ]
    node.inputs[1] = target


def _cut_grouped_in(w: np.ndarray, pos: np.ndarray, groups: int) -> np.ndarray:
    m, cpg = w.shape[0], w.shape[1]
    mg = m // groups
    parts = []
    for g in range(groups):
        local = pos[(pos >= g * cpg) & (pos < (g + 1) * cpg)] - g * cpg
        parts.append(np.delete(w[g * mg:(g + 1) * mg], local, axis=1))
    return np.concatenate(parts, axis=0)


def _set_constant(t: gs.Tensor, value: np.ndarray, names: NameGenerator) -> None:
    if isinstance(t, gs.Constant):
        t.values = np.ascontiguousarray(value)  # one reader (checked when grouping): in place
        return
    new = make_constant(names.fresh(t.name), value)  # a Constant node's output
    for node in list(t.outputs):
        for i, inp in enumerate(node.inputs):
            if inp is t:
                node.inputs[i] = new


def _fix_node(node: gs.Node, act: Mapping[str, tuple[int, np.ndarray]],
              names: NameGenerator, opset: int) -> None:
    axis, pos = act[node.inputs[0].name]
    shape = node.inputs[0].shape
    if shape is None:
        return
    rank = len(shape)
    axis = axis + rank if axis < 0 else axis
    if node.op == "Split":
        split_axis = int(node.attrs.get("axis", 0))
        if axis != (split_axis + rank if split_axis < 0 else split_axis):
            return
        sizes = split_sizes(node, int(shape[axis]))
        assert sizes is not None
        bounds = np.cumsum([0, *sizes])
        new = [int(s - np.count_nonzero((pos >= lo) & (pos < hi)))
               for s, lo, hi in zip(sizes, bounds[:-1], bounds[1:], strict=True)]
        node.attrs.pop("num_outputs", None)
        if opset < 13:
            node.attrs["split"] = new
            return
        const = make_constant(names.fresh(f"{node.name or 'split'}_sizes"),
                              np.asarray(new, dtype=np.int64))
        if len(node.inputs) > 1:
            node.inputs[1] = const
        else:
            node.inputs.append(const)
    elif node.op == "Slice":
        _fix_slice(node, axis, pos, names, rank, int(shape[axis]))
    elif node.op == "Reshape":
        _fix_reshape(node, act, names)


def _fix_slice(node: gs.Node, axis: int, pos: np.ndarray, names: NameGenerator, rank: int,
               dim: int) -> None:
    spec = slice_spec(node)
    assert spec is not None
    starts, ends, axes, _ = spec
    axes = [a + rank if a < 0 else a for a in axes]
    if axis not in axes:
        return
    i = axes.index(axis)
    lo, hi = _clamp_range(starts[i], ends[i], dim)
    starts[i] = lo - int(np.count_nonzero(pos < lo))
    ends[i] = hi - int(np.count_nonzero(pos < hi))
    if "starts" in node.attrs:
        node.attrs["starts"], node.attrs["ends"] = starts, ends
        return
    base = node.name or "slice"
    node.inputs[1] = make_constant(names.fresh(f"{base}_starts"), np.asarray(starts, np.int64))
    node.inputs[2] = make_constant(names.fresh(f"{base}_ends"), np.asarray(ends, np.int64))


def _fix_reshape(node: gs.Node, act: Mapping[str, tuple[int, np.ndarray]],
                 names: NameGenerator) -> None:
    y = node.outputs[0].name
    target = constant_value(node.inputs[1])
    if y not in act or target is None:
        return
    axis, pos = act[y]
    target = target.copy()
    axis = axis + len(target) if axis < 0 else axis
    if target[axis] > 0:  # a literal size (0 copies, -1 infers: both follow by themselves)
        target[axis] -= len(pos)
        node.inputs[1] = make_constant(names.fresh(f"{node.name or 'reshape'}_shape"), target)
