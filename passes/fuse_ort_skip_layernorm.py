"""Fuse a residual Add and the LayerNormalization after it into onnxruntime's SkipLayerNormalization.

    s = a + b (+ c)          a, b: [B, S, H] of the same shape; c: a [H] bias folded in when
    y = LayerNorm(s) * g + h       ``a`` is ``MatMul(...) + c`` read only by the residual Add
 -> y, _, _, s = com.microsoft.SkipLayerNormalization(a', b, g, h, c, epsilon=eps)

The sum ``s`` stays available as the op's fourth output when something else reads it (the
residual stream of a pre-LayerNorm block, as in ViT: onnxruntime's own graph optimizer
declines those and fuses only Adds read by the LayerNormalization alone).

Only where it pays: onnxruntime's CPU kernel is not always faster than Add + LayerNormalization
(1.32 on an AVX-512 EPYC: 4x slower at [1, 65, 192]), and onnxruntime itself fuses an Add read
only by a LayerNormalization into that op when a session starts. So the first use per hidden
size times, as onnxruntime runs them with all its optimizations on, at [1, 64, H] (cached per
machine, ``onnxopt.machine.measured``): the fused op; Add + LayerNormalization as written; and,
where onnxruntime would fuse the Add at load, the sum written as the standard ``Sum`` op, which
it leaves alone (``kept-unfused-as-sum``: the model stays portable ONNX). The fastest wins;
``skipped:slower-here`` when that is the graph as it is. ``when=always`` fuses without measuring.

Same numbers up to float rounding (the op adds and normalises in one pass). Declined:
``skipped:not-last-axis`` (normalised over more than the last axis), ``skipped:shapes``
(the Add's inputs are not both 3-D of one known shape: a broadcast bias, an embedding sum
with a [1, S, H] position table), ``skipped:runtime-scale`` (gamma or beta computed at run time),
``skipped:stats-read`` (the mean / inverse std-dev outputs are read), ``skipped:not-float32``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnxopt.passes._ort_patterns import (
    MS_DOMAIN,
    REQUIRES,
    fastest,
    is_free,
    ms_node,
    projection,
    vector,
)
from onnxopt.passes._pattern import op_is, other_input

from onnxopt.graph_utils import is_graph_output, producer
from onnxopt.pass_base import Pass, PassContext, PassResult


def _decline(graph: gs.Graph, ln: gs.Node, add: gs.Node) -> str | None:
    x = ln.inputs[0]
    rank = len(x.shape) if x.shape is not None else None
    if ln.attrs.get("axis", -1) not in (-1, (rank or 0) - 1):
        return "not-last-axis"
    a, b = add.inputs
    if a.shape is None or b.shape is None or len(a.shape) != 3 or list(a.shape) != list(b.shape):
        return "shapes"
    if any(None in t.shape or "" in t.shape for t in (a, b)):
        return "shapes"  # unnamed dynamic dims: equal lists would prove nothing
    width = a.shape[-1]
    if not isinstance(width, int) or vector(ln.inputs[1], width) is None:
        return "runtime-scale"
    if len(ln.inputs) > 2 and ln.inputs[2].name and vector(ln.inputs[2], width) is None:
        return "runtime-scale"
    if any(t.outputs or is_graph_output(graph, t) for t in ln.outputs[1:] if t.name):
        return "stats-read"
    if any(t.dtype is not None and np.dtype(t.dtype) != np.float32 for t in (a, b)):
        return "not-float32"
    return None


def _split_bias(graph: gs.Graph, add: gs.Node) -> tuple[gs.Tensor, gs.Tensor, gs.Tensor | None]:
    """(input, skip, bias): a bias Add on one input, read by nothing else, moves into the op."""
    for i in (0, 1):
        proj = projection(add.inputs[i])
        if (proj is not None and proj.bias is not None and len(proj.nodes) == 2 and is_free(proj.out, graph)
                and proj.bias.shape[0] == add.inputs[1 - i].shape[-1]):
            return proj.matmul_out, add.inputs[1 - i], other_input(proj.nodes[1], proj.matmul_out)
    return add.inputs[0], add.inputs[1], None


class FuseOrtSkipLayernormPass(Pass):
    """Fuse residual Add + LayerNormalization into onnxruntime's SkipLayerNormalization (com.microsoft)."""

    name = "fuse-ort-skip-layernorm"
    requires_runtime = REQUIRES

    @dataclasses.dataclass(frozen=True)
    class Options:
        when: Literal["faster", "always"] = "faster"  # faster: only where it measures faster here

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        for ln in [n for n in graph.nodes if op_is(n, "LayerNormalization")]:
            add = producer(ln.inputs[0])
            if not op_is(add, "Add"):
                continue
            reason = _decline(graph, ln, add)
            choice = "fused" if reason or self.options.when == "always" else _fastest(graph, add)
            if choice == "add":
                reason = "slower-here"
            if reason:
                stats[f"skipped:{reason}"] += 1
            elif choice == "sum":
                add.op = "Sum"  # same sum, same broadcasting; onnxruntime does not fuse it
                stats["kept-unfused-as-sum"] += 1
            else:
                _fuse(graph, ln, add, ctx)
                stats["fused-skip-layernorm"] += 1
        changed = stats["fused-skip-layernorm"] + stats["kept-unfused-as-sum"] > 0
        if stats["fused-skip-layernorm"]:
            graph.cleanup().toposort()
        return PassResult(changed=changed, stats=dict(stats))


