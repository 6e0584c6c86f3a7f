"""Low-rank factorization of MatMul, Gemm and Conv weights: one layer becomes two through rank r.

    MatMul(X, W[K, N])                ->  MatMul(MatMul(X, A[K, r]), B[r, N])
    Gemm(X, W, C; alpha, beta, transB) ->  Gemm(MatMul(X, A), B, C'; beta, transB)   (alpha folded)
    Conv(X, W[M, C, kh, kw], b)       ->  Conv1x1(Conv_kxk(X, A[r, C, kh, kw]), B[M, r, 1, 1], b)
    Conv(X, W[M, C, kh, kw], b)       ->  Conv_1xkw(Conv_khx1(X, A[r, C, kh, 1]), B[M, r, 1, kw], b)   (spatial)

A Conv is a linear layer over its im2col patches (``K = C*kh*kw``, ``N = M``): the first Conv
keeps the window (strides, pads, dilations, auto_pad) and has r output channels, the second is
a 1x1 Conv to M with the bias; a 1x1 Conv is the same thing with K = C. Activations may have any
known rank (``[B, S, K]`` tokens of a transformer included). The *spatial* form factors the
matrix ``W'[(c, i), (j, m)] = W[m, c, i, j]`` (``K = C*kh``, ``N = kw*M``): the kh x 1 Conv takes
the window's rows (stride, pads, dilation), the 1 x kw Conv its columns; it is exact for a
separable kernel. ``conv_form``: ``auto`` tries both on a k x k Conv and keeps the one whose
chosen rank costs fewer MACs; ``channel``/``spatial`` force one.

Factors (``method``), both the Eckart-Young truncation of a matrix (computed through the
eigendecomposition of its smaller Gram matrix, see ``_lowrank.truncation_basis``):
- ``svd``: of ``W`` itself: ``A = U_r``, ``B = U_r^T W`` (or ``W V_r``, ``V_r^T`` when K > N).
- ``activation`` (``auto`` picks it when calibration data is given): with X the layer's input
  rows on the calibration data (patches for a Conv) and ``X^T X / n + lam I = L L^T`` (Cholesky;
  ``lam = whiten_ridge`` times the mean diagonal), ``||X W - X W'||_F = sqrt(n) ||L^T (W - W')||_F``
  (up to the ridge), so the best rank-r ``W'`` for the layer's *outputs* is the truncation of
  ``L^T W`` mapped back by ``L^-T`` (SVD-LLM; ASVD). For the spatial form X is the patches'
  column strips ``[(c, i)]`` pooled over j (correlations across the kernel's columns are left out).
With calibration data, ``B`` and the bias are then refit by ridge least squares
(``onnxopt.reconstruct.refit_linear``, ``ridge``) from the first factor's outputs ``X A`` to the
original layer's outputs on the same rows; the refit is kept only when it lowers the error.
(Activation-aware factors are already the least-squares ``B`` for their ``A``: the refit then
adds the bias's re-centring and little else; after plain SVD it matters.) ``sequential``: the
layers after the first are fitted (whitening and refit) on the input they read once the layers
before them are factorized (one capture run per layer), still against the original outputs.
Rows: up to 4096 per MatMul/Gemm layer, 64 samples per Conv layer (positions sampled from them),
captured with ``onnxopt.capture`` for as many layers at once as fit in 512 MB.

Rank r (``full = min(K, N)``): ``keep`` (JSON object or file: layer key -> fraction of full rank)
wins for the layers it names; otherwise the largest rank asked for by ``rank_fraction``,
``energy`` (smallest r whose singular values keep this fraction of sum s^2; of the whitened
spectrum when activation-aware) and ``max_error`` (smallest r whose relative squared output
error ``||Y' - Y||^2 / ||Y||^2`` on the calibration rows is within budget, after the refit);
``rank_fraction`` is 0.5 when none is given. r is rounded up to a multiple of ``rank_multiple``
(default: the multiple measured to pay on this machine, per MatMul and Conv).

A pair is only worth it where it is faster: ``crossover`` is the largest share of the layer's MACs
the pair may cost (``r (K + N) / (K N)``; the spatial form's first Conv runs at ``s_w`` times the
output columns). Default: the break-even measured on this machine's onnxruntime, per form, once
and cached (``_lowrank.measured_crossover``; ``bench/FACTORIZE_CROSSOVER.md``); <= 0 turns the
check off. ``time_layers`` (default on) times each factorized layer alone against its pair.

Declined, counted as ``skipped:<reason>`` and listed in the notes: ``subgraph`` (inside If/Loop/
Scan bodies: never touched), ``weight-not-constant``, ``weight-not-2d``, ``conv-not-2d``,
``dtype`` (not float32/float64), ``shared-weight`` (the weight has another reader),
``graph-output`` (the weight is also a graph output: it would stay; an initializer that is also
a graph input can be fed, so it is ``weight-not-constant``),
``constant-input``, ``gemm-transA``, ``grouped`` (grouped and depthwise Conv),
``bias-not-constant``, ``bias-shape`` (a Gemm C that is not one row), ``unknown-shape`` (the
activation's rank is not known), ``full-rank`` (r not below full), ``no-saving``
(``K N / (r (K + N))`` not above ``min_params_saving``), ``error-budget`` (no rank that saves meets
``max_error``), ``crossover`` (the pair's MAC share above the crossover: it would not be faster),
``spatial-kernel`` (``conv_form=spatial`` on a kernel with a side of 1).

``ctx.notes["factorize-lowrank"]``: ``layers`` (key -> ``op``, ``method``, ``rank``, ``full_rank``,
``energy``, ``params_before``/``params_after`` (weights and bias), ``macs_before``/``macs_after``
per row (a token, a sample, or a Conv output position), ``rows_per_sample`` (None if unknown),
``error_before_refit``/``error_after_refit``/``refit_applied`` (None without data), ``form``
(``matmul``, ``conv`` or ``spatial``), with ``time_layers`` ``latency_ms_before``/``latency_ms_after``
and ``latency_input`` (the pinned input shape: batch 1, other unknown MatMul dims 128)),
``skipped`` (key -> reason) and ``crossover`` (the limits and multiples used, and their source).
Layer keys: ``onnxopt.graph_utils.layer_key``.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnxopt.passes import _lowrank

from onnxopt.errors import MissingRequirementError, PassOptionError
from onnxopt.graph_utils import (
    constant_value,
    is_default_domain,
    is_graph_output,
    iter_graphs,
    layer_key,
    make_constant,
)
from onnxopt.pass_base import Pass, PassContext, PassResult, current_model, parse_fractions

NAME = "factorize-lowrank"
_OPS = ("MatMul", "Gemm", "Conv")
_DTYPES = (np.float32, np.float64)
_ROWS = 4096  # calibration rows per MatMul/Gemm layer
_CONV_SAMPLES = 64  # calibration samples per Conv layer (positions are sampled from them)
_PATCH_VALUES = 1 << 24  # im2col values per Conv layer (positions = this / K, capped)
_CAPTURE_BYTES = 1 << 29  # captured rows held at once: layers are captured in chunks of this


@dataclasses.dataclass(eq=False)
class _Layer:
    node: gs.Node
    key: str
    w: np.ndarray  # [K, N] float64: what multiplies the rows (alpha folded, transB undone)
    bias: np.ndarray | None  # [N] float64 added to every row (Gemm: beta * C), or None
    dtype: np.dtype
    rows_per_sample: int | None
    conv: dict[str, Any] | None = None  # kernel, strides, pads, dilations, auto_pad, channels
    form: str = "matmul"  # "matmul" (also Gemm), "conv" (channel form) or "spatial"
    w4: np.ndarray | None = None  # a Conv's weight [M, C, kh, kw] as given

    @property
    def kernel(self) -> tuple[int, int]:
        return tuple(self.conv["kernel"]) if self.conv else (1, 1)  # type: ignore[return-value]

    def macs_after(self, r: int) -> int:
        """The pair's MACs per output row (a token, a sample, a Conv output position). The
        spatial form's first Conv runs at every input column: ``s_w`` times per output."""
        k, n = self.w.shape
        if self.form != "spatial":
            return r * (k + n)
        return r * k * int(self.conv["strides"][1]) + r * n


