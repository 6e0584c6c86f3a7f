"""Refit tests against independent oracles: numpy's lstsq, naive loops and onnxruntime's Conv."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

import onnxopt.reconstruct as reconstruct_mod
from onnxopt.reconstruct import im2col, refit_conv, refit_linear, relative_error
from onnxopt.testing import make_model, vi


def _ort_conv(x, w, b=None, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1):
    """onnxruntime's Conv with these weights on ``x`` (no graph optimizations)."""
    inputs = ["x", "w"] + (["b"] if b is not None else [])
    node = helper.make_node("Conv", inputs, ["y"], strides=list(strides), pads=list(pads),
                            dilations=list(dilations), group=group)
    inits = {"w": np.asarray(w, np.float32)}
    if b is not None:
        inits["b"] = np.asarray(b, np.float32)
    model = make_model([node], [vi("x", list(x.shape))], [vi("y", None)], inits, check=False)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": np.asarray(x, np.float32)})[0]


def _naive_patches(x, kernel, strides, pads, dilations):
    """im2col by explicit loops over every output position, (n, oh, ow) order."""
    n, c, h, w = x.shape
    kh, kw = kernel
    rows = []
    oh = (h + pads[0] + pads[2] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (w + pads[1] + pads[3] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    for s in range(n):
        for p in range(oh):
            for q in range(ow):
                row = []
                for ch in range(c):
                    for i in range(kh):
                        for j in range(kw):
                            r = p * strides[0] + i * dilations[0] - pads[0]
                            t = q * strides[1] + j * dilations[1] - pads[1]
                            inside = 0 <= r < h and 0 <= t < w
                            row.append(x[s, ch, r, t] if inside else 0.0)
                rows.append(row)
    return np.array(rows, np.float64)


def _rows_of(y: np.ndarray) -> np.ndarray:
    return y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1]).astype(np.float64)


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


# --- refit_linear ------------------------------------------------------------------------


def test_linear_exact_recovery_from_noiseless_data() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((400, 8)) * 2 + 3).astype(np.float32)
    w = rng.standard_normal((8, 5))
    b = rng.standard_normal(5)
    y = x.astype(np.float64) @ w + b
    got_w, got_b = refit_linear(x, y, ridge=0.0)
    assert got_w.dtype == np.float32
    assert got_b is not None
    assert _rel(got_w, w) < 1e-5
    assert _rel(got_b, b) < 1e-5
    # the default ridge biases the fit by about ridge, relative
    got_w, got_b = refit_linear(x, y)
    assert 1e-7 < _rel(got_w, w) < 1e-3


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_lstsq_on_the_augmented_system(bias: bool) -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((300, 6)) + rng.standard_normal(6) * 4).astype(np.float32)
    y = (np.sin(x @ rng.standard_normal((6, 4))) + 0.1 * rng.standard_normal((300, 4)))
    a = np.c_[x.astype(np.float64), np.ones(len(x))] if bias else x.astype(np.float64)
    sol = np.linalg.lstsq(a, y, rcond=None)[0]
    got_w, got_b = refit_linear(x, y, ridge=0.0, bias=bias)
    assert _rel(got_w, sol[:6]) < 1e-5
    if bias:
        assert got_b is not None
        assert _rel(got_b, sol[6]) < 1e-5
    else:
        assert got_b is None


def test_linear_streams_chunks_and_keeps_precision_far_from_zero(monkeypatch) -> None:
    """Rows accumulated in many chunks, data with a large offset: still lstsq's solution."""
    monkeypatch.setattr(reconstruct_mod, "_CHUNK_VALUES", 50)  # 10 rows per chunk
    rng = np.random.default_rng(2)
    x = 1e6 + rng.standard_normal((250, 5))
    y = x @ rng.standard_normal((5, 3)) + rng.standard_normal((250, 3))
    sol = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)[0]
    got_w, got_b = refit_linear(x, y, ridge=0.0)
    assert _rel(got_w, sol[:5]) < 1e-4
    assert got_b is not None
    np.testing.assert_allclose(x @ got_w + got_b, np.c_[x, np.ones(len(x))] @ sol, rtol=1e-4)


