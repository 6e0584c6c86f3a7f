"""Static int8 quantization in QDQ format, calibrated on the user's data.

    y = Conv(x, W, b)   ->   xq = QuantizeLinear(x, sx, zx);  x' = DequantizeLinear(xq, sx, zx)
                             W' = DequantizeLinear(Wq, sw, 0, axis)      Wq int8, stored once
                             b' = DequantizeLinear(bq, sx*sw, 0, 0)      bq int32
                             y  = DQ(Q(Conv(x', W', b'), sy, zy), sy, zy)

onnxruntime fuses each DQ -> op -> Q group into its integer kernel (QLinearConv,
QLinearMatMul / MatMulIntegerToFloat, QGemm, QLinearConvTranspose). The float
model computes the same graph with explicit rounding, so the rewrite is lossy but
deterministic:

- weights: per-channel symmetric int8, ``sw = max|W| / 127`` over the output-channel
  axis (0 for Conv and transB Gemm, 1 for ConvTranspose, [K,N] MatMul and Gemm);
  the float initializer is dropped (the file shrinks ~4x for weight-heavy models);
  weights shared by several quantized nodes with the same axis are quantized once;
- biases (Conv, ConvTranspose, Gemm ``C``): int32 at scale ``sx * sw``, zero point 0;
  Gemm ``beta`` is multiplied into ``C`` first;
- activations: per tensor, uint8 asymmetric by default (``onnxopt.calibration`` has
  the formulas); one Q/DQ pair per tensor whatever its number of consumers.

Activations folded into ranges: a Relu (or Clip with min 0) that is the only reader
of a quantized op's output is removed and its output is calibrated instead; with an
asymmetric range that starts at 0 the zero point is ``qmin`` and Q's clamp *is* the
Relu. Between quantized ops, values stay in integers where onnxruntime has the
kernel: MaxPool, Reshape, Transpose, Flatten, Squeeze, Unsqueeze reuse their input's
scale (exact: they only move or select values), and Add, Concat, AveragePool and
GlobalAveragePool get their own calibrated output range (QLinearAdd, ...). Such an
op is quantized only when its output reaches another quantized op; MatMul/Gemm
outputs likewise (onnxruntime runs them with float output), Conv outputs always.

Declined, counted in stats (``skipped:<reason>``) and listed in
``ctx.notes["quantize-qdq"]["skipped"]`` by node name:
- ``excluded``: in ``Options.exclude`` (node name, or first output name if unnamed);
- ``already-quantized``: an input comes from DequantizeLinear or already feeds a
  QuantizeLinear (partly quantized models are left alone; this makes the pass idempotent);
- ``subgraph``: inside an If/Loop/Scan body (bodies stay in float);
- ``not-float32`` / ``unknown-dtype``: activation or weight is not known float32;
- ``dynamic-weight``: Conv/ConvTranspose weight is not a constant;
- ``dynamic-bias``, ``bias-shape``: bias is not a constant, or Gemm ``C`` is not a [N] row;
- ``gemm-alpha``: Gemm with alpha != 1 (QGemm's bias scale assumes 1);
- ``constant-input``: MatMul whose first input is a constant;
- ``shared-weight``: the weight also feeds a node that stays float, or uses another axis
  (a float copy would remain beside the int8 one);
- ``batchnorm-not-folded``: the output feeds BatchNormalization (run level 1 first).

Embedding tables (``gather``, default on): a Gather along axis 0 from a constant float32
table of at least ``gather_min_elements`` values is stored in int8 with per-row scales and
dequantized after the lookup (``passes/_embedding.py``).

Needs opset >= 13 (per-channel DequantizeLinear); ``min_opset`` makes the manager
upgrade older models with ``onnxopt.opset.upgrade_opset`` and say so in the log.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs
from onnxopt.passes._embedding import quantize_embedding_tables
from onnxopt.passes._qdq import Plan, QDQRewriter

from onnxopt.calibration import METHODS, collect_ranges, qrange
from onnxopt.errors import PreconditionError
from onnxopt.graph_utils import (
    constant_value,
    is_default_domain,
    is_graph_output,
    iter_graphs,
    layer_key,
)
from onnxopt.pass_base import Pass, PassContext, PassResult, Requirement, current_model

logger = logging.getLogger(__name__)

SHARE_SCALE = frozenset({"MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze"})
OWN_SCALE = frozenset({"Add", "Concat", "AveragePool", "GlobalAveragePool"})


def _producer_op(t: gs.Tensor) -> str | None:
    return t.inputs[0].op if len(t.inputs) == 1 else None


def _already_quantized(t: gs.Tensor) -> bool:
    return _producer_op(t) == "DequantizeLinear" or any(c.op == "QuantizeLinear" for c in t.outputs)


def _dtype_reason(t: gs.Tensor) -> str | None:
    if t.dtype is None:
        return "unknown-dtype"
    return None if np.dtype(t.dtype) == np.float32 else "not-float32"


class QuantizeQDQPass(Pass):
    """Quantize Conv, ConvTranspose, MatMul and Gemm to int8 with calibrated Q/DQ pairs."""

    name = "quantize-qdq"
    exact = False
    requires = frozenset({Requirement.CALIBRATION_DATA})
    min_opset: ClassVar[int] = 13

    @dataclasses.dataclass(frozen=True)
    class Options:
        method: str = "minmax"  # minmax | percentile | entropy | mse
        percentile: float = 99.99  # central share of values kept by method=percentile
        activation_type: str = "uint8"  # uint8 | int8 (onnxruntime on x86 prefers U8S8)
        activation_symmetric: bool = False
        per_channel: bool = True  # weights: one scale per output channel
        exclude: tuple[str, ...] = ()  # node names kept in float
        op_types: tuple[str, ...] = ("Conv", "ConvTranspose", "MatMul", "Gemm")
        max_calibration_samples: int = 256
        # weights in [-64, 64]: exact in onnxruntime's int16-accumulating AVX2 kernels
        reduce_range: bool = True
        gather: bool = True  # embedding tables read by Gather: int8, dequantized after lookup
        gather_min_elements: int = 4096

    def check(self, graph: gs.Graph, ctx: PassContext) -> None:
        o = self.options
        if o.method not in METHODS:
            raise PreconditionError(
                f"quantize-qdq: method must be one of {METHODS}, not '{o.method}'"
            )
        qrange(o.activation_type)  # raises for an unknown type
        if ctx.opset < self.min_opset:
            raise PreconditionError(
                f"quantize-qdq needs opset >= {self.min_opset} (per-channel DequantizeLinear), "
                f"the model has {ctx.opset}; upgrade it with onnxopt.opset.upgrade_opset(model, "
                f"{self.min_opset}) (the pass manager does this automatically)"
            )

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        self.check(graph, ctx)
        o = self.options
        stats: Counter[str] = Counter()
        skipped: dict[str, str] = {}
        for sub in list(iter_graphs(graph))[1:]:
            for node in sub.nodes:
                if node.op in o.op_types and is_default_domain(node):
                    stats["skipped:subgraph"] += 1
                    skipped[layer_key(node)] = "subgraph"
        graph.toposort()
        plans = self._select(graph, stats, skipped)
        qspec, chain, folds = self._propagate(graph, plans)
        notes: dict[str, Any] = {"quantized": [], "skipped": skipped, "ranges": {}}
        ctx.notes[self.name] = notes
        if plans:  # calibrate before any rewrite: ranges (and the driver's cache) are the float graph's
            own = [name for name, src in qspec.items() if src == name]
            ranges = self._calibrate(graph, ctx, own)
            notes["ranges"] = {n: ranges.get(n, (0.0, 0.0)) for n in own}
        if o.gather:  # before Q/DQ insertion, which would make a table's rows look already quantized
            notes["quantized"] += quantize_embedding_tables(
                graph, ctx.names, o.gather_min_elements, o.exclude, stats, skipped, "quantized:Gather"
            )
        if plans:
            QDQRewriter(
                graph, ctx, o.activation_type, o.activation_symmetric, notes["ranges"], stats,
                weight_qmax=64 if o.reduce_range else 127,
            ).apply(plans, qspec, folds)
            for node in [p.node for p in plans] + chain:
                stats[f"quantized:{node.op}"] += 1
                notes["quantized"].append(layer_key(node))
            stats["folded-activations"] += len(folds)
            if not stats["folded-activations"]:
                del stats["folded-activations"]
        if not notes["quantized"]:
            return PassResult(changed=False, stats=dict(stats))
        graph.cleanup().toposort()
        return PassResult(changed=True, stats=dict(stats))

    # ---- find and decline ----

    def _select(self, graph: gs.Graph, stats: Counter[str], skipped: dict[str, str]) -> list[Plan]:
        o = self.options
        plans: list[Plan] = []
        for node in graph.nodes:
            if node.op not in o.op_types or not is_default_domain(node):
                continue
            plan = self._plan(node)
            reason = plan if isinstance(plan, str) else None
            if reason is None and (node.name in o.exclude or layer_key(node) in o.exclude):
                reason = "excluded"
            if reason is not None:
                stats[f"skipped:{reason}"] += 1
                skipped[layer_key(node)] = reason
            else:
                plans.append(plan)
        # a weight is quantized once, so all its readers must be quantized along one axis
        readers: dict[str, list[Plan]] = {}
        for p in plans:
            if p.weight is not None:
                readers.setdefault(p.node.inputs[p.weight].name, []).append(p)
        declined: set[int] = set()
        for group in readers.values():
            w = group[0].node.inputs[group[0].weight]
            users = [c for c in w.outputs]
            ok = (
                len(users) == len(group)
                and len({p.axis for p in group}) == 1
                and all(
                    any(p.node is u and p.node.inputs[p.weight] is w for p in group) for u in users
                )
                and not is_graph_output(graph, w)
            )
            if not ok:
                declined.update(id(p) for p in group)
        kept = []
        for p in plans:
            if id(p) in declined:
                stats["skipped:shared-weight"] += 1
                skipped[layer_key(p.node)] = "shared-weight"
            else:
                kept.append(p)
        return kept

    def _plan(self, node: gs.Node) -> Plan | str:
        ins = node.inputs
        if any(_already_quantized(t) for t in ins if t.name):
            return "already-quantized"
        if any(c.op == "BatchNormalization" for t in node.outputs for c in t.outputs):
            return "batchnorm-not-folded"
        if len(ins) < 2 or not node.outputs:
            return "dynamic-weight"
        if node.op in ("Conv", "ConvTranspose"):
            if constant_value(ins[1]) is None:
                return "dynamic-weight"
            plan = Plan(
                node, [0], 1, (0 if node.op == "Conv" else 1) if self.options.per_channel else None
            )
            if len(ins) > 2 and ins[2].name:
                if constant_value(ins[2]) is None:
                    return "dynamic-bias"
                plan.bias = 2
        elif node.op == "MatMul":
            if constant_value(ins[0]) is not None:
                return "constant-input"
            w = constant_value(ins[1])
            if w is None:
                plan = Plan(node, [0, 1])
            else:
                axis = 1 if w.ndim == 2 and self.options.per_channel else None
                plan = Plan(node, [0], 1, axis)
        elif node.op == "Gemm":
            if float(node.attrs.get("alpha", 1.0)) != 1.0:
                return "gemm-alpha"
            if constant_value(ins[0]) is not None:
                return "constant-input"
            w = constant_value(ins[1])
            if w is None:
                plan = Plan(node, [0, 1])
            else:
                axis = (
                    (0 if node.attrs.get("transB", 0) else 1) if self.options.per_channel else None
                )
                plan = Plan(node, [0], 1, axis)
            if len(ins) > 2 and ins[2].name:
                c = constant_value(ins[2])
                if c is None:
                    return "dynamic-bias"
                n = _gemm_n(node, w, ins[1])
                if n is None or c.size != n or (c.ndim == 2 and c.shape[0] != 1) or c.ndim > 2:
                    return "bias-shape"
                plan.bias = 2
        else:
            return "unsupported-op"
        for t in [*(ins[i] for i in plan.activations), node.outputs[0]]:
            if reason := _dtype_reason(t):
                return reason
        for i in (plan.weight, plan.bias):
            if i is not None and constant_value(ins[i]).dtype != np.float32:
                return "not-float32"
        return plan

    # ---- which activations get Q/DQ ----

    def _propagate(
        self, graph: gs.Graph, plans: list[Plan]
    ) -> tuple[dict[str, str], list[gs.Node], list[gs.Node]]:
        """(tensor -> tensor whose scale it uses, quantized chain nodes, folded activations)."""
        qspec: dict[str, str] = {}
        planned = {id(p.node): p for p in plans}
        target: dict[int, gs.Tensor] = {}  # node -> tensor whose quantization stands for its output
        folds: dict[int, gs.Node] = {}
        candidates: dict[int, gs.Node] = {}
        excluded = set(self.options.exclude)
        for node in graph.nodes:
            if (p := planned.get(id(node))) is not None:
                for i in p.activations:
                    t = node.inputs[i]
                    if not _already_quantized(t):
                        qspec.setdefault(t.name, t.name)
                self._set_target(graph, node, target, folds)
                if not _already_quantized(target[id(node)]):
                    qspec[target[id(node)].name] = target[id(node)].name
                continue
            if not is_default_domain(node) or layer_key(node) in excluded or not node.outputs:
                continue
            if node.op in SHARE_SCALE and node.inputs and node.inputs[0].name in qspec:
                if node.op == "MaxPool" and len(node.outputs) > 1 and node.outputs[1].outputs:
                    continue
                if _dtype_reason(node.outputs[0]) or _already_quantized(node.outputs[0]):
                    continue
                candidates[id(node)] = node
                target[id(node)] = node.outputs[0]
                qspec[node.outputs[0].name] = qspec[node.inputs[0].name]
            elif (
                node.op in OWN_SCALE
                and node.inputs
                and all(t.name in qspec for t in node.inputs)
                and _dtype_reason(node.outputs[0]) is None
            ):
                self._set_target(graph, node, target, folds)
                if _already_quantized(target[id(node)]):
                    continue
                candidates[id(node)] = node
                qspec[target[id(node)].name] = target[id(node)].name
        # consumers first: a chain node (or a MatMul/Gemm output) stays quantized only if
        # its output reaches a quantized node; Conv outputs always (QLinearConv needs the Q)
        keep: set[int] = set(planned)
        chain: list[gs.Node] = []
        for node in reversed(graph.nodes):
            nid = id(node)
            if nid not in candidates and nid not in planned:
                continue
            t = target[nid]
            if any(id(c) in keep for c in t.outputs) or node.op == "Conv":
                if nid in candidates:
                    keep.add(nid)
                    chain.append(node)
            else:
                if (nid in candidates and t.name in qspec) or (
                    nid in planned
                    and qspec.get(t.name) == t.name
                    and not any(planned.get(id(c)) for c in t.outputs)
                ):
                    del qspec[t.name]
        chain.reverse()
        kept_folds = [act for nid, act in folds.items() if target[nid].name in qspec]
        return qspec, chain, kept_folds

    def _set_target(
        self,
        graph: gs.Graph,
        node: gs.Node,
        target: dict[int, gs.Tensor],
        folds: dict[int, gs.Node],
    ) -> None:
        out = node.outputs[0]
        target[id(node)] = out
        if (
            self.options.activation_symmetric
            or is_graph_output(graph, out)
            or len(out.outputs) != 1
        ):
            return
        act = out.outputs[0]
        if act.op not in ("Relu", "Clip") or not is_default_domain(act) or act.inputs[0] is not out:
            return
        if act.op == "Clip" and not _clip_starts_at_zero(act):
            return
        target[id(node)] = act.outputs[0]
        folds[id(node)] = act

    def _calibrate(
        self, graph: gs.Graph, ctx: PassContext, names: list[str]
    ) -> dict[str, tuple[float, float]]:
        o = self.options
        qmin, qmax = qrange(o.activation_type)
        key = (o.method, o.percentile, qmax - qmin, o.max_calibration_samples)
        cache = ctx.calibration_cache.setdefault(key, {}) if ctx.calibration_cache is not None else {}
        missing = [n for n in names if n not in cache]
        if missing:
            model = current_model(graph, ctx)
            assert ctx.calibration is not None
            found = collect_ranges(
                model,
                ctx.calibration,
                missing,
                o.method,
                o.percentile,
                levels=qmax - qmin,
                max_samples=o.max_calibration_samples,
                tick=ctx.tick,
            )
            cache.update({n: found.get(n) for n in missing})
        return {n: r for n in names if (r := cache[n]) is not None}


def _gemm_n(node: gs.Node, w: np.ndarray | None, b: gs.Tensor) -> int | None:
    shape = w.shape if w is not None else (tuple(b.shape) if b.shape else None)
    if (
        shape is None
        or len(shape) != 2
        or not isinstance(shape[0], int)
        or not isinstance(shape[1], int)
    ):
        return None
    return int(shape[0] if node.attrs.get("transB", 0) else shape[1])


def _clip_starts_at_zero(node: gs.Node) -> bool:
    if "min" in node.attrs:  # opset < 11
        return float(node.attrs["min"]) == 0.0
    if len(node.inputs) < 2 or not node.inputs[1].name:
        return False
    lo = constant_value(node.inputs[1])
    hi = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if len(node.inputs) > 2 and node.inputs[2].name and hi is None:
        return False
    return lo is not None and lo.size == 1 and float(lo) == 0.0
