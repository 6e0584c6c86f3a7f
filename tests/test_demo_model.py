"""The bundled demo model (models/digits_cnn.onnx) and what level 1 does to it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxopt
from onnxopt.testing import op_histogram, run_model

MODELS = Path(__file__).resolve().parent.parent / "models"
MODEL = MODELS / "digits_cnn.onnx"
DATA = MODELS / "digits_val.npz"


@pytest.fixture(scope="module")
def val() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATA) as d:
        return d["image"], d["labels"]


def _logits(model: onnx.ModelProto | Path, images: np.ndarray) -> np.ndarray:
    return run_model(model, [{"image": images}])[0][0]


def test_committed_model_is_an_unfolded_export(val: tuple[np.ndarray, np.ndarray]) -> None:
    model = onnx.load(str(MODEL))
    onnx.checker.check_model(model, full_check=True)
    hist = op_histogram(model)
    assert hist["BatchNormalization"] == 3
    assert hist["Dropout"] == 1
    assert hist["Identity"] == 1
    assert hist["Conv"] == 3
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits"]
    images, labels = val
    assert images.dtype == np.float32
    assert images.shape[1:] == (1, 8, 8)
    assert labels.dtype == np.int64
    assert labels.shape == (images.shape[0],)
    assert 300 <= len(labels) <= 400


def test_committed_model_accuracy(val: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = val
    accuracy = float((_logits(MODEL, images).argmax(1) == labels).mean())
    assert accuracy >= 0.95


def test_level1_keeps_accuracy_and_folds_batchnorm(
    val: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    images, labels = val
    out = tmp_path / "digits_cnn.opt.onnx"
    result = onnxopt.optimize_file(MODEL, out, data=DATA, bench=False)
    assert result.validation is not None
    assert result.validation
    optimized = onnx.load(str(out))
    hist = op_histogram(optimized)
    assert "BatchNormalization" not in hist
    assert "Dropout" not in hist
    assert "Identity" not in hist
    before, after = _logits(MODEL, images), _logits(optimized, images)
    assert after.shape == before.shape
    assert after.dtype == np.float32
    assert float(np.abs(after - before).max()) < 1e-4
    assert np.array_equal(after.argmax(1), before.argmax(1))
    assert float((after.argmax(1) == labels).mean()) == float((before.argmax(1) == labels).mean())
