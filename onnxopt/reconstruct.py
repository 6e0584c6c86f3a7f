"""Layer-wise least-squares refit (layer-wise distillation) for MatMul/Gemm and Conv.

After a layer loses input channels (pruning) its remaining weights no longer produce what
the original layer produced. Given the layer's input in the *compressed* model ``x`` and
its output in the *original* model ``y`` on the same calibration rows (``onnxopt.capture``
keeps the same rows for both), the refit solves

    min_{W, b}  ||x W + 1 b - y||^2  +  lam ||W||^2,     lam = ridge * trace(Xc^T Xc) / k

with ``Xc`` the centred ``x`` (plain ``x`` when ``bias=False``) and ``k`` its columns: the
penalty is ``ridge`` times ``n`` times the mean per-column variance, so it is relative to
the data and does not depend on the scale of the activations. The bias is not penalised.
Why a ridge at all: activations are often rank-deficient (dead ReLU channels, constant
border pixels, neighbouring im2col columns that are nearly equal), and a small ridge keeps
the solve stable and the weights from blowing up along directions the calibration data
never excites, at the price of a relative bias of about ``ridge`` on the fit
(``ridge=0`` gives the plain least-squares solution).

How it is solved: the normal equations are accumulated in float64 over chunks of rows,
each shifted by the first chunk's mean (so the centring loses no precision), then solved
directly (LU) when the condition number is below ~1e10, as the ridge alone guarantees
(``(trace + ridge) / ridge``) or else a Cholesky factor estimates; otherwise (not positive definite, or worse conditioned) by the pseudo-inverse through a
symmetric eigendecomposition: the minimum-norm solution, as ``lstsq`` gives, with the
eigenvalues below 1e-10 of the largest dropped (singular values of ``x`` below 1e-5 of the
largest: for float32 activations, directions the data does not resolve). Results are float32.

Memory: the Gram matrix, ``k^2`` float64 per group (a 512-channel 3x3 Conv: k = 4608,
170 MB), plus one chunk of about ``_CHUNK_VALUES`` values of rows; never all the rows in
float64. Conv uses im2col at sampled output positions (``max_positions``, drawn without
replacement with ``numpy.random.default_rng(seed)``), materialised a chunk at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np

_CHUNK_VALUES = 1 << 22  # values of im2col/rows per chunk (32 MB of float64)
_MAX_COND = 1e10  # beyond this (estimated from the Cholesky factor) use the pseudo-inverse


@contextlib.contextmanager
def blas_threads(n: int = 1) -> Iterator[None]:
    """numpy's BLAS held to ``n`` threads inside the block, when threadpoolctl is installed.

    The refits are Gram products and solves in float64. OpenBLAS starts a thread per core
    and spins while it waits: on a 2-core machine shared with other work, a pruning build on
    MobileNetV2 measured 8.4 s of CPU with its default threads and 2.3 s with one. onnxopt
    runs onnxruntime on one thread by default; the refits follow. Without threadpoolctl
    (not a dependency; scikit-learn brings it) BLAS keeps its own setting
    (``OPENBLAS_NUM_THREADS``).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield


class _NormalEquations:
    """Streamed normal equations of ``g`` independent problems ``x[:, i] -> y[:, i]``."""

    def __init__(self, groups: int, k: int, m: int, center: bool) -> None:
        self.center = center
        self.n = 0
        self.shift_x: np.ndarray | None = None
        self.shift_y: np.ndarray | None = None
        self.sx = np.zeros((groups, k))
        self.sy = np.zeros((groups, m))
        self.xx = np.zeros((groups, k, k))
        self.xy = np.zeros((groups, k, m))

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """``x`` [p, g, k] and ``y`` [p, g, m], the same rows."""
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        if not len(x):
            return
        if self.shift_x is None:
            self.shift_x = x.mean(axis=0) if self.center else np.zeros(x.shape[1:])
            self.shift_y = y.mean(axis=0) if self.center else np.zeros(y.shape[1:])
        x = (x - self.shift_x).transpose(1, 0, 2)  # [g, p, k]
        y = (y - self.shift_y).transpose(1, 0, 2)
        self.n += x.shape[1]
        self.sx += x.sum(axis=1)
        self.sy += y.sum(axis=1)
        if len(x) == 1:  # one problem: ``a.T @ a`` on one 2-D array is a BLAS syrk, 6x faster
            x0 = np.ascontiguousarray(x[0])
            self.xx[0] += x0.T @ x0
            self.xy[0] += x0.T @ y[0]
            return
        xt = x.transpose(0, 2, 1)
        self.xx += xt @ x
        self.xy += xt @ y

    def solve(self, ridge: float) -> tuple[np.ndarray, np.ndarray]:
        """``W`` [g, k, m] and ``b`` [g, m] (zero when not centred)."""
        if self.n == 0 or self.shift_x is None or self.shift_y is None:
            raise ValueError("no rows to fit")
        g, k, m = self.xy.shape
        dx, dy = self.sx / self.n, self.sy / self.n
        if self.center:  # about the mean: the bias takes the offset and is not penalised
            xx = self.xx - self.n * dx[:, :, None] * dx[:, None, :]
            xy = self.xy - self.n * dx[:, :, None] * dy[:, None, :]
        else:
            xx, xy = self.xx, self.xy
        w = np.empty((g, k, m))
        for i in range(g):
            w[i] = _solve_spd(xx[i], xy[i], ridge * max(np.trace(xx[i]), 0.0) / k)
        mean_x, mean_y = self.shift_x + dx, self.shift_y + dy
        b = mean_y - np.einsum("gk,gkm->gm", mean_x, w) if self.center else np.zeros((g, m))
        return w, b


