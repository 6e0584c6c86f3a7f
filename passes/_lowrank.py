"""factorize-lowrank's helpers: where a low-rank pair beats the dense layer on this machine,
what one layer costs, the factors, and the spatial form's and Conv windows' bookkeeping.

``factorize-lowrank`` counts MACs, but two small GEMMs are not as fast per MAC as one large one:
the pair pays only below a *crossover*. It is measured once per machine (``onnxopt.machine.
measured``, key ``factorize-crossover``) on the layer shapes that matter (transformer MatMuls
``[1, 128, K] @ [K, N]``, a 3x3 Conv in channel and spatial form), as the MAC ratio
``pair / dense`` below which the pair is faster, and the rank multiple that pays (a rank just
below a multiple costs as much as the multiple). ``bench/factorize_crossover.py`` runs the
full table and writes ``bench/FACTORIZE_CROSSOVER.md``; the pass runs the bounded subset here
(a few seconds, once per machine).

All timings go through ``onnxopt.bench.measure_latency`` (1 intra-op thread, the calling
thread's CPU time, interleaved repetitions, medians) on tiny one-layer models with random weights.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper
from onnxopt.passes import _channel_multiple

from onnxopt.graph_utils import constant_value

KEY = "factorize-crossover"
VERSION = 1
SEQ = 128  # tokens per sample of the measured MatMuls (a BERT-base-like sequence)
# the in-run subset: (K, N) of transformer projections and feed-forwards, and fractions of full rank
MATMUL_SHAPES = ((384, 384), (384, 1536), (768, 3072))
CONV_SHAPES = ((64, 64, 28, 3),)  # (C in, M out, spatial, kernel)
SHARES = (0.25, 0.5, 0.75, 0.9, 1.0, 1.15)  # pair MACs / dense MACs of the measured ranks
MULTIPLE_RANKS = (40, 48, 52, 56, 60, 62, 63, 64)  # which rank multiple pays (768 x 768; 64-channel Conv)
MULTIPLES = (2, 4, 8, 16, 32)


@dataclasses.dataclass(frozen=True)
class Crossover:
    """The measured break-even of a pair against its dense layer, and the rank multiple that pays.

    ``matmul``/``conv``/``spatial``: a pair is taken only when its MACs are at most this share of
    the dense layer's (``r (K + N) / (K N)``); ``multiple``: ranks are rounded up to it.
    """

    matmul: float
    conv: float
    spatial: float
    matmul_multiple: int = 8
    conv_multiple: int = 16
    source: str = "measured"

    def limit(self, form: str) -> float:
        return {"matmul": self.matmul, "conv": self.conv, "spatial": self.spatial}[form]

    def multiple(self, form: str) -> int:
        return self.matmul_multiple if form == "matmul" else self.conv_multiple


def matmul_model(k: int, n: int, rank: int | None = None, seq: int = SEQ, seed: int = 0) -> onnx.ModelProto:
    """``[1, seq, K] @ [K, N]`` dense (``rank`` None) or through ``rank``."""
    rng = np.random.default_rng(seed)
    if rank is None:
        weights = {"w": rng.standard_normal((k, n)).astype(np.float32) / math.sqrt(k)}
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    else:
        weights = {"a": rng.standard_normal((k, rank)).astype(np.float32) / math.sqrt(k),
                   "b": rng.standard_normal((rank, n)).astype(np.float32) / math.sqrt(rank)}
        nodes = [helper.make_node("MatMul", ["x", "a"], ["h"]), helper.make_node("MatMul", ["h", "b"], ["y"])]
    return single_layer(nodes, "x", [1, seq, k], "y", weights, TensorProto.FLOAT)


def conv_model(c: int, m: int, hw: int, kernel: int, rank: int | None = None, spatial: bool = False,
               seed: int = 0) -> onnx.ModelProto:
    """A ``kernel`` x ``kernel`` Conv (pads keep ``hw``) dense, or its channel pair (``kernel``
    Conv to ``rank``, 1x1 to ``m``), or its spatial pair (``kernel`` x 1 to ``rank``, 1 x ``kernel``)."""
    rng = np.random.default_rng(seed)
    p = kernel // 2

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / math.sqrt(math.prod(shape[1:]))).astype(np.float32)

    if rank is None:
        weights = {"w": w(m, c, kernel, kernel)}
        nodes = [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[kernel, kernel], pads=[p] * 4)]
    elif spatial:
        weights = {"a": w(rank, c, kernel, 1), "b": w(m, rank, 1, kernel)}
        nodes = [helper.make_node("Conv", ["x", "a"], ["h"], kernel_shape=[kernel, 1], pads=[p, 0, p, 0]),
                 helper.make_node("Conv", ["h", "b"], ["y"], kernel_shape=[1, kernel], pads=[0, p, 0, p])]
    else:
        weights = {"a": w(rank, c, kernel, kernel), "b": w(m, rank, 1, 1)}
        nodes = [helper.make_node("Conv", ["x", "a"], ["h"], kernel_shape=[kernel, kernel], pads=[p] * 4),
                 helper.make_node("Conv", ["h", "b"], ["y"], kernel_shape=[1, 1])]
    return single_layer(nodes, "x", [1, c, hw, hw], "y", weights, TensorProto.FLOAT)


def time_models(models: dict[str, onnx.ModelProto], repeats: int = 15, max_seconds: float = 2.0
                ) -> dict[str, float]:
    """Median milliseconds of each model on one random input, interleaved."""
    from onnxopt.bench import measure_latency

    x = next(iter(models.values())).graph.input[0]  # every model reads the same input
    dims = [d.dim_value for d in x.type.tensor_type.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(x.type.tensor_type.elem_type)
    feed = {x.name: np.random.default_rng(1).standard_normal(dims).astype(dtype)}
    got = measure_latency(models, [feed], threads=1, repeats=repeats, warmup=2, max_seconds=max_seconds)
    return {k: v.median_ms for k, v in got.items()}


def break_even(macs: Sequence[float], ms: Sequence[float], dense_ms: float) -> float:
    """The MAC share (pair / dense) below which the pair is faster: the largest measured share
    whose pair (and every smaller one) beats the dense time, interpolated to the next share."""
    pts = sorted(zip(macs, ms, strict=True))
    best = 0.0
    for i, (share, t) in enumerate(pts):
        if t >= dense_ms:
            if i:  # linear interpolation between the last faster share and this one
                s0, t0 = pts[i - 1]
                best = s0 + (share - s0) * (dense_ms - t0) / max(t - t0, 1e-12)
            return round(best, 3)
        best = share
    return round(best, 3)


def _ranks(dense_macs: int, per_rank: int, full: int) -> list[int]:
    """Ranks whose pair costs ``SHARES`` of the dense MACs (at most ``full``, at least 4)."""
    return sorted({min(full, max(4, round(sh * dense_macs / per_rank))) for sh in SHARES})


def _row(ms: dict[str, float], ranks: list[int], shares: list[float]) -> dict[str, Any]:
    pair = [ms[str(r)] for r in ranks]
    return {"dense_ms": ms["dense"], "ranks": ranks, "shares": [round(x, 3) for x in shares], "pair_ms": pair,
            "break_even": break_even(shares, pair, ms["dense"])}


def measure_matmul(k: int, n: int, repeats: int = 15) -> dict[str, Any]:
    """Dense ``[1, SEQ, K] @ [K, N]`` against its pair at the ranks of ``SHARES``."""
    ranks = _ranks(k * n, k + n, min(k, n))
    ms = time_models({"dense": matmul_model(k, n), **{str(r): matmul_model(k, n, r) for r in ranks}}, repeats)
    return _row(ms, ranks, [r * (k + n) / (k * n) for r in ranks])


def measure_conv(c: int, m: int, hw: int, kk: int, spatial: bool, repeats: int = 15) -> dict[str, Any]:
    """A ``kk`` x ``kk`` Conv against its channel (or spatial) pair at the ranks of ``SHARES``."""
    per_rank = c * kk + m * kk if spatial else c * kk * kk + m
    full = min(c * kk, m * kk) if spatial else min(c * kk * kk, m)
    ranks = _ranks(c * m * kk * kk, per_rank, full)
    ms = time_models({"dense": conv_model(c, m, hw, kk),
                      **{str(r): conv_model(c, m, hw, kk, r, spatial) for r in ranks}}, repeats)
    return _row(ms, ranks, [r * per_rank / (c * m * kk * kk) for r in ranks])


def measure_multiples(repeats: int = 15) -> dict[str, Any]:
    """Pairs at ``MULTIPLE_RANKS`` (a 768 x 768 MatMul; a 64-channel 3x3 Conv at 28 x 28)."""
    mm = time_models({str(r): matmul_model(768, 768, r) for r in MULTIPLE_RANKS}, repeats)
    cv = time_models({str(r): conv_model(64, 64, 28, 3, r) for r in MULTIPLE_RANKS}, repeats)
    return {"matmul_ms": mm, "conv_ms": cv,
            "matmul": paying_multiple({int(r): t for r, t in mm.items()}),
            "conv": paying_multiple({int(r): t for r, t in cv.items()})}


def measure_subset(repeats: int = 15) -> dict[str, Any]:
    """The in-run measurement (a few seconds): break-even MAC shares per form, the multiples."""
    out: dict[str, Any] = {"matmul": {f"{k}x{n}": measure_matmul(k, n, repeats) for k, n in MATMUL_SHAPES}}
    for form in ("conv", "spatial"):
        out[form] = {f"{c}x{m}x{kk}x{kk}@{hw}": measure_conv(c, m, hw, kk, form == "spatial", repeats)
                     for c, m, hw, kk in CONV_SHAPES}
    out["multiples"] = measure_multiples(repeats)
    return out


def paying_multiple(ms: dict[int, float]) -> int:
    """The largest multiple ``m`` for which every measured rank off it is no faster than the next
    multiple of ``m`` above it (rounding up then costs nothing and keeps more of the layer)."""
    return _channel_multiple.paying_multiple(ms, MULTIPLES, _channel_multiple.up)


def summarize(result: dict[str, Any]) -> Crossover:
    """The pass's thresholds: per form, the smallest break-even over the measured shapes."""
    def low(form: str) -> float:
        values = [v["break_even"] for v in result.get(form, {}).values()]
        return min(values) if values else 0.0

    multiples = result.get("multiples", {})
    return Crossover(low("matmul"), low("conv"), low("spatial"), int(multiples.get("matmul", 8)),
                     int(multiples.get("conv", 16)))


