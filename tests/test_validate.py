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


def _logits_and_noise(rows: int, classes: int, margin_scale: float, sigma: float, seed: int) -> tuple[object, object, Dataset, np.ndarray]:
    """Reference: y = x. Candidate: y = x + a fixed noise draw, so its error is known."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, classes)).astype(np.float32) * margin_scale
    noise = (rng.standard_normal((rows, classes)) * sigma).astype(np.float32)
    ref = make_model([helper.make_node("Identity", ["x"], ["y"])], [vi("x", [rows, classes])],
                     [vi("y", [rows, classes])])
    cand = make_model([helper.make_node("Add", ["x", "n"], ["y"])], [vi("x", [rows, classes])],
                      [vi("y", [rows, classes])], {"n": noise})
    return ref, cand, Dataset([{"x": x}], source="logits"), x


def _true_agreement(x: np.ndarray, sigma: float, draws: int = 400) -> float:
    """Monte Carlo: the probability that the top-1 survives a fresh iid N(0, sigma) error."""
    rng = np.random.default_rng(123)
    top = x.argmax(1)
    same = [np.mean((x + rng.standard_normal(x.shape) * sigma).argmax(1) == top) for _ in range(draws)]
    return float(np.mean(same))


def test_expected_top1_tracks_the_true_flip_rate_from_one_error_draw() -> None:
    ref, cand, data, x = _logits_and_noise(2000, 10, margin_scale=1.0, sigma=0.05, seed=0)
    (out,) = compare(ref, cand, data, Tolerance(exact=False, min_cosine=0.9)).outputs
    truth = _true_agreement(x, 0.05)
    assert 0.9 < truth < 0.99  # a regime where flips matter
    # the union bound over competitors makes the estimate slightly conservative, never optimistic
    assert truth - 0.02 < out.top1_expected <= truth + 0.003
    assert out.top1_expected_low < out.top1_expected
    assert out.top1_expected_low <= truth


def test_no_flip_on_few_rows_does_not_pass_a_five_percent_flip_rate() -> None:
    """32 rows without a single flip, while the error flips about 5% of inputs: the floor fails."""
    for seed in range(200):
        ref, cand, data, x = _logits_and_noise(32, 10, margin_scale=1.0, sigma=0.06, seed=seed)
        (out,) = compare(ref, cand, data, Tolerance(exact=False, min_cosine=0.9)).outputs
        if out.top1_agreement == 1.0:
            break
    else:
        raise AssertionError("no seed without a flip")
    assert _true_agreement(x, 0.06) < 0.98
    report = compare(ref, cand, data, Tolerance(exact=False, min_cosine=0.9, min_top1=0.98))
    (fail,) = report.failures
    assert fail.top1_agreement == 1.0 and fail.top1_expected_low < 0.98
    assert "expected top-1 agreement" in fail.describe(report.tolerance)


def test_small_error_against_wide_margins_passes_the_floor() -> None:
    ref, cand, data, _ = _logits_and_noise(32, 10, margin_scale=10.0, sigma=1e-3, seed=1)
    report = compare(ref, cand, data, Tolerance(exact=False, min_top1=0.98))
    (out,) = report.outputs
    assert report and out.top1_agreement == 1.0 and out.top1_expected_low > 0.99


def test_identical_outputs_expect_full_agreement() -> None:
    data = generate(_classifier(), count=3, pins={"x": (16, 8)})
    (out,) = compare(_classifier(), _classifier(), data, Tolerance(exact=False, min_top1=0.98)).outputs
    assert out.top1_expected == 1.0 and out.top1_expected_low == 1.0


def test_exact_comparisons_skip_the_expected_agreement() -> None:
    data = generate(_classifier(), count=1, pins={"x": (16, 8)})
    (out,) = compare(_classifier(), _classifier(), data).outputs
    assert out.top1_agreement == 1.0 and out.top1_expected is None


def _rows_model(name: str, rows: np.ndarray, noise: np.ndarray) -> tuple[object, object, Dataset]:
    shape = list(rows.shape)
    ref = make_model([helper.make_node("Identity", ["x"], [name])], [vi("x", shape)], [vi(name, shape)])
    cand = make_model([helper.make_node("Add", ["x", "n"], [name])], [vi("x", shape)], [vi(name, shape)],
                      {"n": noise.astype(np.float32)})
    return ref, cand, Dataset([{"x": rows.astype(np.float32)}], source="rows")


def test_embeddings_get_no_top1_check() -> None:
    """Normalized embeddings (or outputs named so) have no meaningful argmax: cosine only."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((32, 64))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    noise = rng.standard_normal(emb.shape) * 0.01  # flips many argmaxes, cosine ~0.995
    tol = Tolerance(exact=False, min_top1=0.98)
    for name, rows in (("y", emb), ("sentence_embedding", emb * 3.0), ("pooler_output", emb * 3.0)):
        report = compare(*_rows_model(name, rows, noise), tol)
        (out,) = report.outputs
        assert report and out.top1_agreement is None and out.top1_expected is None, name
    # unnormalized rows under a neutral name are logits: the same error fails the floor
    (out,) = compare(*_rows_model("y", emb * 3.0, noise), tol).outputs
    assert out.top1_agreement is not None and not out.passed
    # a confident softmax has rows of norm ~1 but no negative entry: still a classifier
    probs = np.full((32, 10), 1e-5)
    probs[np.arange(32), rng.integers(0, 10, 32)] = 1.0 - 9e-5
    (out,) = compare(*_rows_model("y", probs, np.zeros_like(probs)), tol).outputs
    assert out.top1_agreement == 1.0


