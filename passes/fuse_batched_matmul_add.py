"""Turn a MatMul + bias Add on 3-D (or higher) activations into Reshape -> Gemm -> Reshape, where that is faster.

    y = Add(MatMul(A[..., K], B[K, N]), c)
 -> y = Reshape(Gemm(Reshape(A, [-1, K]), B, c[N]), [d0, ..., d_{r-2}, N])

This is onnxsim's rewrite (on ViT: MatMul 36 -> 12, Gemm 1 -> 25). It is exact: the Gemm
computes the same dot products and adds the same bias (one rounding per output either way).
Whether it pays depends on the runtime, the CPU and the model: recent onnxruntime fuses
MatMul + Add on 3-D inputs itself, and on this project's EPYC the Gemm form made ViT 2% faster
and MiniLM no faster. So ``onnxopt optimize`` (``optimize_file``) runs it as a *trial*: every
candidate is rewritten, and the pass is kept only if the whole model measures faster with it
than without it (``onnxopt.guard.Guard.trial``). Without a measurement (``onnxopt.optimize``
in memory) the pass asks a micro-benchmark cached per machine (``onnxopt.machine.measured``,
key ``matmul-gemm-3d``: the transformer projections of ``MEASURED_SHAPES`` timed both ways)
and rewrites only when the Gemm form measured at least ``GAIN`` faster; ``force=true`` skips
both questions (for runtimes other than the one timed).
bench/LOSSLESS_REWRITES.md has the figures of the machine this was written on.

The output shape comes from A's leading dims: static dims are written as they are, one
dynamic dim as -1; with two or more dynamic dims (batch and sequence) the target is
``Concat(Shape(A)[:-1], [N])`` (``Shape(start, end)`` from opset 15, Shape + Slice before).
B must be a constant 2-D weight and ``c`` a constant that varies only along the last axis
([N], [1, N], [1, 1, N], a scalar) and does not raise A's rank.

Declined, and counted in stats (an Add without a MatMul input is ignored; a 2-D MatMul is
fuse-matmul-add's):
- ``skipped:not-faster``: the Gemm form did not measure faster on this machine.
- ``skipped:non-constant``: B or c is not a constant.
- ``skipped:broadcast``: c varies along another axis or raises the output rank.
- ``skipped:unknown-rank``: A's rank (or K) is not known.
- ``skipped:graph-output``: the MatMul output is also a graph output.
- ``skipped:matmul-output-shared``: the MatMul output has another consumer.
- ``skipped:dtype``: not float32/float64 (float16 Gemm is missing from some CPU runtimes).
- ``skipped:opset``: opset < 7 (Gemm-6's broadcast contract differs).
Works inside If/Loop/Scan bodies.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from onnxopt.passes._pattern import matmul_add_decline, matmul_operands, tensor_shape

from onnxopt.graph_utils import (
    constant_value,
    is_default_domain,
    iter_graphs,
    make_constant,
)
from onnxopt.pass_base import NameGenerator, Pass, PassContext, PassResult

KEY = "matmul-gemm-3d"
VERSION = 1
MEASURED_SHAPES = ((128, 384, 384), (128, 384, 1536), (65, 192, 768))  # (tokens, K, N): MiniLM, ViT
GAIN = 0.97  # the Gemm form must take at most this share of the MatMul form's time
_FLOATS = (np.float32, np.float64)  # onnxruntime's CPU Gemm has no float16 kernel in every version


def _decline(graph: gs.Graph, mm: gs.Node, c_t: gs.Tensor, opset: int) -> str | None:
    if reason := matmul_add_decline(graph, mm, opset):
        return reason
    a_shape = tensor_shape(mm.inputs[0])
    if a_shape is None or not isinstance(a_shape[-1] if a_shape else None, int):
        return "unknown-rank"
    b, c = constant_value(mm.inputs[1]), constant_value(c_t)
    if b is None or c is None:
        return "non-constant"
    if b.ndim != 2 or len(a_shape) < 3:
        return "rank"
    if b.dtype.type not in _FLOATS or c.dtype != b.dtype:
        return "dtype"
    if c.ndim > len(a_shape) or any(d != 1 for d in c.shape[:-1]) or (c.ndim and c.shape[-1] not in (1, b.shape[1])):
        return "broadcast"
    return None


def _out_shape(g: gs.Graph, a: gs.Tensor, n: int, opset: int, names: NameGenerator,
               new_nodes: list[gs.Node]) -> gs.Tensor:
    """The Reshape target [d0, ..., d_{r-2}, N]: a constant unless two or more dims are dynamic."""
    lead = list(tensor_shape(a) or ())[:-1]
    dynamic = [i for i, d in enumerate(lead) if not isinstance(d, int)]
    if len(dynamic) <= 1:
        dims = [-1 if i in dynamic else int(d) for i, d in enumerate(lead)] + [n]
        return make_constant(names.fresh("gemm3d_shape"), np.array(dims, np.int64))
    lead_t = gs.Variable(names.fresh("gemm3d_lead"), dtype=np.int64, shape=[len(lead)])
    if opset >= 15:
        new_nodes.append(gs.Node("Shape", name=names.fresh("gemm3d_shape_of"), attrs={"start": 0, "end": -1},
                                 inputs=[a], outputs=[lead_t]))
    else:
        full = gs.Variable(names.fresh("gemm3d_full_shape"), dtype=np.int64, shape=[len(lead) + 1])
        new_nodes.append(gs.Node("Shape", name=names.fresh("gemm3d_shape_of"), inputs=[a], outputs=[full]))
        if opset < 10:  # Slice-1: starts/ends are attributes
            new_nodes.append(gs.Node("Slice", name=names.fresh("gemm3d_lead_dims"),
                                     attrs={"starts": [0], "ends": [-1]}, inputs=[full], outputs=[lead_t]))
        else:
            bounds = [make_constant(names.fresh("gemm3d_zero"), np.array([0], np.int64)),
                      make_constant(names.fresh("gemm3d_minus1"), np.array([-1], np.int64))]
            new_nodes.append(gs.Node("Slice", name=names.fresh("gemm3d_lead_dims"), inputs=[full, *bounds],
                                     outputs=[lead_t]))
    target = gs.Variable(names.fresh("gemm3d_target"), dtype=np.int64, shape=[len(lead) + 1])
    new_nodes.append(gs.Node("Concat", name=names.fresh("gemm3d_concat"), attrs={"axis": 0},
                             inputs=[lead_t, make_constant(names.fresh("gemm3d_n"), np.array([n], np.int64))],
                             outputs=[target]))
    return target


def _rewrite(g: gs.Graph, mm: gs.Node, add: gs.Node, c_t: gs.Tensor, opset: int,
             names: NameGenerator) -> list[gs.Node]:
    """The nodes replacing ``mm`` and ``add`` (in order)."""
    a, b_t = mm.inputs[0], mm.inputs[1]
    b, c = constant_value(b_t), constant_value(c_t)
    assert b is not None
    assert c is not None
    k, n = b.shape
    y = add.outputs[0]
    new: list[gs.Node] = []
    flat = gs.Variable(names.fresh(f"{mm.name or 'matmul'}_2d"), dtype=b.dtype, shape=[-1, k])
    new.append(gs.Node("Reshape", name=names.fresh("gemm3d_flatten"),
                       inputs=[a, make_constant(names.fresh("gemm3d_flat_shape"), np.array([-1, k], np.int64))],
                       outputs=[flat]))
    target = _out_shape(g, a, n, opset, names, new)
    bias = make_constant(names.fresh(f"{c_t.name}_row"), np.broadcast_to(c.reshape(-1), (n,)).copy())
    y2 = gs.Variable(names.fresh(f"{mm.name or 'matmul'}_gemm_out"), dtype=b.dtype)
    new.append(gs.Node("Gemm", name=names.fresh(f"{mm.name or 'matmul'}_gemm"), inputs=[flat, b_t, bias], outputs=[y2]))
    for node in (mm, add):
        node.inputs.clear()
        node.outputs.clear()
    new.append(gs.Node("Reshape", name=names.fresh("gemm3d_unflatten"), inputs=[y2, target], outputs=[y]))
    return new


def _model(tokens: int, k: int, n: int, gemm: bool, layers: int = 4) -> Any:
    """``layers`` projections [1, tokens, k] @ [k, k|n] + bias, in MatMul + Add or Gemm form."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        width = n if i == layers - 1 else k
        inits += [numpy_helper.from_array((rng.standard_normal((k, width)) * 0.05).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}")]
        out = "y" if i == layers - 1 else f"h{i}"
        if gemm:
            inits += [numpy_helper.from_array(np.array([-1, k], np.int64), f"s{i}"),
                      numpy_helper.from_array(np.array([1, tokens, width], np.int64), f"o{i}")]
            nodes += [helper.make_node("Reshape", [x, f"s{i}"], [f"r{i}"]),
                      helper.make_node("Gemm", [f"r{i}", f"w{i}", f"b{i}"], [f"g{i}"]),
                      helper.make_node("Reshape", [f"g{i}", f"o{i}"], [out])]
        else:
            nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
                      helper.make_node("Add", [f"m{i}", f"b{i}"], [out])]
        x = out
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, tokens, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def measure(repeats: int = 30) -> dict[str, Any]:
    """Median ms of both forms per shape in ``MEASURED_SHAPES`` and the geometric-mean ratio gemm / matmul."""
    from onnxopt.bench import measure_latency

    rows, ratios = {}, []
    for tokens, k, n in MEASURED_SHAPES:
        feeds = [{"x": np.random.default_rng(1).standard_normal((1, tokens, k)).astype(np.float32)}]
        ms = measure_latency({"matmul": _model(tokens, k, n, False), "gemm": _model(tokens, k, n, True)},
                             feeds, repeats=repeats, max_seconds=10)
        rows[f"{tokens}x{k}x{n}"] = {name: lat.median_ms for name, lat in ms.items()}
        ratios.append(ms["gemm"].median_ms / ms["matmul"].median_ms)
    return {"shapes": rows, "ratio": float(np.exp(np.mean(np.log(ratios))))}


