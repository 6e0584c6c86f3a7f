"""Fuse an explicit Pad into the Conv, AveragePool or MaxPool after it.

    Conv(Pad(x, p, mode=constant, value=0), W, b, pads=q)   ->  Conv(x, W, b, pads=q + p_spatial)
    AveragePool(Pad(x, p, value=0), pads=q, cip)           ->  AveragePool(x, pads=q + p_spatial,
                                                                count_include_pad=1)
    MaxPool(Pad(x, p, value=-inf), pads=q)                  ->  MaxPool(x, pads=q + p_spatial)

A Pad's ``pads`` are ``[x0_begin, x1_begin, ..., x0_end, x1_end, ...]`` over every axis of x;
a Conv's/pool's ``pads`` are the same layout over the spatial axes 2.. only. The fused node's
implicit padding must produce exactly the values the Pad wrote:
- Conv pads with zeros: the Pad must be constant mode with value 0 (or no value).
- AveragePool: the elements the Pad added are real elements, counted in every window's
  denominator, which is what ``count_include_pad=1`` does for implicit pads. So the fused node
  needs count_include_pad=1; when the pool had ``count_include_pad=0`` that is only the same
  if the pool had no pads of its own (its windows never saw an implicit pad).
- MaxPool ignores implicit pads (-inf semantics): only a Pad with value -inf is the same. A
  zero-valued Pad changes a window of all-negative values and is declined (it is exact after
  a Relu, which this pass does not try to prove).

Declined, and counted in stats (a Pad whose reader is none of the three is ignored):
- ``skipped:mode``: reflect/edge/wrap padding.
- ``skipped:pad-value``: a value other than 0 (Conv, AveragePool) or -inf (MaxPool).
- ``skipped:non-constant``: the pads, value or axes are not constants.
- ``skipped:non-spatial``: the Pad adds on the batch or channel axis.
- ``skipped:negative-pads``: a negative pad (a crop).
- ``skipped:auto-pad``: the reader uses ``auto_pad`` SAME_UPPER/SAME_LOWER.
- ``skipped:count-include-pad``: AveragePool with count_include_pad=0 and pads of its own.
- ``skipped:ceil-mode``: a pool with ceil_mode=1 (its last window may reach past the pads).
- ``skipped:pad-exceeds-kernel``: a pool whose summed pads would reach its kernel size
  (onnxruntime refuses such a pool; a Pad before it is the only way to express it).
- ``skipped:indices``: MaxPool's Indices output is read (indices refer to the padded input).
- ``skipped:opset``: AveragePool before opset 7 (no count_include_pad attribute).
- ``skipped:graph-output``: the Pad's output is also a graph output.
- ``skipped:pad-output-shared``: the Pad's output has another consumer.
Works inside If/Loop/Scan bodies; custom-domain nodes are left alone.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs
from onnxopt.passes._pattern import op_is

from onnxopt.graph_utils import (
    constant_value,
    is_default_domain,
    is_graph_output,
    iter_graphs,
    producer,
)
from onnxopt.pass_base import Pass, PassContext, PassResult

_READERS = ("Conv", "AveragePool", "MaxPool")


def _input(node: gs.Node, index: int) -> gs.Tensor | None:
    if len(node.inputs) > index and node.inputs[index].name:
        return node.inputs[index]
    return None


def _pad_amounts(pad: gs.Node, opset: int) -> np.ndarray | str:
    """Pad's begin/end amounts over every axis as an int array [2, rank], or a decline reason."""
    if opset < 11:
        raw = pad.attrs.get("pads", pad.attrs.get("paddings"))
        if raw is None:
            return "non-constant"
        pads = np.asarray(raw, dtype=np.int64)
    else:
        t = _input(pad, 1)
        value = constant_value(t) if t is not None else None
        if value is None:
            return "non-constant"
        pads = value.astype(np.int64).reshape(-1)
    axes_t = _input(pad, 3) if opset >= 18 else None
    if axes_t is None:
        return pads.reshape(2, -1)
    axes = constant_value(axes_t)
    rank = pad.inputs[0].shape
    if axes is None:
        return "non-constant"
    if rank is None:
        return "non-constant"  # axes cannot be placed without the rank
    full = np.zeros((2, len(rank)), dtype=np.int64)
    for i, axis in enumerate(axes.astype(np.int64).reshape(-1)):
        full[:, int(axis) % len(rank)] = pads.reshape(2, -1)[:, i]
    return full


