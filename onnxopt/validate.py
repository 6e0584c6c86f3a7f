"""Compare two models in onnxruntime on the same inputs.

Both run on the CPU provider with ORT's graph optimizations off, so the oracle is
the graph as written. Statistics are accumulated feed by feed (bounded memory):
per output max abs error, max relative error, cosine similarity, top-1 agreement
for classifier-like outputs, and with labels the task accuracy of both models.

Classifier-like outputs are 2-D float ``[rows, classes]``, except embeddings: an output
whose name says so (``embed``, ``pool``, ``hidden``, ``feature``) or whose reference rows
all have unit L2 norm with negative entries (normalized sentence or image embeddings; a
confident softmax also has norm near 1, but no negative entry). Their argmax means nothing.

Pass rule: exact pipelines need every element within ``atol + rtol * |ref|`` and
integer/bool outputs equal. The tolerance follows the output's dtype: float32/float64 use
``atol``/``rtol`` as given; float16, bfloat16 and the float8 types, whose last bit is worth
far more, are allowed ``ULPS`` units in the last place at magnitude 1 (float16: atol and rtol
``4 * 2**-10``), or the given tolerance when that is looser; each output's report names
the tolerance that applied. Lossy pipelines need lossy pipelines need the lower confidence bound of the cosine
``>= min_cosine`` (and, for classifier outputs, both the observed top-1 agreement and the
lower bound of the expected one ``>= min_top1``).

Cosine bound: over the samples (feeds) seen, ``1 - cosine`` is about half the relative
squared error ``D = sum |a - b|^2 / sum |a|^2``, a ratio of sums whose standard error the
per-sample terms give (ratio estimator). ``cosine_low = cosine - 2 * stderr(D) / 2``: on 19
sentences MiniLM's int8 embeddings had cosine 0.990 and 0.9898 on 20 other sentences.

Expected top-1 agreement: counting flips on a few dozen inputs says little about the
next inputs (0 flips in 32 is consistent with a 5% flip rate). So the error is also
modelled: per row, the reference's gaps between its top-1 logit and its nearest
competitors, and the candidate's error spread (the variance of ``candidate - reference``
across classes, pooled over rows). A competitor overtakes the top-1 when the error
difference of the pair, roughly normal with variance ``2 * sigma**2``, exceeds the gap,
so a row flips with probability at most ``sum_j Phi(-gap_j / (sqrt(2) * sigma))``.
One minus the mean of that over rows is the expected agreement: it uses every row's
margin, not only the rows that happened to flip, and tracks the held-out flip rate.
It is still a mean over a sample, so the pass rule takes its lower confidence bound,
``expected - 2 * standard error``: a search that picks the cheapest candidate whose
estimate clears the floor otherwise picks one that is lucky on the evaluation rows
(seen on MobileNetV2: 98.2% expected on 32 evaluation rows, 96.1% on 256 held out).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxopt.data import Dataset
from onnxopt.errors import InputDataError, OnnxoptError
from onnxopt.runtime import ModelRef, output_names, run, session

TOP1_COMPETITORS = 16  # per row, the nearest competitors of the top-1 kept for the expected agreement
CONFIDENCE_Z = 2.0  # standard errors below the estimates (cosine, expected top-1) the pass rule checks
EXACT_ATOL = 1e-4
EXACT_RTOL = 1e-3
LOSSY_MIN_COSINE = 0.99
ULPS = 4  # units in the last place allowed to float16/bfloat16/float8 outputs of exact pipelines
# machine epsilon of the float types numpy's finfo does not know (ml_dtypes' types)
_EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float8_e4m3fn": 2.0**-3, "float8_e4m3fnuz": 2.0**-3,
        "float8_e5m2": 2.0**-2, "float8_e5m2fnuz": 2.0**-2}
EMBEDDING_NAME_PARTS = ("embed", "pool", "hidden", "feature")
# rank-3 outputs are sequences of class scores when their rows are distributions or named so
SEQUENCE_NAME_PARTS = ("logit", "score", "prob", "ctc", "token", "char")


@dataclasses.dataclass(frozen=True)
class Tolerance:
    exact: bool = True
    atol: float = EXACT_ATOL
    rtol: float = EXACT_RTOL
    min_cosine: float = LOSSY_MIN_COSINE
    min_top1: float | None = None


@dataclasses.dataclass(frozen=True)
class OutputDiff:
    name: str
    max_abs: float
    max_rel: float
    cosine: float
    top1_agreement: float | None
    mismatches: int  # elements outside tolerance (exact) / differing (integer outputs)
    elements: int
    passed: bool
    top1_expected: float | None = None  # modelled from margins and error spread (module doc)
    top1_expected_low: float | None = None  # its lower confidence bound, which the pass rule checks
    cosine_low: float | None = None  # lower confidence bound of the cosine (lossy pass rule)
    tolerance: str = ""  # the rule that applied to this output, e.g. "float16: atol 0.0039, ..."
    # sequence outputs (class scores [samples, positions, classes]: CTC frames, token logits):
    # argmax agreement per position, and the share of samples whose whole argmax sequence agrees
    position_agreement: float | None = None
    sequence_agreement: float | None = None

    def describe(self, tol: Tolerance) -> str:
        parts = [f"max |diff| {self.max_abs:.3g}", f"max rel {self.max_rel:.3g}",
                 f"cosine {self.cosine:.6f}" + (f" (lower bound {self.cosine_low:.6f})"
                                                if self.cosine_low is not None else "")]
        if self.top1_agreement is not None:
            parts.append(f"top-1 agreement {self.top1_agreement:.2%}")
        if self.sequence_agreement is not None:
            parts.append(f"per-position agreement {self.position_agreement:.2%}, whole sequences "
                         f"{self.sequence_agreement:.2%}")
        if self.top1_expected is not None:
            parts.append(f"expected top-1 agreement {self.top1_expected:.2%} "
                         f"(lower bound {self.top1_expected_low:.2%})")
        if tol.exact:
            parts.append(f"{self.mismatches}/{self.elements} elements beyond {self.tolerance or tol}")
        return f"output '{self.name}': " + ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class ValidationReport:
    outputs: tuple[OutputDiff, ...]
    samples: int
    source: str
    tolerance: Tolerance
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    # standard error of the accuracy drop, from the per-sample differences (paired samples)
    accuracy_drop_stderr: float | None = None
    accuracy_output: str | None = None  # the output the labels were scored on

    def __bool__(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def failures(self) -> list[OutputDiff]:
        return [o for o in self.outputs if not o.passed]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passed"] = bool(self)
        return d


def _dot(x: np.ndarray, y: np.ndarray) -> float:
    """Inner product of two 1-D float64 vectors (``x @ y`` on 1-D arrays measured 15x slower here)."""
    return float(np.einsum("i,i->", x, y))


class _Acc:
    """Streaming statistics for one output."""

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.dot = 0.0
        self.na = 0.0
        self.nb = 0.0
        self.top1_same = 0
        self.top1_total = 0
        self.sample_err: list[float] = []  # per sample: |a - b|^2
        self.sample_ref: list[float] = []  # per sample: |a|^2
        self.gaps: list[np.ndarray] = []  # per row: reference top-1 minus its nearest competitors
        self.err_var: list[np.ndarray] = []  # per row: variance of the error across classes
        self.mismatches = 0
        self.elements = 0
        self.nan_mismatch = False
        self.is_float = True
        self.classifier = True
        self.unit_rows = True  # every reference row so far has L2 norm 1: an embedding ...
        self.negative = False  # ... if some entry is negative (softmax rows are not)
        self.dtype = ""  # the reference's element type, which sets the exact tolerance
        self.seq_positions = self.seq_positions_same = 0  # rank-3 class scores (module doc)
        self.seq_samples = self.seq_samples_same = 0
        self.seq_probabilities = True  # every reference row so far is a distribution

    def tolerance(self, tol: Tolerance) -> tuple[float, float]:
        """(atol, rtol) for this output's dtype (module doc)."""
        eps = _EPS.get(self.dtype)
        if eps is None:
            return tol.atol, tol.rtol
        return max(tol.atol, ULPS * eps), max(tol.rtol, ULPS * eps)

    def describe_tolerance(self, tol: Tolerance) -> str:
        if not tol.exact and self.is_float:
            return (f"cosine >= {tol.min_cosine:g} at its lower bound"
                    + (f", top-1 >= {tol.min_top1:.0%}" if tol.min_top1 and self.top1_total else ""))
        if not self.is_float:
            return f"{self.dtype or 'non-float'}: exact"
        atol, rtol = self.tolerance(tol)
        ulp = f" ({ULPS} ulp)" if self.dtype in _EPS and (atol, rtol) != (tol.atol, tol.rtol) else ""
        return f"{self.dtype}: atol {atol:.2g}, rtol {rtol:.2g}{ulp}"

    def add(self, a: Any, b: Any, tol: Tolerance) -> None:
        if isinstance(a, list):  # sequence outputs: compare element by element
            if not isinstance(b, list) or len(a) != len(b):
                self.mismatches += 1
                self.elements += 1
                self.nan_mismatch = True
                return
            self.classifier = False
            for x, y in zip(a, b):
                self.add(x, y, tol)
            return
        a, b = np.asarray(a), np.asarray(b)
        self.dtype = self.dtype or a.dtype.name
        if a.dtype.name in _EPS and a.dtype.kind != "f":  # ml_dtypes floats: compare as float32
            a, b = a.astype(np.float32), b.astype(np.float32)
        if a.shape != b.shape:
            self.nan_mismatch = True
            self.mismatches += max(a.size, 1)
            self.elements += max(a.size, 1)
            return
        self.elements += a.size
        if a.dtype.kind not in "fc" or b.dtype.kind not in "fc":
            self.is_float = False
            self.classifier = False
            diff = int(np.sum(a != b)) if a.dtype.kind != "O" else int(sum(x != y for x, y in zip(a.ravel(), b.ravel())))
            self.mismatches += diff
            if a.dtype.kind in "iub" and a.size:
                d = np.abs(a.astype(np.float64) - b.astype(np.float64))
                self.max_abs = max(self.max_abs, float(d.max()))
            return
        a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        if np.isfinite(a64).all() and np.isfinite(b64).all():
            fa, fb = a64, b64  # the usual case: no masks to build (outputs of 1e5+ elements)
        else:
            nan_a, nan_b = np.isnan(a64), np.isnan(b64)
            if np.any(nan_a != nan_b):
                self.nan_mismatch = True
            finite = ~(nan_a | nan_b) & np.isfinite(a64) & np.isfinite(b64)
            inf_diff = ~(nan_a | nan_b) & ~finite & (a64 != b64)
            self.mismatches += int(inf_diff.sum()) + int(np.sum(nan_a != nan_b))
            fa, fb = a64[finite], b64[finite]
        if fa.size:
            d = np.abs(fa - fb)
            largest = float(d.max())
            self.max_abs = max(self.max_abs, largest)
            abs_a = np.abs(fa)
            if largest > 0:
                self.max_rel = max(self.max_rel, float((d / np.maximum(abs_a, 1e-12)).max()))
            if tol.exact:  # lossy rules do not count elements
                atol, rtol = self.tolerance(tol)
                self.mismatches += int(np.count_nonzero(d > atol + rtol * abs_a))
            self.dot += _dot(fa, fb)
            self.sample_err.append(_dot(d, d))
            ref_sq = _dot(fa, fa)
            self.sample_ref.append(ref_sq)
            self.na += ref_sq
            self.nb += _dot(fb, fb)
        if a.ndim == 3 and a.shape[-1] > 1 and fa.size == a.size:  # all finite
            self._add_sequences(a, b)
        if a.ndim == 2 and a.shape[-1] > 1:
            self.top1_same += int(np.sum(np.argmax(a, -1) == np.argmax(b, -1)))
            self.top1_total += a.shape[0]
            a2 = a.astype(np.float64)
            if self.unit_rows:
                self.unit_rows = bool(np.all(np.abs(np.linalg.norm(a2, axis=1) - 1.0) < 1e-3))
                self.negative = self.negative or bool(np.any(a2 < 0))
            if not tol.exact:  # the expected agreement serves lossy pass rules only
                self._add_margins(a2, b.astype(np.float64))
        else:
            self.classifier = False

    def _add_sequences(self, a: np.ndarray, b: np.ndarray) -> None:
        if not a.size:  # empty: no position to agree on
            return
        same = np.argmax(a, -1) == np.argmax(b, -1)
        self.seq_positions += same.size
        self.seq_positions_same += int(same.sum())
        self.seq_samples += same.shape[0]
        self.seq_samples_same += int(np.all(same, axis=1).sum())
        if self.seq_probabilities:
            a64 = a.astype(np.float64)
            self.seq_probabilities = bool(np.all(a64 >= -1e-6) and np.all(np.abs(a64.sum(-1) - 1) < 1e-3))

    def _add_margins(self, a: np.ndarray, b: np.ndarray) -> None:
        rows = np.all(np.isfinite(a), 1) & np.all(np.isfinite(b), 1)
        a, b = a[rows], b[rows]
        if not len(a):
            return
        k = min(TOP1_COMPETITORS, a.shape[1] - 1)
        top = -np.sort(np.partition(-a, k, axis=1)[:, : k + 1], axis=1)  # k + 1 largest, descending
        self.gaps.append((top[:, :1] - top[:, 1:]).astype(np.float32))
        self.err_var.append((b - a).var(axis=1))

    def _expected_top1(self) -> tuple[float, float] | tuple[None, None]:
        """(expected agreement, its lower confidence bound) over the rows seen."""
        if not self.gaps:
            return None, None
        gaps = np.concatenate(self.gaps).astype(np.float64)
        sigma = math.sqrt(2.0 * float(np.mean(np.concatenate(self.err_var))))
        if sigma == 0.0:
            return 1.0, 1.0  # the candidate's outputs equal the reference's
        phi = np.frompyfunc(lambda x: 0.5 * math.erfc(x / math.sqrt(2.0)), 1, 1)
        p_flip = np.minimum(1.0, phi(gaps / sigma).astype(np.float64).sum(axis=1))
        n = len(p_flip)
        stderr = float(p_flip.std(ddof=1)) / math.sqrt(n) if n > 1 else 1.0
        expected = 1.0 - float(p_flip.mean())
        return expected, max(0.0, expected - CONFIDENCE_Z * stderr)

    def _cosine_low(self, cosine: float) -> float:
        """``cosine`` less the confidence margin of the relative squared error (module doc)."""
        n = len(self.sample_err)
        err, ref = np.asarray(self.sample_err), np.asarray(self.sample_ref)
        if n < 2 or not ref.sum():
            return cosine
        ratio = err.sum() / ref.sum()
        stderr = math.sqrt(float(np.sum((err - ratio * ref) ** 2)) / (n * (n - 1))) / float(ref.mean())
        return cosine - CONFIDENCE_Z * stderr / 2

    def result(self, name: str, tol: Tolerance) -> OutputDiff:
        if self.na == 0 and self.nb == 0:
            cosine = 1.0
        elif self.na == 0 or self.nb == 0:
            cosine = 0.0
        else:
            cosine = self.dot / math.sqrt(self.na * self.nb)
        embedding = (self.unit_rows and self.negative) or any(
            part in name.lower() for part in EMBEDDING_NAME_PARTS
        )
        classifier = self.classifier and not embedding
        top1 = self.top1_same / self.top1_total if classifier and self.top1_total else None
        expected, top1_low = self._expected_top1() if top1 is not None and not tol.exact else (None, None)
        low = self._cosine_low(cosine) if self.is_float and not tol.exact else None
        sequence = self.seq_positions and not embedding and (
            self.seq_probabilities or any(part in name.lower() for part in SEQUENCE_NAME_PARTS))
        positions = self.seq_positions_same / self.seq_positions if sequence else None
        sequences = self.seq_samples_same / self.seq_samples if sequence else None
        if self.nan_mismatch:
            passed = False
        elif tol.exact or not self.is_float:
            passed = self.mismatches == 0
        else:
            passed = (low if low is not None else cosine) >= tol.min_cosine and (
                tol.min_top1 is None or top1 is None or top1 >= tol.min_top1
            ) and (tol.min_top1 is None or top1_low is None or top1_low >= tol.min_top1) and (
                tol.min_top1 is None or sequences is None
                or (positions >= tol.min_top1 and sequences >= tol.min_top1))
        return OutputDiff(name, self.max_abs, self.max_rel, cosine, top1, self.mismatches,
                          self.elements, passed, expected, top1_low, low, self.describe_tolerance(tol),
                          positions, sequences)


