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
import onnx
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

    @property
    def params(self) -> int:
        return round(sum(m.params_per_channel for m in self.members) * self.channels)

    @property
    def macs(self) -> int:
        return round(sum(m.macs_per_channel for m in self.members) * self.channels)


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
        for node in self.graph.nodes:
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
                             fr[0] if fr else None, fr[1] if fr else "", self.chunks[r]))
        return out

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
    for name in act_removed:
        t = tensors[name]
        if not isinstance(t, gs.Constant) and not is_graph_output(graph, t):
            t.shape = None
    return set(act_removed)


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


def count_parameters(model: onnx.ModelProto) -> int:
    """Elements of every initializer of the main graph (what pruning shrinks)."""
    return sum(math.prod(t.dims) for t in model.graph.initializer)
