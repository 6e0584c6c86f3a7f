"""Fold a per-output-channel constant Mul or Div after Conv, ConvTranspose, Gemm or MatMul into the weights.

    Mul(Conv(x, W, b), s)     ->  Conv(x, W * s[o], b * s)       (also ConvTranspose)
    Mul(Gemm(A, B, C), s)     ->  Gemm(A, B * s along N, C * s)   (alpha, beta kept)
    Mul(MatMul(x, W), s)      ->  MatMul(x, W * s[None, :])       W constant 2-D [K, N], any rank of x
    Div(producer, s)          ->  as Mul with 1/s                 (Div(s, producer) is left alone)

Each producer is linear in its weight along the output-channel axis, so scaling the output
channel o by s[o] scales the weight's slice for o (and the bias) by the same factor. The
new weights are computed in float64 and rounded once to the weight dtype: the result differs
from the original by float rounding (the product is rounded at a different point), not more.

``s`` must vary only along the channel axis and never enlarge the output:
- Conv/ConvTranspose (output [N, M, d...], rank = rank(W)): after left-padding to that rank
  every dim of ``s`` is 1 except axis 1, which is 1 or M (``_fold.output_frame``).
- Gemm (output [M, N]): rank <= 2, first dim 1, last dim 1 or N; ``C * s`` must not have
  more elements than C or N (a [M, 1] C times a [N] scale would materialize [M, N]).
- MatMul: rank(s) <= 1 (scalar, [1] or [N]; the last axis of the output is N), or a higher
  rank whose leading dims are 1 and which does not exceed the output's known rank.
ConvTranspose W is [Cin, M/G, k...]: input channel i belongs to group g = i // (Cin/G), and
its column j is output channel g*(M/G) + j (as in fold-batchnorm).

Declined, and counted in stats (a Mul/Div with no such producer is ignored):
- ``skipped:non-constant``: the scale, the weight or the bias is not a constant.
- ``skipped:broadcast``: the scale is not per output channel or would enlarge the output.
- ``skipped:graph-output``: the producer's output is also a graph output.
- ``skipped:conv-output-shared``: the producer's output has another consumer.
- ``skipped:shared-weight``: the weight feeds other nodes (folding would copy it).
- ``skipped:unknown-shape``: the weight's shape or (for a high-rank MatMul scale) the
  output rank is not known.
- ``skipped:rank``: a MatMul weight that is not 2-D.
- ``skipped:dtype``: not a float weight, or the scale's dtype differs from it.
- ``skipped:zero-divisor``: a Div by a scale with a zero (x/0 is inf or nan, W*inf is not).
- ``skipped:range``: a scaled weight or bias overflows to inf.
Works inside If/Loop/Scan bodies; producers in an outer graph are never touched.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnxopt.passes._fold import bias_input, detach, fold_binary_ops, output_frame, scale_weight

from onnxopt.graph_utils import (
    constant_value,
    is_float_dtype,
    is_graph_output,
    make_constant,
)
from onnxopt.pass_base import NameGenerator, Pass, PassContext, PassResult

_PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _channel_scale(prod: gs.Node, s: np.ndarray, w: np.ndarray) -> np.ndarray | str:
    """The scale as a 1-D float64 array over the output channels, or a decline reason."""
    if prod.op == "MatMul":
        if w.ndim != 2:
            return "rank"  # a batched or 1-D weight: no single column per output channel
        n = w.shape[1]
        out_shape = prod.outputs[0].shape
        if s.ndim > 1 and out_shape is None:
            return "unknown-shape"
        if s.ndim > 1 and s.ndim > len(out_shape):
            return "broadcast"
        dims = (1,) * max(0, 1 - s.ndim) + tuple(s.shape)
        if any(d != 1 for d in dims[:-1]) or dims[-1] not in (1, n):
            return "broadcast"
    else:
        frame = output_frame(prod)
        if frame is None:
            return "unknown-shape"
        rank, n, _ = frame
        if s.ndim > rank:
            return "broadcast"
        dims = (1,) * (rank - s.ndim) + tuple(s.shape)
        if dims[1] not in (1, n) or any(d != 1 for i, d in enumerate(dims) if i != 1):
            return "broadcast"
    return np.broadcast_to(s.astype(np.float64).reshape(-1), (n,))


def _decline(graph: gs.Graph, prod: gs.Node, node: gs.Node, s: np.ndarray | None) -> str | None:
    if s is None:
        return "non-constant"  # first: x * HardSigmoid(x) after a Conv is no scale, shared or not
    z = prod.outputs[0]
    if is_graph_output(graph, z):
        return "graph-output"
    if len(z.outputs) != 1:
        return "conv-output-shared"
    w = constant_value(prod.inputs[1]) if len(prod.inputs) > 1 else None
    bias = bias_input(prod)
    if w is None or (bias is not None and constant_value(bias) is None):
        return "non-constant"
    if len(prod.inputs[1].outputs) != 1:
        return "shared-weight"
    if not is_float_dtype(w.dtype) or s.dtype != w.dtype:
        return "dtype"
    if node.op == "Div" and np.any(s == 0):
        return "zero-divisor"
    return None


def _scaled(prod: gs.Node, w: np.ndarray, bias: np.ndarray | None,
            scale: np.ndarray) -> tuple[np.ndarray, np.ndarray | None] | str:
    """(new weight, new bias) in float64, or a decline reason."""
    w_new = scale_weight(prod, w, scale)
    if bias is None:
        return w_new, None
    if prod.op == "Gemm":
        b_new = bias.astype(np.float64) * scale  # C broadcasts to [M, N]: scale its columns
        if b_new.size > max(bias.size, scale.size):
            return "broadcast"
        return w_new, b_new
    return w_new, bias.astype(np.float64) * scale


def _rewrite(prod: gs.Node, node: gs.Node, w_new: np.ndarray, b_new: np.ndarray | None,
             names: NameGenerator) -> None:
    dtype = constant_value(prod.inputs[1]).dtype  # type: ignore[union-attr]
    prod.inputs[1] = make_constant(names.fresh(f"{prod.inputs[1].name}_scaled"), w_new.astype(dtype))
    if b_new is not None:
        prod.inputs[2] = make_constant(names.fresh(f"{prod.inputs[2].name}_scaled"), b_new.astype(dtype))
    prod.outputs[0] = detach(node)


def _fold(g: gs.Graph, prod: gs.Node, node: gs.Node, other: gs.Tensor, names: NameGenerator) -> str | None:
    """Fold ``node`` (Mul/Div by ``other``) into ``prod``; a decline reason if it cannot be."""
    s = constant_value(other)
    if reason := _decline(g, prod, node, s):
        return reason
    assert s is not None
    w = constant_value(prod.inputs[1])
    assert w is not None
    scale = _channel_scale(prod, s, w)
    if isinstance(scale, str):
        return scale
    if node.op == "Div":
        scale = 1.0 / scale
    bias_tensor = bias_input(prod)
    result = _scaled(prod, w, None if bias_tensor is None else constant_value(bias_tensor), scale)
    if isinstance(result, str):
        return result
    w_new, b_new = result
    finfo = np.finfo(w.dtype)
    if any(a is not None and np.any(np.abs(a) > finfo.max) for a in (w_new, b_new)):
        return "range"
    _rewrite(prod, node, w_new, b_new, names)
    return None


class FoldScalePass(Pass):
    """Fold a per-channel constant Mul or Div after Conv, ConvTranspose, Gemm or MatMul into its weights."""

    name = "fold-scale"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        def fold(g: gs.Graph, prod: gs.Node, node: gs.Node, other: gs.Tensor) -> str | None:
            return _fold(g, prod, node, other, ctx.names)

        stats = fold_binary_ops(graph, ("Mul", "Div"), _PRODUCERS, fold)
        return PassResult(changed=stats.get("folded", 0) > 0, stats=stats)
