"""Fuse a bias Add and the Gelu after it into onnxruntime's BiasGelu (erf) or FastGelu (tanh).

    y = Gelu(x + b)                               b: a constant [H], x: [..., H]
 -> y = com.microsoft.BiasGelu(x, b)              Gelu exact (erf)
 -> y = com.microsoft.FastGelu(x, b)              Gelu approximate="tanh"

Gelu is the standard op (opset 20) or the erf form the exporters write below opset 20:

    g = x * 0.5 * (1 + Erf(x / sqrt(2)))          (any order of the two Muls; x * (1/sqrt(2))
                                                   for the Div)

and the tanh form ``0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`` (``x^3`` as
``Pow(x, 3)`` or ``x * x * x``) is recognised for FastGelu. Without a bias Add before it, a
decomposed erf Gelu becomes com.microsoft's Gelu, and a tanh one (standard or decomposed)
FastGelu without its bias input; a standard erf Gelu without a bias is already one op and is
left alone. The constants are checked to 1e-4 relative (exporters round sqrt(2) and
sqrt(2/pi) differently).

Declined: ``skipped:bias-shape`` (the Add is not of a [H] constant on the last axis),
``skipped:shared-bias-sum`` (x + b is read elsewhere too), ``skipped:not-float32``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs
from onnxopt.passes._gelu_patterns import gelus
from onnxopt.passes._ort_patterns import REQUIRES, ms_node, vector
from onnxopt.passes._pattern import op_is, pattern_nodes

from onnxopt.graph_utils import is_graph_output, producer
from onnxopt.pass_base import Pass, PassContext, PassResult


def _bias(x: gs.Tensor) -> tuple[gs.Tensor, gs.Tensor] | str | None:
    """(input, bias) when ``x`` is ``input + b`` of a [H] constant, a reason, or None (no Add)."""
    add = producer(x)
    if not op_is(add, "Add"):
        return None
    for i in (0, 1):
        inp, b = add.inputs[i], add.inputs[1 - i]
        if vector(b) is None:
            continue
        width = inp.shape[-1] if inp.shape else None
        if not isinstance(width, int) or vector(b, width) is None:
            return "bias-shape"
        return inp, b
    return None


class FuseOrtBiasGeluPass(Pass):
    """Fuse bias Add + Gelu (erf or tanh, standard or decomposed) into onnxruntime's BiasGelu / FastGelu."""

    name = "fuse-ort-bias-gelu"
    requires_runtime = REQUIRES

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        for x, y, kind in gelus(graph):
            if x.dtype is not None and np.dtype(x.dtype) != np.float32:
                stats["skipped:not-float32"] += 1
                continue
            found = _bias(x)
            if isinstance(found, str):
                stats[f"skipped:{found}"] += 1
                continue
            if found is not None and not _only_read_by_gelu(graph, x, y):
                stats["skipped:shared-bias-sum"] += 1
                continue
            tanh = kind in ("FastGelu", "tanh")
            if found is None and kind == "Gelu":
                continue  # a standard Gelu without a bias: already one op
            # com.microsoft.Gelu is BiasGelu without the bias; FastGelu's bias is optional
            op = "FastGelu" if tanh else ("BiasGelu" if found is not None else "Gelu")
            y_producer = producer(y)
            assert y_producer is not None
            y_producer.outputs.clear()
            ms_node(graph, op, list(found) if found is not None else [x], [y], {}, ctx.names.fresh(op))
            stats[f"fused-{op.lower()}"] += 1
        changed = any(k.startswith("fused-") for k in stats)
        if changed:
            graph.cleanup().toposort()
        return PassResult(changed=changed, stats=dict(stats))


def _only_read_by_gelu(graph: gs.Graph, x: gs.Tensor, y: gs.Tensor) -> bool:
    """Whether every reader of ``x`` is a node of the Gelu pattern ending in ``y``."""
    if is_graph_output(graph, x):
        return False
    inside = {id(n) for n in pattern_nodes(x, y)}
    return all(id(r) in inside for r in x.outputs)