def _signal_plus_noise_models() -> tuple[object, object]:
    """Both read x[1, 64] = [signal | noise]: the reference returns the signal, the candidate signal + noise."""
    starts, ends, zero = np.array([0], np.int64), np.array([32], np.int64), np.array([32], np.int64)
    common = {"s0": starts, "s1": ends, "n0": zero, "n1": np.array([64], np.int64), "ax": np.array([1], np.int64)}
    sig = helper.make_node("Slice", ["x", "s0", "s1", "ax"], ["sig"])
    ref = make_model([sig, helper.make_node("Identity", ["sig"], ["y"])], [vi("x", [1, 64])], [vi("y", [1, 32])],
                     common)
    cand = make_model([sig, helper.make_node("Slice", ["x", "n0", "n1", "ax"], ["noise"]),
                       helper.make_node("Add", ["sig", "noise"], ["y"])], [vi("x", [1, 64])], [vi("y", [1, 32])],
                      common)
    return ref, cand


def test_cosine_floor_checks_the_lower_bound_over_samples() -> None:
    """Twenty feeds, most nearly exact, two with large errors: the set cosine clears 0.99, its bound does not."""
    rng = np.random.default_rng(0)
    signal = rng.standard_normal((20, 32))
    scale = np.full((20, 1), 0.01)
    scale[[3, 11]] = 0.4  # two outlier samples carry most of the error
    ref, cand = _signal_plus_noise_models()
    tol = Tolerance(exact=False, min_cosine=0.99)

    def feeds(noise: np.ndarray) -> Dataset:
        rows = np.concatenate([signal, noise], axis=1).astype(np.float32)
        return Dataset([{"x": r[None]} for r in rows], source="rows")

    (out,) = compare(ref, cand, feeds(rng.standard_normal((20, 32)) * scale), tol).outputs
    assert out.cosine > 0.99 > out.cosine_low
    assert not out.passed and "lower bound" in out.describe(tol)
    # about the same total error spread evenly over the samples is certain: the bound stays close
    (even,) = compare(ref, cand, feeds(rng.standard_normal((20, 32)) * 0.12), tol).outputs
    assert 1 - even.cosine > 0.5 * (1 - out.cosine)
    assert even.passed and even.cosine - even.cosine_low < 0.3 * (out.cosine - out.cosine_low)


def test_empty_rank3_outputs_have_no_sequence_figures() -> None:
    from onnxopt.validate import _Acc

    acc = _Acc()
    empty = np.zeros((2, 0, 5), np.float32)
    acc.add(empty, empty, Tolerance(exact=True))
    out = acc.result("scores", Tolerance(exact=True))
    assert out.passed and out.sequence_agreement is None and out.position_agreement is None


def test_reference_outputs_computed_once_give_the_same_report() -> None:
    import pytest

    from onnxopt.validate import ReferenceOutputs, compare

    ref, cand = _classifier(), _classifier(shift=0.05)
    data = generate(ref, count=3, pins={"x": (16, 8)})
    cached = ReferenceOutputs(ref, data)
    direct, again = compare(ref, cand, data, Tolerance(exact=False)), compare(cached, cand, data, Tolerance(exact=False))
    assert again.outputs == direct.outputs
    assert direct.outputs[0].max_abs > 0.04  # a real difference was compared
    with pytest.raises(ValueError, match="another dataset"):
        compare(cached, cand, generate(ref, count=3, pins={"x": (16, 8)}), Tolerance(exact=False))
