from __future__ import annotations

import numpy as np
from onnx import helper

from onnxopt.data import Dataset, generate
from onnxopt.testing import make_model, vi
from onnxopt.validate import Tolerance, compare


def _classifier(scale: float = 1.0, shift: float = 0.0) -> object:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 5)).astype(np.float32) * scale
    return make_model(
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["logits"])],
        [vi("x", ["N", 8])], [vi("logits", ["N", 5])],
        {"W": w, "b": np.full(5, shift, np.float32)},
    )


def test_identical_models_pass_with_zero_error() -> None:
    data = generate(_classifier(), count=3, pins={"x": (16, 8)})
    report = compare(_classifier(), _classifier(), data)
    (out,) = report.outputs
    assert report and out.max_abs == 0 and out.cosine > 0.999999 and out.top1_agreement == 1.0


def test_exact_tolerance_catches_small_change_and_names_figures() -> None:
    data = generate(_classifier(), count=2, pins={"x": (16, 8)})
    report = compare(_classifier(), _classifier(shift=1e-3), data)
    assert not report
    (out,) = report.failures
    assert abs(out.max_abs - 1e-3) < 1e-5
    assert "output 'logits': max |diff| 0.001" in out.describe(report.tolerance)
    # the same difference passes a lossy cosine floor
    assert compare(_classifier(), _classifier(shift=1e-3), data, Tolerance(exact=False, min_cosine=0.99))


def test_accuracy_with_labels() -> None:
    data = generate(_classifier(), count=1, pins={"x": (64, 8)})
    from onnxopt.runtime import run_model

    logits = run_model(_classifier(), data.feeds)[0][0]
    labels = np.argmax(logits, -1)
    labelled = Dataset(data.feeds, labels)
    report = compare(_classifier(), _classifier(scale=-1.0), labelled, Tolerance(exact=False))
    assert report.accuracy_before == 1.0
    assert report.accuracy_after < 0.5
    assert not report  # negated logits: cosine -1
