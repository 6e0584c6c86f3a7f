"""The Python API: ``optimize`` (in memory) and ``optimize_file`` (what the CLI runs).

``optimize_file`` is the whole job: load, rewrite, stage the output beside its
destination, validate it against the original in onnxruntime, measure both, and
only then move it into place. Any failure leaves the destination untouched.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxopt import data as data_mod
from onnxopt import guard
from onnxopt.bench import Latency, ModelStats, measure_latency, model_stats
from onnxopt.errors import ModelSaveError, OnnxoptError, ValidationError
from onnxopt.io import check_model_file, load_model, staged_output, write_model
from onnxopt.machine import cores
from onnxopt.manager import (
    DEFAULT_LEVEL,
    PassManager,
    PassSpec,
    PipelineReport,
    enable_trials,
    lift_growth_budgets,
    resolve,
)
from onnxopt.runtime import ModelRef, failure
from onnxopt.validate import Tolerance, ValidationReport, compare, failure_message

logger = logging.getLogger(__name__)


_UNSET: Any = object()  # tells "level not given" from an explicit level=1


def optimize(
    model: onnx.ModelProto,
    level: int | None = _UNSET,
    passes: Sequence[PassSpec] | None = None,
    *,
    calibration: Sequence[Mapping[str, np.ndarray]] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    verify_each: bool = False,
    max_iterations: int = 4,
    seed: int = 0,
    target: str | None = None,
) -> tuple[onnx.ModelProto, PipelineReport]:
    """Rewrite ``model`` with a preset ``level`` and/or explicit ``passes``.

    ``passes`` given alone (``level`` left at its default) run without the preset;
    pass ``level=1, passes=[...]`` to run both, preset first. ``target="onnxruntime"``
    appends that runtime's fusions (``manager.TARGETS``). The input proto is
    never modified. Returns the new model and the per-pass report.
    """
    if level is _UNSET:
        level = None if passes is not None else DEFAULT_LEVEL
    preset, explicit = resolve(level, passes, target)
    manager = PassManager(preset, explicit, max_iterations=max_iterations, verify_each=verify_each)
    return manager.run(model, calibration=calibration, input_shapes=input_shapes, seed=seed)


@dataclasses.dataclass
class OptimizeResult:
    """Everything one ``optimize_file`` run found out."""

    output: Path | None
    pipeline: PipelineReport
    validation: ValidationReport | None
    before: ModelStats
    after: ModelStats
    latency: dict[str, Latency] = dataclasses.field(default_factory=dict)
    data_source: str = ""
    warnings: list[str] = dataclasses.field(default_factory=list)
    # why validation / latency did not run (--no-validate, or the original model fails on
    # generated inputs); None when they ran
    validation_skipped: str | None = None
    bench_skipped: str | None = None
    inputs: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # shapes fed
    input_notes: list[str] = dataclasses.field(default_factory=list)  # how dynamic dims were chosen
    checks: list[str] = dataclasses.field(default_factory=list)  # what gated the write instead
    # never slower, never bigger: what the guard dropped and why, with the full pipeline's figures
    guard: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    source: Path | None = None  # the model optimized

    def to_dict(self) -> dict[str, Any]:
        from onnxopt.report_html import header

        return {
            **header("optimize"),
            "source": str(self.source) if self.source else None,
            "output": str(self.output) if self.output else None,
            "pipeline": self.pipeline.to_dict(),
            "validation": self.validation.to_dict() if self.validation else None,
            "validation_skipped": self.validation_skipped,
            "bench_skipped": self.bench_skipped,
            "inputs": self.inputs,
            "input_notes": self.input_notes,
            "checks": self.checks,
            "guard": self.guard,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "latency": {k: v.to_dict() for k, v in self.latency.items()},
            "data_source": self.data_source,
            "warnings": self.warnings,
        }


def default_output(path: Path) -> Path:
    return path.with_name(path.stem + ".opt.onnx")


def load_data(
    model: onnx.ModelProto, data: str | os.PathLike[str] | None,
    input_shapes: Mapping[str, Sequence[int]] | None, seed: int = 0, count: int = 8,
    reference: ModelRef | None = None,
) -> data_mod.Dataset:
    """The user's data, else generated inputs (probed on ``reference``, the original model, if given)."""
    if data is not None:
        return data_mod.load(data, model)
    if reference is not None:
        return data_mod.synthesize(model, reference, count=count, pins=input_shapes, seed=seed)
    return data_mod.generate(model, count=count, pins=input_shapes, seed=seed)


