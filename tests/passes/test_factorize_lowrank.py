"""factorize-lowrank against independent oracles: onnxruntime outputs, numpy SVD and lstsq,
parameter counts read from the initializers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnxopt.passes import _lowrank

from onnxopt import optimize
from onnxopt.errors import MissingRequirementError, PassOptionError
from onnxopt.runtime import run_model
from onnxopt.testing import assert_declined, make_model, op_histogram, vi

PASS = "factorize-lowrank"
F16 = onnx.TensorProto.FLOAT16
# a fixed crossover for every test (the pass measures one per machine otherwise): any saving of
# MACs pays, ranks on multiples of 8; tests of the crossover itself pass their own
FIXED = _lowrank.Crossover(1.0, 1.0, 1.0, 8, 8, "test")
MEASURED = _lowrank.measured_crossover  # the real one, for the test of its cache


@pytest.fixture(autouse=True)
def _fixed_crossover(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_lowrank, "measured_crossover", lambda: FIXED)


def _run(model: onnx.ModelProto, spec: str = PASS, calibration: list | None = None
         ) -> tuple[onnx.ModelProto, dict, dict]:
    out, report = optimize(model, passes=[spec], calibration=calibration, verify_each=True)
    return out, report.stats(PASS), report.notes[PASS]


def _low_rank(k: int, n: int, r: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, r)) @ rng.standard_normal((r, n)) / np.sqrt(k)
    return w.astype(np.float32)


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def _factors(model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """First factor [K, r], second [r, N] (Gemm transB undone) and bias, read out of the model."""
    w = _inits(model)
    first, second = model.graph.node[0], model.graph.node[1]
    assert second.input[0] == first.output[0]
    a, b = w[first.input[1]], w[second.input[1]]
    if any(at.name == "transB" and at.i for at in second.attribute):
        b = b.T
    bias = w[second.input[2]] if len(second.input) > 2 else None
    return a.astype(np.float64), b.astype(np.float64), bias


def _rel(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.sum((pred - target) ** 2) / np.sum(target**2))


def _matmul(w: np.ndarray, x_shape: list, opset: int = 17) -> onnx.ModelProto:
    y_shape = [*x_shape[:-1], w.shape[1]]
    return make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")],
                      [vi("x", x_shape)], [vi("y", y_shape)], {"W": w}, opset=opset)


def _feeds(shape: tuple, n: int = 4, seed: int = 1, mix: np.ndarray | None = None,
           mean: float = 0.0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal(shape)
        if mix is not None:
            x = x @ mix
        out.append({"x": (x + mean).astype(np.float32)})
    return out


def _assert_close(a: onnx.ModelProto, b: onnx.ModelProto, feeds: list[dict], rtol: float) -> None:
    """Every output of ``b`` within ``rtol`` of ``a``, relative to the output's norm."""
    for ra, rb in zip(run_model(a, feeds), run_model(b, feeds), strict=True):
        for x, y in zip(ra, rb, strict=True):
            assert x.shape == y.shape
            assert np.linalg.norm(y - x) <= rtol * np.linalg.norm(x)


