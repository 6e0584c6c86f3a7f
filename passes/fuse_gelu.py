"""Recognize a decomposed Gelu and write the standard Gelu op (opset 20).

    0.5 * x * (1 + Erf(x / sqrt(2)))                               ->  Gelu(x)
    0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))        ->  Gelu(x, approximate="tanh")

The forms are matched by ``fuse_ort_bias_gelu``'s recognizer (one matcher for both passes):
the two Muls in any order, ``x / sqrt(2)`` or ``x * (1/sqrt(2))``, ``x^3`` as ``Pow(x, 3)`` or
``x * x * x``, constants within 1e-4 relative (exporters round sqrt(2) and sqrt(2/pi)
differently). Against the decomposition with the exact constants, Gelu differs by float
rounding; a model that wrote sqrt(2) as 1.4142 computes erf of an argument 1.5e-5 relative
off, and the fused op is the one closer to the true Gelu: the two differ by at most
0.5 |x| erf'(z) z * 1.5e-5 <= 4e-6 |x| (z = x / sqrt 2; erf'(z) z peaks at 0.48).

Gelu exists from opset 20: in an older model the pattern is left alone and counted
(``skipped:opset``) unless option ``upgrade=true`` raises the model to opset 20 first.
onnxruntime fuses the erf form itself at load time (so there it gains little) but not the tanh
form (0.36x in bench/LOSSLESS_REWRITES.md); either way the graph gets portable to runtimes that
have Gelu but no such fusion.

Declined, and counted in stats:
- ``skipped:opset``: the model is below opset 20.
- ``skipped:shared``: a tensor inside the pattern (x / sqrt 2, the Erf, ...) has a reader
  outside it or is a graph output; fusing would keep those nodes and add a Gelu.
- ``skipped:dtype``: x is not float16/float32/float64/bfloat16 (Gelu's types).
Works inside If/Loop/Scan bodies; custom-domain nodes are left alone.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs
from onnxopt.passes._gelu_patterns import gelus
from onnxopt.passes._pattern import OpFusionPass, fused_node, only_read_inside, pattern_nodes

from onnxopt.graph_utils import producer
from onnxopt.pass_base import PassContext

GELU_OPSET = 20


def _float(x: gs.Tensor) -> bool:
    if x.dtype is None:
        return True  # Mul/Erf/Tanh on x already require a float type
    try:
        return np.dtype(x.dtype).kind == "f" or str(x.dtype) == "bfloat16"
    except TypeError:
        return str(x.dtype) == "bfloat16"


class FuseGeluPass(OpFusionPass):
    """Write a decomposed Gelu (erf or tanh form) as the standard Gelu op."""

    name = "fuse-gelu"

    op_opset = GELU_OPSET

    def fuse(self, g: gs.Graph, ctx: PassContext, stats: Counter[str]) -> dict[int, gs.Node]:
        replaced: dict[int, gs.Node] = {}
        for x, y, kind in gelus(g):
            if kind not in ("erf", "tanh"):
                continue  # already the standard op
            nodes = pattern_nodes(x, y)
            if ctx.opset < GELU_OPSET:
                stats["skipped:opset"] += 1
                continue
            if not only_read_inside(g, nodes, y):
                stats["skipped:shared"] += 1
                continue
            if not _float(x):
                stats["skipped:dtype"] += 1
                continue
            last = producer(y)
            assert last is not None
            attrs = {"approximate": "tanh"} if kind == "tanh" else {}
            replaced[id(last)] = fused_node(last, "Gelu", [x], attrs, ctx.names.fresh(f"{last.name or 'gelu'}_gelu"))
            stats[f"fused-{kind}"] += 1
        return replaced
