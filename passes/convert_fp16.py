"""Convert float32 compute to float16, keeping the model's inputs and outputs float32.

Every main-graph node whose float32 edges may all be float16 (by its ONNX schema at
the model's opset) runs in float16, except block-listed ops, custom-domain ops,
If/Loop/Scan (their bodies stay float32), excluded nodes, and nodes with an edge of
unknown dtype. A float32 tensor then exists in at most two versions:

    t16 = output of an fp16 node (new name)   ->  t = Cast(t16, to=FLOAT) only if an fp32
                                                  reader, a subgraph or a graph output needs t
    t   = graph input / output of an fp32 node ->  t16 = Cast(t, to=FLOAT16) once, shared
    constant (initializer or Constant node)    ->  a float16 copy, finite values clipped to
                                                  +-65504 (counted, logged), +-inf kept

so there is one Cast per tensor and direction and no pair that cancels. A node with
float inputs but no float outputs (Shape, ArgMax, Less, ...) runs in float16 only when
its inputs are float16 already. Existing ``Cast(to=FLOAT)`` nodes write float16
instead when a float16 node reads them, and a Cast reads the float16 version of its
input when there is one (casting from float16 or from its float32 image is the same).
Graph input/output names, dtypes and shapes never change. Lossy: float16 has 11
significant bits and a range of +-65504.

Default block-list: ops unsafe in float16 (index and box arithmetic, ranges, running
sums, random generators) and ops whose output dtype comes from an attribute:
``DEFAULT_BLOCK_OPS``. Quantization ops are always left alone.

Kept in float32, and counted in stats:
- ``skipped:blocked-op``, ``skipped:custom-domain``, ``skipped:subgraph-op``,
  ``skipped:excluded``, ``skipped:unknown-dtype``, ``skipped:no-fp16-kernel-type``
  (the schema does not allow float16 on one of its float edges).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.graph_utils import (
    add_node,
    constant_value,
    is_default_domain,
    layer_key,
    node_subgraphs,
)
from onnxopt.pass_base import NameGenerator, Pass, PassContext, PassResult

logger = logging.getLogger(__name__)

FP16_MAX = 65504.0
DEFAULT_BLOCK_OPS = (
    "NonMaxSuppression",
    "TopK",
    "RoiAlign",
    "Resize",
    "Upsample",
    "Range",
    "CumSum",
    "Min",
    "Max",
    "ConstantOfShape",
    "EyeLike",
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
)
_QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
_FLOAT16 = int(onnx.TensorProto.FLOAT16)
_FLOAT = int(onnx.TensorProto.FLOAT)


def _is_f32(t: gs.Tensor) -> bool:
    return t.dtype is not None and np.dtype(t.dtype) == np.float32


def _schema_allows_fp16(node: gs.Node, opset: int) -> bool:
    try:
        schema = onnx.defs.get_schema(node.op, opset, "")
    except onnx.defs.SchemaError:
        return False
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    for formals, tensors in ((schema.inputs, node.inputs), (schema.outputs, node.outputs)):
        for i, t in enumerate(tensors):
            if not t.name or not _is_f32(t) or not formals:
                continue
            type_str = formals[min(i, len(formals) - 1)].type_str
            if "tensor(float16)" not in allowed.get(type_str, {type_str}):
                return False
    return True


def _keep_reason(
    node: gs.Node, opset: int, blocked: frozenset[str], exclude: frozenset[str]
) -> str | None:
    if not is_default_domain(node):
        return "custom-domain"
    if node_subgraphs(node):
        return "subgraph-op"
    if node.name in exclude or layer_key(node) in exclude:
        return "excluded"
    if node.op in blocked or node.op in _QUANT_OPS:
        return "blocked-op"
    if any(t.name and t.dtype is None for t in list(node.inputs) + list(node.outputs)):
        return "unknown-dtype"
    if not _schema_allows_fp16(node, opset):
        return "no-fp16-kernel-type"
    return None


def to_fp16(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Float16 copy of ``values``, finite out-of-range entries clipped: (copy, clipped count)."""
    over = np.isfinite(values) & (np.abs(values) > FP16_MAX)
    clipped = np.where(over, np.sign(values) * FP16_MAX, values)
    return clipped.astype(np.float16), int(over.sum())


