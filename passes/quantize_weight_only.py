"""Weight-only int4/int8 quantization of MatMul/Gemm with constant weights (MatMulNBits).

    y = x @ W   ->   y = MatMulNBits(x, B, scales[, zero_points])      (com.microsoft)
    W[k, n] ~ (q[n, k] - z[n, k // block]) * s[n, k // block]

Gemm ``Y = alpha * A @ op(B) + beta * C`` is the same with ``W = op(B)``, ``alpha``
multiplied into the scales and ``beta * C`` passed as MatMulNBits' ``bias`` input.

Each column ``n`` of ``W`` is cut along K into blocks of ``block_size`` (the last one
zero-padded); every block gets its own scale, and with ``symmetric=False`` its own
zero point (the block's range is widened to include 0, so padding is exact):

    symmetric:   s = max|w| / (2^(bits-1) - 1),  z = 2^(bits-1) (implied, not stored)
    asymmetric:  s = (max(w, 0) - min(w, 0)) / (2^bits - 1),  z = round(-min(w, 0) / s)
    q = clip(round(w / s) + z, 0, 2^bits - 1)

Packing follows the contrib-op spec: ``B`` is uint8 [N, ceil(K / block_size),
block_size * bits / 8] with codes low bits first along K; ``scales`` float32
[N * blocks]; 4-bit zero points are packed two per byte per column
([N * ceil(blocks / 2)]), 8-bit ones one per byte. Activations stay float;
``accuracy_level=4`` lets onnxruntime compute with int8 activations (faster, lossier):
on this AVX2 machine the float path (level 0) ran 18x slower than float MatMul for a
[1, 1024] x [1024, 4096] layer, level 4 2.3x (int8) to 3.8x (int4) faster.
One packed copy of each weight is shared by all layers that read it.

Declined, and counted in stats:
- ``skipped:excluded``: the node's name (or first output name) is in ``exclude``.
- ``skipped:weight-not-constant`` / ``skipped:weight-not-2d`` / ``skipped:weight-not-float32``.
- ``skipped:input-not-float32``: the activation's dtype is not known to be float32.
- ``skipped:input-rank``: the activation's rank is unknown or below 2 (MatMulNBits needs [..., K]).
- ``skipped:gemm-transA``: Gemm with ``transA=1``.
- ``skipped:gemm-bias``: Gemm's ``C`` is not a constant that broadcasts as one row of N.
Nodes in If/Loop/Scan bodies are handled like the rest; custom-domain ops are left alone.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnxopt.passes._matmul_weight import float32_weight_decline

from onnxopt.errors import PreconditionError
from onnxopt.graph_utils import add_node, constant_value, is_default_domain, iter_graphs, layer_key
from onnxopt.pass_base import Pass, PassContext, PassResult

CONTRIB = "com.microsoft"


@dataclasses.dataclass(frozen=True)
class BlockQuantized:
    packed: np.ndarray  # uint8 [N, blocks, block_size * bits // 8]
    scales: np.ndarray  # float32 [N * blocks]
    zero_points: np.ndarray | None  # uint8 packed, or None (symmetric)

    def dequantize(self, k: int, bits: int, block_size: int) -> np.ndarray:
        """The float [K, N] weight these codes stand for (for tests and error estimates)."""
        n, blocks, _ = self.packed.shape
        codes = _unpack(self.packed, bits).reshape(n, blocks, block_size).astype(np.float32)
        if self.zero_points is None:
            zp = np.full((n, blocks), 2 ** (bits - 1), np.float32)
        else:
            zp = _unpack(self.zero_points.reshape(n, -1), bits)[:, :blocks].astype(np.float32)
        w = (codes - zp[..., None]) * self.scales.reshape(n, blocks)[..., None]
        return w.reshape(n, -1)[:, :k].T


def quantize_blockwise(
    w: np.ndarray, bits: int, block_size: int, symmetric: bool
) -> BlockQuantized:
    """Quantize a float [K, N] weight into MatMulNBits' B, scales and zero points."""
    k, n = w.shape
    blocks = -(-k // block_size)
    padded = np.zeros((n, blocks * block_size), np.float32)
    padded[:, :k] = w.T
    x = padded.reshape(n, blocks, block_size)
    qmax = 2**bits - 1
    if symmetric:
        scale = np.abs(x).max(-1) / (2 ** (bits - 1) - 1)
        scale[scale == 0] = 1.0
        zero = np.full(scale.shape, 2 ** (bits - 1), np.float32)
    else:
        lo, hi = np.minimum(x.min(-1), 0.0), np.maximum(x.max(-1), 0.0)
        scale = (hi - lo) / qmax
        scale[scale == 0] = 1.0
        zero = np.clip(np.round(-lo / scale), 0, qmax)
    q = np.clip(np.round(x / scale[..., None]) + zero[..., None], 0, qmax).astype(np.uint8)
    zero_points = None
    if not symmetric:
        z = zero.astype(np.uint8)
        if bits == 4 and blocks % 2:
            z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
        zero_points = _pack(z, bits).reshape(-1)
    return BlockQuantized(_pack(q, bits), scale.astype(np.float32).reshape(-1), zero_points)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    return np.ascontiguousarray(
        (codes[..., 0::2] & 0x0F) | ((codes[..., 1::2] & 0x0F) << 4), dtype=np.uint8
    )


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def import_contrib_domain(graph: gs.Graph) -> None:
    """Declare the com.microsoft opset so the exported model imports it."""
    domains = list(graph.import_domains or [])
    if not any(d.domain == CONTRIB for d in domains):
        domains.append(onnx.helper.make_opsetid(CONTRIB, 1))
    graph.import_domains = domains


def _decline(node: gs.Node, exclude: frozenset[str]) -> str | None:
    if reason := float32_weight_decline(node, exclude):
        return reason
    x = node.inputs[0]
    if x.shape is None or len(x.shape) < 2:
        return "input-rank"
    if node.op == "Gemm":
        w_shape = constant_value(node.inputs[1]).shape
        n = w_shape[0] if int(node.attrs.get("transB", 0)) else w_shape[1]
        if _gemm_bias(node, n) is False:
            return "gemm-bias"
    return None


def _gemm_bias(node: gs.Node, n: int) -> np.ndarray | bool | None:
    """``beta * C`` as a [N] row, None without C, False when C is not such a constant."""
    if len(node.inputs) < 3 or not node.inputs[2].name:
        return None
    c = constant_value(node.inputs[2])
    if (
        c is None
        or c.dtype != np.float32
        or c.size not in (1, n)
        or (c.ndim == 2 and c.shape[0] != 1)
    ):
        return False
    return (np.broadcast_to(c.reshape(-1), (n,)) * np.float32(node.attrs.get("beta", 1.0))).astype(
        np.float32
    )


class QuantizeWeightOnlyPass(Pass):
    """Quantize constant MatMul/Gemm weights to int4/int8 blocks (MatMulNBits)."""

    name = "quantize-weight-only"
    exact = False

    @dataclasses.dataclass(frozen=True)
    class Options:
        bits: int = 4  # 4 or 8
        block_size: int = 32  # power of two, >= 16
        symmetric: bool = False  # True: no zero points (implied 2^(bits-1))
        accuracy_level: int = 0  # MatMulNBits compute type: 0 unset (float), 4 int8
        exclude: tuple[str, ...] = ()  # node names (or first output names) kept in float

    def check(self, graph: gs.Graph, ctx: PassContext) -> None:
        o = self.options
        if o.bits not in (4, 8):
            raise PreconditionError(f"{self.name}: bits must be 4 or 8, got {o.bits}")
        if o.block_size < 16 or o.block_size & (o.block_size - 1):
            raise PreconditionError(
                f"{self.name}: block_size must be a power of two >= 16, got {o.block_size}"
            )
        if o.accuracy_level not in (0, 1, 2, 3, 4):
            raise PreconditionError(
                f"{self.name}: accuracy_level must be 0..4, got {o.accuracy_level}"
            )

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        exclude = frozenset(o.exclude)
        stats: Counter[str] = Counter()
        quantized: list[str] = []
        skipped: dict[str, str] = {}
        for g in list(iter_graphs(graph)):
            packed: dict[tuple[Any, ...], tuple[gs.Constant, gs.Constant, gs.Constant | None]] = {}
            for node in list(g.nodes):
                if (
                    node.op not in ("MatMul", "Gemm")
                    or not is_default_domain(node)
                    or len(node.inputs) < 2
                ):
                    continue
                if reason := _decline(node, exclude):
                    stats[f"skipped:{reason}"] += 1
                    skipped[layer_key(node)] = reason
                    continue
                w_tensor = node.inputs[1]
                w = constant_value(w_tensor)
                alpha, bias = 1.0, None
                if node.op == "Gemm":
                    w = w.T if int(node.attrs.get("transB", 0)) else w
                    alpha = float(node.attrs.get("alpha", 1.0))
                    bias = _gemm_bias(node, w.shape[1])
                key = (w_tensor.name, node.op == "Gemm" and int(node.attrs.get("transB", 0)), alpha)
                if key not in packed:
                    bq = quantize_blockwise(w, o.bits, o.block_size, o.symmetric)
                    base = f"{w_tensor.name}_q{o.bits}"
                    packed[key] = (
                        gs.Constant(ctx.names.fresh(base), bq.packed),
                        gs.Constant(
                            ctx.names.fresh(f"{base}_scales"), bq.scales * np.float32(alpha)
                        ),
                        None
                        if bq.zero_points is None
                        else gs.Constant(ctx.names.fresh(f"{base}_zero_points"), bq.zero_points),
                    )
                b, scales, zeros = packed[key]
                inputs = [
                    node.inputs[0],
                    b,
                    scales,
                    zeros if zeros is not None else gs.Variable.empty(),
                ]
                if bias is not None:
                    bias_const = gs.Constant(ctx.names.fresh(f"{layer_key(node)}_bias"), bias)
                    inputs += [gs.Variable.empty(), bias_const]  # g_idx unused
                while inputs[-1].name == "":
                    inputs.pop()
                y = node.outputs[0]
                node.outputs.clear()
                add_node(
                    g,
                    "MatMulNBits",
                    inputs,
                    [y],
                    {
                        "K": int(w.shape[0]),
                        "N": int(w.shape[1]),
                        "bits": o.bits,
                        "block_size": o.block_size,
                        "accuracy_level": o.accuracy_level,
                    },
                    name=ctx.names.fresh(f"{layer_key(node)}_MatMulNBits"),
                    domain=CONTRIB,
                )
                stats[f"quantized-{o.bits}bit"] += 1
                quantized.append(layer_key(node))
        ctx.notes[self.name] = {"quantized": quantized, "skipped": skipped}
        if quantized:
            import_contrib_domain(graph)
            graph.cleanup().toposort()
        return PassResult(changed=bool(quantized), stats=dict(stats))
