"""Never slower, never bigger: a lossless run writes only what pays on this machine.

``optimize_file`` measures the input and the level-1 result anyway. When the result is
bigger than the input beyond a small margin (1%, at least 16 KiB) or measures slower
beyond noise, the pipeline runs again without each pass that changed the graph, and the
variant that fixes it is written instead. The report names the dropped pass and why, and
keeps the figures of the full pipeline's result beside those of the written one.

Slower beyond noise: ``measure_latency`` times the models in interleaved rounds (each
round runs every model once, back to back, on the same feed), so round ``r`` of two models
is a pair. The ratio of medians, median(result) / median(input), gets a 95% confidence
interval by resampling whole rounds (a paired bootstrap, 2000 resamples, fixed seed);
slower means the interval's lower bound is above ``1 + SLOWER_MARGIN``. Two medians
compared once would call every 1% of scheduler noise a regression, or miss a real one; and
sessions that run the same kernels still measured 2% apart on a 0.17 ms model.

Cost, bounded: nothing more when the result is neither slower nor bigger. Otherwise the
pipeline reruns once per pass that changed the graph (level 1: a handful), and latency is
measured ONCE more, the input, the result and every variant interleaved. That second
measurement must confirm the slowdown (else the full result stays, and the report says
so), and picks the fastest variant not slower than the input. When no single pass
accounts for it (for size: no variant within the margin), every pass that changed the
graph is dropped and the input itself is written unchanged (re-serialized, not passed
through the rewriter, whose round trip alone can grow a file).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxopt.bench import Latency
from onnxopt.io import load_model, write_model
from onnxopt.manager import PassManager, PipelineReport
from onnxopt.passes.fold_constants import MIN_RUN_GROWTH_BYTES

logger = logging.getLogger(__name__)

SIZE_MARGIN = 0.01  # a lossless run may grow the file by 1% ...
SIZE_FLOOR = MIN_RUN_GROWTH_BYTES  # ... or 16 KiB, whichever is more: fold-constants' least run budget
SLOWER_MARGIN = 0.03  # slower: the 95% interval of the median ratio lies above 1.03 (the lossy
# verdict's margin too): below that, two graphs onnxruntime runs alike measured apart
CONFIDENCE = 0.95
RESAMPLES = 2000

Measure = Callable[[Mapping[str, Any]], Mapping[str, Latency]]
MeasureAt = Callable[[Mapping[str, Any], int], Mapping[str, Latency]]  # ... at a thread count
Rerun = Callable[[PassManager], tuple[onnx.ModelProto, PipelineReport]]


@dataclasses.dataclass(frozen=True)
class Ratio:
    """median(candidate) / median(reference) over paired rounds, with its confidence interval."""

    ratio: float
    low: float
    high: float
    rounds: int

    @property
    def slower(self) -> bool:
        return self.low > 1.0 + SLOWER_MARGIN

    def __str__(self) -> str:
        return f"{self.ratio:.2f}x (95% interval {self.low:.2f}-{self.high:.2f}, {self.rounds} rounds)"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"slower": self.slower}


def latency_ratio(reference: Latency, candidate: Latency, seed: int = 0) -> Ratio:
    """The paired bootstrap of the ratio of medians (see the module docstring)."""
    ref = np.asarray(reference.samples_ms, dtype=np.float64)
    cand = np.asarray(candidate.samples_ms, dtype=np.float64)
    n = min(len(ref), len(cand))
    if n == 0:  # no samples kept: the medians alone, with no interval to speak of
        r = candidate.median_ms / reference.median_ms if reference.median_ms > 0 else 1.0
        return Ratio(r, r, r, 0)
    ref, cand = ref[:n], cand[:n]
    rounds = np.random.default_rng(seed).integers(0, n, size=(RESAMPLES, n))
    ratios = np.median(cand[rounds], axis=1) / np.maximum(np.median(ref[rounds], axis=1), 1e-12)
    tail = (1.0 - CONFIDENCE) / 2
    low, high = np.quantile(ratios, [tail, 1.0 - tail])
    ratio = float(np.median(cand) / max(float(np.median(ref)), 1e-12))
    return Ratio(ratio, float(low), float(high), n)


def grown(before_bytes: int, after_bytes: int) -> bool:
    """Bigger than the input beyond the margin."""
    return after_bytes > before_bytes + max(SIZE_FLOOR, SIZE_MARGIN * before_bytes)


@dataclasses.dataclass
class Variant:
    """The pipeline without ``dropped``: its model file, report and size."""

    dropped: tuple[str, ...]
    path: Path
    report: PipelineReport
    size_bytes: int


@dataclasses.dataclass
class Decision:
    """What the guard did: the variant to write (None: keep the full result) and why."""

    variant: Variant | None
    reason: str  # "bigger", "slower", or "" when the full result stays
    message: str  # one line for the console and the report
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    latency: dict[str, Latency] = dataclasses.field(default_factory=dict)  # the second measurement

    def to_dict(self) -> dict[str, Any]:
        return {"dropped": list(self.variant.dropped) if self.variant else [], "reason": self.reason,
                "message": self.message, **self.figures}


class Guard:
    """Builds pipeline variants in a scratch directory beside the output, and judges them.

    A context manager: the scratch directory (made on the first variant) goes at exit.
    Each variant is written under the output's own file name, so a variant with external
    data can be moved into the staging directory as it is.
    """

    def __init__(self, manager: PassManager, rerun: Rerun, source: Path, output: Path,
                 size_of: Callable[[Path], int]) -> None:
        self.manager, self.rerun, self.size_of = manager, rerun, size_of
        self.source, self.output = source, output
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self._count = 0

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()

    def variant(self, dropped: Collection[str]) -> Variant:
        """The pipeline run again without the passes in ``dropped``, written to scratch."""
        names = tuple(sorted(dropped))
        model, report = self.rerun(self.manager.without(names))
        return self._write(model, names, report)

    def unchanged(self, dropped: Collection[str]) -> Variant:
        """The input itself, re-serialized without the rewriter: never bigger, never slower.

        Not the pipeline with no pass: that round trip can itself grow a file (Silero VAD's
        half-precision model: weights shared by both If branches came out once per branch).
        """
        return self._write(load_model(self.source), tuple(sorted(dropped)), PipelineReport())

    def _write(self, model: onnx.ModelProto, dropped: tuple[str, ...], report: PipelineReport) -> Variant:
        if self._scratch is None:  # on the output's filesystem: variants can be large
            self._scratch = tempfile.TemporaryDirectory(prefix=".onnxopt-variants-",
                                                        dir=self.output.parent)
        self._count += 1
        path = Path(self._scratch.name) / str(self._count) / self.output.name
        path.parent.mkdir()
        write_model(model, path, restore_data=False)
        return Variant(dropped, path, report, self.size_of(path))

    def singles(self, report: PipelineReport, already: Sequence[str] = ()) -> list[Variant]:
        """One variant per pass that changed the graph in ``report`` (each dropped alone)."""
        return [self.variant({*already, name}) for name in report.changed_passes]

    def smaller(self, report: PipelineReport, before_bytes: int, after_bytes: int) -> Decision:
        """The result grew the file: the smallest single-pass variant within the margin."""
        grew = f"the file grew {_mb(before_bytes)} -> {_mb(after_bytes)} (+{after_bytes / before_bytes - 1:.0%})"
        if not report.changed_passes:  # the graph written back as it was, with the shapes inferred
            message = (f"no pass changed the graph; wrote the input as it was (written back, {grew} "
                       "with the shapes inferred for its values)")
            return Decision(self.unchanged(()), "unchanged", message,
                            {"full_pipeline": {"size_bytes": after_bytes}, "written": {"size_bytes": before_bytes}})
        variants = self.singles(report)
        fits = [v for v in variants if not grown(before_bytes, v.size_bytes)]
        if fits:
            chosen = min(fits, key=lambda v: (v.size_bytes, v.dropped))
            message = (f"dropped {_names(chosen.dropped)}: with it {grew}; without it "
                       f"{_mb(chosen.size_bytes)}, which was written (--allow-growth keeps growth)")
        else:
            chosen = self.unchanged(report.changed_passes)
            message = (f"dropped {_names(chosen.dropped)}: with them {grew} and no single pass "
                       "accounts for it; wrote the input unchanged (--allow-growth keeps growth)")
        figures = {"full_pipeline": {"size_bytes": after_bytes},
                   "written": {"size_bytes": chosen.size_bytes},
                   "variants": {_names(v.dropped): {"size_bytes": v.size_bytes} for v in variants}}
        return Decision(chosen, "bigger", message, figures)

    def faster(self, report: PipelineReport, src: Path, after: Path, first: Ratio,
               measure: Measure, already: Sequence[str] = ()) -> Decision:
        """The result measured slower: confirm it in one more measurement, with every variant."""
        variants = self.singles(report, already)
        labels = {f"without {_names(v.dropped)}": v for v in variants}
        lat = measure({"before": src, "after": after, **{k: v.path for k, v in labels.items()}})
        confirmed = latency_ratio(lat["before"], lat["after"])
        ratios = {k: latency_ratio(lat["before"], lat[k]) for k in labels}
        figures: dict[str, Any] = {
            "full_pipeline": {"first": first.to_dict(), "second": confirmed.to_dict(),
                              "median_ms": lat["after"].median_ms},
            "input_median_ms": lat["before"].median_ms,
            "variants": {k: r.to_dict() for k, r in ratios.items()},
        }
        if not confirmed.slower:
            message = (f"the result first measured {first} against the input; a second "
                       f"measurement did not confirm it ({confirmed}); kept every pass")
            return Decision(None, "", message, figures, dict(lat))
        ok = [k for k, r in ratios.items() if not r.slower]
        if not ok:  # no single pass accounts for it: the input itself, as measured as "before"
            chosen = self.unchanged({*already, *report.changed_passes})
            figures["written"] = {"median_ms": lat["before"].median_ms, "ratio": None}
            message = (f"dropped {_names(chosen.dropped)}: with them the model measured {confirmed} "
                       "against the input and no single pass accounts for it; wrote the input unchanged")
            return Decision(chosen, "slower", message, figures, {"before": lat["before"], "after": lat["before"]})
        label = min(ok, key=lambda k: lat[k].median_ms)  # the fastest not slower than the input
        chosen = labels[label]
        figures["written"] = {"median_ms": lat[label].median_ms, "ratio": ratios[label].to_dict()}
        message = (f"dropped {_names(chosen.dropped)}: with it the model measured {confirmed} "
                   f"against the input; without it {ratios[label]}, which was written")
        return Decision(chosen, "slower", message, figures, {"before": lat["before"], "after": lat[label]})

    def trial(self, name: str, src: Path, after: Path, measure: MeasureAt, threads: Sequence[int],
              already: Sequence[str] = ()) -> Decision:
        """``name`` is a trial pass (``Pass.trial``) that changed the graph: keep it only if faster.

        The model without it is measured interleaved with the input and the result, once per
        count in ``threads`` (``measure(models, threads)``; the first is the run's own, the others what a deployment
        may use: onnxruntime's default is every core). The pass stays only when the result is
        faster than that variant at the first count with 95% confidence (the interval of
        with / without lies below 1) and not slower beyond noise at any other. A tie goes to
        the graph without the rewrite. (The Gemm form of ViT's projections: 2% faster at one
        thread, 15% slower at two, on this project's EPYC.)
        """
        without = self.variant({*already, name})
        paths = {"before": src, "after": after, "without": without.path}
        lat = {n: measure(paths, n) for n in threads}
        gains = {n: latency_ratio(m["without"], m["after"]) for n, m in lat.items()}
        first, *others = gains
        figures: dict[str, Any] = {
            "trial": name, "with_against_without": gains[first].to_dict(),
            "threads": {str(t): g.to_dict() for t, g in gains.items()},
            "input_median_ms": lat[first]["before"].median_ms}
        said = ", ".join(f"{g} at {t} thread{'s' if t > 1 else ''}" for t, g in gains.items())
        if gains[first].high < 1.0 and not any(gains[t].slower for t in others):
            message = f"trial: kept {name}: the model measured {said} with it against without it"
            return Decision(None, "", message, figures, {"before": lat[first]["before"], "after": lat[first]["after"]})
        message = f"trial: left out {name}: the model measured {said} with it against without it, not faster"
        return Decision(without, "not-faster", message, figures,
                        {"before": lat[first]["before"], "after": lat[first]["without"]})


def adopt(variant: Variant, staged: Path) -> None:
    """Replace the staged output (and its external data) with ``variant``'s files."""
    for f in staged.parent.iterdir():
        if f.name in (staged.name, staged.name + ".data"):
            f.unlink()
    for f in variant.path.parent.iterdir():
        os.replace(f, staged.parent / f.name)


def _names(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "nothing"


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"
