"""The accuracy budget, judged the way the task is judged, on every output.

With labels, the budget is the task accuracy drop in percentage points, at its upper
confidence bound (``drop + CONFIDENCE_Z`` standard errors of the per-sample differences:
the same inputs run through both models, so the samples are paired), and every output
must also keep the fidelity floor. Without labels, the fidelity floor alone: per output,
cosine at its lower confidence bound, top-1 agreement for classifiers (observed and
expected, at its lower bound), and for sequences of class scores (CTC frames, token
logits) the argmax agreement per position *and* the share of samples whose whole argmax
sequence is unchanged: a recognizer whose frames agree 98% of the time can still change
the text of a third of its lines (``onnxopt.validate``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxopt.validate import CONFIDENCE_Z, Tolerance, ValidationReport

DEFAULT_MAX_ACCURACY_DROP = 1.0  # percentage points, when labels are given without a budget
DEFAULT_MIN_COSINE = 0.99
DEFAULT_MIN_TOP1 = 0.98


@dataclasses.dataclass(frozen=True)
class Verdict:
    ok: bool
    detail: str
    accuracy: float | None = None
    drop_pp: float | None = None
    drop_bound_pp: float | None = None


@dataclasses.dataclass(frozen=True)
class Budget:
    max_accuracy_drop: float | None  # percentage points; None: the fidelity floor alone
    tolerance: Tolerance

    def describe(self) -> str:
        floor = f"cosine >= {self.tolerance.min_cosine:g}" + (
            f", top-1 and sequence agreement >= {self.tolerance.min_top1:.0%}"
            if self.tolerance.min_top1 else "") + " (lower confidence bounds)"
        if self.max_accuracy_drop is not None:
            return (f"task accuracy drop <= {self.max_accuracy_drop:g} pt (upper confidence bound); "
                    f"every other output {floor}")
        return floor

    def judge(self, report: ValidationReport) -> Verdict:
        labelled = self.max_accuracy_drop is not None and report.accuracy_before is not None
        # the output the labels score is judged by its accuracy; every other one by the floor
        failures = [o for o in report.failures if not (labelled and o.name == report.accuracy_output)]
        floor_ok = not failures
        worst = "; ".join(o.describe(report.tolerance) for o in failures)
        if labelled:
            drop = (report.accuracy_before - (report.accuracy_after or 0.0)) * 100
            bound = drop + CONFIDENCE_Z * 100 * (report.accuracy_drop_stderr or 0.0)
            finite = all(np.isfinite(o.cosine) for o in report.outputs)
            ok = bound <= self.max_accuracy_drop and finite and floor_ok
            detail = (f"accuracy {report.accuracy_after:.2%} vs {report.accuracy_before:.2%}: drop "
                      f"{drop:+.2f} pt (bound {bound:+.2f}) {'<=' if bound <= self.max_accuracy_drop else '>'} "
                      f"{self.max_accuracy_drop:g} pt")
            if not floor_ok:
                detail += f"; below the fidelity floor: {worst}"
            return Verdict(ok, detail, report.accuracy_after, drop, bound)
        if floor_ok:
            return Verdict(True, "fidelity floor holds on every output")
        return Verdict(False, f"below the fidelity floor ({self.describe()}): {worst}")


def error_of(report: ValidationReport) -> float:
    """One number per candidate for sensitivity: the worst output's ``1 - cosine``.

    Sequences of class scores also count their whole-sequence disagreement: their cosine hardly
    moves when a frame flips, and a flipped frame changes the text.
    """
    worst = 0.0
    for o in report.outputs:
        worst = max(worst, 1.0 - o.cosine)
        if o.sequence_agreement is not None:
            worst = max(worst, 1.0 - o.sequence_agreement)
    return float(worst)
