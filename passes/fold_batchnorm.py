"""Fold inference-mode BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul feeding it.

    y = (p(x) - mean) * s + beta,        s = gamma / sqrt(var + eps)   (eps defaults to 1e-5)

p is linear in its weight W along the output-channel axis, so

    Conv:           W'[o, ...]  = W[o, ...] * s[o]                 b' = (b - mean) * s + beta
    ConvTranspose:  W'[i, j, ...] = W[i, j, ...] * s[g*(M/G) + j]  (W is [Cin, M/G, k...];
                    input channel i belongs to group g = i // (Cin/G))   b' as for Conv
    Gemm:           B' = B * s along N (axis 1 of B, or axis 0 when transB=1)
                    C' = (beta_g * C - mean) * s + beta,  beta_g' = 1 (alpha is kept)
    MatMul:         x @ W with a constant 2-D W[K, N] and a 2-D output [M, N]:
                    MatMul(x, W * s) then Add(b'),  b' = beta - mean * s
                    (fuse-matmul-add turns that pair into a Gemm when legal)

BN's channel axis is 1, so Gemm/MatMul outputs must be 2-D [M, C]; a MatMul whose output
has rank > 2 scales an axis of x, not of W, and is declined. The producer node is rewritten
in place and writes BN's output tensor (graph-output names survive); the BN node goes.
Arithmetic is float64, cast back to the weight dtype (float16/float32/float64).

Declined, and counted in stats (a BN with no Conv/ConvTranspose/Gemm/MatMul producer is
left alone and not counted):
- ``skipped:training-mode``: opset 14+ ``training_mode=1``, opset < 7 ``is_test=0``, or a
  running-statistics output of BN is read.
- ``skipped:spatial``: opset < 9 ``spatial=0`` (per-activation statistics).
- ``skipped:graph-output``: the producer's output is a graph output.
- ``skipped:conv-output-shared``: the producer's output has another consumer.
- ``skipped:non-constant``: a BN parameter, the weight or the bias is not a constant.
- ``skipped:shared-weight``: the weight feeds other nodes (folding would copy it).
- ``skipped:rank``: MatMul with a weight that is not 2-D or an output that is not 2-D.
- ``skipped:shape-mismatch``: BN parameters are not 1-D of the producer's channel count.
- ``skipped:dtype``: the weight is not a float tensor.
Works inside If/Loop/Scan bodies; a producer in another (outer) graph is never touched.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs
from onnxopt.passes._fold import bias_input, detach, scale_weight, set_bias

from onnxopt.graph_utils import (
    constant_value,
    is_default_domain,
    is_float_dtype,
    is_graph_output,
    iter_graphs,
    make_constant,
)
from onnxopt.pass_base import NameGenerator, Pass, PassContext, PassResult

_PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _bn_decline(graph: gs.Graph, bn: gs.Node, opset: int) -> str | None:
    if opset < 7 and int(bn.attrs.get("is_test", 0)) == 0:
        return "training-mode"
    if int(bn.attrs.get("training_mode", 0)) != 0:
        return "training-mode"
    # running mean/var outputs only exist in training; reading one means training semantics
    if any(out.outputs or is_graph_output(graph, out) for out in bn.outputs[1:]):
        return "training-mode"
    if opset < 9 and int(bn.attrs.get("spatial", 1)) == 0:
        return "spatial"
    return None


def _bn_scale_shift(bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | str:
    """(s, t) in float64 with BN(z) = z * s[c] + t[c], or a decline reason."""
    values = [constant_value(t) for t in bn.inputs[1:5]]
    if len(values) != 4 or any(v is None for v in values):
        return "non-constant"
    gamma, beta, mean, var = (np.asarray(v, dtype=np.float64) for v in values)
    if gamma.ndim != 1 or not (gamma.shape == beta.shape == mean.shape == var.shape):
        return "shape-mismatch"
    # BN epsilon defaults to 1e-5 in the ONNX spec
    s = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    return s, beta - mean * s


def _channels(node: gs.Node, w: np.ndarray) -> int | None:
    """Output-channel count of the producer, read from its weight."""
    if node.op == "Conv":
        return int(w.shape[0]) if w.ndim >= 3 else None
    if node.op == "ConvTranspose":
        return int(w.shape[1]) * int(node.attrs.get("group", 1)) if w.ndim >= 3 else None
    if node.op == "Gemm":
        if w.ndim != 2:
            return None
        return int(w.shape[0] if int(node.attrs.get("transB", 0)) else w.shape[1])
    return int(w.shape[1]) if w.ndim == 2 else None  # MatMul


def _producer_decline(graph: gs.Graph, prod: gs.Node) -> str | None:
    z = prod.outputs[0]
    if is_graph_output(graph, z):
        return "graph-output"
    if len(z.outputs) != 1:
        return "conv-output-shared"
    # a 2-D MatMul output [M, C] puts W's columns on BN's channel axis; rank > 2 does not
    if prod.op == "MatMul" and (z.shape is None or len(z.shape) != 2):
        return "rank"
    w = constant_value(prod.inputs[1]) if len(prod.inputs) > 1 else None
    if w is None:
        return "non-constant"
    if len(prod.inputs[1].outputs) != 1:
        return "shared-weight"
    if not is_float_dtype(w.dtype):
        return "dtype"
    if prod.op == "MatMul" and w.ndim != 2:
        return "rank"
    if bias_input(prod) is not None and constant_value(bias_input(prod)) is None:
        return "non-constant"
    return None


def _fold(
    prod: gs.Node, bn: gs.Node, s: np.ndarray, t: np.ndarray, names: NameGenerator
) -> gs.Node | None:
    """Rewrite ``prod`` to compute BN's output; returns a node to put in BN's place, if any."""
    w = constant_value(prod.inputs[1])
    assert w is not None
    bias_tensor = bias_input(prod)
    bias = None if bias_tensor is None else constant_value(bias_tensor)
    b64 = 0.0 if bias is None else bias.astype(np.float64)
    w_new = scale_weight(prod, w, s)
    if prod.op == "Gemm":
        # beta_g * C is folded into the new C, so the new beta is 1
        b_new = b64 * float(prod.attrs.get("beta", 1.0)) * s + t
        prod.attrs["beta"] = 1.0
    elif prod.op == "MatMul":
        b_new = t
    else:
        b_new = b64 * s + t
    dtype = w.dtype
    prod.inputs[1] = make_constant(names.fresh(f"{prod.inputs[1].name}_bnfold"),
                                   w_new.astype(dtype))
    b_const = make_constant(names.fresh(f"{prod.name or prod.op}_bias_bnfold"),
                            np.asarray(b_new).astype(dtype))
    y = detach(bn)
    if prod.op == "MatMul":
        return gs.Node("Add", name=names.fresh(f"{prod.name or 'matmul'}_bnfold_add"),
                       inputs=[prod.outputs[0], b_const], outputs=[y])
    set_bias(prod, b_const)
    prod.outputs[0] = y
    return None


class FoldBatchNormPass(Pass):
    """Fold inference BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul before it."""

    name = "fold-batchnorm"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        for g in list(iter_graphs(graph)):
            alive = {id(n) for n in g.nodes}
            replaced: dict[int, gs.Node | None] = {}
            for bn in list(g.nodes):
                if bn.op != "BatchNormalization" or not is_default_domain(bn):
                    continue
                if len(bn.inputs) < 5 or not bn.outputs:
                    continue
                prod = bn.inputs[0].inputs[0] if len(bn.inputs[0].inputs) == 1 else None
                if prod is None or prod.op not in _PRODUCERS or not is_default_domain(prod):
                    continue  # standalone BN: nothing to fold into
                if id(prod) not in alive:
                    continue  # produced in an outer graph: not ours to rewrite
                reason = _bn_decline(g, bn, ctx.opset) or _producer_decline(g, prod)
                scale_shift = _bn_scale_shift(bn) if reason is None else reason
                if isinstance(scale_shift, str):
                    stats[f"skipped:{scale_shift}"] += 1
                    continue
                s, t = scale_shift
                w = constant_value(prod.inputs[1])
                assert w is not None
                if _channels(prod, w) != s.shape[0]:
                    stats["skipped:shape-mismatch"] += 1
                    continue
                replaced[id(bn)] = _fold(prod, bn, s, t, ctx.names)
                stats["folded"] += 1
            if replaced:
                g.nodes = [r for n in g.nodes if (r := replaced.get(id(n), n)) is not None]
        if stats["folded"]:
            graph.cleanup()
        return PassResult(changed=stats["folded"] > 0, stats=dict(stats))