def _solve_spd(a: np.ndarray, rhs: np.ndarray, lam: float) -> np.ndarray:
    """``(a + lam I)^-1 rhs``: solved directly, or by the pseudo-inverse when (near) singular.

    ``a`` is a Gram matrix (positive semi-definite): with ``lam > 0`` the condition number of
    ``a + lam I`` is at most ``(trace(a) + lam) / lam``, and when that is below the limit
    no factorization needs to vouch for it (a ridge of 1e-4 keeps it near ``1e4 k``).
    """
    bound = (max(np.trace(a), 0.0) + lam) / lam if lam > 0 else np.inf
    a = a + lam * np.eye(len(a))
    if bound < _MAX_COND:
        return np.linalg.solve(a, rhs)
    try:
        d = np.diag(np.linalg.cholesky(a))
        if d.min() > d.max() / np.sqrt(_MAX_COND):
            # one LU solve: numpy has no triangular solve, and two general ones on the
            # factors cost twice as much (the factor only vouches for the conditioning)
            return np.linalg.solve(a, rhs)
    except np.linalg.LinAlgError:
        pass
    e, v = np.linalg.eigh(a)
    keep = e > max(e.max(), 0.0) / _MAX_COND
    inv = np.where(keep, 1.0 / np.where(keep, e, 1.0), 0.0)
    return v @ (inv[:, None] * (v.T @ rhs))


def refit_linear(
    x: np.ndarray, y: np.ndarray, *, ridge: float = 1e-4, bias: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """``W`` [k, m] (float32) and ``b`` [m] (or None) so that ``x @ W + b`` fits ``y``.

    ``x`` [n, k] and ``y`` [n, m] are the same rows (a MatMul/Gemm input in the compressed
    model and its output in the original). Solves the ridge problem of the module
    docstring; ``ridge=0`` is ordinary least squares (minimum-norm when rank-deficient).
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"need x [n, k] and y [n, m] with the same n, got {x.shape}, {y.shape}")
    ne = _NormalEquations(1, x.shape[1], y.shape[1], center=bias)
    step = max(1, _CHUNK_VALUES // max(x.shape[1], y.shape[1], 1))
    for start in range(0, len(x), step):
        ne.add(x[start : start + step, None, :], y[start : start + step, None, :])
    w, b = ne.solve(ridge)
    return w[0].astype(np.float32), (b[0].astype(np.float32) if bias else None)


def conv_output_size(
    hw: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
    pads: Sequence[int], dilations: Sequence[int],
) -> tuple[int, int]:
    """(OH, OW) of a 2-D Conv; ``pads`` is ONNX's (top, left, bottom, right)."""
    out = tuple(
        (hw[i] + pads[i] + pads[i + 2] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
        for i in range(2)
    )
    if min(out) < 1:
        raise ValueError(f"the kernel does not fit: input {tuple(hw)}, output {out}")
    return out[0], out[1]


def sample_positions(total: int, positions: int | None, seed: int = 0) -> np.ndarray:
    """All of ``range(total)``, or ``positions`` of them without replacement, sorted."""
    if positions is None or positions >= total:
        return np.arange(total)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=positions, replace=False))


