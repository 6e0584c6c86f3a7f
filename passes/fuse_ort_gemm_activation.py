"""Fuse a Gemm and the activation after it into onnxruntime's FusedGemm.

    y = act(Gemm(a, b, c; alpha, beta, transA, transB))
 -> y = com.microsoft.FusedGemm(a, b, c; alpha, beta, transA, transB, activation="act", ...)

for the activations FusedGemm's CPU kernel applies in place: Relu, Sigmoid, Tanh, LeakyRelu
(``activation_alpha`` = alpha), HardSigmoid (alpha, beta). The same ops onnxruntime's own
graph optimizer fuses at session start (GemmActivationFusion); written into the file, a
model loaded with fewer optimizations (``ORT_ENABLE_BASIC``) gets them too. FusedMatMul
(transposes and a scalar folded into MatMul) is not written: onnxruntime folds those at
session start, and after fuse-ort-attention no such Transpose is left in the models here.

The same numbers (the activation runs on the Gemm's output buffer). Declined:
``skipped:shared-output`` (the Gemm's output is read by something else too, or is a graph output).
"""

from __future__ import annotations

from collections import Counter

import onnx_graphsurgeon as gs
from onnxopt.passes._ort_patterns import REQUIRES, ms_node
from onnxopt.passes._pattern import op_is

from onnxopt.graph_utils import is_graph_output
from onnxopt.pass_base import Pass, PassContext, PassResult

# activation op -> its attributes as FusedGemm names them, with the ONNX defaults
ACTIVATIONS: dict[str, dict[str, tuple[str, float]]] = {
    "Relu": {},
    "Sigmoid": {},
    "Tanh": {},
    "LeakyRelu": {"alpha": ("activation_alpha", 0.01)},
    "HardSigmoid": {"alpha": ("activation_alpha", 0.2), "beta": ("activation_beta", 0.5)},
}
GEMM_ATTRS = ("alpha", "beta", "transA", "transB")


class FuseOrtGemmActivationPass(Pass):
    """Fuse Gemm + Relu/Sigmoid/Tanh/LeakyRelu/HardSigmoid into onnxruntime's FusedGemm (com.microsoft)."""

    name = "fuse-ort-gemm-activation"
    requires_runtime = REQUIRES

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        for gemm in [n for n in graph.nodes if op_is(n, "Gemm")]:
            out = gemm.outputs[0]
            act = out.outputs[0] if len(out.outputs) == 1 else None
            readers = [r for r in out.outputs if op_is(r, *ACTIVATIONS)]
            if not readers:
                continue
            if act is None or not op_is(act, *ACTIVATIONS) or is_graph_output(graph, out):
                stats["skipped:shared-output"] += 1
                continue
            attrs: dict[str, object] = {k: gemm.attrs[k] for k in GEMM_ATTRS if k in gemm.attrs}
            attrs["activation"] = act.op
            for name, (fused_name, default) in ACTIVATIONS[act.op].items():
                attrs[fused_name] = float(act.attrs.get(name, default))
            y = act.outputs[0]
            act.outputs.clear()
            ms_node(graph, "FusedGemm", list(gemm.inputs), [y], attrs, ctx.names.fresh("FusedGemm"))
            stats["fused-gemm-activation"] += 1
        if stats["fused-gemm-activation"]:
            graph.cleanup().toposort()
        return PassResult(changed=stats["fused-gemm-activation"] > 0, stats=dict(stats))
