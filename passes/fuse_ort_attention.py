"""Fuse multi-head self-attention into onnxruntime's ``Attention`` / ``MultiHeadAttention`` ops.

The pattern, rooted at each Softmax (per head h, N heads of size d, H = N * d):

    q_h = heads(x @ Wq + bq)   k_h = heads(x @ Wk + bk)   v_h = heads(x @ Wv + bv)
    p   = Softmax(s * (q_h @ k_h^T) + M)        (optionally NaN -> 0 after the Softmax)
    out = merge(p @ v_h)                        merge: Transpose(0,2,1,3) + Reshape [B,S,H]
 -> out = com.microsoft.Attention(x, [Wq|Wk|Wv], [bq|bk|bv], mask, num_heads=N, scale=s)

``heads`` is Reshape [B,S,N,d] + Transpose (0,2,1,3), or, for one packed projection
``x @ Wqkv``, Reshape [B,S,3,N,d] + Transpose (2,0,3,1,4) + Gather 0/1/2 (ViT style).
``k_h^T`` is a Transpose (0,1,3,2) of k_h, a Transpose (0,2,3,1) of the Reshape (the
TorchScript BERT export), or Reshape [-1,S,d] + Transpose (0,2,1) + Reshape (torch's
decomposed scaled_dot_product_attention). ``s`` is the product of every scalar Mul/Div on
the q side, the k side and the scores (sdpa splits sqrt(1/d) over q and k).

The mask M may be absent or a key-padding mask computed from a 2-D graph input
``mask[batch, seq]`` by any ops: it is recognised (passes/_ort_masks.py) by evaluating its subgraph in
onnxruntime on made-up 0/1 masks and checking M == 0 where the mask is 1 and M <= -1000
where it is 0 (the same value everywhere). The fused op gets ``Cast(mask, int32)`` and
``mask_filter_value`` = that value (float32's lowest for -inf). Both torch exporters mask
with a finite value (-10000, or float32's lowest for sdpa), so even a batch row with no
token at all matches (a uniform Softmax in both). Only a mask of -inf differs there: the
original's Softmax gives NaN (or zeros after a NaN guard), the fused op the mean of v.

With constant float32 weights and one input x the three projections are packed into
``Attention``'s weight (``fused-attention``); otherwise (weights computed at run time, or
q from another input than k and v) the projections stay and ``MultiHeadAttention`` takes
their outputs (``fused-multihead-attention``).

Declined (``skipped:<reason>``): ``mask-constant`` (a constant additive bias, e.g. causal or
relative-position), ``mask-not-key-padding`` (its probed values are not a 0/-big key-padding
mask, or it reads other inputs than a 2-D mask and the batch/sequence shape), ``head-shape``
(q, k, v disagree on heads or size, or the merge Reshape is not [B,S,N*d]),
``no-projection`` (q, k or v is not a MatMul of a 3-D input), ``query-rows`` (k and v are,
but only some query rows are computed: the last block of a classifier after
``eliminate-unread-rows``, left unfused on its few tokens), ``shared-intermediate``
(a value inside the pattern is read elsewhere, so fusing would compute it twice),
``packed-runtime-weights`` (one packed projection with weights computed at run time),
``not-float32``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs
from onnxopt.passes._ort_masks import KeyPaddingMasks
from onnxopt.passes._ort_patterns import (
    REQUIRES,
    Projection,
    int_attr,
    ms_node,
    peel_scale,
    projection,
    reshape_entries,
    reshape_rank,
    reshape_tail,
    resolve_tail,
)
from onnxopt.passes._pattern import op_is

from onnxopt.graph_utils import constant_value, is_graph_output, make_constant, producer
from onnxopt.pass_base import Pass, PassContext, PassResult


@dataclasses.dataclass(eq=False)
class _Head:
    """One of q, k, v: a projection split into ``heads`` heads of ``size``."""

    proj: Projection
    heads: int
    size: int
    part: int | None  # packed projection: which third of its columns; None: its own projection
    nodes: list[gs.Node]  # from the projection's output to the per-head tensor


@dataclasses.dataclass(eq=False)
class _Match:
    q: _Head
    k: _Head
    v: _Head
    scale: float
    mask: gs.Tensor | None
    out: gs.Tensor
    nodes: list[gs.Node]  # every node of the pattern after the projections


def _split_heads(transpose: gs.Node) -> _Head | None:
    """Read ``transpose``'s input, a Reshape of a projection to [B, S, N, d], back to the projection
    (the Transpose itself is [0, 2, 1, 3] for q/v or [0, 2, 3, 1] for k^T: the caller checks)."""
    reshape = producer(transpose.inputs[0])
    if not op_is(reshape, "Reshape") or reshape_rank(reshape.inputs[1]) != 4:
        return None
    proj = projection(reshape.inputs[0])
    tail = resolve_tail(reshape_tail(reshape.inputs[1], 2), proj.width if proj else None)
    if tail is None or proj is None:
        return None
    return _Head(proj, tail[0], tail[1], None, [reshape, transpose])


def _heads(t: gs.Tensor) -> _Head | None:
    """Read a per-head tensor [B, N, S, d] back to its projection."""
    node = producer(t)
    if op_is(node, "Transpose") and list(node.attrs.get("perm", [])) == [0, 2, 1, 3]:
        return _split_heads(node)
    if op_is(node, "Gather") and int_attr(node, "axis", 0) == 0:
        index = constant_value(node.inputs[1])
        perm = producer(node.inputs[0])
        if index is None or index.size != 1 or not op_is(perm, "Transpose"):
            return None
        if list(perm.attrs.get("perm", [])) != [2, 0, 3, 1, 4]:
            return None
        reshape = producer(perm.inputs[0])
        if not op_is(reshape, "Reshape") or reshape_rank(reshape.inputs[1]) != 5:
            return None
        proj = projection(reshape.inputs[0])
        tail = resolve_tail(reshape_tail(reshape.inputs[1], 3), proj.width if proj else None)
        if tail is None or tail[0] != 3 or proj is None:
            return None
        part = int(index.reshape(())) % 3
        return _Head(proj, tail[1], tail[2], part, [reshape, perm, node])
    return None


def _keys_transposed(t: gs.Tensor) -> _Head | None:
    """Read k^T [B, N, d, S] back to its projection (three export styles, module doc)."""
    node = producer(t)
    if op_is(node, "Transpose"):
        perm = list(node.attrs.get("perm", []))
        if perm == [0, 1, 3, 2]:
            head = _heads(node.inputs[0])
            if head is not None:
                head.nodes.append(node)
            return head
        if perm == [0, 2, 3, 1]:
            return _split_heads(node)
        return None
    # sdpa: Reshape(Transpose(Reshape(k_h, [-1, S, d]), (0, 2, 1)), [B, N, d, S])
    if not op_is(node, "Reshape") or reshape_rank(node.inputs[1]) != 4:
        return None
    swap = producer(node.inputs[0])
    if not op_is(swap, "Transpose") or list(swap.attrs.get("perm", [])) != [0, 2, 1]:
        return None
    flat = producer(swap.inputs[0])
    if not op_is(flat, "Reshape") or reshape_rank(flat.inputs[1]) != 3:
        return None
    head = _heads(flat.inputs[0])
    if head is None or reshape_tail(flat.inputs[1], 1) != (head.size,):
        return None
    head.nodes += [flat, swap, node]
    return head


def _merges_heads(reshape: gs.Node, q: _Head) -> bool:
    """Whether the last Reshape makes [B, S, N*d]: its target ends in N*d, or in -1 where shape
    inference says the result is [B, S, N*d] with x's B and S, or where the runtime entries are
    followed by a MatMul with an [N*d, ...] weight."""
    width, out, x = q.heads * q.size, reshape.outputs[0], q.proj.x
    tail = reshape_tail(reshape.inputs[1], 1)
    if tail == (width,):
        return True
    if tail != (-1,):
        return False
    if (out.shape is not None and x.shape is not None and len(out.shape) == 3 and out.shape[-1] == width
            and list(out.shape[:2]) == list(x.shape[:2])):
        return True
    # [B, S, -1] with B and S read at run time (TorchScript): the output projection reading it
    # with a [N*d, ...] weight pins the last dim, so the first two multiply to B*S
    entries = reshape_entries(reshape.inputs[1])
    reader = _next(out)
    weight = constant_value(reader.inputs[1]) if op_is(reader, "MatMul") else None
    return (entries is not None and entries[:2] == [None, None] and weight is not None
            and weight.ndim == 2 and weight.shape[0] == width)


def _next(t: gs.Tensor) -> gs.Node | None:
    """The one reader of ``t`` besides Shape nodes (which only size the pattern's own Reshapes;
    ``_shared`` checks that), else None."""
    readers = [r for r in t.outputs if r.op != "Shape"]
    return readers[0] if len(readers) == 1 else None


def _keeps_heads(reshape: gs.Node, q: _Head) -> bool:
    """Whether a Reshape of [B, N, S, d] is [B, N, S, d] again: its target is [runtime, N or -1,
    runtime, d] (the runtime entries are B and S, read back from the pattern's own shapes)."""
    entries = reshape_entries(reshape.inputs[1])
    return (entries is not None and len(entries) == 4 and entries[1] in (q.heads, -1)
            and entries[3] == q.size and entries[0] in (None, -1, 0) and entries[2] in (None, -1, 0)
            and [entries[0], entries[2]].count(-1) + (entries[1] == -1) <= 1)


def _match(graph: gs.Graph, softmax: gs.Node, opset: int) -> _Match | str | None:
    """The attention around ``softmax``, a decline reason, or None (not attention at all)."""
    axis = softmax.attrs.get("axis", -1 if opset >= 13 else 1)
    if axis not in (-1, 3):
        return None
    nodes = [softmax]
    scores, mask = softmax.inputs[0], None
    add = producer(scores)
    if op_is(add, "Add"):
        for i in (0, 1):
            src, _, _ = peel_scale(add.inputs[i])
            if op_is(producer(src), "MatMul"):
                scores, mask = add.inputs[i], add.inputs[1 - i]
                nodes.append(add)
                break
    scores, s_factor, s_nodes = peel_scale(scores)
    qk = producer(scores)
    if not op_is(qk, "MatMul"):
        return None
    q_in, q_factor, q_nodes = peel_scale(qk.inputs[0])
    kt_in, k_factor, k_nodes = peel_scale(qk.inputs[1])
    nodes += [*s_nodes, qk, *q_nodes, *k_nodes]
    probs = softmax.outputs[0]
    readers = probs.outputs
    if len(readers) == 2 and {r.op for r in readers} == {"IsNaN", "Where"}:
        isnan = next(r for r in readers if r.op == "IsNaN")
        where = next(r for r in readers if r.op == "Where")
        zero = constant_value(where.inputs[1])
        if (where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not probs or zero is None
                or np.any(zero != 0)):
            return None
        nodes += [isnan, where]
        probs = where.outputs[0]
    if len(probs.outputs) != 1 or not op_is(probs.outputs[0], "MatMul") or probs.outputs[0].inputs[0] is not probs:
        return None
    pv = probs.outputs[0]
    merge = _next(pv.outputs[0])
    regroup = None  # TorchScript's sdpa re-reads p @ v as [B, N, S, d] before the merge
    if op_is(merge, "Reshape"):
        regroup, merge = merge, _next(merge.outputs[0])
    if not op_is(merge, "Transpose") or list(merge.attrs.get("perm", [])) != [0, 2, 1, 3]:
        return None
    final = _next(merge.outputs[0])
    if not op_is(final, "Reshape") or reshape_rank(final.inputs[1]) != 3:
        return None
    nodes += [pv, merge, final] + ([regroup] if regroup is not None else [])
    q, k, v = _heads(q_in), _keys_transposed(kt_in), _heads(pv.inputs[1])
    if q is None and k is not None and v is not None:
        return "query-rows"  # eliminate-unread-rows computes only the queries a classifier reads
    if q is None or k is None or v is None:
        return "no-projection"
    if len({(h.heads, h.size) for h in (q, k, v)}) != 1 or not _merges_heads(final, q):
        return "head-shape"
    if regroup is not None and not _keeps_heads(regroup, q):
        return "head-shape"
    return _Match(q, k, v, s_factor * q_factor * k_factor, mask, final.outputs[0],
                  nodes + q.nodes + k.nodes + v.nodes)


def _shared(graph: gs.Graph, m: _Match, keep_projections: bool) -> bool:
    """Whether a value the fusion makes dead is read outside the pattern (Shape reads excepted:
    in both exporters' output they only feed the pattern's own Reshape targets)."""
    dying = list(m.nodes)
    for h in (m.q, m.k, m.v):
        dying += h.proj.nodes[1:] if keep_projections else h.proj.nodes
    inside = {id(n) for n in dying}
    for node in dying:
        for t in node.outputs:
            if t is m.out:
                continue
            if is_graph_output(graph, t) or any(id(r) not in inside and r.op != "Shape" for r in t.outputs):
                return True
    return False


def _packed(m: _Match) -> tuple[np.ndarray, np.ndarray] | str | None:
    """Attention's [K, 3H] weight and [3H] bias, a reason MultiHeadAttention must do, or None."""
    heads = (m.q, m.k, m.v)
    width = m.q.heads * m.q.size
    if any(h.proj.weight is None for h in heads):
        return "runtime-weights"
    if any(h.proj.x is not m.q.proj.x for h in heads):
        return "separate-inputs"
    weights, biases = [], []
    for h in heads:
        w, b = h.proj.weight, h.proj.bias
        assert w is not None
        if b is None:
            b = np.zeros(w.shape[1], np.float32)
        if h.part is not None:
            w, b = w[:, h.part * width:(h.part + 1) * width], b[h.part * width:(h.part + 1) * width]
        if w.shape[1] != width:
            return None
        weights.append(w)
        biases.append(b)
    return np.concatenate(weights, axis=1), np.concatenate(biases).astype(np.float32)


def _decline(graph: gs.Graph, m: _Match, packed: tuple[np.ndarray, np.ndarray] | str | None) -> str | None:
    """Why ``m`` is not fused, or None; ``packed``: ``_packed(m)``."""
    heads = (m.q, m.k, m.v)
    x_shapes = [h.proj.x.shape for h in heads]
    if any(s is None or len(s) != 3 for s in x_shapes):
        return "no-projection"
    if any(h.proj.x.dtype is not None and np.dtype(h.proj.x.dtype) != np.float32 for h in heads):
        return "not-float32"
    if packed is None:
        return "head-shape"
    if isinstance(packed, str) and any(h.part is not None for h in heads):
        return "packed-runtime-weights"
    return "shared-intermediate" if _shared(graph, m, isinstance(packed, str)) else None


class FuseOrtAttentionPass(Pass):
    """Fuse multi-head self-attention into onnxruntime's Attention or MultiHeadAttention (com.microsoft)."""

    name = "fuse-ort-attention"
    requires_runtime = REQUIRES

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        masks = KeyPaddingMasks(graph, ctx)
        for softmax in [n for n in graph.nodes if op_is(n, "Softmax")]:
            m = _match(graph, softmax, ctx.opset)
            if m is None:
                continue
            packed = None if isinstance(m, str) else _packed(m)
            reason = m if isinstance(m, str) else _decline(graph, m, packed)
            mask_info = None
            if reason is None and m.mask is not None:
                mask_info = masks.recognise(m.mask)
                reason = mask_info if isinstance(mask_info, str) else None
            if reason is not None:
                stats[f"skipped:{reason}"] += 1
                continue
            assert isinstance(m, _Match)
            assert not isinstance(mask_info, str)
            stats[_fuse(graph, m, packed, mask_info, masks, ctx)] += 1
        fused = stats["fused-attention"] + stats["fused-multihead-attention"]
        if fused:
            graph.cleanup().toposort()
        return PassResult(changed=fused > 0, stats=dict(stats))


def _fuse(graph: gs.Graph, m: _Match, packed: tuple[np.ndarray, np.ndarray] | str | None,
          mask: tuple[gs.Tensor, float] | None, masks: KeyPaddingMasks, ctx: PassContext) -> str:
    attrs: dict[str, object] = {"num_heads": m.q.heads, "scale": float(m.scale)}
    mask_input: gs.Tensor = gs.Variable.empty()
    if mask is not None:
        mask_input = masks.index(mask[0])
        attrs["mask_filter_value"] = float(mask[1])
    m.out.inputs.clear()  # the pattern's last Reshape no longer writes it; cleanup drops the rest
    if isinstance(packed, tuple):
        weight = make_constant(ctx.names.fresh("attention_qkv_weight"), packed[0].astype(np.float32))
        bias = make_constant(ctx.names.fresh("attention_qkv_bias"), packed[1])
        ms_node(graph, "Attention", [m.q.proj.x, weight, bias, mask_input], [m.out], attrs,
                ctx.names.fresh("Attention"))
        return "fused-attention"
    heads = (m.q, m.k, m.v)
    width = m.q.heads * m.q.size
    biases = [h.proj.bias if h.proj.bias is not None else np.zeros(width, np.float32) for h in heads]
    bias = make_constant(ctx.names.fresh("attention_qkv_bias"), np.concatenate(biases).astype(np.float32))
    ms_node(graph, "MultiHeadAttention", [h.proj.matmul_out for h in heads] + [bias, mask_input], [m.out],
            attrs, ctx.names.fresh("MultiHeadAttention"))
    return "fused-multihead-attention"