def _correct(outputs: Sequence[Any], labels: np.ndarray) -> tuple[int, np.ndarray] | None:
    """(index, per sample: is its top-1 the label?) of the first classifier-like output."""
    for i, out in enumerate(outputs):
        out = np.asarray(out)
        if out.dtype.kind == "f" and out.ndim == 2 and out.shape[-1] > 1 and out.shape[0] == len(labels):
            return i, np.argmax(out, -1) == labels.reshape(-1)
    return None


_ONE_AT_A_TIME = 2**30  # bytes of model files past which the two sessions do not coexist


def _on_disk_bytes(model: ModelRef) -> int:
    """Size of a model file with its ``<name>.data`` (0 for in-memory models)."""
    if not isinstance(model, (str, os.PathLike)):
        return 0
    path = Path(model)
    data = path.with_name(path.name + ".data")
    try:
        return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    except OSError:
        return 0


class ReferenceOutputs:
    """A reference model's outputs on a dataset, computed once for many ``compare`` calls.

    The lossy driver compares dozens of candidates against one float model on the same feeds;
    running the reference again for each would double the cost of every evaluation.
    """

    def __init__(self, reference: ModelRef, data: Dataset) -> None:
        sess = session(reference)
        self.names = output_names(sess)
        self.data = data
        self.outputs = [run(sess, feed) for feed in data.feeds]


