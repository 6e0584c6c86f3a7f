"""Helpers for passes that replace a multi-node pattern by one op (not a pass).

A fusion rewires the pattern's last output to the new node and lets ``cleanup`` drop the
rest; that only removes nodes (and is only worth doing) when nothing outside the pattern
reads a tensor inside it.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxopt.graph_utils import is_default_domain, is_graph_output, producer


def pattern_nodes(x: gs.Tensor, y: gs.Tensor) -> list[gs.Node]:
    """The nodes computing ``y`` from ``x`` and constants: a walk back from ``y`` that stops at
    ``x`` and at constants (initializers and Constant nodes, which may be shared)."""
    seen: dict[int, gs.Node] = {}
    stack = [y]
    while stack:
        node = producer(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        stack.extend(t for t in node.inputs if t is not x and not _is_constant(t))
    return list(seen.values())


def _is_constant(t: gs.Tensor) -> bool:
    node = producer(t)
    return isinstance(t, gs.Constant) or (node is not None and node.op == "Constant" and is_default_domain(node))


def only_read_inside(graph: gs.Graph, nodes: list[gs.Node], y: gs.Tensor) -> bool:
    """Whether every tensor the ``nodes`` write (but ``y``) is read by those nodes only."""
    inside = {id(n) for n in nodes}
    for node in nodes:
        for t in node.outputs:
            if t is y:
                continue
            if is_graph_output(graph, t) or any(id(r) not in inside for r in t.outputs):
                return False
    return True
