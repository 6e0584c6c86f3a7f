"""sparsify-weights: zeros where the magnitudes are smallest, N:M patterns, honest size figures."""

from __future__ import annotations

import zlib

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxopt import optimize
from onnxopt.errors import PassOptionError
from onnxopt.runtime import run_model
from onnxopt.testing import make_model, vi

NAME = "sparsify-weights"


def _model(w: np.ndarray, op: str = "MatMul", **attrs: int) -> onnx.ModelProto:
    k = w.shape[1] if op == "Gemm" and attrs.get("transB") else w.shape[0]
    n = w.shape[0] if op == "Gemm" and attrs.get("transB") else w.shape[1]
    return make_model([helper.make_node(op, ["x", "w"], ["y"], **attrs)], [vi("x", [3, k])], [vi("y", [3, n])],
                      {"w": w})


def _weight(model: onnx.ModelProto) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w"))


def test_unstructured_zeros_the_smallest_magnitudes_and_outputs_follow() -> None:
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    out, report = optimize(_model(w), passes=[f"{NAME}:sparsity=0.75"])
    got = _weight(out)
    # an independent oracle: the 75% smallest |w| are exactly the zeros
    threshold = np.sort(np.abs(w).ravel())[int(0.75 * w.size) - 1]
    assert np.array_equal(got == 0, np.abs(w) <= threshold)
    assert np.array_equal(got[got != 0], w[got != 0])
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(run_model(out, [{"x": x}])[0][0], x @ got, rtol=1e-5, atol=1e-5)
    notes = report.notes[NAME]
    assert notes["zeros"] == int(0.75 * w.size) and notes["elements"] == w.size
    assert notes["compressed_bytes_before"] == len(zlib.compress(w.tobytes(), 6))
    assert notes["compressed_bytes_after"] < 0.6 * notes["compressed_bytes_before"]
    assert out.ByteSize() == pytest.approx(_model(w).ByteSize(), rel=0.01)  # same shapes, same size


@pytest.mark.parametrize(("op", "attrs", "axis"), [("MatMul", {}, 0), ("Gemm", {"transB": 1}, 1)])
def test_two_of_four_along_the_reduction_axis(op: str, attrs: dict, axis: int) -> None:
    w = np.random.default_rng(2).standard_normal((64, 32) if axis == 0 else (32, 64)).astype(np.float32)
    out, report = optimize(_model(w, op, **attrs), passes=[f"{NAME}:pattern=2:4"])
    got = np.moveaxis(_weight(out), axis, -1)  # reduction axis last
    orig = np.moveaxis(w, axis, -1)
    for row_got, row_w in zip(got.reshape(-1, 4), orig.reshape(-1, 4), strict=True):
        kept = np.flatnonzero(row_got)
        assert len(kept) == 2
        # the two kept are the two largest magnitudes of the run of four
        assert set(kept) == set(np.argsort(-np.abs(row_w))[:2])
    assert report.stats(NAME) == {"sparsified": 1}


def test_declines_and_bad_options() -> None:
    w = np.ones((30, 64), np.float32)
    out, report = optimize(_model(w), passes=[f"{NAME}:pattern=2:4"])
    assert report.stats(NAME) == {"skipped:pattern-axis": 1}  # 30 rows: not runs of four
    small = np.ones((4, 4), np.float32)
    assert optimize(_model(small), passes=[NAME])[1].stats(NAME) == {"skipped:small": 1}
    with pytest.raises(PassOptionError, match="N:M"):
        optimize(_model(w), passes=[f"{NAME}:pattern=half"])
    with pytest.raises(PassOptionError, match=r"sparsity must be in \[0, 1\)"):
        optimize(_model(w), passes=[f"{NAME}:sparsity=1.5"])
