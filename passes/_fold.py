"""Helpers for the passes that fold an op after Conv, ConvTranspose, Gemm or MatMul into that
producer's weight or bias (fold-bias, fold-scale, fold-batchnorm; not a pass).

One definition of where a producer's output channels lie (its weight's axis, its bias input)
so that the three folds agree on which constants are per output channel.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs
from onnxopt.passes._pattern import tensor_shape

from onnxopt.graph_utils import constant_value, is_default_domain, iter_graphs


def producer_operand(node: gs.Node, producers: tuple[str, ...], alive: set[int]) -> tuple[gs.Node, gs.Tensor] | None:
    """(producer, other operand) for a binary ``node`` with an operand written by one of the
    ``producers`` ops of this graph (``alive``: ids of its nodes; one in an outer graph is not
    ours to rewrite). Sub and Div take the producer on their first operand only (c - Conv(x)
    would negate the weights too). With two candidates, the one whose partner is constant."""
    sides = [
        (t.inputs[0], node.inputs[1 - i]) for i, t in enumerate(node.inputs)
        if (node.op not in ("Sub", "Div") or i == 0)
        and len(t.inputs) == 1 and t.inputs[0].op in producers
        and is_default_domain(t.inputs[0]) and id(t.inputs[0]) in alive
    ]
    if not sides:
        return None
    sides.sort(key=lambda side: constant_value(side[1]) is None)
    return sides[0]


FoldFn = Callable[[gs.Graph, gs.Node, gs.Node, gs.Tensor], "str | None"]


def fold_binary_ops(graph: gs.Graph, ops: tuple[str, ...], producers: tuple[str, ...],
                    fold: FoldFn) -> dict[str, int]:
    """The walk fold-bias and fold-scale share: every default-domain binary ``ops`` node of each
    (sub)graph with a ``producers`` operand is handed to ``fold(g, producer, node, other)``, which
    rewrites the producer to write the node's output and returns None, or returns a decline reason
    (counted as ``skipped:<reason>``). Folded nodes are dropped in one sweep per graph; stats."""
    stats: Counter[str] = Counter()
    for g in list(iter_graphs(graph)):
        alive = {id(n) for n in g.nodes}
        removed: set[int] = set()
        for node in list(g.nodes):
            if node.op not in ops or not is_default_domain(node) or len(node.inputs) != 2:
                continue
            found = producer_operand(node, producers, alive)
            if found is None:
                continue
            if reason := fold(g, found[0], node, found[1]):
                stats[f"skipped:{reason}"] += 1
                continue
            removed.add(id(node))
            stats["folded"] += 1
        if removed:
            g.nodes = [n for n in g.nodes if id(n) not in removed]
    if stats["folded"]:
        graph.cleanup()
    return dict(stats)


def bias_input(prod: gs.Node) -> gs.Tensor | None:
    """The producer's bias (Conv/ConvTranspose B, Gemm C), None when it has none (MatMul never)."""
    if prod.op == "MatMul" or len(prod.inputs) < 3 or not prod.inputs[2].name:
        return None
    return prod.inputs[2]


def _static_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    shape = tensor_shape(tensor)
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return shape  # type: ignore[return-value]


def _dim(tensor: gs.Tensor, axis: int) -> int | str | None:
    shape = tensor_shape(tensor)
    if shape is None or len(shape) <= axis:
        return None
    return shape[axis]


def output_frame(prod: gs.Node) -> tuple[int, int, int | str | None] | None:
    """(output rank, channel count on the broadcast axis, leading dim M for Gemm) or None."""
    w_shape = _static_shape(prod.inputs[1]) if len(prod.inputs) > 1 else None
    if w_shape is None:
        return None
    if prod.op == "Conv":
        return len(w_shape), w_shape[0], None
    if prod.op == "ConvTranspose":
        return len(w_shape), w_shape[1] * int(prod.attrs.get("group", 1)), None
    n = w_shape[0] if int(prod.attrs.get("transB", 0)) else w_shape[1]
    m = _dim(prod.inputs[0], 1 if int(prod.attrs.get("transA", 0)) else 0)
    return 2, n, m


def scale_weight(prod: gs.Node, w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``w`` in float64 with each output channel o's slice multiplied by ``scale[o]``.

    ConvTranspose W is [Cin, M/G, k...]: input channel i belongs to group g = i // (Cin/G), and
    its column j is output channel g*(M/G) + j. Gemm B is [K, N], or [N, K] with transB;
    MatMul W is [K, N]."""
    w64 = w.astype(np.float64)
    if prod.op == "Conv":
        return w64 * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    if prod.op == "ConvTranspose":
        group = int(prod.attrs.get("group", 1))
        cin, per_group = w.shape[0], w.shape[1]
        rows = scale.reshape(group, per_group)[np.arange(cin) // (cin // group)]
        return w64 * rows.reshape(rows.shape + (1,) * (w.ndim - 2))
    if prod.op == "Gemm" and int(prod.attrs.get("transB", 0)):
        return w64 * scale[:, None]
    return w64 * scale[None, :]


def detach(node: gs.Node) -> gs.Tensor:
    """Disconnect ``node`` (folded away; the caller drops it) and return its output, for the
    producer (or a replacement) to write instead."""
    y = node.outputs[0]
    node.inputs.clear()
    node.outputs.clear()
    return y


def set_bias(prod: gs.Node, b_const: gs.Constant) -> None:
    """Make ``b_const`` the producer's bias, replacing the existing one or adding it."""
    if bias_input(prod) is not None:
        prod.inputs[2] = b_const
        return
    while len(prod.inputs) > 2:  # an empty optional bias, if present
        prod.inputs.pop()
    prod.inputs.append(b_const)
