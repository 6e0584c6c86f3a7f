"""onnxruntime sessions for validation (no ORT rewrites) and for measurement (all of them)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from onnxopt.errors import OnnxoptError

ModelRef = onnx.ModelProto | str | os.PathLike[str] | bytes


def session(
    model: ModelRef, optimize: bool = False, threads: int = 1, spinning: bool = False
) -> ort.InferenceSession:
    """A CPU session; ``optimize=False`` runs the graph as written (the validation oracle)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, (str, os.PathLike)):
        model = str(Path(model))
    try:
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for unloadable models
        raise OnnxoptError(f"onnxruntime cannot load the model: {str(e).splitlines()[0][:300]}") from None


def output_names(sess: ort.InferenceSession) -> list[str]:
    return [o.name for o in sess.get_outputs()]


def run(sess: ort.InferenceSession, feed: dict[str, np.ndarray]) -> list[Any]:
    try:
        return list(sess.run(None, feed))
    except Exception as e:
        raise OnnxoptError(f"onnxruntime failed to run the model: {str(e).splitlines()[0][:300]}") from None


def run_model(model: ModelRef, feeds: Sequence[dict[str, np.ndarray]]) -> list[list[Any]]:
    """Run ``model`` as written (no ORT rewrites) on each feed."""
    sess = session(model)
    return [run(sess, f) for f in feeds]