def _anisotropic(k: int, seed: int = 3) -> np.ndarray:
    """A mixing matrix: singular values from 30 down to 0.01, random directions."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    return np.diag(np.geomspace(30.0, 0.01, k)) @ q


# ---- exact at the true rank ----

@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("calibrated", [False, True])
def test_true_rank_weight_is_reproduced(opset: int, calibrated: bool) -> None:
    w = _low_rank(64, 48, 8)
    model = _matmul(w, [4, 64], opset)
    feeds = _feeds((4, 64), n=8)
    out, stats, notes = _run(model, f"{PASS}:rank_fraction=0.16",
                             calibration=feeds if calibrated else None)
    assert stats == {"factorized": 1}
    layer = notes["layers"]["fc"]
    assert layer["rank"] == 8
    assert layer["full_rank"] == 48
    assert layer["method"] == ("activation" if calibrated else "svd")
    assert op_histogram(out) == {"MatMul": 2}
    _assert_close(model, out, _feeds((4, 64), seed=9), 1e-5)
    a, b, _ = _factors(out)
    assert a.shape == (64, 8)
    assert b.shape == (8, 48)
    np.testing.assert_allclose(a @ b, w, atol=1e-5 * np.abs(w).max())
    # parameters: counted from the initializers, against K*N and r*(K+N)
    assert _params(model) == 64 * 48 == layer["params_before"]
    assert _params(out) == 8 * (64 + 48) == layer["params_after"]
    assert (layer["macs_before"], layer["macs_after"]) == (64 * 48, 8 * 112)


def test_true_rank_found_by_energy() -> None:
    out, _stats, notes = _run(_matmul(_low_rank(64, 64, 16), [2, 64]), f"{PASS}:energy=0.999999")
    assert notes["layers"]["fc"]["rank"] == 16
    _assert_close(_matmul(_low_rank(64, 64, 16), [2, 64]), out, _feeds((2, 64)), 1e-5)


# ---- activation-aware factors ----

def test_activation_aware_beats_plain_svd_and_is_optimal_on_the_rows() -> None:
    k, n, r = 64, 64, 16
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) / 8).astype(np.float32)
    mix = _anisotropic(k)
    model = _matmul(w, [256, k])
    calib = _feeds((256, k), n=8, mix=mix)
    spec = f"{PASS}:rank_fraction=0.25,refit=false"
    plain, _, _ = _run(model, spec + ",method=svd", calibration=calib)
    aware, _, notes = _run(model, spec, calibration=calib)
    x = np.concatenate([f["x"] for f in calib]).astype(np.float64)
    y = x @ w.astype(np.float64)
    a_p, b_p, _ = _factors(plain)
    a_w, b_w, _ = _factors(aware)
    err_plain, err_aware = _rel(x @ a_p @ b_p, y), _rel(x @ a_w @ b_w, y)
    # the best any rank-r W' can do on these rows: Eckart-Young on Y = X W itself
    s = np.linalg.svd(y, compute_uv=False)
    best = float(np.sum(s[r:] ** 2) / np.sum(s**2))
    assert err_aware <= best * 1.02 + 1e-6
    assert err_aware < 0.5 * err_plain
    assert notes["layers"]["fc"]["error_before_refit"] == pytest.approx(err_aware, rel=1e-3)
    # and on rows it has not seen, from the same distribution
    held = np.concatenate([f["x"] for f in _feeds((256, k), n=4, seed=7, mix=mix)])
    held = held.astype(np.float64)
    y_held = held @ w
    assert _rel(held @ a_w @ b_w, y_held) < 0.5 * _rel(held @ a_p @ b_p, y_held)


@pytest.mark.parametrize("method", ["svd", "activation"])
def test_refit_matches_lstsq_on_the_same_rows(method: str) -> None:
    """Gemm with transB and a bias: the second factor and the bias are the least-squares fit
    of the original outputs from the first factor's outputs (ridge=0), as lstsq finds it."""
    k, n = 48, 40
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((n, k)) / 7).astype(np.float32)  # stored [N, K]: transB
    c = rng.standard_normal(n).astype(np.float32)
    model = make_model(
        [helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="g", transB=1, alpha=0.5, beta=2.0)],
        [vi("x", [64, k])], [vi("y", [64, n])], {"W": w, "C": c})
    calib = _feeds((64, k), n=6, mix=_anisotropic(k), mean=0.5)
    out, _stats, notes = _run(model, f"{PASS}:rank_fraction=0.33,ridge=0,method={method}",
                             calibration=calib)
    layer = notes["layers"]["g"]
    assert layer["refit_applied"]
    assert layer["error_after_refit"] < layer["error_before_refit"]
    a, b, bias = _factors(out)
    x = np.concatenate([f["x"] for f in calib]).astype(np.float64)
    y = 0.5 * x @ w.T.astype(np.float64) + 2.0 * c
    h = x @ a
    sol = np.linalg.lstsq(np.hstack([h, np.ones((len(h), 1))]), y, rcond=None)[0]
    np.testing.assert_allclose(b, sol[:-1], rtol=1e-3, atol=1e-3 * np.abs(sol).max())
    np.testing.assert_allclose(bias, sol[-1], rtol=1e-3, atol=1e-3 * np.abs(sol).max())
    assert layer["error_after_refit"] == pytest.approx(_rel(h @ sol[:-1] + sol[-1], y), rel=1e-3)
    second = out.graph.node[1]
    assert second.op_type == "Gemm"
    assert {at.name: at for at in second.attribute}["transB"].i == 1


# ---- Gemm, 3-D activations, Conv forms in onnxruntime ----

@pytest.mark.parametrize("opset", [11, 13, 17])
def test_gemm_transb_bias_at_true_rank(opset: int) -> None:
    k, n = 40, 64
    w = _low_rank(k, n, 8, seed=4).T.copy()  # [N, K]
    c = np.linspace(-1, 1, n).astype(np.float32)
    model = make_model(
        [helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="g", transB=1, alpha=0.7, beta=1.5)],
        [vi("x", [3, k])], [vi("y", [3, n])], {"W": w, "C": c}, opset=opset)
    out, stats, notes = _run(model, f"{PASS}:rank_fraction=0.2")
    assert stats == {"factorized": 1}
    assert notes["layers"]["g"]["rank"] == 8
    assert op_histogram(out) == {"Gemm": 1, "MatMul": 1}
    _assert_close(model, out, _feeds((3, k)), 1e-5)
    assert _params(model) - _params(out) == k * n - 8 * (k + n)


@pytest.mark.parametrize("batch", [2, "N"])
def test_3d_activations(batch: int | str) -> None:
    k, n = 64, 96
    rng = np.random.default_rng(5)
    w = (_low_rank(k, n, 16, seed=5) + 0.01 * rng.standard_normal((k, n))).astype(np.float32)
    model = _matmul(w, [batch, 8, k])
    calib = _feeds((2, 8, k), n=4, mix=_anisotropic(k))
    out, _stats, notes = _run(model, f"{PASS}:rank_fraction=0.25", calibration=calib)
    layer = notes["layers"]["fc"]
    assert layer["rank"] == 16
    assert layer["rows_per_sample"] == 8
    h = next(v for v in onnx.shape_inference.infer_shapes(out).graph.value_info
             if v.name == out.graph.node[0].output[0])
    assert [d.dim_value or d.dim_param for d in h.type.tensor_type.shape.dim][1:] == [8, 16]
    feeds = _feeds((2, 8, k), n=2, seed=3, mix=_anisotropic(k))
    # the graph computes x @ A @ B exactly as read out; the error is what the notes say
    a, b, _ = _factors(out)
    got = run_model(out, feeds)
    ref = run_model(model, feeds)
    for f, (g,), (r,) in zip(feeds, got, ref, strict=True):
        np.testing.assert_allclose(g, f["x"] @ a @ b, rtol=1e-4, atol=1e-4)
        assert _rel(g, r) < 1e-3
    x = np.concatenate([f["x"].reshape(-1, k) for f in calib]).astype(np.float64)
    assert layer["error_after_refit"] == pytest.approx(_rel(x @ a @ b, x @ w), rel=1e-2, abs=1e-9)


