"""Remove nodes whose outputs nothing reads, and initializers nothing uses.

Liveness starts at the graph outputs and walks back through producers; values read
from inside If/Loop/Scan bodies (outer-scope references) count as used. Graph
inputs are never removed, even when unused: callers still feed them.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxopt.graph_utils import iter_graphs
from onnxopt.pass_base import Pass, PassContext, PassResult


def _counts(graph: gs.Graph) -> tuple[int, int]:
    nodes = consts = 0
    for g in iter_graphs(graph):
        nodes += len(g.nodes)
        consts += sum(isinstance(t, gs.Constant) for t in g.tensors().values())
    return nodes, consts


class EliminateDeadCodePass(Pass):
    """Remove unused nodes and initializers (graph inputs are kept)."""

    name = "eliminate-dead-code"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        nodes, consts = _counts(graph)
        graph.cleanup(remove_unused_graph_inputs=False)
        nodes_after, consts_after = _counts(graph)
        stats = {}
        if nodes - nodes_after:
            stats["removed-nodes"] = nodes - nodes_after
        if consts - consts_after:
            stats["removed-initializers"] = consts - consts_after
        return PassResult(changed=bool(stats), stats=stats)