def parse_keep(spec: str) -> dict[str, float]:
    """``keep``: a JSON object, or the path of a JSON file, of layer key -> rank fraction."""
    return parse_fractions(NAME, spec, "layer", "rank fractions")


class FactorizeLowRankPass(Pass):
    """Factorize MatMul/Gemm/Conv weights through a lower rank (SVD or activation-aware)."""

    name = NAME
    exact = False

    @dataclasses.dataclass(frozen=True)
    class Options:
        rank_fraction: float | None = None  # of full rank min(K, N); 0.5 when nothing is given
        energy: float | None = None  # retained fraction of sum s^2
        max_error: float | None = None  # relative squared output error per layer (needs data)
        # ranks are rounded up to this; None: the multiple measured to pay on this machine
        rank_multiple: int | None = None
        keep: str = ""  # JSON object or file: layer key -> rank fraction (wins over the rest)
        min_params_saving: float = 1.0  # K*N / (r*(K+N)) must exceed this
        # the pair's MACs / the layer's must be at most this; None: the break-even measured on
        # this machine (``_lowrank``, cached per machine); <= 0: no latency check
        crossover: float | None = None
        conv_form: Literal["auto", "channel", "spatial"] = "auto"  # auto: fewer MACs of the two
        time_layers: bool = True  # time each factorized layer against its pair (tiny models)
        method: Literal["auto", "svd", "activation"] = "auto"
        refit: bool = True  # refit B and the bias on calibration data
        ridge: float = 1e-4  # of the refit (onnxopt.reconstruct)
        whiten_ridge: float = 1e-3  # added to X^T X / n, relative to its mean diagonal
        sequential: bool = False  # refit on the input with the earlier layers factorized

    def check(self, graph: gs.Graph, ctx: PassContext) -> None:
        o = self.options
        for field, value in (("rank_fraction", o.rank_fraction), ("energy", o.energy)):
            if value is not None and not 0.0 < value <= 1.0:
                raise PassOptionError(f"pass '{NAME}': {field} must be in (0, 1], got {value}")
        if o.max_error is not None and o.max_error < 0.0:
            raise PassOptionError(f"pass '{NAME}': max_error must be >= 0, got {o.max_error}")
        if (o.rank_multiple is not None and o.rank_multiple < 1) or o.min_params_saving <= 0.0:
            raise PassOptionError(
                f"pass '{NAME}': rank_multiple must be >= 1 and min_params_saving > 0")
        parse_keep(o.keep)
        if not ctx.calibration and (o.method == "activation" or o.max_error is not None):
            what = "method=activation" if o.method == "activation" else "max_error"
            raise MissingRequirementError(f"pass '{NAME}' with {what} needs calibration data; "
                                          "supply --calibration-data FILE.npz")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        stats: Counter[str] = Counter()
        skipped: dict[str, str] = {}

        def decline(key: str, reason: str) -> None:
            stats[f"skipped:{reason}"] += 1
            skipped[key] = reason

        for sub in list(iter_graphs(graph))[1:]:
            for n in sub.nodes:
                if n.op in _OPS and is_default_domain(n):
                    decline(layer_key(n), "subgraph")
        layers: list[list[_Layer]] = []  # per layer, the forms it may take
        for node in graph.nodes:
            if node.op not in _OPS or not is_default_domain(node) or len(node.inputs) < 2:
                continue
            found = _layer(graph, node)
            views = found if isinstance(found, str) else _forms(found, o.conv_form)
            if isinstance(views, str):
                decline(layer_key(node), views)
            else:
                layers.append(views)
        keep = parse_keep(o.keep)
        known = {views[0].key for views in layers}
        unknown = sorted(set(keep) - known - set(skipped))
        if unknown:
            raise PassOptionError(f"pass '{NAME}': keep names unknown layers {unknown}; the "
                                  f"layers are {sorted(known)}")
        self._limits = self._crossover() if layers else None
        # layers whose rank is fixed by a fraction can be declined before any data is read
        fixed = o.energy is None and o.max_error is None
        for views in list(layers):
            key = views[0].key
            if key in keep or fixed:
                reasons = [self._rank_decline(v, self._fraction_rank(v, keep.get(key, o.rank_fraction or 0.5)))
                           for v in views]
                if all(reasons):
                    decline(key, str(reasons[0]))
                    layers.remove(views)
                else:
                    views[:] = [v for v, why in zip(views, reasons, strict=True) if not why]
        reference = current_model(graph, ctx) if ctx.calibration and layers else None
        aware = o.method == "activation" or (o.method == "auto" and reference is not None)
        report: dict[str, Any] = {}
        pending: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        replaced: dict[int, list[gs.Node]] = {}  # id(layer node) -> its pair, not yet in graph.nodes

        def splice() -> None:  # one rebuild of the node list for all the pairs since the last
            graph.nodes = [m for n in graph.nodes for m in replaced.get(id(n), [n])]
            replaced.clear()

        for i, views in enumerate(layers):  # in topological order
            la = views[0]
            x = y = None
            if reference is not None:  # the layer's own input and output in the model as given
                if la.key not in pending:  # the next layers whose rows fit in memory, in one run
                    pending = _capture(reference, ctx, _chunk([v[0] for v in layers[i:]]))
                x, y = pending.pop(la.key)
            chosen = self._best_form(views, keep, x if aware else None, x, y)
            if isinstance(chosen, str):
                decline(la.key, chosen)
                continue
            la, r, (a_full, b_full, s) = chosen
            if reference is not None and o.sequential and report:
                # what the layer reads now that the layers before it are factorized
                splice()
                x = _capture(current_model(graph, ctx), ctx, [la], outputs=False)[la.key][0]
                if aware:
                    a_full, b_full, _ = _lowrank.factor_basis(la.w, _whitening_rows(la, x), o.whiten_ridge)
            a, b, bias, entry = self._fit(la, a_full[:, :r], b_full[:r], x, y)
            entry.update(method="activation" if aware else "svd",
                         energy=float((s[:r] ** 2).sum() / max((s**2).sum(), 1e-300)))
            conv = la.conv is not None
            original = _lowrank.layer_model([la.node], la.dtype, conv) if o.time_layers else None
            new = _rewrite(la, a, b, bias, ctx)
            if original is not None:
                entry.update(_lowrank.timing(original, _lowrank.layer_model(new, la.dtype, conv)))
            replaced[id(la.node)] = new
            report[la.key] = entry
            stats["factorized"] += 1
            if la.form == "spatial":
                stats["spatial"] += 1
        if report:
            splice()
            graph.cleanup()
        ctx.notes[NAME] = {"layers": report, "skipped": skipped}
        if self._limits is not None:
            c = self._limits
            ctx.notes[NAME]["crossover"] = {"matmul": c.matmul, "conv": c.conv, "spatial": c.spatial,
                                            "matmul_multiple": c.matmul_multiple,
                                            "conv_multiple": c.conv_multiple, "source": c.source}
        return PassResult(changed=bool(report), stats=dict(stats))

    def _crossover(self) -> _lowrank.Crossover:
        """The options' crossover and multiple, what they leave open measured on this machine."""
        o = self.options
        if o.crossover is not None and o.rank_multiple is not None:
            v = o.crossover
            return _lowrank.Crossover(v, v, v, o.rank_multiple, o.rank_multiple, "options")
        m = _lowrank.measured_crossover()
        if o.crossover is not None:
            m = dataclasses.replace(m, matmul=o.crossover, conv=o.crossover, spatial=o.crossover)
        if o.rank_multiple is not None:
            m = dataclasses.replace(m, matmul_multiple=o.rank_multiple, conv_multiple=o.rank_multiple)
        return m

    def _best_form(self, views: list[_Layer], keep: Mapping[str, float], whiten: np.ndarray | None,
                   x: np.ndarray | None, y: np.ndarray | None
                   ) -> tuple[_Layer, int, tuple[np.ndarray, np.ndarray, np.ndarray]] | str:
        """The form (of a Conv: channel or spatial) whose chosen rank costs the fewest MACs,
        with its rank and factor basis; or the first form's decline reason."""
        best, first_reason = None, ""
        for v in views:
            basis = _lowrank.factor_basis(v.w, None if whiten is None else _whitening_rows(v, whiten),
                                 self.options.whiten_ridge)
            r = self._choose_rank(v, keep, *basis, x, y)
            if isinstance(r, str):
                first_reason = first_reason or r
            elif best is None or v.macs_after(r) < best[0].macs_after(best[1]):
                best = (v, r, basis)
        return best if best is not None else first_reason

    # ---- rank ----
    def _multiple(self, la: _Layer) -> int:
        assert self._limits is not None
        return self._limits.multiple(la.form)

    def _fraction_rank(self, la: _Layer, fraction: float) -> int:
        return _lowrank.round_rank(fraction * min(la.w.shape), self._multiple(la))

    def _rank_decline(self, la: _Layer, r: int) -> str | None:
        k, n = la.w.shape
        if r >= min(k, n):
            return "full-rank"
        if k * n <= self.options.min_params_saving * r * (k + n):
            return "no-saving"
        limit = self._limits.limit(la.form) if self._limits is not None else 0.0
        if limit > 0.0 and la.macs_after(r) > limit * k * n:
            return "crossover"
        return None

    def _choose_rank(self, la: _Layer, keep: Mapping[str, float], a_full: np.ndarray, b_full: np.ndarray,
                     s: np.ndarray, x: np.ndarray | None, y: np.ndarray | None) -> int | str:
        o = self.options
        step = self._multiple(la)
        if la.key in keep or (o.energy is None and o.max_error is None):
            r = self._fraction_rank(la, keep.get(la.key, o.rank_fraction or 0.5))
            return self._rank_decline(la, r) or r
        ranks = []
        if o.rank_fraction is not None:
            ranks.append(self._fraction_rank(la, o.rank_fraction))
        if o.energy is not None:
            cum = np.cumsum(s**2) / max(float((s**2).sum()), 1e-300)
            ranks.append(_lowrank.round_rank(int(np.searchsorted(cum, o.energy - 1e-12)) + 1, step))
        r = max(ranks, default=step)
        if reason := self._rank_decline(la, r):
            return reason
        if o.max_error is not None and x is not None and y is not None:
            # the smallest multiple within budget, by bisection (error falls as r grows)
            lo, hi = r, r
            while not self._rank_decline(la, hi + step):
                hi += step
            if self._error(la, a_full, b_full, hi, x, y) > o.max_error:
                return "error-budget"
            while lo < hi:
                mid = lo + step * ((hi - lo) // step // 2)
                if self._error(la, a_full, b_full, mid, x, y) <= o.max_error:
                    hi = mid
                else:
                    lo = mid + step
            r = hi
        return r

    def _error(self, la: _Layer, a_full: np.ndarray, b_full: np.ndarray, r: int,
               x: np.ndarray, y: np.ndarray) -> float:
        entry = self._fit(la, a_full[:, :r], b_full[:r], x, y)[3]
        return float(entry["error_after_refit"])

    # ---- factors ----
    def _fit(self, la: _Layer, a: np.ndarray, b: np.ndarray, x: np.ndarray | None,
             y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict]:
        """The first factor and the second *as a map of the first's outputs* (``B`` itself, or for
        the spatial form ``B_rows``, see ``_lowrank.spatial_rows``) cast to the weight dtype, the
        bias, and the notes entry (errors on the calibration rows)."""
        from onnxopt.reconstruct import refit_linear, relative_error

        k, n = la.w.shape
        r = a.shape[1]
        nb = 0 if la.bias is None else la.bias.shape[0]
        entry: dict[str, Any] = {
            "op": la.node.op, "form": la.form, "rank": r, "full_rank": min(k, n),
            "params_before": k * n + nb, "params_after": r * (k + n) + nb,
            "macs_before": k * n, "macs_after": la.macs_after(r),
            "rows_per_sample": la.rows_per_sample,
            "error_before_refit": None, "error_after_refit": None, "refit_applied": False,
        }
        a = a.astype(la.dtype)
        if la.form == "spatial":
            a_rows, b = _lowrank.spatial_rows(a.astype(np.float64), b, la.kernel[1])
        else:
            a_rows = a.astype(np.float64)
        b, bias = b.astype(la.dtype), la.bias
        if x is None or y is None:
            return a, b, bias, entry
        h = np.asarray(x, np.float64) @ a_rows
        offset = 0.0 if bias is None else bias
        before = relative_error(h @ b.astype(np.float64) + offset, y)
        entry["error_before_refit"] = entry["error_after_refit"] = before
        if self.options.refit:
            b2, bias2 = refit_linear(h, y, ridge=self.options.ridge, bias=bias is not None)
            after = relative_error(h @ b2.astype(np.float64) + (0.0 if bias2 is None else bias2), y)
            if after < before:
                b, bias = b2.astype(la.dtype), None if bias2 is None else bias2.astype(np.float64)
                entry.update(error_after_refit=after, refit_applied=True)
        return a, b, bias, entry


def _forms(la: _Layer, conv_form: str) -> list[_Layer] | str:
    """The forms a layer may take: MatMul/Gemm one; a k x k Conv its channel form, its spatial
    form (k x 1 then 1 x k), or both (``auto``); a Conv with a side of 1 only the channel form."""
    if la.conv is None:
        return [la]
    kh, kw = la.kernel
    if kh == 1 or kw == 1:
        return "spatial-kernel" if conv_form == "spatial" else [la]
    spatial = _spatial(la)
    if conv_form == "spatial":
        return spatial if isinstance(spatial, str) else [spatial]
    return [la] if conv_form == "channel" or isinstance(spatial, str) else [la, spatial]


def _spatial(la: _Layer) -> _Layer | str:
    """The spatial view of a Conv layer: ``w`` is ``[(C, kh), (kw, M)]``; pads made explicit."""
    assert la.conv is not None
    assert la.w4 is not None
    conv = dict(la.conv)
    if conv["auto_pad"] not in ("NOTSET", ""):
        hw = [d if isinstance(d, int) and d > 0 else None for d in (la.node.inputs[0].shape or [])[2:]]
        if len(hw) != 2 or None in hw:
            return "unknown-shape"  # SAME padding is split between the two Convs: needs the size
        conv.update(pads=_lowrank.explicit_pads(conv, tuple(hw)), auto_pad="NOTSET")
    return dataclasses.replace(la, w=_lowrank.spatial_matrix(la.w4.astype(np.float64)), conv=conv,
                               form="spatial")


def _whitening_rows(la: _Layer, x: np.ndarray) -> np.ndarray:
    """The rows the first factor reads: ``x`` itself, or a spatial pair's column strips."""
    if la.form != "spatial":
        return x
    kh, kw = la.kernel
    return _lowrank.spatial_strips(x, la.conv["channels"], kh, kw)


def _layer(graph: gs.Graph, node: gs.Node) -> _Layer | str:
    """The layer as a linear map of rows, or why it is declined."""
    x, wt = node.inputs[0], node.inputs[1]
    w = constant_value(wt)
    if w is None:
        return "weight-not-constant"
    if constant_value(x) is not None:
        return "constant-input"
    if node.op == "Conv" and w.ndim != 4:
        return "conv-not-2d"
    if node.op != "Conv" and w.ndim != 2:
        return "weight-not-2d"
    if w.dtype.type not in _DTYPES:
        return "dtype"
    if len(wt.outputs) != 1:
        return "shared-weight"
    if is_graph_output(graph, wt):
        return "graph-output"
    bias_t = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    bias = None
    if bias_t is not None:
        bias = constant_value(bias_t)
        if bias is None:
            return "bias-not-constant"
        if len(bias_t.outputs) != 1 or is_graph_output(graph, bias_t):
            return "shared-weight"
    shape = x.shape
    if shape is None:
        return "unknown-shape"
    dims = [d if isinstance(d, int) and d > 0 else None for d in shape]
    key = layer_key(node)
    if node.op == "MatMul":
        rows = math.prod(dims[1:-1]) if len(dims) > 2 and None not in dims[1:-1] else None
        return _Layer(node, key, w.astype(np.float64), None, w.dtype, 1 if len(dims) <= 2 else rows)
    if node.op == "Gemm":
        if int(node.attrs.get("transA", 0)):
            return "gemm-transA"
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        wk = (w.T if int(node.attrs.get("transB", 0)) else w).astype(np.float64) * alpha
        if bias is not None:
            if bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1) or (
                    bias.ndim and bias.shape[-1] not in (1, wk.shape[1])):
                return "bias-shape"
            bias = beta * np.broadcast_to(bias.reshape(-1).astype(np.float64), (wk.shape[1],))
        return _Layer(node, key, wk, bias, w.dtype, 1)
    if int(node.attrs.get("group", 1)) != 1:
        return "grouped"
    if len(shape) != 4:
        return "unknown-shape"
    m = w.shape[0]
    y_shape = node.outputs[0].shape
    spatial = [d if isinstance(d, int) and d > 0 else None for d in (y_shape or [None] * 4)[2:]]
    conv = {"kernel": list(w.shape[2:]), "strides": list(node.attrs.get("strides", [1, 1])),
            "pads": list(node.attrs.get("pads", [0, 0, 0, 0])),
            "dilations": list(node.attrs.get("dilations", [1, 1])),
            "auto_pad": node.attrs.get("auto_pad", "NOTSET"), "channels": int(w.shape[1])}
    b = None if bias is None else bias.reshape(-1).astype(np.float64)
    rows = math.prod(spatial) if len(spatial) == 2 and None not in spatial else None
    return _Layer(node, key, w.reshape(m, -1).T.astype(np.float64), b, w.dtype, rows, conv, "conv", w)