def _conv_model(cin: int, cout: int, k: int, rank: int, opset: int = 17, **attrs: object
                ) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(6)
    mat = rng.standard_normal((cout, rank)) @ rng.standard_normal((rank, cin * k * k))
    w = (mat / np.sqrt(cin * k * k)).reshape(cout, cin, k, k).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", **attrs)
    model = make_model([node], [vi("x", [2, cin, 12, 12])], [vi("y", None)], {"W": w, "B": b},
                       opset=opset, check=False)
    y = run_model(model, _feeds((2, cin, 12, 12), n=1))[0][0]  # the output's shape, declared
    model.graph.output[0].CopyFrom(vi("y", list(y.shape)))
    onnx.checker.check_model(model)
    return model, w


@pytest.mark.parametrize(("k", "attrs"), [
    (1, {}),
    (1, {"strides": [2, 2]}),
    (3, {"pads": [1, 1, 1, 1]}),
    (3, {"strides": [2, 1], "pads": [0, 1, 2, 1], "dilations": [1, 2]}),
    (3, {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
])
@pytest.mark.parametrize("calibrated", [False, True])
def test_conv_channel_factorization_at_true_rank(k: int, attrs: dict, calibrated: bool) -> None:
    cin, cout, r = 32, 48, 8
    model, _w = _conv_model(cin, cout, k, r, **attrs)
    calib = _feeds((2, cin, 12, 12), n=3) if calibrated else None
    out, stats, notes = _run(model, f"{PASS}:rank_fraction=0.16", calibration=calib)
    assert stats == {"factorized": 1}
    assert op_histogram(out) == {"Conv": 2}
    _assert_close(model, out, _feeds((2, cin, 12, 12), seed=4), 1e-5)
    a, b = (_inits(out)[out.graph.node[i].input[1]] for i in (0, 1))
    assert a.shape == (r, cin, k, k)
    assert b.shape == (cout, r, 1, 1)
    kk = cin * k * k
    layer = notes["layers"]["conv"]
    assert layer["params_before"] == kk * cout + cout
    assert layer["params_after"] == r * (kk + cout) + cout
    assert _params(model) - _params(out) == kk * cout - r * (kk + cout)


def test_conv_error_in_notes_is_what_onnxruntime_measures() -> None:
    """k x k at a rank below the true one, activation-aware with refit: the notes' error on
    the calibration patches (all positions are used here) is the error onnxruntime shows."""
    cin, cout = 16, 32
    model, _ = _conv_model(cin, cout, 3, 16, pads=[1, 1, 1, 1])
    calib = _feeds((2, cin, 12, 12), n=2, mix=None)
    out, _, notes = _run(model, f"{PASS}:rank_fraction=0.25", calibration=calib)
    layer = notes["layers"]["conv"]
    assert layer["rank"] == 8
    ref, got = run_model(model, calib), run_model(out, calib)
    measured = _rel(np.concatenate([g[0] for g in got]).astype(np.float64),
                    np.concatenate([r[0] for r in ref]).astype(np.float64))
    assert layer["error_after_refit"] == pytest.approx(measured, rel=1e-3)
    assert layer["error_after_refit"] <= layer["error_before_refit"]


# ---- spatial form: k x k -> k x 1 then 1 x k ----

def _separable_conv(cin: int, cout: int, k: int, rank: int, seed: int = 13, **attrs: object
                    ) -> tuple[onnx.ModelProto, np.ndarray]:
    """W[m, c, i, j] = sum_r V[c, i, r] H[r, j, m]: spatial rank ``rank``; channel rank full."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((cin, k, rank))
    h = rng.standard_normal((rank, k, cout))
    w = (np.einsum("cir,rjm->mcij", v, h) / np.sqrt(cin * k * k)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", **attrs)
    model = make_model([node], [vi("x", [2, cin, 12, 12])], [vi("y", None)], {"W": w, "B": b},
                       check=False)
    y = run_model(model, _feeds((2, cin, 12, 12), n=1))[0][0]
    model.graph.output[0].CopyFrom(vi("y", list(y.shape)))
    return model, w


def _kernel_shapes(model: onnx.ModelProto) -> list[list[int]]:
    return [list(next(a.ints for a in n.attribute if a.name == "kernel_shape")) for n in model.graph.node]


@pytest.mark.parametrize("attrs", [
    {"pads": [1, 1, 1, 1]},
    {"strides": [2, 1], "pads": [0, 1, 2, 1], "dilations": [1, 2]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "VALID", "dilations": [2, 1]},
])
@pytest.mark.parametrize("calibrated", [False, True])
def test_spatial_factorization_at_true_rank(attrs: dict, calibrated: bool) -> None:
    cin, cout, k, r = 8, 16, 3, 8
    model, w = _separable_conv(cin, cout, k, r, **attrs)
    calib = _feeds((2, cin, 12, 12), n=3) if calibrated else None
    # full spatial rank min(C k, k M) = 24: a third is the true rank
    out, stats, notes = _run(model, f"{PASS}:rank_fraction=0.33,conv_form=spatial", calibration=calib)
    assert stats == {"factorized": 1, "spatial": 1}
    assert _kernel_shapes(out) == [[3, 1], [1, 3]]
    a, b = (_inits(out)[out.graph.node[i].input[1]] for i in (0, 1))
    assert a.shape == (r, cin, k, 1)
    assert b.shape == (cout, r, 1, k)
    # the pair's weights compose back to W (numpy, independent of the pass's helpers)
    np.testing.assert_allclose(np.einsum("rci,mrj->mcij", a[..., 0], b[:, :, 0, :]), w,
                               atol=1e-5 * np.abs(w).max())
    _assert_close(model, out, _feeds((2, cin, 12, 12), seed=4), 1e-5)
    layer = notes["layers"]["conv"]
    assert (layer["form"], layer["rank"], layer["full_rank"]) == ("spatial", r, cin * k)
    assert layer["params_after"] == r * (cin * k + k * cout) + cout == _params(out)
    assert layer["params_before"] == _params(model)


def test_spatial_error_falls_with_rank_and_is_what_onnxruntime_measures() -> None:
    """A Conv that is not separable: activation-aware spatial factors at growing rank; the error
    onnxruntime shows on held-out inputs falls, and the notes' error on the calibration patches
    (every position used) is onnxruntime's on them."""
    cin, cout, k = 16, 16, 3
    rng = np.random.default_rng(14)
    w = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])
    model = make_model([node], [vi("x", [2, cin, 12, 12])], [vi("y", [2, cout, 12, 12])], {"W": w})
    mix = _anisotropic(12)  # rows of the image correlated: the whitening has something to use
    calib = _feeds((2, cin, 12, 12), n=2, mix=mix)
    held = _feeds((2, cin, 12, 12), n=2, seed=21, mix=mix)
    ref_held, ref_calib = run_model(model, held), run_model(model, calib)
    errors = []
    for r in (8, 16):
        out, _, notes = _run(model, f"{PASS}:keep={json.dumps({'conv': r / 48})},conv_form=spatial",
                             calibration=calib)
        layer = notes["layers"]["conv"]
        assert (layer["form"], layer["rank"]) == ("spatial", r)
        got = np.concatenate([g[0] for g in run_model(out, calib)]).astype(np.float64)
        want = np.concatenate([g[0] for g in ref_calib]).astype(np.float64)
        assert layer["error_after_refit"] == pytest.approx(_rel(got, want), rel=1e-3)
        errors.append(_rel(np.concatenate([g[0] for g in run_model(out, held)]),
                           np.concatenate([g[0] for g in ref_held])))
    assert errors[1] < 0.7 * errors[0]
    assert errors[1] > 1e-4  # not separable at rank 16: the test can see a difference