def _keeps_sum(graph: gs.Graph, add: gs.Node) -> bool:
    """Whether the residual sum is read besides the LayerNormalization (the op's fourth output then)."""
    total = add.outputs[0]
    return is_graph_output(graph, total) or len(total.outputs) > 1


def _fuse(graph: gs.Graph, ln: gs.Node, add: gs.Node, ctx: PassContext) -> None:
    total = add.outputs[0]
    keep_sum = _keeps_sum(graph, add)
    x, skip, bias = _split_bias(graph, add)
    beta = ln.inputs[2] if len(ln.inputs) > 2 and ln.inputs[2].name else gs.Variable.empty()
    inputs = [x, skip, ln.inputs[1], beta] + ([bias] if bias is not None else [])
    y = ln.outputs[0]
    outputs = [y] + ([gs.Variable.empty(), gs.Variable.empty(), total] if keep_sum else [])
    ln.outputs.clear()
    if keep_sum:
        add.outputs.clear()
    ms_node(graph, "SkipLayerNormalization", inputs, outputs,
            {"epsilon": float(ln.attrs.get("epsilon", 1e-5))}, ctx.names.fresh("SkipLayerNormalization"))


def _fastest(graph: gs.Graph, add: gs.Node) -> str:
    """"fused", "add" (leave it) or "sum" (rewrite the Add as Sum): the fastest here, at [1, 64, H]."""
    width = int(add.inputs[0].shape[-1])
    keep_sum = _keeps_sum(graph, add)
    return fastest(f"ort-skip-layernorm:h{width}:sum{int(keep_sum)}", *micro_forms(width, keep_sum))


def micro_forms(width: int, keep_sum: bool) -> tuple[dict[str, Callable[[], onnx.ModelProto]], dict[str, np.ndarray]]:
    """The forms chosen between at [1, 64, ``width``] (name -> model builder) and their feed;
    ``bench/target_ort_profile.py`` times the same."""
    # with a second reader onnxruntime does not fuse the Add, so Sum would change nothing
    forms = ("fused", "add") if keep_sum else ("fused", "add", "sum")
    feed = {n: np.random.default_rng(0).standard_normal((1, 64, width)).astype(np.float32) for n in ("x", "skip")}
    return {form: (lambda form=form: _micro_model(width, keep_sum, form)) for form in forms}, feed


def _micro_model(width: int, keep_sum: bool, form: str) -> onnx.ModelProto:
    h = onnx.helper
    gamma, beta = (onnx.numpy_helper.from_array(np.full(width, v, np.float32), n) for n, v in (("g", 1.0), ("b", 0.0)))
    if form == "fused":
        nodes = [h.make_node("SkipLayerNormalization", ["x", "skip", "g", "b"],
                             ["y"] + (["", "", "sum"] if keep_sum else []), domain=MS_DOMAIN, epsilon=1e-6)]
    else:
        nodes = [h.make_node("Add" if form == "add" else "Sum", ["x", "skip"], ["sum"]),
                 h.make_node("LayerNormalization", ["sum", "g", "b"], ["y"], axis=-1, epsilon=1e-6)]
    io = [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 64, width]) for n in ("x", "skip")]
    outs = [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 64, width])
            for n in (["y", "sum"] if keep_sum else ["y"])]
    model = h.make_model(h.make_graph(nodes, "skip_layernorm", io, outs, [gamma, beta]),
                         opset_imports=[h.make_opsetid("", 17), h.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = 8
    return model
