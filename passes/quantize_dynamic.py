"""Dynamic int8 quantization of MatMul and Gemm with constant weights (transformers).

    y = x @ W (+ c)
      ~ Cast(MatMulInteger(xq, Wq, xz, Wz)) * (xs * Ws) (+ c)
    xq, xs, xz = DynamicQuantizeLinear(x)          # uint8, asymmetric, per run
    Wq = round(W / Ws) clipped to [-Q, Q],  Ws = max|W| / Q,  Wz = 0

``Q = 64`` by default (``reduce_range``): onnxruntime's u8 x s8 kernels on x86 without
VNNI (AVX2) add pairs of u8*s8 products in int16 with saturation, so full-range
weights (``Q = 127``) give wrong sums there (measured on this machine's AVX2 CPU:
errors up to 2e4 in the int32 accumulator); with ``|Wq| <= 64`` a pair is at most
2 * 255 * 64 = 32640 < 32767, exact everywhere, at the same speed.

``Ws`` is per output column (``per_channel``, the default) or one scalar. Gemm
``Y = alpha * A @ op(B) + beta * C`` becomes the same chain with ``B`` transposed to
[K, N] first, ``alpha`` folded into ``Ws`` and ``beta * C`` added as a constant bias.
onnxruntime fuses the whole chain (bias included) into its ``DynamicQuantizeMatMul``
kernel; other runtimes still run it, since every op is standard (opset >= 11).
One quantized copy of each weight is shared by all layers that read it.

Conv is not handled: onnxruntime's ConvInteger path is slower than float Conv.

Embedding tables (``gather``, default on): a Gather along axis 0 from a constant float32
table of at least ``gather_min_elements`` values is stored in int8 with per-row scales and
dequantized after the lookup (``passes/_embedding.py``; counted as ``quantized-gather``).

Declined, and counted in stats:
- ``skipped:excluded``: the node's name (or first output name) is in ``exclude``.
- ``skipped:opset-below-11``: DynamicQuantizeLinear does not exist before opset 11.
- ``skipped:weight-not-constant`` / ``skipped:weight-not-2d`` / ``skipped:weight-not-float32``.
- ``skipped:input-not-float32``: the activation's dtype is not known to be float32.
- ``skipped:gemm-transA``: Gemm with ``transA=1``.
- ``skipped:gemm-bias-not-constant``: Gemm's ``C`` is computed at run time.
Nodes in If/Loop/Scan bodies are handled like the rest; custom-domain ops are left alone.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from onnxopt.passes._embedding import quantize_embedding_tables
from onnxopt.passes._matmul_weight import float32_weight_decline

from onnxopt.graph_utils import add_node, constant_value, is_default_domain, iter_graphs, layer_key
from onnxopt.pass_base import NameGenerator, Pass, PassContext, PassResult


@dataclasses.dataclass(frozen=True)
class _Weight:
    q: gs.Constant  # int8 [K, N]
    scale: gs.Constant  # float32 [N] or scalar
    zero: gs.Constant  # int8, same shape as scale


def quantize_weight_int8(
    w: np.ndarray, per_channel: bool, qmax: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of a [K, N] weight: (codes in [-qmax, qmax], scale per column or scalar)."""
    amax = np.abs(w).max(axis=0) if per_channel else np.asarray(np.abs(w).max())
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.round(w / scale), -qmax, qmax).astype(np.int8)
    return q, scale


def _decline(node: gs.Node, ctx: PassContext, exclude: frozenset[str]) -> str | None:
    # an excluded node is reported as such; any other node needs opset 11 first
    if ctx.opset < 11 and not (node.name in exclude or layer_key(node) in exclude):
        return "opset-below-11"
    if reason := float32_weight_decline(node, exclude):
        return reason
    if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
        if constant_value(node.inputs[2]) is None:
            return "gemm-bias-not-constant"
    return None