def _pad_value(pad: gs.Node, opset: int) -> float | str:
    if opset < 11:
        return float(pad.attrs.get("value", 0.0))
    t = _input(pad, 2)
    if t is None:
        return 0.0
    value = constant_value(t)
    if value is None or value.size != 1:
        return "non-constant"
    return float(value.reshape(-1)[0])


def _decline(graph: gs.Graph, pad: gs.Node, reader: gs.Node, opset: int) -> str | np.ndarray:
    """The spatial begin/end amounts [2, rank - 2] to add to the reader's pads, or a reason."""
    if pad.attrs.get("mode", "constant") != "constant":
        return "mode"
    value = _pad_value(pad, opset)
    if isinstance(value, str):
        return value
    want = -np.inf if reader.op == "MaxPool" else 0.0
    if value != want:
        return "pad-value"
    amounts = _pad_amounts(pad, opset)
    if isinstance(amounts, str):
        return amounts
    if np.any(amounts < 0):
        return "negative-pads"
    if amounts.shape[1] < 3 or np.any(amounts[:, :2] != 0):
        return "non-spatial"
    if reader.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return "auto-pad"
    if reader.op != "Conv" and int(reader.attrs.get("ceil_mode", 0)):
        return "ceil-mode"
    if reader.op == "AveragePool":
        if opset < 7:
            return "opset"
        own = reader.attrs.get("pads")
        if not int(reader.attrs.get("count_include_pad", 0)) and own is not None and any(own):
            return "count-include-pad"
    if reader.op == "MaxPool" and len(reader.outputs) > 1 and (
            reader.outputs[1].outputs or is_graph_output(graph, reader.outputs[1])):
        return "indices"
    if reader.op != "Conv" and np.any(_summed(reader, amounts[:, 2:]) >= np.asarray(
            reader.attrs.get("kernel_shape", []), dtype=np.int64)):
        return "pad-exceeds-kernel"
    z = pad.outputs[0]
    if is_graph_output(graph, z):
        return "graph-output"
    if len(z.outputs) != 1:
        return "pad-output-shared"
    return amounts[:, 2:]


def _summed(reader: gs.Node, spatial: np.ndarray) -> np.ndarray:
    """The reader's own pads plus the Pad's spatial amounts, as [2, rank - 2]."""
    own = reader.attrs.get("pads")
    if reader.attrs.get("auto_pad", "NOTSET") == "VALID" or own is None:
        own = [0] * spatial.size  # VALID means no padding
    return np.asarray(own, dtype=np.int64).reshape(2, -1) + spatial


def _fuse(pad: gs.Node, reader: gs.Node, spatial: np.ndarray) -> None:
    reader.attrs["pads"] = [int(v) for v in _summed(reader, spatial).reshape(-1)]
    reader.attrs.pop("auto_pad", None)
    if reader.op == "AveragePool":
        reader.attrs["count_include_pad"] = 1
    reader.inputs[0] = pad.inputs[0]
    pad.inputs.clear()
    pad.outputs.clear()


class FusePadPass(Pass):
    """Fuse a constant-mode Pad into the Conv, AveragePool or MaxPool that reads it."""

    name = "fuse-pad"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        for g in list(iter_graphs(graph)):
            alive = {id(n) for n in g.nodes}
            removed: set[int] = set()
            for reader in list(g.nodes):
                if reader.op not in _READERS or not is_default_domain(reader) or not reader.inputs:
                    continue
                pad = producer(reader.inputs[0])
                if not op_is(pad, "Pad") or id(pad) not in alive:
                    continue
                result = _decline(g, pad, reader, ctx.opset)
                if isinstance(result, str):
                    stats[f"skipped:{result}"] += 1
                    continue
                _fuse(pad, reader, result)
                removed.add(id(pad))
                stats["fused"] += 1
            if removed:
                g.nodes = [n for n in g.nodes if id(n) not in removed]
        if stats["fused"]:
            graph.cleanup()
        return PassResult(changed=stats["fused"] > 0, stats=dict(stats))
