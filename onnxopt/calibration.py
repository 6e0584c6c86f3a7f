"""Activation ranges for static quantization, collected in a stream with bounded memory.

An augmented copy of the model exposes the tensors of interest as extra graph
outputs (what onnxruntime's calibrator does) and runs, with onnxruntime's graph
optimizations off, over the calibration feeds one at a time (``onnxopt.capture``'s
``run_exposed``, shared with activation capture). Per tensor we keep:

- ``minmax``: the running minimum and maximum;
- ``percentile``, ``entropy``, ``mse``: also a histogram of a fixed number of bins
  over ``[min, max]``. When a feed widens the range, the counts are re-binned onto
  the new edges by interpolating the cumulative count (mass is moved, not lost), so
  memory is ``bins`` floats per tensor whatever the number of feeds.

Range rules (every method returns a sub-range of the minmax range):

- ``percentile`` p: the central p% of the values, ``(q((100-p)/200), q(1-(100-p)/200))``.
- ``entropy``: TensorRT's KL threshold ``t`` on the histogram of ``|x|`` (128 levels),
  range ``(max(min, -t), min(max, t))``.
- ``mse``: the range ``f * [min(lo, 0), max(hi, 0)]``, ``f`` in (0, 1], that minimises
  the expected squared error (rounding ``s**2/12`` inside, distance to the bound outside).

Quantization parameters (``scale_zero_point``), in float64, scale stored as float32:

    lo, hi = min(lo, 0), max(hi, 0)               # 0 must be exactly representable
    asymmetric: scale = (hi - lo) / (qmax - qmin);  zp = clip(round(qmin - lo / scale))
    symmetric:  scale = max(|lo|, |hi|) / 127;      zp = 0 (int8) or 128 (uint8)
    scale = 1 when the range is empty (lo == hi == 0); round is numpy's (half to even).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx

from onnxopt.capture import run_exposed
from onnxopt.errors import InputDataError

logger = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy", "mse")
QTYPES = {"uint8": (0, 255), "int8": (-128, 127)}
DEFAULT_BINS = 2048


def qrange(qtype: str) -> tuple[int, int]:
    try:
        return QTYPES[qtype]
    except KeyError:
        raise ValueError(f"quantized type must be one of {sorted(QTYPES)}, not '{qtype}'") from None


def scale_zero_point(
    lo: float, hi: float, qtype: str = "uint8", symmetric: bool = False
) -> tuple[np.float32, int]:
    """Scale (float32) and zero point (int) that map ``[lo, hi]`` onto ``qtype``."""
    qmin, qmax = qrange(qtype)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        absmax = max(abs(lo), abs(hi))
        scale = absmax / 127.0 if absmax > 0 else 1.0
        return np.float32(scale), (0 if qtype == "int8" else 128)
    scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
    zp = int(np.clip(np.round(qmin - lo / scale), qmin, qmax))
    return np.float32(scale), zp


def weight_scales(w: np.ndarray, axis: int | None, qmax: int = 127) -> np.ndarray:
    """Symmetric int8 scales of a weight: ``max|w| / qmax`` per channel of ``axis`` (or one)."""
    a = np.abs(w.astype(np.float64))
    if axis is None:
        amax = np.asarray(a.max() if a.size else 0.0)
    else:
        amax = (
            a.max(axis=tuple(i for i in range(w.ndim) if i != axis))
            if a.size
            else np.zeros(w.shape[axis])
        )
    return np.where(amax > 0, amax / float(qmax), 1.0).astype(np.float32)


def quantize_weight(
    w: np.ndarray, scales: np.ndarray, axis: int | None, qmax: int = 127
) -> np.ndarray:
    """``clip(round(w / scale), -qmax, qmax)`` as int8, the scale broadcast along ``axis``."""
    s = scales.astype(np.float64)
    if axis is not None:
        shape = [1] * w.ndim
        shape[axis] = -1
        s = s.reshape(shape)
    return np.clip(np.round(w.astype(np.float64) / s), -qmax, qmax).astype(np.int8)


class Histogram:
    """Counts over ``bins`` equal bins spanning the values seen so far."""

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        self.bins = bins
        self.counts: np.ndarray | None = None
        self.edges: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:
        lo, hi = float(x.min()), float(x.max())
        if self.edges is None:
            self.edges = _edges(lo, hi, self.bins)
            self.counts = np.zeros(self.bins)
        elif lo < self.edges[0] or hi > self.edges[-1]:
            self._rebin(min(lo, self.edges[0]), max(hi, self.edges[-1]))
        assert self.counts is not None
        counts, _ = np.histogram(x, bins=self.bins, range=(self.edges[0], self.edges[-1]))
        self.counts += counts

    def _rebin(self, lo: float, hi: float) -> None:
        assert self.edges is not None
        assert self.counts is not None
        new_edges = _edges(lo, hi, self.bins)
        self.counts = np.diff(self.cdf(new_edges))
        self.edges = new_edges

    def cdf(self, values: np.ndarray) -> np.ndarray:
        """Count of values below each of ``values`` (linear within a bin)."""
        assert self.edges is not None
        assert self.counts is not None
        cum = np.concatenate([[0.0], np.cumsum(self.counts)])
        return np.interp(values, self.edges, cum, left=0.0, right=cum[-1])

    def quantile(self, q: float) -> float:
        assert self.edges is not None
        assert self.counts is not None
        cum = np.concatenate([[0.0], np.cumsum(self.counts)])
        target = q * cum[-1]
        i = int(np.clip(np.searchsorted(cum, target, side="left"), 1, self.bins))
        lo_c, hi_c = cum[i - 1], cum[i]
        frac = 0.0 if hi_c <= lo_c else (target - lo_c) / (hi_c - lo_c)
        return float(self.edges[i - 1] + frac * (self.edges[i] - self.edges[i - 1]))


def _edges(lo: float, hi: float, bins: int) -> np.ndarray:
    if hi <= lo:  # a constant tensor so far: any positive width will be re-binned later
        hi = lo + max(abs(lo), 1.0) * 1e-6
    return np.linspace(lo, hi, bins + 1)


class TensorStats:
    """Streamed statistics of one tensor: running min/max and an optional histogram."""

    def __init__(self, histogram: bool, bins: int = DEFAULT_BINS) -> None:
        self.lo = np.inf
        self.hi = -np.inf
        self.hist = Histogram(bins) if histogram else None

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.size == 0 or x.dtype.kind != "f":
            return
        if not np.isfinite(x).all():
            x = x[np.isfinite(x)]
            if x.size == 0:
                return
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        if self.hist is not None:
            self.hist.add(x)

    @property
    def seen(self) -> bool:
        return self.lo <= self.hi

    def range(
        self, method: str = "minmax", percentile: float = 99.99, levels: int = 255
    ) -> tuple[float, float]:
        if not self.seen:
            raise ValueError("no values seen")
        if method == "minmax" or self.hist is None or self.lo == self.hi:
            return self.lo, self.hi
        if method == "percentile":
            cut = (100.0 - percentile) / 200.0
            lo, hi = self.hist.quantile(cut), self.hist.quantile(1.0 - cut)
        elif method == "entropy":
            t = _entropy_threshold(self.hist, max(abs(self.lo), abs(self.hi)))
            lo, hi = -t, t
        elif method == "mse":
            lo, hi = _mse_range(self.hist, min(self.lo, 0.0), max(self.hi, 0.0), levels)
        else:
            raise ValueError(f"calibration method must be one of {METHODS}, not '{method}'")
        lo, hi = max(self.lo, lo), min(self.hi, hi)
        return (lo, hi) if lo <= hi else (self.lo, self.hi)


def _entropy_threshold(hist: Histogram, absmax: float, quant_bins: int = 128) -> float:
    """TensorRT's KL-divergence threshold over the histogram of ``|x|``."""
    nb = hist.bins
    grid = np.linspace(0.0, absmax, nb + 1)
    inside = hist.cdf(grid) - hist.cdf(-grid)  # mass within [-g, g]
    counts = np.maximum(np.diff(inside), 0.0)
    total = counts.sum()
    if total <= 0:
        return absmax
    best_i, best_kl = nb, np.inf
    for i in np.unique(np.linspace(quant_bins, nb, 192).astype(int)):
        p = counts[:i].copy()
        p[-1] += counts[i:].sum()
        idx = np.arange(i) * quant_bins // i
        nonzero = counts[:i] > 0
        sums = np.bincount(idx, weights=counts[:i], minlength=quant_bins)
        nz = np.bincount(idx, weights=nonzero.astype(float), minlength=quant_bins)
        q = np.where(nonzero, (sums / np.maximum(nz, 1))[idx], 0.0)
        p, q = p / p.sum(), q / max(q.sum(), 1e-300)
        m = p > 0
        kl = float(np.sum(p[m] * np.log(p[m] / np.maximum(q[m], 1e-12))))
        if kl < best_kl:
            best_i, best_kl = int(i), kl
    return float(grid[best_i])


