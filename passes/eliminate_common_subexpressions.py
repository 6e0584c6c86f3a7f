"""Merge duplicate constants and duplicate nodes.

    c1 == c2 (same dtype, shape and bytes)            ->  readers of c2 read c1
    y1 = op(a, b; attrs), y2 = op(a, b; attrs)        ->  readers of y2 read y1

Constants first (initializers and Constant-node values up to ``max_constant_bytes``), so
nodes reading equal constants then merge. Nodes are visited once in topological order
and keyed by (domain, op, attributes, identities of the inputs); since inputs are already
merged when a node is visited, whole duplicate chains merge in one pass. Each graph
(If/Loop/Scan body) is handled on its own; a body may reuse constants of the graphs that
enclose it, never those of a sibling.

A duplicate whose output is a graph output keeps that name: its node becomes
``Identity(y1)`` (a copy instead of a second computation; ``eliminate-identity``
removes it where it can rename). Graph inputs are never merged (callers feed them).

Never merged: nondeterministic ops (``skipped:nondeterministic``), custom-domain ops,
nodes with subgraphs (If/Loop/Scan), Constant nodes (merged as values).
Declined, and counted: ``skipped:graph-output`` when a duplicate Identity's output is a
graph output (nothing to gain).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import ChainMap, Counter
from collections.abc import Hashable
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph_utils import (
    NONDETERMINISTIC,
    constant_value,
    is_default_domain,
    is_graph_input,
    is_graph_output,
    node_subgraphs,
    replace_uses,
)
from onnxopt.pass_base import Pass, PassContext, PassResult


def _value_key(value: np.ndarray) -> Hashable:
    data = np.ascontiguousarray(value).tobytes()
    return (value.dtype.str, value.shape, hashlib.blake2b(data, digest_size=16).digest(), data)


def _attr_key(value: Any) -> Hashable:
    if isinstance(value, gs.Constant):
        return ("tensor", _value_key(np.asarray(value.values)))
    if isinstance(value, (list, tuple)):
        return tuple(_attr_key(v) for v in value)
    if isinstance(value, np.ndarray):
        return _value_key(value)
    if isinstance(value, float):
        return ("float", value.hex())  # exact, and 0.0 != -0.0
    return (type(value).__name__, value)


class EliminateCommonSubexpressionsPass(Pass):
    """Merge equal constants and nodes computing the same value."""

    name = "eliminate-common-subexpressions"

    @dataclasses.dataclass(frozen=True)
    class Options:
        max_constant_bytes: int = 1 << 20  # constants above this are not compared

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        graph.toposort()
        self._run_graph(graph, ChainMap(), stats)
        changed = stats["merged-constants"] + stats["merged-nodes"] > 0
        if changed:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(changed=changed, stats={k: v for k, v in stats.items() if v})

    def _run_graph(self, g: gs.Graph, constants: ChainMap, stats: Counter[str]) -> None:
        constants = constants.new_child()  # visible here and in nested bodies only
        table: dict[Hashable, gs.Node] = {}
        canon_of: dict[int, gs.Tensor | None] = {}
        for node in list(g.nodes):
            for i, t in enumerate(node.inputs):
                if id(t) not in canon_of:
                    canon_of[id(t)] = self._canonical_constant(g, t, constants)
                    first = canon_of[id(t)]
                    stats["merged-constants"] += first is not None and first is not t
                canon = canon_of[id(t)]
                if canon is not None and canon is not t:
                    node.inputs[i] = canon
            for sub in node_subgraphs(node):
                self._run_graph(sub, constants, stats)
            if (
                not is_default_domain(node)
                or node.op == "Constant"
                or node_subgraphs(node)
                or not node.outputs
            ):
                continue
            if node.op in NONDETERMINISTIC:
                stats["skipped:nondeterministic"] += 1
                continue
            key = (
                node.domain or "",
                node.op,
                tuple(bool(t.name) for t in node.outputs),
                tuple(sorted((k, _attr_key(v)) for k, v in node.attrs.items())),
                tuple(id(t) if t.name else None for t in node.inputs),
            )
            first = table.get(key)
            if first is None:
                table[key] = node
            elif reason := self._merge(g, first, node):
                stats[f"skipped:{reason}"] += 1
            else:
                stats["merged-nodes"] += 1

    def _canonical_constant(
        self, g: gs.Graph, t: gs.Tensor, constants: ChainMap
    ) -> gs.Tensor | None:
        """The first equal constant visible here (``t`` itself if it is the first)."""
        value = constant_value(t) if t.name and not is_graph_input(g, t) else None
        if value is None or value.nbytes > self.options.max_constant_bytes:
            return None
        return constants.setdefault(_value_key(value), t)

    @staticmethod
    def _merge(g: gs.Graph, first: gs.Node, dup: gs.Node) -> str | None:
        outputs = list(zip(first.outputs, dup.outputs, strict=True))
        kept = [(a, b) for a, b in outputs if is_graph_output(g, b)]
        if kept and dup.op == "Identity":
            return "graph-output"
        for a, b in outputs:
            if b.name and not is_graph_output(g, b):
                replace_uses(b, a)
        dup.inputs.clear()
        dup.outputs.clear()
        for a, b in kept:  # the duplicate's graph-output names survive as copies
            g.nodes.append(gs.Node("Identity", inputs=[a], outputs=[b]))
        return None
