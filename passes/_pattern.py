"""Helpers for passes that replace a multi-node pattern by one op (not a pass).

A fusion rewires the pattern's last output to the new node and lets ``cleanup`` drop the
rest; that only removes nodes (and is only worth doing) when nothing outside the pattern
reads a tensor inside it.
"""

from __future__ import annotations

import abc
import dataclasses
from collections import Counter
from typing import Any, ClassVar

import onnx_graphsurgeon as gs

from onnxopt.graph_utils import constant_value, is_default_domain, is_graph_output, iter_graphs, producer
from onnxopt.pass_base import Pass, PassContext, PassResult


def op_is(node: gs.Node | None, *ops: str) -> bool:
    """Whether ``node`` exists and is one of the standard-domain ``ops`` (a custom-domain op of
    the same name means something else)."""
    return node is not None and node.op in ops and is_default_domain(node)


def other_input(node: gs.Node, t: gs.Tensor) -> gs.Tensor | None:
    """The input of a binary ``node`` that is not ``t`` (None if both or neither are, or if
    ``node`` does not have two inputs)."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if (a is t) == (b is t):
        return None
    return b if a is t else a


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


def fused_node(last: gs.Node, op: str, inputs: list[gs.Tensor], attrs: dict[str, Any], name: str) -> gs.Node:
    """The fused ``op`` writing the output of the pattern's ``last`` node, which is left without
    inputs and outputs (as ``OpFusionPass.fuse`` requires; ``cleanup`` then drops the rest)."""
    y = last.outputs[0]
    last.inputs.clear()
    last.outputs.clear()
    return gs.Node(op, name=name, attrs=attrs, inputs=inputs, outputs=[y])


def tensor_shape(t: gs.Tensor) -> tuple[int | str | None, ...] | None:
    """A constant's shape, else the recorded one (dims may be symbolic or unknown), else None."""
    value = constant_value(t)
    if value is not None:
        return tuple(value.shape)
    return None if t.shape is None else tuple(t.shape)


def matmul_operands(add: gs.Node, alive: set[int]) -> list[tuple[gs.Node, gs.Tensor]]:
    """(MatMul, other operand) for each operand of ``add`` written by a default-domain MatMul of
    this graph (``alive``: ids of its nodes); Add(MatMul, MatMul) gives two, either may fuse."""
    return [
        (t.inputs[0], add.inputs[1 - i]) for i, t in enumerate(add.inputs)
        if len(t.inputs) == 1 and op_is(t.inputs[0], "MatMul") and id(t.inputs[0]) in alive
    ]


def matmul_add_decline(graph: gs.Graph, mm: gs.Node, opset: int) -> str | None:
    """The checks that fuse-matmul-add and fuse-batched-matmul-add make first on Add(MatMul, c):
    the MatMul's output must be read by the Add only (else the MatMul stays, nothing is saved),
    and Gemm before opset 7 has a ``broadcast`` attribute these rewrites do not write."""
    z = mm.outputs[0]
    if is_graph_output(graph, z):
        return "graph-output"
    if len(z.outputs) != 1:
        return "matmul-output-shared"
    if opset < 7:
        return "opset"
    return None


class OpFusionPass(Pass):
    """Base of the passes that write a decomposed pattern as one standard op new in ``op_opset``.

    Shared so that each such pass has the same ``upgrade`` option and the same walk: every graph
    (If/Loop/Scan bodies too), the pattern's last node swapped for the fused op in place (the
    order stays topological), and a cleanup when a ``fused*`` count was recorded.
    """

    op_opset: ClassVar[int] = 0

    @dataclasses.dataclass(frozen=True)
    class Options:
        # raise the model's opset (onnx's version converter, before the pipeline) so that the
        # fused op can be written; off by default: the output's opset would differ from the input's
        upgrade: bool = False

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.min_opset = self.op_opset if self.options.upgrade else 0  # read by the pass manager

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        for g in list(iter_graphs(graph)):
            replaced = self.fuse(g, ctx, stats)
            if replaced:
                g.nodes = [replaced.get(id(n), n) for n in g.nodes]
        changed = any(k.startswith("fused") for k in stats)
        if changed:
            graph.cleanup()
        return PassResult(changed=changed, stats=dict(stats))

    @abc.abstractmethod
    def fuse(self, g: gs.Graph, ctx: PassContext, stats: Counter[str]) -> dict[int, gs.Node]:
        """Fuse the patterns of one graph (not its subgraphs); counts go to ``stats``.

        Returns {id(pattern's last node): the node taking its place}; the last node must be
        left without inputs and outputs."""