def _mse_range(hist: Histogram, lo: float, hi: float, levels: int) -> tuple[float, float]:
    assert hist.edges is not None
    assert hist.counts is not None
    centers = (hist.edges[:-1] + hist.edges[1:]) / 2
    n = hist.counts
    best, best_err = (lo, hi), np.inf
    for f in np.linspace(0.01, 1.0, 100):
        a, b = lo * f, hi * f
        s = (b - a) / levels
        outside = np.clip(centers, a, b) - centers
        err = float(np.sum(n * outside**2) + np.sum(n[outside == 0]) * s * s / 12)
        if err < best_err:
            best, best_err = (a, b), err
    return best


def collect_stats(
    model: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]],
    tensor_names: Sequence[str],
    histogram: bool = False,
    bins: int = DEFAULT_BINS,
    max_samples: int = 256,
    tick: Callable[[int, int], None] | None = None,
) -> dict[str, TensorStats]:
    """Run the model with ``tensor_names`` exposed as outputs and stream their statistics.

    The expose-and-run loop is ``onnxopt.capture.run_exposed``: ``model`` gets the extra
    outputs only while its session is built and is left as it was (a model over the
    protobuf limit is written to a temporary directory with external data first).
    ``tick(done, total)`` is called after each run; ``total`` is 0 when ``feeds`` is not
    a sequence (a stream has no known length).
    """
    wanted = list(dict.fromkeys(tensor_names))
    stats = {n: TensorStats(histogram, bins) for n in wanted}
    runs = 0
    for values in run_exposed(model, feeds, wanted, max_samples, tick):
        for name in wanted:
            stats[name].add(values[name])
        runs += 1
    logger.info("calibration: %d run(s), %d tensor(s)", runs, len(wanted))
    if runs == 0:
        raise InputDataError("calibration data is empty")
    return stats


def collect_ranges(
    model: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]],
    tensor_names: Sequence[str],
    method: str = "minmax",
    percentile: float = 99.99,
    levels: int = 255,
    bins: int = DEFAULT_BINS,
    max_samples: int = 256,
    tick: Callable[[int, int], None] | None = None,
) -> dict[str, tuple[float, float]]:
    """Tensor name -> calibrated ``(lo, hi)``; tensors that never held a finite value are absent."""
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, not '{method}'")
    stats = collect_stats(model, feeds, tensor_names, method != "minmax", bins, max_samples, tick)
    return {name: s.range(method, percentile, levels) for name, s in stats.items() if s.seen}