def test_auto_form_takes_spatial_where_it_costs_fewer_macs() -> None:
    """Spatially separable at rank 8 (channel rank full): by energy, the spatial pair is
    small and taken; on a channel-low-rank Conv the channel pair is."""
    sep, _ = _separable_conv(16, 16, 3, 8, pads=[1, 1, 1, 1])
    out, stats, notes = _run(sep, f"{PASS}:energy=0.999999")
    assert stats == {"factorized": 1, "spatial": 1}
    assert (notes["layers"]["conv"]["form"], notes["layers"]["conv"]["rank"]) == ("spatial", 8)
    _assert_close(sep, out, _feeds((2, 16, 12, 12), seed=5), 1e-5)
    chan, _ = _conv_model(16, 48, 3, 8, pads=[1, 1, 1, 1])
    out, stats, notes = _run(chan, f"{PASS}:energy=0.999999")
    assert stats == {"factorized": 1}
    assert notes["layers"]["conv"]["form"] == "conv"
    assert _kernel_shapes(out) == [[3, 3], [1, 1]]


# ---- the crossover measured on this machine ----

def test_crossover_declines_pairs_that_would_be_slower() -> None:
    """64 x 128 at rank 16: the pair does 16 * 192 / 8192 = 0.375 of the MACs. A crossover of
    0.3 declines it, 0.4 takes it; a Conv in spatial form against its own limit."""
    w = _low_rank(64, 128, 16)
    _, stats, notes = _run(_matmul(w, [2, 64]), f"{PASS}:rank_fraction=0.25,crossover=0.3")
    assert (stats, notes["skipped"]) == ({"skipped:crossover": 1}, {"fc": "crossover"})
    _, stats, notes = _run(_matmul(w, [2, 64]), f"{PASS}:rank_fraction=0.25,crossover=0.4")
    assert stats == {"factorized": 1}
    assert notes["layers"]["fc"]["macs_after"] == 16 * 192
    # the measured one (injected here): spatial at 8 of 24 on 8 -> 16 channels is 0.5 of the MACs
    model, _ = _separable_conv(8, 16, 3, 8, pads=[1, 1, 1, 1])
    spec = f"{PASS}:rank_fraction=0.33,conv_form=spatial"
    _, stats, _ = _run(model, spec)
    assert stats == {"factorized": 1, "spatial": 1}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_lowrank, "measured_crossover", lambda: _lowrank.Crossover(1.0, 1.0, 0.45, 8, 8))
        _, stats, notes = _run(model, spec)
    assert stats == {"skipped:crossover": 1}
    assert notes["crossover"]["spatial"] == 0.45


def test_measured_multiple_rounds_ranks_and_options_override_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_lowrank, "measured_crossover", lambda: _lowrank.Crossover(1.0, 1.0, 1.0, 16, 32))
    w = _low_rank(128, 128, 8)
    _, _, notes = _run(_matmul(w, [2, 128]), f"{PASS}:rank_fraction=0.07")  # 8.96 -> 16
    assert notes["layers"]["fc"]["rank"] == 16
    _, _, notes = _run(_matmul(w, [2, 128]), f"{PASS}:rank_fraction=0.07,rank_multiple=4")
    assert notes["layers"]["fc"]["rank"] == 12
    model, _ = _conv_model(32, 128, 3, 8, pads=[1, 1, 1, 1])  # channel full rank 128: 8.96 -> 32
    _, _, notes = _run(model, f"{PASS}:rank_fraction=0.07,conv_form=channel")
    assert notes["layers"]["conv"]["rank"] == 32