def _chunk(layers: list[_Layer]) -> list[_Layer]:
    """The first layers whose captured rows take at most ``_CAPTURE_BYTES`` (at least one)."""
    total, out = 0, []
    for la in layers:
        k, n = la.w.shape
        if la.conv is None:
            size = _ROWS * (k + n) * 4
        else:
            shapes = (la.node.inputs[0].shape, la.node.outputs[0].shape)
            dims = [d for s in shapes for d in (s or [])[1:]]
            known = all(isinstance(d, int) and d > 0 for d in dims) and len(dims) == 6
            size = _CONV_SAMPLES * 4 * (math.prod(dims[:3]) + math.prod(dims[3:])) if known \
                else _CAPTURE_BYTES
        if out and total + size > _CAPTURE_BYTES:
            break
        total += size
        out.append(la)
    return out


def _capture(model: onnx.ModelProto, ctx: PassContext, layers: list[_Layer],
             outputs: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Layer key -> its input rows (patches [n, K] for a Conv) and output rows [n, N] in
    ``model`` on the calibration data; rows pair across models (same seed and positions)."""
    from onnxopt.capture import capture
    from onnxopt.reconstruct import im2col, output_rows

    assert ctx.calibration is not None
    got: dict[str, np.ndarray] = {}
    for conv in (False, True):
        part = [la for la in layers if (la.conv is not None) == conv]
        layout = "nchw" if conv else "rows"
        names = {t.name: layout for la in part
                 for t in (la.node.inputs[0], *(la.node.outputs[:1] if outputs else []))}
        if names:  # ctx.calibration_cache: the driver keeps it across builds of one model
            got.update(capture(model, ctx.calibration, names,
                               max_rows=_CONV_SAMPLES if conv else _ROWS, seed=ctx.seed,
                               cache=ctx.calibration_cache))
    out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for la in layers:
        x, y = got[la.node.inputs[0].name], got[la.node.outputs[0].name] if outputs else None
        if la.conv is None:
            out[la.key] = (x, y)
            continue
        c = la.conv
        positions = min(65536, max(1024, _PATCH_VALUES // la.w.shape[0]))
        patches, index = im2col(x, c["kernel"], c["strides"], _lowrank.explicit_pads(c, x.shape[2:]),
                                c["dilations"], positions=positions, seed=ctx.seed)
        out[la.key] = (patches, None if y is None else output_rows(y, index))
    return out


def _rewrite(la: _Layer, a: np.ndarray, b: np.ndarray, bias: np.ndarray | None,
             ctx: PassContext) -> list[gs.Node]:
    """The two nodes that replace ``la.node`` (which is detached); the output tensor is kept."""
    node, r = la.node, a.shape[1]
    x, y = node.inputs[0], node.outputs[0]
    base = la.key or node.op.lower()
    fresh = ctx.names.fresh
    if la.form == "spatial":
        a_w, b_w = _lowrank.spatial_weights(a, b, la.conv["channels"], *la.kernel)
    else:
        a_w, b_w = (_conv_a(a, la), b.T.reshape(b.shape[1], r, 1, 1)) if la.conv else (a, b)
    a_c = make_constant(fresh(f"{base}_lowrank_a_w"), a_w)
    mid_shape = None
    if la.form == "spatial" and y.shape is not None and x.shape is not None:
        mid_shape = [y.shape[0], r, y.shape[2], x.shape[3]]  # kh x 1: rows as the output, columns as the input
    elif la.conv is not None and y.shape is not None:
        mid_shape = [y.shape[0], r, *y.shape[2:]]
    elif la.conv is None and x.shape is not None:
        mid_shape = [*x.shape[:-1], r]
    h = gs.Variable(fresh(f"{base}_lowrank_h"), dtype=la.dtype, shape=mid_shape)
    bias_in = [] if bias is None else [make_constant(fresh(f"{base}_lowrank_bias"),
                                                     bias.astype(la.dtype))]
    if la.form == "spatial":
        first_attrs, second_attrs = _lowrank.spatial_attrs(la.conv)
        first = gs.Node("Conv", fresh(f"{base}_lowrank_a"), first_attrs, [x, a_c], [h])
        second = gs.Node("Conv", fresh(f"{base}_lowrank_b"), second_attrs,
                         [h, make_constant(fresh(f"{base}_lowrank_b_w"), b_w), *bias_in], [y])
    elif node.op == "Conv":
        attrs = {k: v for k, v in node.attrs.items()
                 if k in ("strides", "pads", "dilations", "auto_pad")}
        attrs["kernel_shape"] = list(la.conv["kernel"]) if la.conv else []
        first = gs.Node("Conv", fresh(f"{base}_lowrank_a"), attrs, [x, a_c], [h])
        second = gs.Node("Conv", fresh(f"{base}_lowrank_b"), {"kernel_shape": [1, 1]},
                         [h, make_constant(fresh(f"{base}_lowrank_b_w"), b_w), *bias_in], [y])
    else:
        first = gs.Node("MatMul", fresh(f"{base}_lowrank_a"), {}, [x, a_c], [h])
        if node.op == "MatMul":
            second = gs.Node("MatMul", fresh(f"{base}_lowrank_b"), {},
                             [h, make_constant(fresh(f"{base}_lowrank_b_w"), b)], [y])
        else:
            trans_b = int(node.attrs.get("transB", 0))
            b_c = make_constant(fresh(f"{base}_lowrank_b_w"),
                                np.ascontiguousarray(b.T) if trans_b else b)
            attrs = {"transB": trans_b} if trans_b else {}
            second = gs.Node("Gemm", fresh(f"{base}_lowrank_b"), attrs, [h, b_c, *bias_in], [y])
    node.inputs.clear()
    node.outputs.clear()
    return [first, second]


def _conv_a(a: np.ndarray, la: _Layer) -> np.ndarray:
    """First factor ``[K, r]`` as a Conv weight ``[r, C, kh, kw]``."""
    kh, kw = la.conv["kernel"] if la.conv else (1, 1)
    return np.ascontiguousarray(a.T.reshape(a.shape[1], -1, kh, kw))