@pytest.mark.parametrize("extra", ["near-duplicate", "dead"])
def test_linear_rank_deficient_falls_back_to_least_squares(extra: str) -> None:
    rng = np.random.default_rng(3)
    base = rng.standard_normal((200, 3))
    # near-duplicate: equal up to 1e-7 (Cholesky succeeds, condition number ~1e14);
    # dead: a zero column (Cholesky fails)
    noise = 1e-7 * rng.standard_normal((200, 1))
    x = np.c_[base, base[:, :1] + noise if extra != "dead" else np.zeros((200, 1))]
    y = base @ rng.standard_normal((3, 2)) + 0.05 * rng.standard_normal((200, 2))
    aug = np.c_[x, np.ones(len(x))]
    # the direction of the 1e-7 difference is not resolved: dropped (singular values below
    # 1e-5 of the largest), as the refit's pseudo-inverse drops eigenvalues below 1e-10
    want = aug @ np.linalg.lstsq(aug, y, rcond=1e-5)[0]
    got_w, got_b = refit_linear(x, y, ridge=0.0)
    assert np.isfinite(got_w).all()
    np.testing.assert_allclose(x @ got_w + got_b, want, rtol=1e-4, atol=1e-4)
    if extra == "dead":
        assert np.abs(got_w[3]).max() < 1e-6
    else:  # minimum norm: the weight split evenly between the two copies
        np.testing.assert_allclose(got_w[0], got_w[3], rtol=1e-4)


def test_ridge_shrinks_the_norm_relative_to_the_data() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((100, 10))
    x[:, 1] = x[:, 0] + 1e-3 * rng.standard_normal(100)  # nearly collinear: a large W
    y = rng.standard_normal((100, 2))
    norms = [np.linalg.norm(refit_linear(x, y, ridge=r)[0]) for r in (0.0, 1e-4, 1e-2, 1.0)]
    assert norms == sorted(norms, reverse=True)
    assert norms[0] > 2 * norms[2]
    # the penalty scales with the data: x * 100 gives W / 100 at the same ridge
    w1 = refit_linear(x, y, ridge=1e-2)[0]
    w100 = refit_linear(x * 100, y, ridge=1e-2)[0]
    np.testing.assert_allclose(w100 * 100, w1, rtol=1e-3, atol=1e-6)


# --- im2col and refit_conv ---------------------------------------------------------------

CASES = {
    "plain": dict(kernel=(3, 3), strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1),
    "stride-pad": dict(kernel=(3, 2), strides=(2, 1), pads=(1, 0, 2, 1), dilations=(1, 1),
                       group=1),
    "dilated": dict(kernel=(3, 3), strides=(1, 2), pads=(2, 2, 2, 2), dilations=(2, 2), group=1),
    "grouped": dict(kernel=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1), group=2),
    "depthwise": dict(kernel=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), dilations=(1, 1),
                      group=6),
}