@functools.lru_cache(maxsize=1)
def measured_ratio() -> float:
    """Gemm-form time / MatMul-form time on this machine (cached per machine and onnxruntime version)."""
    from onnxopt import machine

    return float(machine.measured(KEY, measure, version=VERSION)["ratio"])


class FuseBatchedMatMulAddPass(Pass):
    """Rewrite a 3-D MatMul + bias Add as Reshape, Gemm, Reshape where that measures faster."""

    name = "fuse-batched-matmul-add"
    trial = "force"  # onnxruntime's MatMul + Add fusion wins on some models, Gemm on others

    @dataclasses.dataclass(frozen=True)
    class Options:
        force: bool = False  # rewrite without asking the per-machine measurement

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        for g in list(iter_graphs(graph)):
            alive = {id(n) for n in g.nodes}
            replaced: dict[int, list[gs.Node]] = {}
            for add in list(g.nodes):
                if add.op != "Add" or not is_default_domain(add) or len(add.inputs) != 2:
                    continue
                sides = matmul_operands(add, alive)  # a MatMul fused already has no output left
                if not sides:
                    continue
                reasons = [_decline(g, mm, c, ctx.opset) for mm, c in sides]
                if all(reasons):
                    if reasons[0] != "rank":  # a 2-D MatMul is fuse-matmul-add's, not a decline here
                        stats[f"skipped:{reasons[0]}"] += 1
                    continue
                if not self.options.force and measured_ratio() > GAIN:
                    stats["skipped:not-faster"] += 1
                    continue
                mm, c = sides[reasons.index(None)]
                replaced[id(add)] = _rewrite(g, mm, add, c, ctx.opset, ctx.names)
                replaced[id(mm)] = []
                stats["fused"] += 1
            if replaced:
                g.nodes = [r for n in g.nodes for r in replaced.get(id(n), [n])]
        if stats["fused"]:
            graph.cleanup()
        return PassResult(changed=stats["fused"] > 0, stats=dict(stats))