class QuantizeDynamicPass(Pass):
    """Dynamically quantize MatMul/Gemm with constant weights to int8 (activations at run time)."""

    name = "quantize-dynamic"
    exact = False

    @dataclasses.dataclass(frozen=True)
    class Options:
        per_channel: bool = True  # one weight scale per output column
        reduce_range: bool = True  # weights in [-64, 64]: exact on AVX2 (no int16 saturation)
        exclude: tuple[str, ...] = ()  # node names (or first output names) kept in float
        op_types: tuple[str, ...] = ("MatMul", "Gemm")
        gather: bool = True  # embedding tables read by Gather: int8, dequantized after lookup
        gather_min_elements: int = 4096

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opts = self.options
        op_types = frozenset(opts.op_types) & {"MatMul", "Gemm"}
        exclude = frozenset(opts.exclude)
        stats: Counter[str] = Counter()
        quantized: list[str] = []
        skipped: dict[str, str] = {}
        for g in list(iter_graphs(graph)):
            weights: dict[tuple[Any, ...], _Weight] = {}
            activations: dict[str, tuple[gs.Variable, gs.Variable, gs.Variable]] = {}
            for node in list(g.nodes):
                if not is_default_domain(node) or node.op not in op_types:
                    continue
                if reason := _decline(node, ctx, exclude):
                    stats[f"skipped:{reason}"] += 1
                    skipped[layer_key(node)] = reason
                    continue
                _rewrite(
                    g,
                    node,
                    ctx.names,
                    opts.per_channel,
                    64 if opts.reduce_range else 127,
                    weights,
                    activations,
                )
                stats[f"quantized-{node.op.lower()}"] += 1
                quantized.append(layer_key(node))
        if opts.gather and ctx.opset >= 6:  # Cast's ``to`` is a string attribute before opset 6
            quantized += quantize_embedding_tables(
                graph, ctx.names, opts.gather_min_elements, exclude, stats, skipped, "quantized-gather"
            )
        ctx.notes[self.name] = {"quantized": quantized, "skipped": skipped}
        if quantized:
            graph.cleanup().toposort()
        return PassResult(changed=bool(quantized), stats=dict(stats))


def _rewrite(
    g: gs.Graph,
    node: gs.Node,
    names: NameGenerator,
    per_channel: bool,
    qmax: int,
    weights: dict[tuple[Any, ...], _Weight],
    activations: dict[str, tuple[gs.Variable, gs.Variable, gs.Variable]],
) -> None:
    x, w_tensor, y = node.inputs[0], node.inputs[1], node.outputs[0]
    base = layer_key(node) or "matmul"
    alpha, trans_b, bias = 1.0, False, None
    if node.op == "Gemm":
        alpha = float(node.attrs.get("alpha", 1.0))
        trans_b = bool(int(node.attrs.get("transB", 0)))
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = constant_value(node.inputs[2])
            bias = (float(node.attrs.get("beta", 1.0)) * c).astype(np.float32)
    key = (w_tensor.name, alpha, trans_b)
    if key not in weights:
        w = constant_value(w_tensor)
        w = w.T if trans_b else w
        q, scale = quantize_weight_int8(w, per_channel, qmax)
        weights[key] = _Weight(
            gs.Constant(names.fresh(f"{w_tensor.name}_quantized"), np.ascontiguousarray(q)),
            gs.Constant(
                names.fresh(f"{w_tensor.name}_scale"),
                np.asarray(scale * np.float32(alpha), dtype=np.float32),
            ),
            gs.Constant(
                names.fresh(f"{w_tensor.name}_zero_point"), np.zeros(np.shape(scale), np.int8)
            ),
        )
    wq = weights[key]
    # one DynamicQuantizeLinear per activation, shared by every layer that reads it (Q, K, V)
    if x.name not in activations:
        xq = gs.Variable(names.fresh(f"{x.name}_quantized"), dtype=np.uint8, shape=x.shape)
        xs = gs.Variable(names.fresh(f"{x.name}_scale"), dtype=np.float32, shape=[])
        xz = gs.Variable(names.fresh(f"{x.name}_zero_point"), dtype=np.uint8, shape=[])
        add_node(
            g,
            "DynamicQuantizeLinear",
            [x],
            [xq, xs, xz],
            name=names.fresh(f"{x.name}_DynamicQuantize"),
        )
        activations[x.name] = (xq, xs, xz)
    xq, xs, xz = activations[x.name]
    acc = gs.Variable(names.fresh(f"{base}_int32"), dtype=np.int32)
    acc_f = gs.Variable(names.fresh(f"{base}_int32_float"), dtype=np.float32)
    scale = gs.Variable(names.fresh(f"{base}_output_scale"), dtype=np.float32)
    add_node(
        g,
        "MatMulInteger",
        [xq, wq.q, xz, wq.zero],
        [acc],
        name=names.fresh(f"{base}_MatMulInteger"),
    )
    add_node(g, "Cast", [acc], [acc_f], {"to": 1}, name=names.fresh(f"{base}_Cast"))  # 1 = FLOAT
    add_node(g, "Mul", [xs, wq.scale], [scale], name=names.fresh(f"{base}_scale_Mul"))
    node.outputs.clear()  # the original node now writes nothing; cleanup() drops it
    if bias is None:
        add_node(g, "Mul", [acc_f, scale], [y], name=names.fresh(f"{base}_Mul"))
        return
    scaled = gs.Variable(names.fresh(f"{base}_scaled"), dtype=np.float32)
    add_node(g, "Mul", [acc_f, scale], [scaled], name=names.fresh(f"{base}_Mul"))
    bias_const = gs.Constant(names.fresh(f"{base}_bias"), np.ascontiguousarray(bias))
    add_node(g, "Add", [scaled, bias_const], [y], name=names.fresh(f"{base}_bias_Add"))
