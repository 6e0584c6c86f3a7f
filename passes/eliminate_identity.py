"""Remove Identity nodes and inference-mode Dropout.

    y = Identity(x)                      ->  readers of y read x
    y[, mask] = Dropout(x[, ratio, training_mode=false])  ->  readers of y read x

Dropout is the identity at inference: opset < 12 always (``is_test`` was dropped in
opset 7; before it, ``is_test=0`` means training and is declined), opset >= 12
unless ``training_mode`` is given and not a constant false.

Declined, and counted in stats:
- ``skipped:graph-output``: ``y`` is a graph output and ``x`` cannot take over its
  name (``x`` is a graph input, another output, a constant, or an outer-scope value).
- ``skipped:training-mode``: Dropout in training mode, or a non-constant mode.
- ``skipped:mask-used``: the Dropout mask output is read, or is a graph output.
Works inside If/Loop/Scan bodies too; outer-scope values are never renamed.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph_utils import (
    bypass,
    constant_value,
    is_default_domain,
    is_graph_output,
    iter_graphs,
)
from onnxopt.pass_base import Pass, PassContext, PassResult


def _dropout_decline(graph: gs.Graph, node: gs.Node, opset: int) -> str | None:
    if opset < 7 and int(node.attrs.get("is_test", 0)) == 0:
        return "training-mode"
    if len(node.inputs) > 2 and node.inputs[2].name:
        mode = constant_value(node.inputs[2])
        if mode is None or bool(np.asarray(mode).any()):
            return "training-mode"
    if len(node.outputs) > 1 and (node.outputs[1].outputs or is_graph_output(graph, node.outputs[1])):
        return "mask-used"
    return None


class EliminateIdentityPass(Pass):
    """Remove Identity and inference-mode Dropout nodes."""

    name = "eliminate-identity"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        for g in list(iter_graphs(graph)):
            removed: set[int] = set()
            for node in list(g.nodes):
                if not is_default_domain(node) or node.op not in ("Identity", "Dropout"):
                    continue
                if not node.inputs or not node.outputs:
                    continue
                if node.op == "Dropout" and (reason := _dropout_decline(g, node, ctx.opset)):
                    stats[f"skipped:{reason}"] += 1
                    continue
                src, dst = node.inputs[0], node.outputs[0]
                if reason := bypass(g, src, dst):
                    stats[f"skipped:{reason}"] += 1
                    continue
                if len(node.outputs) > 1:
                    node.outputs[1].inputs.clear()
                node.inputs.clear()
                node.outputs.clear()
                removed.add(id(node))
                stats[f"removed-{node.op.lower()}"] += 1
            if removed:
                g.nodes = [n for n in g.nodes if id(n) not in removed]
        changed = any(k.startswith("removed") for k in stats)
        return PassResult(changed=changed, stats=dict(stats))
