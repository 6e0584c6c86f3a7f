"""Plans and the graph rewrite behind ``quantize-qdq``: Q/DQ pairs, int8 weights, int32 biases.

The formulas are ``onnxopt.calibration``'s (activations) and, for weights, symmetric
int8 per channel: ``Wq = clip(round(W / sw), -Q, Q)``, ``sw = max|W| / Q``, with ``Q = 64``
when ``reduce_range`` (the default) and 127 otherwise. onnxruntime's u8 x s8 kernels on
x86 without VNNI (AVX2) add pairs of products in int16 with saturation: 255 * 127 * 2
overflows int16, 255 * 64 * 2 does not, so 7-bit weights are exact there.
Biases: ``bq = round(b / (sx * sw))`` as int32 (clipped, counted as ``bias-clipped``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.calibration import quantize_weight, scale_zero_point, weight_scales
from onnxopt.graph_utils import constant_value
from onnxopt.pass_base import PassContext

_INT32 = 2**31 - 1


@dataclasses.dataclass(eq=False)
class Plan:
    """One accepted core node: which inputs are activations, the weight and its axis."""

    node: gs.Node
    activations: list[int]
    weight: int | None = None
    axis: int | None = None
    bias: int | None = None


class QDQRewriter:
    """Inserts the Q/DQ nodes and quantized weights for an accepted plan."""

    def __init__(
        self,
        graph: gs.Graph,
        ctx: PassContext,
        activation_type: str,
        symmetric: bool,
        ranges: dict[str, tuple[float, float]],
        stats: Counter[str],
        weight_qmax: int = 64,
    ) -> None:
        self.graph, self.ctx, self.ranges, self.stats = graph, ctx, ranges, stats
        self.weight_qmax = weight_qmax
        self.activation_type, self.symmetric = activation_type, symmetric
        self.qparams: dict[str, tuple[gs.Constant, gs.Constant]] = {}  # by range-owning tensor
        self.weights: dict[
            str, tuple[gs.Variable, np.ndarray]
        ] = {}  # by weight name: (DQ out, scales)
        self.qtype = np.uint8 if activation_type == "uint8" else np.int8

    def apply(self, plans: list[Plan], qspec: dict[str, str], folds: list[gs.Node]) -> None:
        tensors = self.graph.tensors()
        for relu in folds:  # the producer now writes the activation's output; Q clamps instead
            src, dst = relu.inputs[0], relu.outputs[0]
            producer = src.inputs[0]
            relu.outputs.clear()
            relu.inputs.clear()
            producer.outputs[producer.outputs.index(src)] = dst
        for name, root in qspec.items():
            self._qdq(tensors[name], self._params(root))
        for p in plans:
            w_scales = self._quantize_weight(p)
            if p.bias is not None:
                self._quantize_bias(p, w_scales)

    def _params(self, root: str) -> tuple[gs.Constant, gs.Constant]:
        if root not in self.qparams:
            lo, hi = self.ranges.get(root, (0.0, 0.0))
            scale, zp = scale_zero_point(lo, hi, self.activation_type, self.symmetric)
            fresh = self.ctx.names.fresh
            self.qparams[root] = (
                gs.Constant(fresh(f"{root}_scale"), np.array(scale, dtype=np.float32)),
                gs.Constant(fresh(f"{root}_zero_point"), np.array(zp, dtype=self.qtype)),
            )
        return self.qparams[root]

    def _qdq(self, t: gs.Variable, params: tuple[gs.Constant, gs.Constant]) -> None:
        fresh = self.ctx.names.fresh
        q = gs.Variable(fresh(f"{t.name}_quantized"), dtype=self.qtype, shape=t.shape)
        qnode = gs.Node("QuantizeLinear", fresh(f"{t.name}_QuantizeLinear"), inputs=[], outputs=[q])
        dnode = gs.Node(
            "DequantizeLinear", fresh(f"{t.name}_DequantizeLinear"), inputs=[q, *params]
        )
        if len(t.inputs) == 1:  # produced here: the producer writes a new tensor, DQ takes over t
            raw = gs.Variable(fresh(f"{t.name}_float"), dtype=t.dtype, shape=t.shape)
            producer = t.inputs[0]
            producer.outputs[producer.outputs.index(t)] = raw
            qnode.inputs.extend([raw, *params])
            dnode.outputs.append(t)
        else:  # a graph input: its readers read the DQ output
            out = gs.Variable(fresh(f"{t.name}_dequantized"), dtype=t.dtype, shape=t.shape)
            for reader in list(t.outputs):
                for i, inp in enumerate(reader.inputs):
                    if inp is t:
                        reader.inputs[i] = out
            qnode.inputs.extend([t, *params])
            dnode.outputs.append(out)
        self.graph.nodes.extend([qnode, dnode])

    def _quantize_weight(self, p: Plan) -> np.ndarray:
        """Quantize the plan's weight (once per initializer); returns its scales."""
        node, fresh = p.node, self.ctx.names.fresh
        if p.weight is None:  # MatMul/Gemm of two activations: B's activation scale
            return _input_scale(node.inputs[1])
        w_t = node.inputs[p.weight]
        key = w_t.name
        if key not in self.weights:
            w = constant_value(w_t).astype(np.float32)
            scales = weight_scales(w, p.axis, self.weight_qmax)
            wq = gs.Constant(
                fresh(f"{key}_quantized"), quantize_weight(w, scales, p.axis, self.weight_qmax)
            )
            out = self._dequantized(key, wq, scales, p.axis, w.shape)
            self.weights[key] = (out, scales)
        out, scales = self.weights[key]
        node.inputs[p.weight] = out
        return scales

    def _quantize_bias(self, p: Plan, w_scales: np.ndarray) -> None:
        node, fresh = p.node, self.ctx.names.fresh
        x_scale = _input_scale(node.inputs[p.activations[0]])
        b_t = node.inputs[p.bias]
        b = constant_value(b_t).astype(np.float64).reshape(-1)
        if node.op == "Gemm":
            b = b * float(node.attrs.get("beta", 1.0))
            node.attrs["beta"] = 1.0
        scale = (np.float32(x_scale) * w_scales.astype(np.float32)).astype(np.float32)
        scale = np.broadcast_to(scale, b.shape).copy() if scale.size != 1 else scale.reshape(())
        q = np.round(b / scale.astype(np.float64))
        if np.abs(q).max(initial=0) > _INT32:
            self.stats["bias-clipped"] += 1
        bq = gs.Constant(
            fresh(f"{b_t.name}_quantized"), np.clip(q, -_INT32, _INT32).astype(np.int32)
        )
        node.inputs[p.bias] = self._dequantized(
            b_t.name, bq, scale, 0 if scale.ndim == 1 else None, b.shape
        )

    def _dequantized(
        self, base: str, q: gs.Constant, scale: np.ndarray, axis: int | None, shape: tuple[int, ...]
    ) -> gs.Variable:
        """Append ``DequantizeLinear(q, scale, 0)`` (zero point of q's dtype); return its output."""
        fresh = self.ctx.names.fresh
        sc = gs.Constant(fresh(f"{base}_scale"), scale)
        zero = gs.Constant(fresh(f"{base}_zero_point"), np.zeros(scale.shape, q.values.dtype))
        out = gs.Variable(fresh(f"{base}_dequantized"), dtype=np.float32, shape=list(shape))
        attrs = {"axis": axis} if axis is not None else {}
        name = fresh(f"{base}_DequantizeLinear")
        self.graph.nodes.append(gs.Node("DequantizeLinear", name, attrs, [q, sc, zero], [out]))
        return out


def _input_scale(dq_out: gs.Tensor) -> np.ndarray:
    """The activation scale of an input that a DequantizeLinear now produces."""
    return np.asarray(dq_out.inputs[0].inputs[1].values, dtype=np.float32)
