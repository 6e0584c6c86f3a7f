"""onnxopt: a graph-level optimizer for ONNX models, validated and measured with onnxruntime."""

from __future__ import annotations

__version__ = "0.1.0"

from onnxopt.api import OptimizeResult, optimize, optimize_file  # noqa: E402
from onnxopt.errors import OnnxoptError  # noqa: E402
from onnxopt.io import load_model, save_model  # noqa: E402

__all__ = [
    "OnnxoptError",
    "OptimizeResult",
    "__version__",
    "load_model",
    "optimize",
    "optimize_file",
    "save_model",
]
