"""Fuse BERT's embedding sum and its LayerNormalization into onnxruntime's EmbedLayerNormalization.

    e = Gather(Wword, ids) + Gather(Wpos, p) (+ Gather(Wseg, t))     (Adds in any order)
    y = LayerNorm(e) * g + b
 -> y, _ = com.microsoft.EmbedLayerNormalization(int32(ids), int32(t), Wword, Wpos', Wseg, g, b)

``ids`` is a 2-D integer graph input [batch, seq]. The op numbers positions 0..seq-1 itself,
so ``p`` must be those: it is evaluated in onnxruntime on made-up inputs of two sizes
(its subgraph may read the inputs' shapes, as ``position_ids[:, :seq]`` does) and must
equal ``arange(seq)`` on every row. The segment ids ``t`` are a 2-D integer graph input
(passed on, cast to int32), or evaluate to zeros everywhere (a ``token_type_ids`` buffer
of zeros, as both torch exporters write an absent one): then row 0 of ``Wseg`` is added to
the position table (``Wpos' = Wpos + Wseg[0]``) and the op gets no segment input. The sum
``e`` stays available as the op's third output when something else reads it.

Same numbers up to float rounding (the three rows are added in another order). Declined:
``skipped:positions-not-arange``, ``skipped:segments-not-input-or-zero``,
``skipped:ids-not-2d-input`` (the word ids are computed, or not [batch, seq]),
``skipped:table-shapes`` (tables not 2-D float32 constants of one width, gamma/beta not
[H] constants), ``skipped:stats-read`` (the LayerNormalization's mean/inv-std are read),
``skipped:shared-sum`` (a partial sum is read elsewhere).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs
from onnxopt.passes._ort_patterns import REQUIRES, as_int32, cone, is_free, ms_node, probe, vector
from onnxopt.passes._pattern import op_is

from onnxopt.graph_utils import (
    constant_value,
    is_graph_input,
    is_graph_output,
    make_constant,
    producer,
)
from onnxopt.pass_base import Pass, PassContext, PassResult

SIZES = ((2, 5), (1, 3))  # (batch, seq) of the probes: two sequence lengths, two batch sizes


@dataclasses.dataclass(eq=False)
class _Lookup:
    table: np.ndarray  # [rows, H]
    tensor: gs.Tensor  # the table as the graph holds it (reused, not copied)
    index: gs.Tensor


def _lookups(t: gs.Tensor, graph: gs.Graph, shared: list[bool], top: bool = True) -> list[_Lookup] | None:
    """The Gathers of 2-D float32 tables an Add tree over ``t`` sums (None if a leaf is anything
    else); ``shared`` is set when a partial sum or a looked-up row is read outside the tree."""
    node = producer(t)
    if not top and not is_free(t, graph):
        shared[0] = True
    if op_is(node, "Add"):
        found: list[_Lookup] = []
        for i in node.inputs:
            part = _lookups(i, graph, shared, top=False)
            if part is None:
                return None
            found += part
        return found
    if op_is(node, "Gather") and int(node.attrs.get("axis", 0)) == 0:
        table = constant_value(node.inputs[0])
        if table is not None and table.ndim == 2 and table.dtype == np.float32:
            return [_Lookup(table, node.inputs[0], node.inputs[1])]
    return None


def _is_2d_int_input(graph: gs.Graph, t: gs.Tensor) -> bool:
    return (is_graph_input(graph, t) and t.shape is not None and len(t.shape) == 2
            and t.dtype is not None and np.dtype(t.dtype).kind in "iu")


def _probe_index(graph: gs.Graph, index: gs.Tensor, ctx: PassContext) -> list[tuple[np.ndarray, int]] | None:
    """(value, seq) of ``index`` at each probe size, feeding every 2-D integer input it reads zeros."""
    found = cone(index)
    if found is None or not found[1] or not all(_is_2d_int_input(graph, t) for t in found[1]):
        return None
    feeds = [{t.name: np.zeros((b, s), np.dtype(t.dtype)) for t in found[1]} for b, s in SIZES]
    values = probe(graph, index, feeds, ctx.opset)  # one session for every size
    return None if values is None else [(v, s) for v, (_, s) in zip(values, SIZES, strict=True)]


def _is_positions(graph: gs.Graph, index: gs.Tensor, ctx: PassContext) -> bool:
    probes = _probe_index(graph, index, ctx)
    return probes is not None and all(
        v.ndim == 2 and v.shape[-1] == s and np.array_equal(v, np.broadcast_to(np.arange(s), v.shape))
        for v, s in probes)


def _is_zeros(graph: gs.Graph, index: gs.Tensor, ctx: PassContext) -> bool:
    probes = _probe_index(graph, index, ctx)
    return probes is not None and all(v.ndim == 2 and v.shape[-1] == s and not v.any() for v, s in probes)


@dataclasses.dataclass(eq=False)
class _Match:
    ln: gs.Node
    total: gs.Tensor
    word: _Lookup
    position: _Lookup
    segment: _Lookup | None
    segment_input: bool  # the segment ids are a graph input (else zeros, folded into positions)


def _match(graph: gs.Graph, ln: gs.Node, ctx: PassContext) -> _Match | str | None:
    total = ln.inputs[0]
    shared = [False]
    lookups = _lookups(total, graph, shared)
    if lookups is None or len(lookups) not in (2, 3):
        return None
    if shared[0]:
        return "shared-sum"
    words = [u for u in lookups if _is_2d_int_input(graph, u.index)]
    if not words:
        return "ids-not-2d-input"
    width = lookups[0].table.shape[1]
    if any(u.table.shape[1] != width for u in lookups) or vector(ln.inputs[1], width) is None:
        return "table-shapes"
    if len(ln.inputs) > 2 and ln.inputs[2].name and vector(ln.inputs[2], width) is None:
        return "table-shapes"
    if ln.attrs.get("axis", -1) != -1 and ln.attrs.get("axis") != 2:
        return "table-shapes"
    if any(t.outputs or is_graph_output(graph, t) for t in ln.outputs[1:] if t.name):
        return "stats-read"
    # the word table is the largest that reads a 2-D input; the others must be positions/segments
    word = max(words, key=lambda u: u.table.shape[0])
    rest = [u for u in lookups if u is not word]
    position = next((u for u in rest if _is_positions(graph, u.index, ctx)), None)
    if position is None:
        return "positions-not-arange"
    segment = next((u for u in rest if u is not position), None)
    segment_input = False
    if segment is not None:
        segment_input = _is_2d_int_input(graph, segment.index)
        if not segment_input and not _is_zeros(graph, segment.index, ctx):
            return "segments-not-input-or-zero"
    return _Match(ln, total, word, position, segment, segment_input)


class FuseOrtEmbedLayernormPass(Pass):
    """Fuse word + position (+ segment) embedding Gathers and LayerNormalization into EmbedLayerNormalization."""

    name = "fuse-ort-embed-layernorm"
    requires_runtime = REQUIRES

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        int32: dict[str, gs.Tensor] = {}
        for ln in [n for n in graph.nodes if op_is(n, "LayerNormalization")]:
            m = _match(graph, ln, ctx)
            if m is None:
                continue
            if isinstance(m, str):
                stats[f"skipped:{m}"] += 1
                continue
            _fuse(graph, m, ctx, int32)
            stats["fused-embed-layernorm"] += 1
        if stats["fused-embed-layernorm"]:
            graph.cleanup().toposort()
        return PassResult(changed=stats["fused-embed-layernorm"] > 0, stats=dict(stats))


def _fuse(graph: gs.Graph, m: _Match, ctx: PassContext, int32: dict[str, gs.Tensor]) -> None:
    positions = m.position.table
    segment_ids: gs.Tensor = gs.Variable.empty()
    segment_table: gs.Tensor = gs.Variable.empty()
    if m.segment is not None and m.segment_input:
        segment_ids = as_int32(graph, m.segment.index, ctx, int32)
        segment_table = m.segment.tensor
    elif m.segment is not None:  # all-zero segment ids: their one row joins the position table
        positions = positions + m.segment.table[0]
    beta = m.ln.inputs[2] if len(m.ln.inputs) > 2 and m.ln.inputs[2].name else gs.Variable.empty()
    inputs = [as_int32(graph, m.word.index, ctx, int32), segment_ids,
              m.word.tensor,
              make_constant(ctx.names.fresh("embed_position_table"), positions.astype(np.float32)),
              segment_table, m.ln.inputs[1], beta]
    y = m.ln.outputs[0]
    mask_index = gs.Variable(ctx.names.fresh("embed_mask_index"), dtype=np.int32)
    keep_sum = is_graph_output(graph, m.total) or len(m.total.outputs) > 1
    outputs = [y, mask_index] + ([m.total] if keep_sum else [])
    m.ln.outputs.clear()
    if keep_sum:
        producer(m.total).outputs.clear()
    ms_node(graph, "EmbedLayerNormalization", inputs, outputs,
            {"epsilon": float(m.ln.attrs.get("epsilon", 1e-5))}, ctx.names.fresh("EmbedLayerNormalization"))