def _conv_case(name: str, seed: int = 0):
    p = CASES[name]
    rng = np.random.default_rng(seed)
    c = 6 if name == "depthwise" else 4
    m = 6 if name == "depthwise" else (8 if name == "grouped" else 5)
    x = rng.standard_normal((3, c, 9, 10)).astype(np.float32)
    w = rng.standard_normal((m, c // p["group"], *p["kernel"])).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    return p, x, w, b


@pytest.mark.parametrize("name", list(CASES))
def test_im2col_matches_naive_loops_and_onnxruntime(name: str) -> None:
    p, x, w, _ = _conv_case(name)
    geo = (p["kernel"], p["strides"], p["pads"], p["dilations"])
    patches, index = im2col(x, *geo)
    np.testing.assert_array_equal(patches, _naive_patches(x, *geo))
    np.testing.assert_array_equal(index, np.arange(len(patches)))
    if p["group"] == 1:
        y = _ort_conv(x, w, None, p["strides"], p["pads"], p["dilations"])
        pred = patches.astype(np.float64) @ w.reshape(len(w), -1).T.astype(np.float64)
        np.testing.assert_allclose(pred, _rows_of(y), rtol=1e-4, atol=1e-4)
    sampled, sidx = im2col(x, *geo, positions=17, seed=3)
    assert sampled.shape == (17, patches.shape[1])
    assert len(set(sidx.tolist())) == 17
    np.testing.assert_array_equal(sampled, patches[sidx])
    again, _ = im2col(x, *geo, index=sidx)
    np.testing.assert_array_equal(again, sampled)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("max_positions", [65536, 60])
def test_refit_conv_recovers_a_conv_exactly(name: str, max_positions: int) -> None:
    """The target is itself a Conv of x: the refit finds its weights (checked in ORT)."""
    p, x, w, b = _conv_case(name)
    y = _ort_conv(x, w, b, p["strides"], p["pads"], p["dilations"], p["group"])
    got_w, got_b = refit_conv(x, y, ridge=0.0, max_positions=max_positions, **p)
    assert got_w.shape == w.shape
    assert got_w.dtype == np.float32
    assert _rel(got_w, w) < 1e-4
    assert got_b is not None
    assert _rel(got_b, b) < 1e-4
    out = _ort_conv(x, got_w, got_b, p["strides"], p["pads"], p["dilations"], p["group"])
    assert relative_error(out, y) < 1e-9


@pytest.mark.parametrize("name", ["plain", "stride-pad", "grouped", "depthwise"])
def test_refit_conv_matches_an_independent_least_squares_solve(name: str) -> None:
    """Noisy target: the same solution as lstsq on naive patches, group by group."""
    p, x, w, b = _conv_case(name, seed=5)
    y = _ort_conv(x, w, b, p["strides"], p["pads"], p["dilations"], p["group"])
    y = y + np.random.default_rng(6).standard_normal(y.shape).astype(np.float32)
    got_w, got_b = refit_conv(x, y, ridge=0.0, **p)
    g = p["group"]
    c, m = x.shape[1], y.shape[1]
    kk = p["kernel"][0] * p["kernel"][1]
    patches = _naive_patches(x, p["kernel"], p["strides"], p["pads"], p["dilations"])
    rows = _rows_of(y)
    for i in range(g):
        a = patches[:, i * (c // g) * kk : (i + 1) * (c // g) * kk]
        a = np.c_[a, np.ones(len(a))]
        sol = np.linalg.lstsq(a, rows[:, i * (m // g) : (i + 1) * (m // g)], rcond=None)[0]
        want_w = sol[:-1].T.reshape(m // g, c // g, *p["kernel"])
        assert _rel(got_w[i * (m // g) : (i + 1) * (m // g)], want_w) < 1e-4
        assert _rel(got_b[i * (m // g) : (i + 1) * (m // g)], sol[-1]) < 1e-4


def _correlated_input(rng: np.random.Generator, n: int) -> np.ndarray:
    """8 channels mixed from 4 smooth latent maps: dropped channels are predictable."""
    latent = rng.standard_normal((n, 4, 12, 12))
    latent = (latent + np.roll(latent, 1, axis=2) + np.roll(latent, 1, axis=3)) / 3
    mix = np.random.default_rng(99).standard_normal((8, 4))
    x = np.einsum("ck,nkhw->nchw", mix, latent) + 0.05 * rng.standard_normal((n, 8, 12, 12))
    return x.astype(np.float32)


def test_refit_after_dropping_input_channels_beats_dropping_them() -> None:
    """The pruning use case, judged in onnxruntime on held-out samples."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((6, 8, 3, 3)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    geo = dict(strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1))
    kept = [0, 2, 3, 5, 6]
    x_cal, x_val = _correlated_input(rng, 16), _correlated_input(rng, 8)
    y_cal, y_val = _ort_conv(x_cal, w, b, **geo), _ort_conv(x_val, w, b, **geo)
    dropped = relative_error(_ort_conv(x_val[:, kept], w[:, kept], b, **geo), y_val)
    new_w, new_b = refit_conv(x_cal[:, kept], y_cal, kernel=(3, 3), max_positions=1000, **geo)
    refit = relative_error(_ort_conv(x_val[:, kept], new_w, new_b, **geo), y_val)
    assert dropped > 0.05  # the dropped channels mattered
    assert refit < 0.2 * dropped
    assert relative_error(_ort_conv(x_cal, w, b, **geo), y_cal) == 0.0


def test_refit_conv_rejects_mismatched_shapes() -> None:
    x = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(ValueError, match="must be"):
        refit_conv(x, np.zeros((1, 5, 8, 8), np.float32), kernel=(3, 3))
    with pytest.raises(ValueError, match="groups"):
        refit_conv(x, np.zeros((1, 5, 6, 6), np.float32), kernel=(3, 3), group=2)


def test_relative_error() -> None:
    t = np.array([3.0, 4.0])
    assert relative_error(t, t) == 0.0
    assert relative_error(np.zeros(2), t) == 1.0
    assert relative_error(np.array([3.0, 5.0]), t) == pytest.approx(1 / 25)
    assert relative_error(np.ones(2), np.zeros(2)) == float("inf")