class ConvertFp16Pass(Pass):
    """Run float32 compute in float16 with Casts at the model's inputs, outputs and fp32 islands."""

    name = "convert-fp16"
    exact = False

    @dataclasses.dataclass(frozen=True)
    class Options:
        block_ops: tuple[str, ...] = DEFAULT_BLOCK_OPS  # op types kept in float32
        exclude: tuple[str, ...] = ()  # node names (or first output names) kept in float32

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        blocked, exclude = frozenset(self.options.block_ops), frozenset(self.options.exclude)
        graph.toposort()
        main = {id(n) for n in graph.nodes}
        capable: dict[int, bool] = {}
        for node in graph.nodes:
            if node.op == "Constant" or not any(
                _is_f32(t) for t in list(node.inputs) + list(node.outputs)
            ):
                continue
            reason = _keep_reason(node, ctx.opset, blocked, exclude)
            capable[id(node)] = reason is None
            if reason:
                stats[f"skipped:{reason}"] += 1
        fp16 = _choose_modes(graph, capable, main)
        if not any(fp16.values()):
            return PassResult(changed=False, stats=dict(stats))
        _rewire(graph, fp16, main, ctx.names, stats)
        ctx.notes[self.name] = {
            "quantized": [layer_key(n) for n in graph.nodes if fp16.get(id(n))],
            "skipped": {},
        }
        stats["converted-nodes"] = sum(fp16.values())
        if stats["clipped-values"]:
            logger.warning(
                "convert-fp16: %d weight values beyond +-65504 were clipped",
                stats["clipped-values"],
            )
        graph.cleanup().toposort()
        return PassResult(changed=True, stats=dict(stats))


def _choose_modes(graph: gs.Graph, capable: dict[int, bool], main: set[int]) -> dict[int, bool]:
    """id(node) -> runs in float16; nodes are visited in topological order."""
    fp16: dict[int, bool] = {}

    def fp16_for_free(t: gs.Tensor) -> bool:
        if constant_value(t) is not None:
            return True
        src = t.inputs[0] if len(t.inputs) == 1 else None
        return src is not None and fp16.get(id(src), False)

    for node in graph.nodes:
        if id(node) not in capable or not capable[id(node)]:
            continue
        if node.op == "Cast":
            out = node.outputs[0]
            fp16[id(node)] = int(node.attrs.get("to", 0)) == _FLOAT and any(
                id(c) in main and capable.get(id(c), False) for c in out.outputs
            )
        elif any(_is_f32(t) for t in node.outputs):
            fp16[id(node)] = True
        else:
            fp16[id(node)] = all(fp16_for_free(t) for t in node.inputs if t.name and _is_f32(t))
    return fp16


def _rewire(
    graph: gs.Graph,
    fp16: dict[int, bool],
    main: set[int],
    names: NameGenerator,
    stats: Counter[str],
) -> None:
    produced: dict[str, tuple[gs.Variable, gs.Variable]] = {}  # name -> (t, t16)
    for node in graph.nodes:
        if not fp16.get(id(node)):
            continue
        if node.op == "Cast":
            node.attrs["to"] = _FLOAT16
        for i, t in enumerate(list(node.outputs)):
            if _is_f32(t):
                t16 = gs.Variable(names.fresh(f"{t.name}_fp16"), dtype=np.float16, shape=t.shape)
                node.outputs[i] = t16
                produced[t.name] = (t, t16)
    casts16: dict[str, gs.Variable] = {}
    consts16: dict[str, gs.Constant] = {}
    for node in list(graph.nodes):
        if id(node) not in main:
            continue
        for i, t in enumerate(list(node.inputs)):
            if not t.name or not _is_f32(t):
                continue
            if node.op == "Cast":
                if t.name in produced:  # a Cast reads any dtype: skip the round trip
                    node.inputs[i] = produced[t.name][1]
            elif not fp16.get(id(node)):
                continue
            elif t.name in produced:
                node.inputs[i] = produced[t.name][1]
            elif (value := constant_value(t)) is not None:
                if t.name not in consts16:
                    half, clipped = to_fp16(value)
                    consts16[t.name] = gs.Constant(names.fresh(f"{t.name}_fp16"), half)
                    stats["converted-constants"] += 1
                    if clipped:
                        stats["clipped-values"] += clipped
                node.inputs[i] = consts16[t.name]
            else:
                if t.name not in casts16:
                    t16 = gs.Variable(
                        names.fresh(f"{t.name}_fp16"), dtype=np.float16, shape=t.shape
                    )
                    add_node(
                        graph,
                        "Cast",
                        [t],
                        [t16],
                        {"to": _FLOAT16},
                        name=names.fresh(f"{t.name}_to_fp16"),
                    )
                    casts16[t.name] = t16
                    stats["casts-inserted"] += 1
                node.inputs[i] = casts16[t.name]
    outputs = {t.name for t in graph.outputs}
    for name, (t, t16) in produced.items():
        # fp32 readers (nodes, subgraph bodies) kept reading t; graph outputs keep their name
        if t.outputs or name in outputs:
            add_node(graph, "Cast", [t16], [t], {"to": _FLOAT}, name=names.fresh(f"{name}_to_fp32"))
            stats["casts-inserted"] += 1
