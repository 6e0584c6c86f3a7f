"""Fold a constant Add or Sub after Conv, ConvTranspose or Gemm into the producer's bias.

    Add(Conv(x, W, b), c)          ->  Conv(x, W, b + c[M])      (also ConvTranspose)
    Add(Gemm(A, B, C), c)          ->  Gemm(A, B, beta*C + c), beta = 1
    Sub(producer(...), c)          ->  as Add with -c            (negation is exact)

``Sub(c, producer(...))`` would negate the weights too and is left alone (not counted).

Conv: the output is [N, M, d...] with rank = rank(W); ``c`` may only vary along the
channel axis: after left-padding to that rank every dim is 1 except axis 1, which is 1
or M (so [M,1,1], [1,M,1,1], [1] and scalars qualify); it is expanded to [M].

Gemm computes ``alpha*A'B' + beta*C``; adding ``c`` gives ``beta*C + c``, so the new C is
that sum and beta becomes 1 (a beta of 0 or a missing C then needs no special case).
``c`` must broadcast to the Gemm output [M, N] without enlarging it: rank <= 2, last dim
1 or N, first dim 1 or M (a static M). Sums are taken in float64 and cast back.

Declined, and counted in stats (an Add/Sub with no Conv/ConvTranspose/Gemm input is ignored):
- ``skipped:non-constant``: Add's other input, or the existing bias/C, is not a constant.
- ``skipped:broadcast``: ``c`` would enlarge the output or is not per output channel.
- ``skipped:graph-output``: the producer's output is also a graph output.
- ``skipped:conv-output-shared``: the producer's output has another consumer.
- ``skipped:unknown-shape``: the weight's shape (channel count, N) is not known.
- ``skipped:dtype``: not a float tensor, or ``c``'s dtype differs from the weight's.
- ``skipped:opset``: Gemm before opset 7 (it has a ``broadcast`` attribute).
Works inside If/Loop/Scan bodies; producers in an outer graph are never touched.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnxopt.passes._fold import bias_input, detach, fold_binary_ops, output_frame, set_bias

from onnxopt.graph_utils import (
    constant_value,
    is_float_dtype,
    is_graph_output,
    make_constant,
)
from onnxopt.pass_base import NameGenerator, Pass, PassContext, PassResult

_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")


def _broadcast_ok(prod: gs.Node, c: np.ndarray, rank: int, channels: int,
                  m: int | str | None) -> bool:
    if c.ndim > rank:
        return False
    dims = (1,) * (rank - c.ndim) + tuple(c.shape)
    if prod.op == "Gemm":
        return dims[1] in (1, channels) and (dims[0] == 1 or dims[0] == m)
    return dims[1] in (1, channels) and all(d == 1 for i, d in enumerate(dims) if i != 1)


def _decline(graph: gs.Graph, prod: gs.Node, other: gs.Tensor, opset: int) -> str | None:
    z = prod.outputs[0]
    if is_graph_output(graph, z):
        return "graph-output"
    if len(z.outputs) != 1:
        return "conv-output-shared"
    c = constant_value(other)
    if c is None:
        return "non-constant"
    bias = bias_input(prod)
    if bias is not None and constant_value(bias) is None:
        return "non-constant"
    if prod.op == "Gemm" and opset < 7:
        return "opset"
    frame = output_frame(prod)
    if frame is None:
        return "unknown-shape"
    w = constant_value(prod.inputs[1])
    w_dtype = w.dtype if w is not None else prod.inputs[1].dtype
    if not is_float_dtype(c.dtype) or w_dtype is None or np.dtype(w_dtype) != c.dtype:
        return "dtype"
    if not _broadcast_ok(prod, c, *frame):
        return "broadcast"
    return None


def _fold(prod: gs.Node, add: gs.Node, c: np.ndarray, names: NameGenerator) -> None:
    bias_tensor = bias_input(prod)
    old = constant_value(bias_tensor) if bias_tensor is not None else None
    c64 = c.astype(np.float64)
    if prod.op == "Gemm":
        beta = float(prod.attrs.get("beta", 1.0))
        new = c64 if old is None else old.astype(np.float64) * beta + c64
        prod.attrs["beta"] = 1.0
    else:
        frame = output_frame(prod)
        assert frame is not None
        per_channel = np.broadcast_to(c64.reshape(-1), (frame[1],))
        new = per_channel if old is None else old.astype(np.float64) + per_channel
    b_const = make_constant(names.fresh(f"{prod.name or prod.op}_bias_folded"),
                            np.asarray(new).astype(c.dtype))
    set_bias(prod, b_const)
    prod.outputs[0] = detach(add)


class FoldBiasPass(Pass):
    """Fold a constant Add or Sub after Conv, ConvTranspose or Gemm into its bias."""

    name = "fold-bias"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        def fold(g: gs.Graph, prod: gs.Node, add: gs.Node, other: gs.Tensor) -> str | None:
            if reason := _decline(g, prod, other, ctx.opset):
                return reason
            c = constant_value(other)
            assert c is not None
            _fold(prod, add, c if add.op == "Add" else np.negative(c), ctx.names)
            return None

        stats = fold_binary_ops(graph, ("Add", "Sub"), _PRODUCERS, fold)
        return PassResult(changed=stats.get("folded", 0) > 0, stats=stats)
