"""Accuracy-aware, latency-aware compression: quantize, check the budget, keep it only if it pays.

``compress`` is what ``onnxopt optimize --quantize METHOD`` runs:

1. load the model; upgrade its opset when the method needs a newer one (int8 QDQ:
   13 for per-channel DequantizeLinear; dynamic: 11), and say so;
2. run the lossless level-1 preset: this is the *float* candidate. It is checked against
   the source model with the exact tolerance ``optimize`` uses, and nothing is written
   when it differs: every later step only compares against the float candidate;
3. quantize it with the method's pass;
4. evaluate on inputs kept apart from the calibration inputs (one dataset given:
   the first half calibrates, the second half evaluates). Generated inputs that the
   source model itself fails on are refused: a lossy method is never judged on inputs
   the model does not accept. With labels the budget is
   the task accuracy drop in percentage points (``max_accuracy_drop``, default 1.0);
   without labels it is a fidelity floor against the float model on every output:
   cosine >= ``min_cosine`` (0.99) at its lower confidence bound over the evaluation
   samples and, for classifier outputs, top-1 agreement >= ``min_top1`` (0.98), both as
   observed and as expected from the reference's margins and the candidate's error spread,
   at its lower confidence bound (``onnxopt.validate``): a few dozen evaluation inputs with
   no flip do not show a 5% flip rate, the margins do;
5. over budget: measure each quantized layer's sensitivity by quantizing *only that
   layer* (all others excluded) and taking ``1 - cosine`` of the outputs on a few
   evaluation feeds; then keep the most sensitive layers in float, one more at a time,
   until the budget holds (every step re-evaluated on the whole evaluation set);
6. measure the float model and the candidate within budget on this machine
   (interleaved medians, 1 thread by default); the quantized model is written only if
   it is within budget *and* at least ``min_speedup`` times faster. Otherwise the
   float model is written, and the result says why. ``force=True`` writes the
   quantized model anyway (and, with ``bench=False``, without timing it);
7. the written file is compared with the source model under the same budget before it
   is moved into place (``CompressResult.validation``).

Single-layer sensitivity costs one quantization and one short evaluation per layer,
the same as leave-one-out, but it ranks layers by the error each one causes on its
own, which is what keeping a layer in float removes; the greedy loop then checks the
combined effect on the full evaluation set, so the ranking only orders the search.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxopt import data as data_mod
from onnxopt.bench import Latency, measure_latency
from onnxopt.data import Dataset, Feed
from onnxopt.errors import InputDataError, OnnxoptError, ValidationError
from onnxopt.io import load_model, opset_of, staged_output, write_model
from onnxopt.manager import DEFAULT_LEVEL, PassManager, PipelineReport, resolve
from onnxopt.runtime import run, session
from onnxopt.validate import Tolerance, ValidationReport, compare

logger = logging.getLogger(__name__)

# method -> (pass name, options, opset the method needs)
METHODS: dict[str, tuple[str, dict[str, Any], int]] = {
    "int8": ("quantize-qdq", {}, 13),
    "dynamic": ("quantize-dynamic", {}, 11),
    # accuracy_level 4: MatMulNBits computes with int8 activations; the float path
    # (level 0) measured 18x slower than float MatMul on this AVX2 machine
    "int8-weight": ("quantize-weight-only", {"bits": 8, "accuracy_level": 4}, 1),
    "int4": ("quantize-weight-only", {"bits": 4, "accuracy_level": 4}, 1),
    "fp16": ("convert-fp16", {}, 1),
}
NEEDS_CALIBRATION = frozenset({"int8"})
DEFAULT_MAX_ACCURACY_DROP = 1.0  # percentage points, when labels are given without a budget
DEFAULT_MIN_COSINE = 0.99
DEFAULT_MIN_TOP1 = 0.98
SENSITIVITY_FEEDS = 4

Measure = Callable[[Mapping[str, onnx.ModelProto], Sequence[Feed]], Mapping[str, Latency]]


@dataclasses.dataclass
class Candidate:
    """One model the driver evaluated: float, fully quantized, or with some layers kept float."""

    label: str
    float_layers: list[str]
    within_budget: bool
    budget_detail: str
    accuracy: float | None = None
    accuracy_drop_pp: float | None = None
    min_cosine: float | None = None
    min_cosine_low: float | None = None  # its lower confidence bound (the budget checks it)
    min_top1: float | None = None
    min_top1_expected: float | None = None  # from margins and error spread (validate's doc)
    min_top1_expected_low: float | None = None  # its lower confidence bound (the budget checks it)
    latency_ms: float | None = None
    size_bytes: int = 0
    # short: "written", "replaced", "over budget", "not faster", "within budget, not chosen";
    # why is said once, in ``CompressResult.reason``
    verdict: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CompressResult:
    """What ``compress`` tried, measured and wrote."""

    output: Path
    method: str
    written: str  # "float" or "quantized"
    reason: str
    candidates: list[Candidate]
    sensitivity: dict[str, float]  # layer -> 1 - cosine when only it is quantized
    float_layers: list[str]  # layers kept in float in the written quantized model
    quantized_layers: list[str]
    skipped_layers: dict[str, str]
    calibration_source: str
    evaluation_source: str
    evaluation_samples: int
    warnings: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    budget: str = ""
    lossless_validation: ValidationReport | None = None  # float candidate vs source, exact
    validation: ValidationReport | None = None  # written file vs source (see ``write``)
    validation_passed: bool | None = None  # met the lossless tolerance (float) or the budget
    validation_detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(
            dataclasses.replace(self, lossless_validation=None, validation=None)
        )
        d["output"] = str(self.output)
        for key in ("lossless_validation", "validation"):
            report = getattr(self, key)
            d[key] = report.to_dict() if report is not None else None
        return d


@dataclasses.dataclass
class _Budget:
    max_accuracy_drop: float | None  # pp; None: fidelity floor
    tolerance: Tolerance

    def describe(self) -> str:
        if self.max_accuracy_drop is not None:
            return f"task accuracy drop <= {self.max_accuracy_drop:g} pt"
        top1 = self.tolerance.min_top1
        return f"cosine >= {self.tolerance.min_cosine:g}" + (
            f", top-1 agreement >= {top1:.0%}" if top1 else ""
        ) + " (lower confidence bounds)"

    def judge(self, report: ValidationReport) -> tuple[bool, str, float | None, float | None]:
        """(within budget, why, accuracy after, drop in pp)."""
        if self.max_accuracy_drop is not None and report.accuracy_before is not None:
            drop = (report.accuracy_before - (report.accuracy_after or 0.0)) * 100
            ok = drop <= self.max_accuracy_drop and all(
                np.isfinite(o.cosine) for o in report.outputs
            )
            return (
                ok,
                (
                    f"accuracy {report.accuracy_after:.2%} vs {report.accuracy_before:.2%}: "
                    f"drop {drop:+.2f} pt {'<=' if ok else '>'} {self.max_accuracy_drop:g} pt"
                ),
                report.accuracy_after,
                drop,
            )
        if report:
            return True, "fidelity floor holds on every output", None, None
        worst = "; ".join(o.describe(report.tolerance) for o in report.failures)
        return (
            False,
            f"below the fidelity floor (cosine >= {self.tolerance.min_cosine:g}"
            + (
                f", top-1 agreement >= {self.tolerance.min_top1:.0%}"
                if self.tolerance.min_top1
                else ""
            )
            + f"): {worst}",
            None,
            None,
        )


def _default_measure(threads: int, repeats: int) -> Measure:
    def measure(
        models: Mapping[str, onnx.ModelProto], feeds: Sequence[Feed]
    ) -> Mapping[str, Latency]:
        return measure_latency(dict(models), feeds, threads=threads, repeats=repeats)

    return measure


def compress(
    model_path: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    method: str = "int8",
    *,
    calibration_data: str | os.PathLike[str] | Dataset | None = None,
    eval_data: str | os.PathLike[str] | Dataset | None = None,
    max_accuracy_drop: float | None = None,
    min_cosine: float = DEFAULT_MIN_COSINE,
    min_top1: float = DEFAULT_MIN_TOP1,
    min_speedup: float = 1.03,
    force: bool = False,
    bench: bool = True,
    threads: int = 1,
    repeats: int = 100,  # interleaved timings per model (at most 30 s): the verdict turns on a few %
    level: int = DEFAULT_LEVEL,
    pass_options: Mapping[str, Any] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    exact_tolerance: Tolerance | None = None,
    verify_each: bool = False,
    seed: int = 0,
    measure: Measure | None = None,
    progress: Callable[[str], None] | None = None,
) -> CompressResult:
    """Quantize the model at ``model_path`` within an accuracy budget, keep it only if faster.

    Args:
        method: ``int8`` (static QDQ, calibrated), ``dynamic``, ``int8-weight``, ``int4``, ``fp16``.
        calibration_data, eval_data: ``.npz`` / directory paths or ``Dataset``s. One given: it
            is split, first half calibration, second half evaluation. None: generated inputs.
        max_accuracy_drop: budget in percentage points of task accuracy (needs labels).
        min_speedup: the quantized model must be this many times faster than the float one.
        bench: False skips the latency verdict; only with ``force`` (it decides what is kept).
        exact_tolerance: checks the lossless step against the source (default: ``optimize``'s).
        verify_each: run ``onnx.checker`` after every pass that changed the graph.
        measure: ``measure(models, feeds) -> {name: Latency}``; the default times the models
            in onnxruntime (interleaved medians).

    Raises:
        ValidationError: the lossless step changed the source model's outputs, or the written
            file is over budget against the source; nothing is written.
    """
    if method not in METHODS:
        raise OnnxoptError(
            f"unknown quantization method '{method}'; choose one of {', '.join(METHODS)}"
        )
    if not bench and not force:
        raise OnnxoptError(
            "--no-bench: the latency verdict decides whether the quantized model is kept; "
            "add --force to write it without measuring"
        )
    say = progress or (lambda _msg: None)
    src = Path(model_path)
    dst = Path(output) if output is not None else src.with_name(src.stem + ".opt.onnx")
    pass_name, options, min_opset = METHODS[method]
    options = {**options, **(pass_options or {})}
    measure = measure or _default_measure(threads, repeats)
    say(f"loading {src}")
    model = load_model(src)
    notes: list[str] = []
    if opset_of(model) < min_opset:
        from onnxopt.opset import upgrade_opset

        notes.append(
            f"upgraded the model from opset {opset_of(model)} to {min_opset} ({pass_name} needs it)"
        )
        model = upgrade_opset(model, min_opset)
    calib, evaluation, warnings, input_notes = _datasets(
        model, src, method, calibration_data, eval_data, input_shapes, seed
    )
    notes += input_notes

    say("lossless passes")
    preset, _ = resolve(level, None)
    float_model, lossless = PassManager(preset, verify_each=verify_each).run(
        model, input_shapes=input_shapes, seed=seed
    )
    say(f"validating the lossless passes against {src.name}")
    lossless_report = compare(src, float_model, evaluation, exact_tolerance or Tolerance())
    if not lossless_report:
        raise ValidationError(_lossless_failure(lossless_report, level, lossless, notes),
                              lossless_report)
    tol = Tolerance(exact=False, min_cosine=min_cosine, min_top1=min_top1)
    if max_accuracy_drop is None and evaluation.labels is not None:
        max_accuracy_drop = DEFAULT_MAX_ACCURACY_DROP
    if max_accuracy_drop is not None and evaluation.labels is None:
        warnings.append(
            "--max-accuracy-drop needs labels in the evaluation data ('labels' array); "
            "judging by the fidelity floor instead"
        )
        max_accuracy_drop = None
    budget = _Budget(max_accuracy_drop, tol)
    calib_feeds = calib.feeds if calib is not None else None
    ranges: dict[Any, Any] = {}  # every candidate quantizes the same float model: calibrate once

    def quantize(exclude: Sequence[str]) -> tuple[onnx.ModelProto, dict[str, Any]]:
        opts = dict(options)
        if exclude:
            opts["exclude"] = tuple(exclude)
        p = resolve(None, [(pass_name, opts)])[1]
        qmodel, report = PassManager((), p, verify_each=verify_each).run(
            float_model, calibration=calib_feeds, input_shapes=input_shapes, seed=seed,
            calibration_cache=ranges,
        )
        return qmodel, report.notes.get(pass_name, {})

    def evaluate(label: str, qmodel: onnx.ModelProto, float_layers: list[str]) -> Candidate:
        say(f"evaluating {label}")
        report = compare(float_model, qmodel, evaluation, tol, optimize_candidate=True)
        ok, why, acc, drop = budget.judge(report)
        if report.accuracy_before is not None:
            float_cand.accuracy, float_cand.accuracy_drop_pp = report.accuracy_before, 0.0
        observed = [o.top1_agreement for o in report.outputs if o.top1_agreement is not None]
        expected = [o for o in report.outputs if o.top1_expected is not None]
        return Candidate(
            label,
            list(float_layers),
            ok,
            why,
            acc,
            drop,
            min(o.cosine for o in report.outputs),
            min((o.cosine_low for o in report.outputs if o.cosine_low is not None), default=None),
            min(observed) if observed else None,
            min(o.top1_expected for o in expected) if expected else None,
            min(o.top1_expected_low for o in expected) if expected else None,
            size_bytes=qmodel.ByteSize(),
        )

    def write(written: onnx.ModelProto) -> CompressResult:
        """Stage the file, check it against the source, then move it into place.

        The float model is held to the lossless step's tolerance; a quantized one to the
        budget, run as onnxruntime will run it (fused integer kernels).
        """
        lossy = result.written == "quantized"
        with staged_output(dst) as staged:
            say(f"writing {dst}")
            write_model(written, staged)
            say(f"validating {dst.name} against {src.name}")
            report = compare(src, staged, evaluation, tol if lossy else lossless_report.tolerance,
                             optimize_candidate=lossy)
            if lossy:
                ok, why = budget.judge(report)[:2]
            else:
                ok = bool(report)
                t = report.tolerance
                why = (f"outputs within atol {t.atol:g} rtol {t.rtol:g}" if ok
                       else "; ".join(o.describe(t) for o in report.failures))
            result.validation, result.validation_passed, result.validation_detail = report, ok, why
            if not ok and not (force and lossy):
                raise ValidationError(
                    f"the {result.written} model differs from the source model beyond its "
                    f"tolerance ({why}); nothing was written", report,
                )
            if not ok:
                result.warnings.append(
                    f"the written model is over budget against the source: {why}"
                )
        return result

    say(f"quantizing ({pass_name})")
    qmodel, qnotes = quantize(())
    layers = list(qnotes.get("quantized", []))
    skipped = dict(qnotes.get("skipped", {}))
    float_cand = Candidate(
        "float (lossless passes)",
        [],
        True,
        "reference",
        min_cosine=1.0,
        size_bytes=float_model.ByteSize(),
        verdict="written",
    )
    result = CompressResult(
        dst,
        method,
        "float",
        "",
        [float_cand],
        {},
        [],
        layers,
        skipped,
        calib.source if calib is not None else "none (method needs no calibration)",
        evaluation.source,
        len(evaluation),
        warnings,
        notes,
        budget.describe(),
        lossless_report,
    )
    if not layers:
        result.reason = f"{pass_name} found nothing to quantize; wrote the float model"
        return write(float_model)

    candidates = [evaluate(method, qmodel, [])]
    chosen: tuple[onnx.ModelProto, Candidate] | None = (
        (qmodel, candidates[0]) if candidates[0].within_budget else None
    )
    last_tried: tuple[onnx.ModelProto, Candidate] = (qmodel, candidates[0])
    if chosen is None and method != "fp16" and len(layers) > 1:
        result.sensitivity = _sensitivity(layers, quantize, float_model, evaluation, say)
        ranked = sorted(layers, key=lambda name: -result.sensitivity[name])
        chosen, last_tried = _fewest_float_layers(
            ranked, quantize, evaluate, candidates, method, last_tried
        )
    result.candidates += candidates
    for cand in candidates:
        cand.verdict = "within budget, not chosen" if cand.within_budget else "over budget"

    if chosen is None:
        # the closest is the last tried; which outputs fail, by how much, is in its budget_detail
        closest = last_tried[1]
        short = closest.budget_detail.split("): ")[0] + (
            ")" if "): " in closest.budget_detail else "")
        result.reason = (
            f"no {method} variant is within the accuracy budget (closest: {closest.label}, "
            f"{short}); wrote the float model after the lossless passes"
        )
        if force:
            return _forced(result, last_tried, float_cand, write)
        return write(float_model)

    qbest, cand = chosen
    if not bench:  # only with force (checked above)
        return _forced(result, chosen, float_cand, write, (
            f"--force: wrote {cand.label}, within budget ({cand.budget_detail}); "
            "latency not measured (--no-bench)"
        ))
    say("measuring latency")
    lat = measure({"float": float_model, "quantized": qbest}, evaluation.feeds[:SENSITIVITY_FEEDS])
    float_cand.latency_ms, cand.latency_ms = lat["float"].median_ms, lat["quantized"].median_ms
    speedup = float_cand.latency_ms / cand.latency_ms if cand.latency_ms > 0 else float("inf")
    if speedup >= min_speedup:
        result.written, result.float_layers = "quantized", cand.float_layers
        result.reason = (
            f"{cand.label} is within budget ({cand.budget_detail}) and {speedup:.2f}x "
            f"faster than float ({cand.latency_ms:.3f} vs {float_cand.latency_ms:.3f} ms)"
        )
        cand.verdict, float_cand.verdict = "written", "replaced"
        return write(qbest)
    result.reason = (
        f"{cand.label} is within budget but not faster on this machine: "
        f"{cand.latency_ms:.3f} ms vs {float_cand.latency_ms:.3f} ms float "
        f"({speedup:.2f}x, needs >= {min_speedup:g}x); "
        "wrote the float model after the lossless passes"
    )
    cand.verdict = "not faster"
    if force:
        return _forced(result, chosen, float_cand, write)
    return write(float_model)


def _fewest_float_layers(
    ranked: Sequence[str],
    quantize: Callable[[Sequence[str]], tuple[onnx.ModelProto, dict[str, Any]]],
    evaluate: Callable[[str, onnx.ModelProto, list[str]], Candidate],
    candidates: list[Candidate],
    method: str,
    last_tried: tuple[onnx.ModelProto, Candidate],
) -> tuple[tuple[onnx.ModelProto, Candidate] | None, tuple[onnx.ModelProto, Candidate]]:
    """Smallest k such that the k most sensitive layers in float meet the budget.

    The error shrinks as more of the most sensitive layers stay in float, so k is found by
    doubling (1, 2, 4, ...) until the budget holds, then bisecting between the last k that
    failed and the first that held: about 2 log2(n) evaluations instead of up to n.
    All layers in float is the float model itself, so k stays below ``len(ranked)``.
    """
    tried: dict[int, tuple[onnx.ModelProto, Candidate]] = {}

    def attempt(k: int) -> bool:
        kept = list(ranked[:k])
        qk, _ = quantize(kept)
        cand = evaluate(f"{method}, {k} layer{'s' if k > 1 else ''} in float", qk, kept)
        candidates.append(cand)
        tried[k] = (qk, cand)
        return cand.within_budget

    n = len(ranked)
    low, high, k = 0, None, 1  # low: most float layers known to fail; high: fewest known to hold
    while k < n:
        if attempt(k):
            high = k
            break
        low, k = k, min(2 * k, n - 1) if k < n - 1 else n
    if high is None:
        return None, tried[max(tried)] if tried else last_tried
    while high - low > 1:
        mid = (low + high) // 2
        if attempt(mid):
            high = mid
        else:
            low = mid
    return tried[high], tried[high]


def _forced(
    result: CompressResult,
    chosen: tuple[onnx.ModelProto, Candidate],
    float_cand: Candidate,
    write: Callable[[onnx.ModelProto], CompressResult],
    reason: str | None = None,
) -> CompressResult:
    """``--force``: write the candidate that the budget or the latency verdict turned down."""
    qmodel, cand = chosen
    result.written, result.float_layers = "quantized", cand.float_layers
    result.reason = reason or (
        f"--force: wrote {cand.label} although " + result.reason.split("; wrote")[0]
    )
    cand.verdict, float_cand.verdict = "written (--force)", "replaced (--force)"
    return write(qmodel)


def _sensitivity(
    layers: Sequence[str],
    quantize: Callable[[Sequence[str]], tuple[onnx.ModelProto, dict[str, Any]]],
    float_model: onnx.ModelProto,
    evaluation: Dataset,
    say: Callable[[str], None],
) -> dict[str, float]:
    """Layer -> 1 - (lowest output cosine) with only that layer quantized, on a few feeds."""
    few = Dataset(evaluation.feeds[:SENSITIVITY_FEEDS], source=evaluation.source)
    tol = Tolerance(exact=False)
    out: dict[str, float] = {}
    for i, layer in enumerate(layers):
        say(f"sensitivity {i + 1}/{len(layers)}: {layer}")
        qmodel, notes = quantize([other for other in layers if other != layer])
        if layer not in notes.get("quantized", []):
            out[layer] = 0.0  # not quantizable on its own (e.g. a scale-sharing op)
            continue
        report = compare(float_model, qmodel, few, tol, optimize_candidate=True)
        out[layer] = float(max(1.0 - o.cosine for o in report.outputs))
    return out


def _datasets(
    model: onnx.ModelProto,
    src: Path,
    method: str,
    calibration_data: Any,
    eval_data: Any,
    input_shapes: Mapping[str, Sequence[int]] | None,
    seed: int,
) -> tuple[Dataset | None, Dataset, list[str], list[str]]:
    """(calibration, evaluation, warnings, notes): disjoint whenever the method calibrates.

    Generated inputs are synthesized on the source model (dynamic dims probed on it); the
    notes say which shapes were chosen.
    """
    warnings: list[str] = []

    def load(d: Any) -> Dataset | None:
        if d is None or isinstance(d, Dataset):
            return d
        return data_mod.load(d, model)

    calib, evaluation = load(calibration_data), load(eval_data)
    needs_calib = method in NEEDS_CALIBRATION
    if calib is None and evaluation is None:
        warnings.append(
            "NO DATA GIVEN: calibrating and evaluating on GENERATED random inputs; the accuracy "
            "budget is only a fidelity check on noise. Pass --calibration-data (and --data with "
            "labels) from your real inputs."
        )
        generated = data_mod.synthesize(
            model, src, count=32 if needs_calib else 16, pins=input_shapes, seed=seed
        )
        _require_usable(src, generated)
        if not needs_calib:
            return None, generated, warnings, list(generated.notes)
        first, second = generated.split(0.5)
        return first, second, warnings, list(generated.notes)
    if not needs_calib:
        # nothing is fitted to the data, so every given sample can evaluate
        merged = evaluation if evaluation is not None else calib
        return None, merged, warnings, []
    if calib is not None and evaluation is not None:
        return calib, evaluation, warnings, []
    single = calib if calib is not None else evaluation
    if len(single) < 2:
        raise InputDataError(
            f"{single.source}: holds one feed; calibration and evaluation need separate inputs "
            "(give more samples, or both --calibration-data and --data)"
        )
    first, second = single.split(0.5)
    warnings.append(f"split {single.source}: {len(first)} feeds calibrate, {len(second)} evaluate")
    return first, second, warnings, []


def _require_usable(src: Path, ds: Dataset) -> None:
    """Refuse generated inputs that the source model fails on: lossy methods are judged on them.

    ``synthesize`` runs the source on the first feed only (``unusable`` says why it failed);
    the others are run here, so no later step meets the source's own error.
    """
    why = ds.unusable
    if why is None:
        sess = session(src)
        try:
            for feed in ds.feeds:
                run(sess, feed)
        except OnnxoptError as e:
            why = str(e)
    if why:
        reason = " ".join(why.split())  # one line, nothing cut
        if not reason.startswith("the original model fails"):
            reason = f"the original model fails on the generated inputs ({reason})"
        raise InputDataError(
            f"{reason}; lossy methods are only judged on inputs it accepts: pass real ones "
            "with --calibration-data/--data"
        )


def _lossless_failure(
    report: ValidationReport, level: int, pipeline: PipelineReport, notes: Sequence[str]
) -> str:
    changed = list(dict.fromkeys(r.name for r in pipeline.records if r.changed))
    upgraded = [n for n in notes if n.startswith("upgraded")]
    lines = [
        f"the lossless passes (level {level}; changed the graph: {', '.join(changed) or 'none'}"
        + (f"; {upgraded[0]}" if upgraded else "")
        + ") changed the outputs against the source model:"
    ]
    lines += ["  " + o.describe(report.tolerance) for o in report.failures]
    lines.append(
        "  nothing was written; --level 0 runs only the cleanups, --atol/--rtol loosen the check"
    )
    return "\n".join(lines)