def im2col(
    x: np.ndarray,
    kernel: Sequence[int],
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
    *,
    positions: int | None = None,
    seed: int = 0,
    index: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Patches ``[P, C*kh*kw]`` of ``x`` [N, C, H, W] under a Conv window, and their positions.

    Columns are ordered ``(c, i, j)``, as ``weight.reshape(M, -1)`` of an ONNX Conv weight
    ``[M, C, kh, kw]``, so ``patches @ weight.reshape(M, -1).T`` is the Conv output at
    those positions (zero padding). ``index`` (returned, or given to reuse) holds flat
    positions into ``[N, OH, OW]``: all of them in order when ``positions`` is None, else
    ``positions`` drawn without replacement from ``default_rng(seed)``, sorted; pick the
    same rows of the target with ``output_rows(y, index)``. Memory: the padded input plus
    ``P * C * kh * kw`` values.
    """
    x = np.asarray(x)
    n, c, h, w = x.shape
    kh, kw = kernel
    oh, ow = conv_output_size((h, w), kernel, strides, pads, dilations)
    if index is None:
        index = sample_positions(n * oh * ow, positions, seed)
    ni, hi, wi = np.unravel_index(index, (n, oh, ow))
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    out = np.empty((len(index), c, kh, kw), x.dtype)
    for i in range(kh):
        for j in range(kw):
            out[:, :, i, j] = xp[ni, :, hi * strides[0] + i * dilations[0],
                                 wi * strides[1] + j * dilations[1]]
    return out.reshape(len(index), c * kh * kw), index


def output_rows(y: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``y`` [N, M, OH, OW] at flat positions ``index`` into [N, OH, OW], as rows [P, M]."""
    n, _, oh, ow = y.shape
    ni, hi, wi = np.unravel_index(index, (n, oh, ow))
    return y[ni, :, hi, wi]


def refit_conv(
    x: np.ndarray,
    y: np.ndarray,
    *,
    kernel: Sequence[int],
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
    group: int = 1,
    ridge: float = 1e-4,
    bias: bool = True,
    max_positions: int = 65536,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Conv weight ``[M, C'/group, kh, kw]`` (float32) and bias ``[M]`` (or None) fitting ``y``.

    ``x`` [N, C', H, W] is the Conv's input in the compressed model, ``y`` [N, M, OH, OW]
    its output in the original (same samples). Each output position is one row of a
    linear problem over its im2col patch; ``max_positions`` positions are sampled (see
    ``im2col``) and processed a chunk at a time. With ``group > 1`` each group is its own
    problem: output channels ``[g*M/G, (g+1)*M/G)`` from input channels
    ``[g*C'/G, (g+1)*C'/G)`` (depthwise: one input channel's ``kh*kw`` patch per output
    channel). ``pads`` is ONNX's (top, left, bottom, right); resolve ``auto_pad`` first.
    """
    x, y = np.asarray(x), np.asarray(y)
    n, c, h, w = x.shape
    kh, kw = kernel
    oh, ow = conv_output_size((h, w), kernel, strides, pads, dilations)
    m = y.shape[1] if y.ndim == 4 else -1
    if y.shape != (n, m, oh, ow):
        raise ValueError(f"y must be [{n}, M, {oh}, {ow}] for this Conv, got {list(y.shape)}")
    if c % group or m % group:
        raise ValueError(f"channels {c} in, {m} out do not divide into {group} groups")
    cg, mg = c // group, m // group
    index = sample_positions(n * oh * ow, max_positions, seed)
    ne = _NormalEquations(group, cg * kh * kw, mg, center=bias)
    step = max(1, _CHUNK_VALUES // (c * kh * kw))
    for start in range(0, len(index), step):
        part = index[start : start + step]
        patches, _ = im2col(x, kernel, strides, pads, dilations, index=part)
        ne.add(patches.reshape(len(part), group, cg * kh * kw),
               output_rows(y, part).reshape(len(part), group, mg))
    wg, bg = ne.solve(ridge)  # [G, Cg*kh*kw, Mg], [G, Mg]
    weight = wg.transpose(0, 2, 1).reshape(m, cg, kh, kw).astype(np.float32)
    return weight, (bg.reshape(m).astype(np.float32) if bias else None)


def conv_rows(
    patches: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None, group: int = 1
) -> np.ndarray:
    """Conv output rows ``[P, M]`` from ``im2col`` patches and an ONNX Conv weight (float64)."""
    m, cg = weight.shape[0], weight.shape[1]
    mg, kk = m // group, cg * weight.shape[2] * weight.shape[3]
    p = np.asarray(patches, np.float64).reshape(len(patches), group, kk).transpose(1, 0, 2)
    wt = np.asarray(weight, np.float64).reshape(group, mg, kk).transpose(0, 2, 1)
    out = (p @ wt).transpose(1, 0, 2).reshape(len(patches), m)
    return out + bias if bias is not None else out


def relative_error(pred: np.ndarray, target: np.ndarray) -> float:
    """``||pred - target||^2 / ||target||^2`` in float64 (0 for equal, inf for a zero target)."""
    pred = np.asarray(pred, np.float64)
    target = np.asarray(target, np.float64)
    num = float(np.sum((pred - target) ** 2))
    den = float(np.sum(target**2))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den