def test_spatial_declines() -> None:
    one, _ = _conv_model(16, 32, 1, 8)
    _, stats, notes = _run(one, f"{PASS}:conv_form=spatial")
    assert (stats, notes["skipped"]) == ({"skipped:spatial-kernel": 1}, {"conv": "spatial-kernel"})
    # SAME padding is split between the two Convs by the input size: unknown, declined
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="conv", auto_pad="SAME_UPPER")
    dyn = make_model([node], [vi("x", ["n", 8, "h", "w"])], [vi("y", None)],
                     {"W": np.ones((16, 8, 3, 3), np.float32)}, check=False)
    _, stats, notes = _run(dyn, f"{PASS}:conv_form=spatial")
    assert notes["skipped"] == {"conv": "unknown-shape"}


def test_each_layer_is_timed_against_its_pair() -> None:
    """The notes time the layer and its pair alone, at the layer's input shape (batch pinned)."""
    w = _low_rank(256, 256, 16)
    model = _matmul(w, ["b", 32, 256])
    _, _, notes = _run(model, f"{PASS}:rank_fraction=0.0625")
    layer = notes["layers"]["fc"]
    assert layer["latency_input"] == [1, 32, 256]
    assert layer["latency_ms_before"] > 0.0
    assert layer["latency_ms_after"] > 0.0
    _, _, notes = _run(model, f"{PASS}:rank_fraction=0.0625,time_layers=false")
    assert "latency_ms_before" not in notes["layers"]["fc"]
    # a Conv whose image size is unknown is factorized but not timed (its cost depends on the size)
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])
    dyn = make_model([node], [vi("x", ["n", 32, "h", "w"])], [vi("y", ["n", 48, "h", "w"])],
                     {"W": _low_rank(48, 32 * 9, 8).reshape(48, 32, 3, 3)})
    _, stats, notes = _run(dyn, f"{PASS}:rank_fraction=0.17,conv_form=channel")
    assert stats == {"factorized": 1}
    assert "latency_ms_before" not in notes["layers"]["conv"]


def test_crossover_is_measured_once_per_machine_and_cached(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The measurement runs through onnxopt.machine's cache: once, then read back."""
    from onnxopt import machine

    calls = []

    def fake() -> dict:
        calls.append(1)
        return {"matmul": {"a": {"break_even": 0.97}}, "conv": {"b": {"break_even": 0.85}},
                "spatial": {"c": {"break_even": 0.8}}, "multiples": {"matmul": 8, "conv": 16}}

    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    monkeypatch.delenv("ONNXOPT_NO_MEASURE_CACHE", raising=False)
    monkeypatch.setattr(_lowrank, "measure_subset", fake)
    for _ in range(2):
        MEASURED.cache_clear()
        assert MEASURED() == _lowrank.Crossover(0.97, 0.85, 0.8, 8, 16)
    MEASURED.cache_clear()
    assert len(calls) == 1
    cached = json.loads((machine.cache_dir() / f"{machine.fingerprint()}.json").read_text())
    assert cached[_lowrank.KEY]["version"] == _lowrank.VERSION


def test_spatial_activation_aware_beats_plain_and_max_error_holds() -> None:
    """Inputs whose channels are correlated (as a CNN's are): whitening the column strips spends
    the rank where the outputs need it (error measured by onnxruntime on held-out inputs, with and
    without the refit); max_error picks the smallest spatial rank within its budget."""
    cin, cout, k = 16, 16, 3
    rng = np.random.default_rng(15)
    w = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])
    model = make_model([node], [vi("x", [2, cin, 12, 12])], [vi("y", [2, cout, 12, 12])], {"W": w})

    def feeds(n: int, seed: int) -> list[dict]:
        return [{"x": np.einsum("nchw,cd->ndhw", f["x"], _anisotropic(cin)).astype(np.float32)}
                for f in _feeds((2, cin, 12, 12), n=n, seed=seed)]

    calib, held = feeds(3, 1), feeds(2, 22)
    ref = np.concatenate([g[0] for g in run_model(model, held)])

    def held_error(spec: str) -> float:
        out, _, _ = _run(model, spec, calibration=calib)
        return _rel(np.concatenate([g[0] for g in run_model(out, held)]), ref)

    spatial = f"{PASS}:rank_fraction=0.17,conv_form=spatial"
    for spec in (spatial, spatial + ",refit=false"):
        assert held_error(spec) < 0.5 * held_error(spec + ",method=svd")
    _, _, notes = _run(model, f"{PASS}:max_error=0.05,conv_form=spatial", calibration=calib)
    layer = notes["layers"]["conv"]
    assert layer["form"] == "spatial"
    assert layer["error_after_refit"] <= 0.05
    fewer = json.dumps({"conv": (layer["rank"] - 8) / 48})
    _, _, notes = _run(model, f"{PASS}:keep={fewer},conv_form=spatial", calibration=calib)
    assert notes["layers"]["conv"]["error_after_refit"] > 0.05


def test_break_even_and_paying_multiple_from_hand_timings() -> None:
    # dense 1.0 ms; the pair at MAC shares 0.5, 0.75, 1.0 takes 0.6, 0.9, 1.2 ms: equal at 0.8333
    assert _lowrank.break_even([0.5, 0.75, 1.0], [0.6, 0.9, 1.2], 1.0) == pytest.approx(0.833, abs=1e-3)
    assert _lowrank.break_even([0.5, 1.0], [0.4, 0.9], 1.0) == 1.0  # faster at every share measured
    assert _lowrank.break_even([0.5, 1.0], [1.1, 1.2], 1.0) == 0.0  # never faster
    # steps of 16: 49..64 cost what 64 costs, 33..48 what 48 costs; 8 and 4 do not pay more
    steps = {40: 1.0, 48: 1.0, 52: 1.5, 56: 1.5, 60: 1.5, 62: 1.5, 63: 1.5, 64: 1.5}
    assert _lowrank.paying_multiple(steps) == 16
    linear = {r: r / 64 for r in (40, 48, 52, 56, 60, 62, 63, 64)}
    assert _lowrank.paying_multiple(linear) == 2  # only 63 -> 64 is within the 3% noise
    # summarize: the smallest break-even of each form, the measured multiples
    result = {"matmul": {"a": {"break_even": 0.9}, "b": {"break_even": 0.95}},
              "conv": {"c": {"break_even": 0.8}}, "spatial": {"d": {"break_even": 0.7}},
              "multiples": {"matmul": 4, "conv": 16}}
    assert _lowrank.summarize(result) == _lowrank.Crossover(0.9, 0.8, 0.7, 4, 16)