def compare(
    reference: ModelRef | ReferenceOutputs, candidate: ModelRef, data: Dataset,
    tolerance: Tolerance | None = None, optimize_candidate: bool = False,
) -> ValidationReport:
    """Run both models on every feed of ``data`` and compare their outputs.

    ``optimize_candidate`` runs the candidate with onnxruntime's rewrites on, as it will
    be deployed: quantized models then run in ORT's fused integer kernels, whose
    rounding (and, on AVX2, int16 saturation) the unfused QDQ graph does not show.
    ``reference`` may be a ``ReferenceOutputs`` computed on the same ``data``.
    """
    tol = tolerance or Tolerance()
    if not len(data):
        raise InputDataError("no inputs to validate on")
    if not isinstance(reference, ReferenceOutputs) and (
            _on_disk_bytes(reference) + _on_disk_bytes(candidate) > _ONE_AT_A_TIME):
        # big models: one session at a time (the reference's outputs are kept instead)
        reference = ReferenceOutputs(reference, data)
        gc.collect()
    if isinstance(reference, ReferenceOutputs):
        if reference.data is not data:
            raise ValueError("ReferenceOutputs were computed on another dataset")
        cand = session(candidate, optimize=optimize_candidate)
        pairs = ((a, run(cand, f)) for a, f in zip(reference.outputs, data.feeds, strict=True))
        return _report(reference.names, cand, pairs, data, tol)
    ref = session(reference)
    cand = session(candidate, optimize=optimize_candidate)
    pairs = ((run(ref, f), run(cand, f)) for f in data.feeds)
    return _report(output_names(ref), cand, pairs, data, tol)


