"""Embedding tables in int8: shared by the static (``quantize-qdq``) and dynamic quantizers.

A Gather along axis 0 from a constant float32 table (word and position embeddings) reads
an int8 copy of the table instead, with one symmetric scale per row gathered beside it:

    Cast(Gather(Wq, ids), float) * Gather(scales, ids)  ==  Gather(Wq * scales, ids)

exactly, so only the looked-up rows are dequantized at run time and the table is stored
once, in int8. Per-row scales matter: on MiniLM's word embeddings one scale for the whole
table gives a relative squared error of 1.8e-3, one per row 5.3e-5. Only the main graph is
rewritten; If/Loop bodies keep their tables.

Declined (``skipped:<reason>``, keyed by layer name): ``excluded``, ``already-quantized``
(the rows already feed a QuantizeLinear), ``gather-axis`` (axis != 0) and
``shared-weight`` (the table also feeds something else, such as a tied output
projection, so a float copy would stay beside the int8 one).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.graph_utils import is_default_domain, is_graph_output, layer_key
from onnxopt.pass_base import NameGenerator


def quantize_embedding_tables(
    graph: gs.Graph,
    names: NameGenerator,
    min_elements: int,
    exclude: Iterable[str],
    stats: Counter[str],
    skipped: dict[str, str],
    stat_key: str,
) -> list[str]:
    """Rewrite the qualifying Gathers of ``graph``; return their layer names (``stat_key`` counts them)."""
    excluded = frozenset(exclude)
    by_table: dict[str, list[gs.Node]] = {}
    for node in graph.nodes:
        if node.op != "Gather" or not is_default_domain(node):
            continue
        table = node.inputs[0]
        if not isinstance(table, gs.Constant) or table.values.dtype != np.float32:
            continue
        if table.values.size < min_elements or table.values.ndim < 2:
            continue
        reason = None
        if any(c.op == "QuantizeLinear" for t in node.outputs for c in t.outputs):
            reason = "already-quantized"
        elif node.attrs.get("axis", 0) != 0:
            reason = "gather-axis"
        elif node.name in excluded or layer_key(node) in excluded:
            reason = "excluded"
        if reason is not None:
            stats[f"skipped:{reason}"] += 1
            skipped[layer_key(node)] = reason
            continue
        by_table.setdefault(table.name, []).append(node)
    done: list[str] = []
    for nodes in by_table.values():
        table = nodes[0].inputs[0]
        if len(table.outputs) != len(nodes) or is_graph_output(graph, table):
            for node in nodes:
                stats["skipped:shared-weight"] += 1
                skipped[layer_key(node)] = "shared-weight"
            continue
        w = table.values
        if not np.all(np.isfinite(w)):
            continue
        peak = np.max(np.abs(w.reshape(len(w), -1)), axis=1)
        scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        row_shape = (len(w),) + (1,) * (w.ndim - 1)
        qtable = gs.Constant(
            names.fresh(f"{table.name}_quantized"),
            np.clip(np.rint(w / scales.reshape(row_shape)), -127, 127).astype(np.int8),
        )
        scale_table = gs.Constant(names.fresh(f"{table.name}_scales"), scales.reshape(row_shape))
        for node in nodes:
            out, ids = node.outputs[0], node.inputs[1]
            rows = gs.Variable(names.fresh(f"{out.name}_quantized"), dtype=np.int8, shape=out.shape)
            as_float = gs.Variable(names.fresh(f"{out.name}_int8_as_float"), dtype=np.float32)
            row_scales = gs.Variable(names.fresh(f"{out.name}_row_scales"), dtype=np.float32)
            node.inputs[0] = qtable
            node.outputs[0] = rows
            graph.nodes.extend([
                gs.Node("Cast", names.fresh(f"{out.name}_Cast"), {"to": onnx.TensorProto.FLOAT},
                        inputs=[rows], outputs=[as_float]),
                gs.Node("Gather", names.fresh(f"{out.name}_GatherScales"), {"axis": 0},
                        inputs=[scale_table, ids], outputs=[row_scales]),
                gs.Node("Mul", names.fresh(f"{out.name}_Dequantize"),
                        inputs=[as_float, row_scales], outputs=[out]),
            ])
            stats[stat_key] += 1
            done.append(layer_key(node))
    return done