# ---- rank choice ----

def test_energy_picks_the_smallest_rank_that_keeps_it() -> None:
    rng = np.random.default_rng(8)
    u, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    v, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    s = np.geomspace(10, 0.01, 64)
    w = (u * s @ v.T).astype(np.float32)
    for energy in (0.9, 0.99, 0.999):
        expected = int(np.argmax(np.cumsum(s**2) / np.sum(s**2) >= energy)) + 1
        expected = 8 * -(-expected // 8)
        _, _, notes = _run(_matmul(w, [2, 64]), f"{PASS}:energy={energy},min_params_saving=1.0")
        layer = notes["layers"].get("fc")
        if expected >= 32:  # 32 * (64 + 64) is no saving over 64 * 64
            assert notes["skipped"] == {"fc": "no-saving"}
        else:
            assert layer["rank"] == expected
            assert layer["energy"] >= energy


def test_max_error_picks_the_smallest_rank_within_budget() -> None:
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((128, 96)) / 11).astype(np.float32)
    model = _matmul(w, [64, 128])
    calib = _feeds((64, 128), n=4, mix=_anisotropic(128))
    _, _, notes = _run(model, f"{PASS}:max_error=0.01", calibration=calib)
    layer = notes["layers"]["fc"]
    r = layer["rank"]
    assert r % 8 == 0
    assert layer["error_after_refit"] <= 0.01
    assert r > 8
    fewer = json.dumps({"fc": (r - 8) / 96})
    _, report = optimize(model, passes=[(PASS, {"keep": fewer})], calibration=calib)
    assert report.notes[PASS]["layers"]["fc"]["error_after_refit"] > 0.01


def test_keep_json_and_file_set_per_layer_fractions(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("MatMul", ["h", "W2"], ["y"])]  # unnamed: keyed by its output
    inits = {"W1": rng.standard_normal((64, 64)).astype(np.float32),
             "W2": rng.standard_normal((64, 128)).astype(np.float32)}
    model = make_model(nodes, [vi("x", [2, 64])], [vi("y", [2, 128])], inits)
    keep = {"fc1": 0.25, "y": 0.125}
    _, report = optimize(model, passes=[(PASS, {"keep": json.dumps(keep)})])
    layers = report.notes[PASS]["layers"]
    assert (layers["fc1"]["rank"], layers["y"]["rank"]) == (16, 8)
    path = tmp_path / "keep.json"
    path.write_text(json.dumps({"fc1": 1.0, "y": 0.25}))
    _, report = optimize(model, passes=[(PASS, {"keep": str(path)})])
    assert report.notes[PASS]["skipped"] == {"fc1": "full-rank"}
    assert report.notes[PASS]["layers"]["y"]["rank"] == 16
    with pytest.raises(PassOptionError, match="unknown layers"):
        optimize(model, passes=[(PASS, {"keep": '{"nope": 0.5}'})])
    with pytest.raises(PassOptionError, match=r"\(0, 1\]"):
        optimize(model, passes=[(PASS, {"keep": '{"fc1": 1.5}'})])


def test_options_that_need_data_refuse_without_it() -> None:
    model = _matmul(_low_rank(64, 64, 8), [2, 64])
    for spec in (f"{PASS}:method=activation", f"{PASS}:max_error=0.1"):
        with pytest.raises(MissingRequirementError):
            optimize(model, passes=[spec])