@functools.lru_cache(maxsize=1)
def measured_crossover() -> Crossover:
    """This machine's crossover: from the per-machine cache, else measured now (a few seconds)."""
    from onnxopt import machine

    return summarize(machine.measured(KEY, measure_subset, version=VERSION))


_LATENCY: dict[str, tuple[float, float]] = {}  # signature -> (original ms, pair ms), per process


def layer_latency(original: onnx.ModelProto, pair: onnx.ModelProto) -> tuple[float, float]:
    """Milliseconds of one layer and of its factor pair, each as a tiny model, timed together.

    Memoized on the two models' structure (ops, attributes, weight shapes, input shape): the
    layers of a transformer share a few shapes, and the lossy driver builds many candidates.
    """
    key = _signature(original) + "|" + _signature(pair)
    if key not in _LATENCY:
        ms = time_models({"original": original, "pair": pair})
        _LATENCY[key] = (ms["original"], ms["pair"])
    return _LATENCY[key]


def _signature(model: onnx.ModelProto) -> str:
    g = model.graph
    return repr(([(n.op_type, sorted((a.name, str(helper.get_attribute_value(a))) for a in n.attribute))
                  for n in g.node], [tuple(t.dims) for t in g.initializer],
                 [d.dim_value for d in g.input[0].type.tensor_type.shape.dim]))