def _report(names: list[str], cand: Any, pairs: Any, data: Dataset, tol: Tolerance) -> ValidationReport:
    if output_names(cand) != names:
        raise OnnxoptError(f"the models' outputs differ: {names} vs {output_names(cand)}")
    accs = {n: _Acc() for n in names}
    ref_all: list[list[Any]] = []
    cand_all: list[list[Any]] = []
    for a, b in pairs:
        for n, x, y in zip(names, a, b):
            accs[n].add(x, y, tol)
        if data.labels is not None:
            ref_all.append(a)
            cand_all.append(b)
    before = after = stderr = scored = None
    if data.labels is not None and ref_all:
        ref_c = _correct([np.concatenate([np.asarray(r[i]) for r in ref_all]) for i in range(len(names))], data.labels)
        cand_c = _correct([np.concatenate([np.asarray(r[i]) for r in cand_all]) for i in range(len(names))], data.labels)
        if ref_c is not None and cand_c is not None:
            (index, ok_ref), (_, ok_cand) = ref_c, cand_c
            before, after, scored = float(ok_ref.mean()), float(ok_cand.mean()), names[index]
            diff = ok_ref.astype(np.float64) - ok_cand.astype(np.float64)
            stderr = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return ValidationReport(
        tuple(accs[n].result(n, tol) for n in names), len(data), data.source, tol, before, after, stderr,
        scored,
    )


def failure_message(report: ValidationReport, pipeline: Sequence[str]) -> str:
    lines = [f"validation failed after {', '.join(pipeline) or 'no passes'}:"]
    lines += ["  " + o.describe(report.tolerance) for o in report.failures]
    lines.append("  nothing was written; rerun with --verify-each -v to find the pass, "
                 "loosen --atol/--rtol, or --no-validate to write anyway")
    return "\n".join(lines)