def test_cli_pass_spec(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from onnxopt.cli import app

    src = tmp_path / "m.onnx"
    onnx.save(_matmul(_low_rank(64, 96, 8), [2, 64]), src)
    dst = tmp_path / "o.onnx"
    result = CliRunner().invoke(app, ["optimize", str(src), "--level", "0", "--pass",
                                      f"{PASS}:rank_fraction=0.125", "-o", str(dst),
                                      "--repeats", "3"])
    assert result.exit_code == 0, result.output
    assert op_histogram(onnx.load(dst))["MatMul"] == 2
    # the per-layer table: rank 8 of 64, parameters 64*96 -> 8*(64+96), the layer timed alone
    assert "Factorized layers" in result.output
    row = next(line for line in result.output.splitlines() if line.strip("│ ").startswith("fc "))
    assert "8/64" in row
    assert "6,144 -> 1,280" in row
    assert "ms alone" in result.output


# ---- declines ----

def _one(op: str, inputs: list[str], inits: dict, x_shape: list | None = (2, 64),
         extra_inputs: tuple = (), outputs: tuple = (), **attrs: object) -> onnx.ModelProto:
    node = helper.make_node(op, inputs, ["y"], name="n", **attrs)
    x = [vi("x", list(x_shape) if x_shape is not None else None)]
    return make_model([node], x + list(extra_inputs), [vi("y", None), *outputs], inits,
                      check=False)


W64 = np.ones((64, 64), np.float32)


@pytest.mark.parametrize(("model", "reason", "spec"), [
    (_one("MatMul", ["x", "w"], {}, extra_inputs=(vi("w", [64, 64]),)), "weight-not-constant",
     None),
    (_one("MatMul", ["x", "W"], {"W": np.ones((3, 64, 64), np.float32)}, x_shape=(3, 2, 64)),
     "weight-not-2d", None),
    (_one("Conv", ["x", "W"], {"W": np.ones((8, 4, 3), np.float32)}, x_shape=(1, 4, 10)),
     "conv-not-2d", None),
    (make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="n")], [vi("x", [2, 64], F16)],
                [vi("y", [2, 64], F16)], {"W": W64.astype(np.float16)}), "dtype", None),
    (_one("MatMul", ["x", "W"], {"W": W64}, outputs=(vi("W", [64, 64]),)), "graph-output", None),
    (_one("MatMul", ["x", "W"], {"W": W64}, extra_inputs=(vi("W", [64, 64]),)),
     "weight-not-constant", None),  # an initializer that is also an input can be fed
    (_one("MatMul", ["c", "W"], {"W": W64, "c": W64}), "constant-input", None),
    (_one("Gemm", ["x", "W"], {"W": W64}, x_shape=(64, 2), transA=1), "gemm-transA", None),
    (_one("Conv", ["x", "W"], {"W": np.ones((64, 16, 3, 3), np.float32)}, x_shape=(1, 64, 8, 8),
          group=4), "grouped", None),
    (_one("Conv", ["x", "W"], {"W": np.ones((64, 1, 3, 3), np.float32)}, x_shape=(1, 64, 8, 8),
          group=64), "grouped", None),
    (_one("Gemm", ["x", "W", "c"], {"W": W64}, extra_inputs=(vi("c", [64]),)), "bias-not-constant",
     None),
    (_one("Gemm", ["x", "W", "C"], {"W": W64, "C": np.ones((2, 64), np.float32)}), "bias-shape",
     None),
    (_one("MatMul", ["x", "W"], {"W": W64}, x_shape=None), "unknown-shape", None),
    (_one("MatMul", ["x", "W"], {"W": W64}), "full-rank", f"{PASS}:rank_fraction=0.9"),
    (_one("MatMul", ["x", "W"], {"W": W64}), "no-saving", f"{PASS}:rank_fraction=0.5"),
    (_one("MatMul", ["x", "W"], {"W": np.ones((64, 8), np.float32)}), "full-rank", None),
], ids=lambda v: v if isinstance(v, str) else "")
def test_decline_reasons(model: onnx.ModelProto, reason: str, spec: str | None) -> None:
    assert_declined(model, PASS, reason, spec)
    _, report = optimize(model, passes=[spec or PASS])
    notes = report.notes[PASS]
    assert (notes["layers"], notes["skipped"]) == ({}, {"n": reason})


def test_shared_weight_is_declined_for_every_reader() -> None:
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="a"),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="b")]
    model = make_model(nodes, [vi("x", [2, 64])], [vi("y", [2, 64])], {"W": W64 * 0.1})
    out, stats, notes = _run(model, f"{PASS}:rank_fraction=0.25")
    assert stats == {"skipped:shared-weight": 2}
    assert notes["skipped"] == {"a": "shared-weight", "b": "shared-weight"}
    assert op_histogram(out) == op_histogram(model)


def test_error_budget_declined_when_no_saving_rank_meets_it() -> None:
    rng = np.random.default_rng(11)
    model = _matmul(rng.standard_normal((64, 64)).astype(np.float32), [32, 64])
    out, stats, notes = _run(model, f"{PASS}:max_error=1e-6", calibration=_feeds((32, 64)))
    assert stats == {"skipped:error-budget": 1}
    assert notes["skipped"] == {"fc": "error-budget"}
    assert op_histogram(out) == {"MatMul": 1}


def _subgraph_model(opset: int) -> onnx.ModelProto:
    """An If whose branches each hold a MatMul with a constant weight; a Loop likewise."""
    rng = np.random.default_rng(12)

    def branch(name: str) -> onnx.GraphProto:
        w = numpy_helper.from_array(_low_rank(64, 64, 8, seed=len(name)), f"{name}_W")
        return helper.make_graph([helper.make_node("MatMul", ["x", f"{name}_W"], [f"{name}_y"],
                                                   name=f"{name}_mm")],
                                 name, [], [vi(f"{name}_y", [2, 64])], [w])

    body_w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "body_W")
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["v_in", "body_W"], ["v_out"], name="body_mm")],
        "body", [vi("i", [], onnx.TensorProto.INT64), vi("cond_in", [], onnx.TensorProto.BOOL),
                 vi("v_in", [2, 64])],
        [vi("cond_out", [], onnx.TensorProto.BOOL), vi("v_out", [2, 64])], [body_w])
    nodes = [
        helper.make_node("If", ["c"], ["y"], then_branch=branch("then"),
                         else_branch=branch("else")),
        helper.make_node("Loop", ["n", "c", "x"], ["z"], body=body),
    ]
    return make_model(nodes, [vi("x", [2, 64]), vi("c", [], onnx.TensorProto.BOOL),
                              vi("n", [], onnx.TensorProto.INT64)],
                      [vi("y", [2, 64]), vi("z", [2, 64])], opset=opset)


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_subgraphs_are_left_alone(opset: int) -> None:
    model = _subgraph_model(opset)
    out, stats, notes = _run(model, f"{PASS}:rank_fraction=0.125")
    assert stats == {"skipped:subgraph": 3}
    assert notes["skipped"] == dict.fromkeys(("then_mm", "else_mm", "body_mm"), "subgraph")
    assert op_histogram(out) == op_histogram(model)


