"""Fuse a 2-D MatMul followed by a bias Add into one Gemm.

    y = Add(MatMul(A, B), c)   ->   y = Gemm(A, B, c)        (alpha = beta = 1)

Legal when A and B are both provably 2-D ([M, K] and [K, N]: A's rank comes from its
declared or inferred shape) and ``c`` broadcasts to [M, N] the way Gemm's C does
(unidirectionally): rank <= 2, last dim 1 or N, first dim 1 or M ([N], [1, N], [M, 1],
[M, N], scalars). Dims are compared as written: a symbolic dim matches only the same
symbol, so an Add that could enlarge the output is never fused. ``c`` need not be a
constant. Only float16/float32/float64 are fused (Gemm accepts them from opset 7; its
integer support differs by opset and is not worth the risk).

Declined, and counted in stats (Adds without a MatMul input are ignored):
- ``skipped:rank``: A or B is not 2-D (batched/transformer MatMuls stay as they are).
- ``skipped:unknown-rank``: the rank of A, B or the shape of ``c`` is not known.
- ``skipped:broadcast``: ``c`` does not broadcast to [M, N] without enlarging it.
- ``skipped:graph-output``: the MatMul output is also a graph output.
- ``skipped:matmul-output-shared``: the MatMul output has another consumer.
- ``skipped:dtype``: not float16/float32/float64.
- ``skipped:opset``: opset < 7 (Gemm-6 has a different broadcast contract).
Works inside If/Loop/Scan bodies; a MatMul in an outer graph is never touched.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs
from onnxopt.passes._pattern import matmul_add_decline, matmul_operands, tensor_shape

from onnxopt.graph_utils import constant_value, is_default_domain, iter_graphs
from onnxopt.pass_base import Pass, PassContext, PassResult

_DTYPES = (np.float16, np.float32, np.float64)


def _dtype(tensor: gs.Tensor) -> np.dtype | None:
    value = constant_value(tensor)
    if value is not None:
        return value.dtype
    try:
        return np.dtype(tensor.dtype) if tensor.dtype is not None else None
    except TypeError:
        return None


def _same_dim(a: int | str | None, b: int | str | None) -> bool:
    return a is not None and a == b


def _decline(graph: gs.Graph, mm: gs.Node, bias: gs.Tensor, opset: int) -> str | None:
    if reason := matmul_add_decline(graph, mm, opset):
        return reason
    a_shape, b_shape, c_shape = tensor_shape(mm.inputs[0]), tensor_shape(mm.inputs[1]), tensor_shape(bias)
    if a_shape is None or b_shape is None:
        return "unknown-rank"
    if len(a_shape) != 2 or len(b_shape) != 2:
        return "rank"
    dtype = _dtype(mm.inputs[0])
    dtype = _dtype(mm.inputs[1]) if dtype is None else dtype  # np.dtype is falsy: no `or`
    if dtype is None or dtype.type not in _DTYPES or _dtype(bias) != dtype:
        return "dtype"
    if c_shape is None:
        return "unknown-rank"
    m, n = a_shape[0], b_shape[1]
    if len(c_shape) > 2:
        return "broadcast"
    dims = (1,) * (2 - len(c_shape)) + c_shape
    if not (dims[1] == 1 or _same_dim(dims[1], n)) or not (dims[0] == 1 or _same_dim(dims[0], m)):
        return "broadcast"
    return None


class FuseMatMulAddPass(Pass):
    """Fuse a 2-D MatMul and a bias Add into one Gemm."""

    name = "fuse-matmul-add"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        for g in list(iter_graphs(graph)):
            alive = {id(n) for n in g.nodes}
            replaced: dict[int, gs.Node | None] = {}
            for add in list(g.nodes):
                if add.op != "Add" or not is_default_domain(add) or len(add.inputs) != 2:
                    continue
                candidates = matmul_operands(add, alive)
                if not candidates:
                    continue
                # Add(MatMul, MatMul): either side may be the one that fuses
                reasons = [_decline(g, mm, bias, ctx.opset) for mm, bias in candidates]
                if all(reasons):
                    stats[f"skipped:{reasons[0]}"] += 1
                    continue
                mm, bias = candidates[reasons.index(None)]
                a, b = mm.inputs[0], mm.inputs[1]
                y = add.outputs[0]
                add.inputs.clear()
                add.outputs.clear()
                mm.inputs.clear()
                mm.outputs.clear()
                # the Gemm takes the Add's place: A, B and c are all computed before it
                replaced[id(add)] = gs.Node(
                    "Gemm", name=ctx.names.fresh(f"{mm.name or 'matmul'}_gemm"),
                    inputs=[a, b, bias], outputs=[y],
                )
                replaced[id(mm)] = None
                stats["fused"] += 1
            if replaced:
                g.nodes = [r for n in g.nodes if (r := replaced.get(id(n), n)) is not None]
        if stats["fused"]:
            graph.cleanup()
        return PassResult(changed=stats["fused"] > 0, stats=dict(stats))
