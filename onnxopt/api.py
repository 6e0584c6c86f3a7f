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
from onnxopt.bench import Latency, ModelStats, measure_latency, model_stats
from onnxopt.errors import ModelSaveError, OnnxoptError, ValidationError
from onnxopt.io import check_model_file, load_model, staged_output, write_model
from onnxopt.manager import DEFAULT_LEVEL, PassManager, PassSpec, PipelineReport, resolve
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
) -> tuple[onnx.ModelProto, PipelineReport]:
    """Rewrite ``model`` with a preset ``level`` and/or explicit ``passes``.

    ``passes`` given alone (``level`` left at its default) run without the preset;
    pass ``level=1, passes=[...]`` to run both, preset first. The input proto is
    never modified. Returns the new model and the per-pass report.
    """
    if level is _UNSET:
        level = None if passes is not None else DEFAULT_LEVEL
    preset, explicit = resolve(level, passes)
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output) if self.output else None,
            "pipeline": self.pipeline.to_dict(),
            "validation": self.validation.to_dict() if self.validation else None,
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
) -> data_mod.Dataset:
    if data is not None:
        return data_mod.load(data, model)
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
) -> OptimizeResult:
    """Optimize the model at ``model_path`` and write it to ``output`` (atomically, validated)."""
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
    if validate or bench:
        dataset = load_data(model, data, pins, seed)
        if dataset.generated:
            logger.info("validating on generated inputs (seed %d); pass --data for real ones", seed)
    calibration = None
    if calibration_data is not None:
        calibration = data_mod.load(calibration_data, model).feeds
    preset, explicit = resolve(level, passes)
    manager = PassManager(preset, explicit, verify_each=verify_each, progress=lambda n: say(f"pass {n}"))
    optimized, report = manager.run(model, calibration=calibration, input_shapes=pins, seed=seed)
    shapes = _shapes_of(dataset) if dataset else pins
    before = model_stats(model, shapes, size_bytes=_file_size(src))
    # from here on only files are used: drop the weights before onnxruntime loads both models
    # (collect: the pipeline's graph is cyclic and its constants still point into ``model``)
    del model, calibration
    gc.collect()
    result: OptimizeResult
    with staged_output(dst) as staged:
        say("writing")
        write_model(optimized, staged, restore_data=False)
        after = model_stats(optimized, shapes, size_bytes=_file_size(staged))
        del optimized
        result = OptimizeResult(dst, report, None, before, after,
                                data_source=dataset.source if dataset else "")
        if dataset is not None and dataset.generated:
            result.warnings.append(f"validated on {dataset.source} inputs, not on real data")
        if validate:
            say("validating")
            tol = tolerance or Tolerance(exact=report.exact)
            try:
                result.validation = compare(src, staged, dataset, tol)
            except OnnxoptError as e:
                # e.g. a custom-domain op onnxruntime does not know: say how to go on without it
                raise OnnxoptError(f"cannot validate: {e}; rerun with --no-validate to write "
                                   "the model without checking it") from e
            if not result.validation:
                raise ValidationError(failure_message(result.validation, report.passes_run),
                                      result.validation)
        if bench:
            say("measuring latency")
            try:
                result.latency = measure_latency(
                    {"before": src, "after": staged}, dataset.feeds, threads=threads,
                    repeats=bench_repeats, tick=tick,
                )
            except OnnxoptError as e:  # a measurement, not a check: the model is still written
                result.warnings.append(f"latency not measured: {e}")
        if report_path is not None:
            _write_json(Path(report_path), result.to_dict())
        if on_result:
            on_result(result)
    return result


def _shapes_of(dataset: data_mod.Dataset) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in dataset.feeds[0].items()} if dataset.feeds else {}


def _file_size(path: Path) -> int:
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return size + (data.stat().st_size if data.exists() else 0)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    try:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=_json_default))
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