def test_weight_read_inside_a_subgraph_is_shared() -> None:
    """A main-graph MatMul whose weight a branch also reads keeps its weight."""
    then = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"], name="then_mm")],
                             "then", [], [vi("t", [2, 64])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [vi("e", [2, 64])])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="main_mm"),
             helper.make_node("If", ["c"], ["z"], then_branch=then, else_branch=other)]
    model = make_model(nodes, [vi("x", [2, 64]), vi("c", [], onnx.TensorProto.BOOL)],
                       [vi("y", [2, 64]), vi("z", [2, 64])], {"W": _low_rank(64, 64, 8)})
    out, stats, _ = _run(model, f"{PASS}:rank_fraction=0.125")
    assert stats == {"skipped:subgraph": 1, "skipped:shared-weight": 1}
    assert op_histogram(out) == op_histogram(model)


def test_sequential_refit_fits_the_input_the_layer_now_reads() -> None:
    """Two layers: with ``sequential`` the second is refit on its input in the model whose first
    layer is already factorized, so its noted error is the final output's error in onnxruntime,
    and no worse than fitting both on the original rows."""
    rng = np.random.default_rng(13)
    k = 64
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    inits = {"W1": (rng.standard_normal((k, 96)) / 8).astype(np.float32),
             "W2": (rng.standard_normal((96, k)) / 10).astype(np.float32)}
    model = make_model(nodes, [vi("x", [128, k])], [vi("y", [128, k])], inits)
    calib = _feeds((128, k), n=4, mix=_anisotropic(k))
    ref = np.concatenate([r[0] for r in run_model(model, calib)]).astype(np.float64)
    errors = {}
    for sequential in (False, True):
        out, _, notes = _run(model, f"{PASS}:rank_fraction=0.25,sequential={sequential}",
                             calibration=calib)
        got = np.concatenate([r[0] for r in run_model(out, calib)]).astype(np.float64)
        errors[sequential] = _rel(got, ref)
        if sequential:
            noted = notes["layers"]["fc2"]["error_after_refit"]
            assert noted == pytest.approx(errors[True], rel=1e-3)
    assert errors[True] <= errors[False] * 1.001


# ---- through the lossy driver ----

def test_driver_reports_each_factorized_layer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--factorize 0.5 on layers of true rank 8: the uniform candidate is exact, so it is written;
    the step's report carries the pass's per-layer figures, and the console prints them."""
    from onnxopt.bench import Latency
    from onnxopt.cli import print_compress_result
    from onnxopt.data import Dataset
    from onnxopt.lossy import compress

    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    model = make_model(nodes, [vi("x", ["n", 64])], [vi("y", ["n", 96])],
                       {"W1": _low_rank(64, 128, 8, seed=1), "W2": _low_rank(128, 96, 8, seed=2)})
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    data = Dataset(_feeds((32, 64), n=8, seed=5), source="t")

    def measure(models: dict, feeds: list) -> dict[str, Latency]:  # the factorized model is faster
        return {k: Latency(1.0 if k == "float" else 0.5, 1, 1, 1, 1, "fake") for k in models}

    result = compress(src, tmp_path / "o.onnx", "factorize:0.5", calibration_data=data, measure=measure)
    assert result.written == "compressed"
    (step,) = result.steps
    fc1, fc2 = step.layers["fc1"]["pass"], step.layers["fc2"]["pass"]
    assert (fc1["rank"], fc1["params_before"], fc1["params_after"]) == (32, 64 * 128, 32 * (64 + 128))
    assert (fc2["rank"], fc2["params_before"], fc2["params_after"]) == (48, 128 * 96, 48 * (128 + 96))
    assert fc1["error_after_refit"] < 1e-8
    assert fc1["latency_ms_before"] > 0.0
    _assert_close(model, onnx.load(tmp_path / "o.onnx"), _feeds((4, 64), seed=6), 1e-5)
    print_compress_result(result)
    out = capsys.readouterr().out
    assert "Factorized layers" in out
    assert "8,192 -> 6,144" in out


def test_driver_reports_layers_of_an_allocated_candidate(tmp_path: Path) -> None:
    """fc1 is full rank, fc2 of true rank 8: half rank everywhere breaks the budget, so the
    driver allocates; what it writes (fc2 at a quarter of its rank, fc1 kept) carries the pass's
    figures of that build."""
    from onnxopt.bench import Latency
    from onnxopt.data import Dataset
    from onnxopt.lossy import compress

    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("MatMul", ["h", "W2"], ["y"], name="fc2")]
    model = make_model(nodes, [vi("x", ["n", 64])], [vi("y", ["n", 96])],
                       {"W1": (rng.standard_normal((64, 128)) / 8).astype(np.float32),
                        "W2": _low_rank(128, 96, 8, seed=1)})
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    data = Dataset(_feeds((32, 64), n=8, seed=5), source="t")

    def measure(models: dict, feeds: list) -> dict[str, Latency]:
        return {k: Latency(1.0 if k == "float" else 0.5, 1, 1, 1, 1, "fake") for k in models}

    result = compress(src, tmp_path / "o.onnx", "factorize:0.5", calibration_data=data, measure=measure)
    (step,) = result.steps
    assert step.applied
    assert step.reason.endswith("moves within budget")  # the allocation, not the uniform candidate
    assert step.layers["fc2"]["level"] == 0.25
    # fc1 may be assigned 0.75 of its rank, which saves nothing on 64 x 128: the pass left it
    assert "pass" not in step.layers.get("fc1", {})
    assert (step.layers["fc2"]["pass"]["rank"], step.layers["fc2"]["pass"]["params_after"]) == (24, 24 * 224)
    written = onnx.load(tmp_path / "o.onnx")
    assert op_histogram(written) == {"MatMul": 3}
    _assert_close(model, written, _feeds((4, 64), seed=6), 1e-5)  # fc2 is exact at rank 24
