"""Checks shared by the MatMul/Gemm quantizers that need a constant float32 weight."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph_utils import constant_value, layer_key


def float32_weight_decline(node: gs.Node, exclude: frozenset[str]) -> str | None:
    """Why ``node`` (MatMul or Gemm) cannot be weight-quantized, or None.

    Declines: ``excluded`` (by node name or first output name), ``weight-not-constant``,
    ``weight-not-2d``, ``weight-not-float32``, ``input-not-float32`` (unknown counts as
    not), ``gemm-transA``.
    """
    if node.name in exclude or layer_key(node) in exclude:
        return "excluded"
    w = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None:
        return "weight-not-constant"
    if w.ndim != 2:
        return "weight-not-2d"
    if w.dtype != np.float32:
        return "weight-not-float32"
    x = node.inputs[0]
    if x.dtype is None or np.dtype(x.dtype) != np.float32:
        return "input-not-float32"
    if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
        return "gemm-transA"
    return None