def optimize_file(
    model_path: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    level: int | None = DEFAULT_LEVEL,
    passes: Sequence[PassSpec] | None = None,
    *,
    data: str | os.PathLike[str] | None = None,
    calibration_data: str | os.PathLike[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    tolerance: Tolerance | None = None,
    validate: bool = True,
    bench: bool = True,
    bench_repeats: int = 30,
    threads: int = 1,
    verify_each: bool = False,
    report_path: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    on_result: Callable[[OptimizeResult], None] | None = None,
    tick: Callable[[int, int], None] | None = None,
    require_validation: bool = False,
    allow_growth: bool = False,
    target: str | None = None,
) -> OptimizeResult:
    """Optimize the model at ``model_path`` and write it to ``output`` (atomically, validated).

    Without ``data``, inputs are generated to fit the model and probed on it. When the original
    model runs on none of them, the lossless result is still written, gated by ``onnx.checker``,
    strict shape inference and an onnxruntime load, and ``validation_skipped`` says why;
    ``require_validation=True`` makes that an error instead.

    A lossless run (every pass exact) is never written slower or bigger than its input
    (``onnxopt.guard``): the pass responsible is dropped and named in ``warnings`` and
    ``guard``. ``allow_growth`` lets it grow the file (and lifts fold-constants' budget).
    """
    src = Path(model_path)
    dst = Path(output) if output is not None else default_output(src)
    say = progress or (lambda _msg: None)
    say(f"loading {src}")
    model = load_model(src)
    # refuse a broken input here, rather than blame the output when it fails the same check
    check_model_file(src)
    if dst.exists() and dst.is_dir():
        raise ModelSaveError(f"{dst}: is a directory")
    if not dst.parent.exists():
        raise ModelSaveError(f"{dst}: directory '{dst.parent}' does not exist")
    pins = dict(input_shapes or {})
    dataset = None
    skipped: str | None = None if validate else "--no-validate"
    if validate or bench:
        say("choosing inputs" if data is None else f"loading {data}")
        dataset = load_data(model, data, pins, seed, reference=src)
        if dataset.unusable and validate:
            skipped = dataset.unusable
    if skipped and require_validation:
        raise ValidationError(f"--require-validation: {_skip_message(skipped)}")
    calibration = None
    if calibration_data is not None:
        calibration = data_mod.load(calibration_data, model).feeds
    preset, explicit = resolve(level, passes, target)
    if allow_growth:
        lift_growth_budgets(preset + explicit)
    lossless = all(p.exact for p in preset + explicit)
    # rewrites whose payoff depends on the model are tried on it: measured with and without
    trials = enable_trials(preset + explicit) if lossless and bench else []
    manager = PassManager(preset, explicit, verify_each=verify_each, progress=lambda n: say(f"pass {n}"))
    optimized, report = manager.run(model, calibration=calibration, input_shapes=pins, seed=seed)
    shapes = _shapes_of(dataset) if dataset else pins
    before = model_stats(model, shapes, size_bytes=_file_size(src))
    source_checks = _write_gates(model, src) if skipped else None
    # from here on only files are used: drop the weights before onnxruntime loads both models
    # (collect: the pipeline's graph is cyclic and its constants still point into ``model``)
    del model, calibration
    gc.collect()
    result: OptimizeResult

    def rerun(variant: PassManager) -> tuple[onnx.ModelProto, PipelineReport]:
        source = load_model(src)  # reloaded (freed above): one copy serves the data and the run
        cal = data_mod.load(calibration_data, source).feeds if calibration_data else None
        return variant.run(source, calibration=cal, input_shapes=pins, seed=seed)

    with staged_output(dst) as staged, guard.Guard(manager, rerun, src, dst, _file_size) as keeper:
        say("writing")
        write_model(optimized, staged, restore_data=False)
        after = model_stats(optimized, shapes, size_bytes=_file_size(staged))
        decisions: list[guard.Decision] = []
        if lossless and not allow_growth and guard.grown(before.size_bytes, after.size_bytes):
            say("finding the pass that grew the file")
            decisions.append(keeper.smaller(report, before.size_bytes, after.size_bytes))
            optimized, report, after = _adopt(decisions[-1], staged, shapes)
        result = OptimizeResult(dst, report, None, before, after,
                                data_source=dataset.source if dataset else "", source=src)
        _record(result, decisions)
        if dataset is not None:
            result.inputs = {k: list(v) for k, v in shapes.items()}
            result.input_notes = list(dataset.notes)
        if skipped:
            assert source_checks is not None
            say("checking the model (validation skipped)")
            result.checks = _gate(optimized, staged, source_checks)
        del optimized
        # only when validation runs: with --no-validate inputs are still generated, for latency
        if validate and not skipped and dataset is not None and dataset.generated and not dataset.unusable:
            result.warnings.append(f"validated on {dataset.source} inputs, not on real data")
        if validate and not skipped:
            say("validating")
            assert dataset is not None
            result.validation, skipped = _validate(src, staged, dataset, report, tolerance)
            if skipped:  # the original fails on some generated feed: not the rewrite's fault
                if require_validation:
                    raise ValidationError(f"--require-validation: {_skip_message(skipped)}")
                result.checks = _gate(load_model(staged), staged, _write_gates(load_model(src), src))
        result.validation_skipped = skipped
        if skipped and skipped != "--no-validate":
            result.warnings.insert(0, "validation skipped: " + _skip_message(skipped))
        if not bench:
            result.bench_skipped = "--no-bench"
        elif dataset is not None and (dataset.unusable or (skipped and skipped != "--no-validate")):
            result.bench_skipped = "the original model does not run on the generated inputs"
        else:
            assert dataset is not None
            say("measuring latency")
            try:
                result.latency = measure_latency(
                    {"before": src, "after": staged}, dataset.feeds, threads=threads,
                    repeats=bench_repeats, tick=tick,
                )
            except OnnxoptError as e:  # a measurement, not a check: the model is still written
                result.bench_skipped = str(e)
                result.warnings.append(f"latency not measured: {e}")
            first = guard.latency_ratio(result.latency["before"], result.latency["after"]) \
                if lossless and result.latency else None

            def measure(models: Mapping[str, Any], at: int = threads) -> Mapping[str, Latency]:
                return measure_latency(models, dataset.feeds, threads=at, repeats=bench_repeats, tick=tick)

            def dropped() -> list[str]:
                return [n for d in decisions if d.variant for n in d.variant.dropped]

            if first is not None and first.slower:
                say("finding the pass that slowed it")
                decisions.append(keeper.faster(report, src, staged, first, measure, already=dropped()))
                _settle(result, decisions[-1], staged, shapes, src, dataset, tolerance)
            for name in trials if first is not None else ():
                if name in dropped() or name not in result.pipeline.changed_passes:
                    continue
                say(f"trying the model without {name}")
                # also timed with every core, onnxruntime's default in deployment
                decisions.append(keeper.trial(name, src, staged, measure, list(dict.fromkeys([threads, cores()])),
                                              already=dropped()))
                _settle(result, decisions[-1], staged, shapes, src, dataset, tolerance)
        if report_path is not None:
            _write_json(Path(report_path), result.to_dict())
        if on_result:
            on_result(result)
    return result


def _settle(result: OptimizeResult, decision: guard.Decision, staged: Path,
            shapes: Mapping[str, Sequence[int]], src: Path, dataset: data_mod.Dataset,
            tolerance: Tolerance | None) -> None:
    """A decision after the measurement: its latency; its variant staged and validated, if any."""
    result.latency = decision.latency
    if decision.variant is not None:
        _, result.pipeline, result.after = _adopt(decision, staged, shapes)
        if result.validation is not None:  # the written graph changed: validate it
            result.validation, _ = _validate(src, staged, dataset, result.pipeline, tolerance)
    _record(result, [decision])


def _adopt(decision: guard.Decision, staged: Path, shapes: Mapping[str, Sequence[int]],
           ) -> tuple[onnx.ModelProto, PipelineReport, ModelStats]:
    """Stage the guard's variant instead of the full result: its model, report and stats."""
    assert decision.variant is not None
    guard.adopt(decision.variant, staged)
    report = decision.variant.report
    report.dropped = {name: decision.message for name in decision.variant.dropped}
    model = load_model(staged)
    return model, report, model_stats(model, shapes, size_bytes=_file_size(staged))


def _record(result: OptimizeResult, decisions: Sequence[guard.Decision]) -> None:
    """The guard's decisions go to the report, and all but the trials' to the warnings (a trial's
    verdict is how the run works, not a caveat: the console and the HTML page show it as a note)."""
    for d in decisions:
        result.guard.append(d.to_dict())
        if "trial" not in d.figures:
            result.warnings.append(d.message)


def _skip_message(reason: str) -> str:
    if reason == "--no-validate":
        return "--no-validate was given"
    if "cannot load" in reason:  # no data helps: onnxruntime cannot run the original at all
        return reason
    return f"{reason}; pass --data FILE.npz (arrays named after the model inputs) to validate"


def _validate(
    src: Path, staged: Path, dataset: data_mod.Dataset, report: PipelineReport,
    tolerance: Tolerance | None,
) -> tuple[ValidationReport | None, str | None]:
    """(report, None), or (None, why) when the original model fails on a generated feed.

    A pipeline with lossy passes is judged as onnxruntime runs it (its graph rewrites on, so
    quantized models run in the fused integer kernels), like the ``--quantize`` driver does.
    """
    tol = tolerance or Tolerance(exact=report.exact)
    try:
        validation = compare(src, staged, dataset, tol, optimize_candidate=not report.exact)
    except OnnxoptError as e:
        original = failure(src, dataset.feeds)
        if original is not None and dataset.generated:
            return None, f"the original model fails on generated inputs: {original}"
        if original is not None:
            raise OnnxoptError(f"the original model fails on {dataset.source}: {original}") from e
        raise ValidationError(f"the optimized model fails in onnxruntime where the original runs: "
                              f"{e}; nothing was written") from e
    if not validation:
        raise ValidationError(failure_message(validation, report.passes_run), validation)
    return validation, None


def _write_gates(model: onnx.ModelProto, src: Path) -> dict[str, str | None]:
    """What the source model fails of the checks that gate an unvalidated write (None: passes)."""
    return {"onnx.checker": _checker(model), "strict shape inference": _strict_shapes(model),
            "onnxruntime load": failure(src)}


def _gate(model: onnx.ModelProto, staged: Path, source: Mapping[str, str | None]) -> list[str]:
    """Checks an unvalidated model must pass before it is written (those the source passes)."""
    done = []
    for name, error in (("onnx.checker", _checker(model)),
                        ("strict shape inference", _strict_shapes(model)),
                        ("onnxruntime load", failure(staged))):
        if error is None:
            done.append(f"{name}: ok")
        elif source.get(name) is not None:
            done.append(f"{name}: fails on the original model too ({source[name]})")
        else:
            raise ValidationError(f"the optimized model fails {name}, which the original passes: "
                                  f"{error}; nothing was written")
    return done


def _checker(model: onnx.ModelProto) -> str | None:
    from onnxopt.io import over_protobuf_limit

    try:
        if not over_protobuf_limit(model):
            onnx.checker.check_model(model)
    except Exception as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def _strict_shapes(model: onnx.ModelProto) -> str | None:
    from onnxopt.shapes import copy_structure

    light = onnx.ModelProto()
    copy_structure(model, light)
    try:
        onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True)
    except Exception as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def _shapes_of(dataset: data_mod.Dataset) -> dict[str, tuple[int, ...]]:
    if not dataset.feeds:
        return {}
    return {k: tuple(v.shape) for k, v in dataset.feeds[0].items() if isinstance(v, np.ndarray)}


def _file_size(path: Path) -> int:
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return size + (data.stat().st_size if data.exists() else 0)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    _write_text(path, json.dumps(payload, indent=2, default=_json_default))


def _write_text(path: Path, text: str) -> None:
    """Write a report atomically: a temporary file beside ``path``, then moved into place."""
    try:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        raise OnnxoptError(f"{path}: cannot write report ({e.strerror})") from None


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)