def single_layer(nodes: Sequence[Any], x_name: str, x_shape: Sequence[int], y_name: str,
                 weights: dict[str, np.ndarray], elem_type: int) -> onnx.ModelProto:
    """A model of ``nodes`` (NodeProtos) reading ``x`` of a fixed shape and the given weights."""
    graph = helper.make_graph(list(nodes), "layer", [helper.make_tensor_value_info(x_name, elem_type, x_shape)],
                              [helper.make_tensor_value_info(y_name, elem_type, None)],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def layer_model(nodes: list[gs.Node], dtype: np.dtype, is_conv: bool) -> onnx.ModelProto | None:
    """``nodes`` (the layer, or its pair) alone as a model for timing: the input's unknown dims
    pinned (batch 1; other MatMul dims ``_lowrank.SEQ``); None when a Conv's size is unknown."""
    x, y = nodes[0].inputs[0], nodes[-1].outputs[0]
    shape = []
    for i, d in enumerate(x.shape or []):
        if isinstance(d, int) and d > 0:
            shape.append(d)
        elif i == 0:
            shape.append(1)
        elif not is_conv:
            shape.append(SEQ)
        else:
            return None
    if not shape:
        return None
    protos, weights = [], {}
    for n in nodes:
        for t in n.inputs:
            if isinstance(t, gs.Constant):
                weights[t.name] = np.asarray(constant_value(t))
        protos.append(onnx.helper.make_node(n.op, [t.name for t in n.inputs], [t.name for t in n.outputs],
                                            **{k: v for k, v in n.attrs.items()}))
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return single_layer(protos, x.name, shape, y.name, weights, elem)


def timing(original: onnx.ModelProto, pair: onnx.ModelProto | None) -> dict[str, Any]:
    """The notes' latency fields: the layer and its pair, each timed alone on this machine."""
    if pair is None:
        return {}
    before, after = layer_latency(original, pair)
    dims = [d.dim_value for d in original.graph.input[0].type.tensor_type.shape.dim]
    return {"latency_ms_before": round(before, 4), "latency_ms_after": round(after, 4), "latency_input": dims}


# ---- spatial form: W[M, C, kh, kw] as the matrix [(C, kh), (kw, M)]


def spatial_matrix(w4: np.ndarray) -> np.ndarray:
    """``W'[(c, i), (j, m)] = W[m, c, i, j]``: a rank-r factorization ``A B`` of it is a kh x 1
    Conv to r channels (A) followed by a 1 x kw Conv to M (B)."""
    m, c, kh, kw = w4.shape
    return np.ascontiguousarray(w4.transpose(1, 2, 3, 0).reshape(c * kh, kw * m))


def spatial_strips(patches: np.ndarray, c: int, kh: int, kw: int) -> np.ndarray:
    """im2col rows ``[n, (c, i, j)]`` as the column strips ``[n * kw, (c, i)]`` the first
    factor reads (whitening for the spatial form: their pooled second moment)."""
    n = len(patches)
    return patches.reshape(n, c, kh, kw).transpose(0, 3, 1, 2).reshape(n * kw, c * kh)


def spatial_rows(a: np.ndarray, b: np.ndarray, kw: int) -> tuple[np.ndarray, np.ndarray]:
    """The pair as a linear map of im2col rows: ``(A_rows [(c, i, j), (j, r)], B_rows [(j, r), M])``
    with ``patches @ A_rows @ B_rows`` the pair's output (``A`` [C kh, r], ``B`` [r, kw M])."""
    ckh, r = a.shape
    m = b.shape[1] // kw
    a_rows = np.zeros((ckh, kw, kw, r), a.dtype)
    for j in range(kw):
        a_rows[:, j, j, :] = a
    return a_rows.reshape(ckh * kw, kw * r), b.reshape(r, kw, m).transpose(1, 0, 2).reshape(kw * r, m)


def spatial_weights(a: np.ndarray, b_rows: np.ndarray, c: int, kh: int, kw: int) -> tuple[np.ndarray, np.ndarray]:
    """Conv weights ``[r, C, kh, 1]`` and ``[M, r, 1, kw]`` from ``A`` [C kh, r] and ``B_rows``."""
    r = a.shape[1]
    m = b_rows.shape[1]
    first = a.reshape(c, kh, r).transpose(2, 0, 1)[..., None]
    second = b_rows.reshape(kw, r, m).transpose(2, 1, 0)[:, :, None, :]
    return np.ascontiguousarray(first), np.ascontiguousarray(second)


# ---- factors


def round_rank(r: float, multiple: int) -> int:
    """``r`` rounded up to a multiple of ``multiple`` (at least one multiple)."""
    return max(multiple, multiple * math.ceil(r / multiple - 1e-9))


def factor_basis(w: np.ndarray, x: np.ndarray | None, whiten_ridge: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(A [K, q], B [q, N], s [q])``, ``q = min(K, N)``: ``A[:, :r] @ B[:r]`` is the best rank-r
    fit of ``w`` (Eckart-Young), ``s`` the singular values it truncates; plain when ``x`` is
    None, else in the norm of ``x``'s outputs (whitened)."""
    w = np.asarray(w, np.float64)
    chol = None
    if x is not None and len(x):
        x = np.asarray(x, np.float64)
        gram = x.T @ x / len(x)
        scale = float(np.trace(gram)) / len(gram)
        if scale > 0.0:
            chol = np.linalg.cholesky(gram + whiten_ridge * scale * np.eye(len(gram)))
    a, b, s = truncation_basis(w if chol is None else chol.T @ w)
    return (a if chol is None else np.linalg.solve(chol.T, a)), b, s


def truncation_basis(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``m = A @ B`` with the singular directions of ``m`` in decreasing order: the leading
    singular vectors on the smaller side (orthonormal), ``m`` projected on them on the other.

    Through the symmetric eigendecomposition of the smaller Gram matrix, not ``svd``: the
    leading directions are as accurate, and LAPACK's gesdd measured 20-80x slower here
    (2.9 s for one 384 x 1536 weight on this machine's OpenBLAS).
    """
    k, n = m.shape
    e, vec = np.linalg.eigh(m @ m.T if k <= n else m.T @ m)
    order = np.argsort(e)[::-1]
    vec = vec[:, order]
    s = np.sqrt(np.clip(e[order], 0.0, None))
    if k <= n:
        return vec, vec.T @ m, s
    return m @ vec, vec.T, s


# ---- Conv windows


def explicit_pads(conv: Mapping[str, Any], hw: tuple[int, ...]) -> list[int]:
    """ONNX pads (top, left, bottom, right), resolving ``auto_pad`` for an input of size ``hw``."""
    mode = conv["auto_pad"]
    if mode in ("NOTSET", ""):
        return list(conv["pads"])
    if mode == "VALID":
        return [0, 0, 0, 0]
    begin, end = [], []
    for i in range(2):
        s, k, d = conv["strides"][i], conv["kernel"][i], conv["dilations"][i]
        total = max((-(-hw[i] // s) - 1) * s + (k - 1) * d + 1 - hw[i], 0)
        small = total // 2
        begin.append(small if mode == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return begin + end


def spatial_attrs(conv: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The kh x 1 Conv takes the window's rows (stride, pads, dilation), the 1 x kw its columns."""
    (kh, kw), (sh, sw), (dh, dw) = conv["kernel"], conv["strides"], conv["dilations"]
    top, left, bottom, right = conv["pads"]
    return ({"kernel_shape": [kh, 1], "strides": [sh, 1], "pads": [top, 0, bottom, 0], "dilations": [dh, 1]},
            {"kernel_shape": [1, kw], "strides": [1, sw], "pads": [0, left, 0, right], "dilations": [1, dw]})
