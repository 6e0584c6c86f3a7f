"""The ``onnxopt`` command line: a thin typer layer over the Python API.

This is the only module that prints. An ``OnnxoptError`` becomes one
``onnxopt: error: ...`` message and exit code 1; an interrupt exits 130 with
nothing written; typer's usage errors keep exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from onnxopt import __version__
from onnxopt.errors import OnnxoptError
from onnxopt.many import ExecutorOption, MeasureOnOption, RayAddressOption
from onnxopt.many import command as optimize_many

# plain help (rich_markup_mode=None): the rich help panels print a type such as <bool> beside
# every flag, --help included; plain help shows each option with its METAVAR, flags without one
app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]},
    help="Graph-level optimizer for ONNX models: rewrites, validates against the original "
    "in onnxruntime, and measures before and after.",
)
# wide enough for the report tables when output is a file or a CI log
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


@contextlib.contextmanager
def _user_errors(verbose: bool = False) -> Iterator[None]:
    try:
        yield
    except OnnxoptError as e:
        lines = str(e).splitlines() or [type(e).__name__]
        err.print(f"onnxopt: error: {lines[0]}", markup=False, soft_wrap=True)
        for line in lines[1:]:
            err.print(line, markup=False, soft_wrap=True)
        if verbose and e.__cause__ is not None:
            import traceback

            err.print("".join(traceback.format_exception(e.__cause__)), markup=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("onnxopt: interrupted; nothing was written", markup=False)
        raise typer.Exit(130) from None


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else
                                         logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("onnxopt").setLevel(level)


def _version(value: bool) -> None:
    if value:
        out.print(f"onnxopt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    pass


Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True, show_default=False,
                                      help="More logging (-vv for debug).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", show_default=False,
                                     help="Print only the one-line summary, warnings and errors.")]
InputShape = Annotated[
    list[str] | None,
    typer.Option("--input-shape", metavar="NAME=1,3,224,224",
                 help="Pin an input's shape; every dim a positive integer (repeatable)."),
]
Seed = Annotated[int, typer.Option(metavar="N", help="Seed for generated inputs.")]
DataOption = Annotated[Path | None, typer.Option(
    metavar="FILE.npz|DIR", help="Inputs (.npz or a directory of .npz); default: generated.")]


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _fmt_int(n: int | None) -> str:
    if n is None:
        return "-"
    if abs(n) >= 1e9:
        return f"{n / 1e9:.2f}G"
    if abs(n) >= 1e6:
        return f"{n / 1e6:.2f}M"
    if abs(n) >= 1e4:
        return f"{n / 1e3:.1f}k"
    return str(n)


def _pct(before: float | None, after: float | None) -> str:
    if not before or after is None:
        return "-"
    return f"{(after - before) / before:+.1%}"


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]],
           left: Collection[str] = ("",)) -> Table:
    """``_compact_table`` (no empty columns, cells not markup) with a title kept on one line."""
    table = _compact_table(list(header), [list(r) for r in rows], tuple(left))
    table.title, table.title_justify, table.min_width = title, "left", len(title)
    return table


def _signed(n: int) -> str:
    return "" if n == 0 else ("+" if n > 0 else "") + _fmt_int(n)


def _fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape) if len(shape) else "scalar"


def _fmt_shapes(shapes: Mapping[str, Sequence[int]]) -> str:
    return ", ".join(f"{k}={_fmt_shape(v)}" for k, v in shapes.items())


def _fmt_pass(p: Any) -> str:
    """``name(key=value, ...)``: a pass with its options, as ``--pass`` would spell them."""
    import dataclasses

    options = getattr(p, "options", None)
    if options is None or not dataclasses.is_dataclass(options):
        return str(p.name)
    fields = ", ".join(f"{f.name}={getattr(options, f.name)}" for f in dataclasses.fields(options))
    return f"{p.name}({fields})" if fields else str(p.name)


_SKIPPED = "validation skipped"  # how optimize_file's warning on a skipped validation begins
_DROPPED = "dropped "  # ... and onnxopt.guard's, on a pass taken out (slower or bigger with it)


def print_warnings(result: Any) -> None:
    """Yellow lines above everything else: validation could not run, or a pass was dropped."""
    for w in result.warnings:
        if w.startswith((_SKIPPED, _DROPPED)):
            err.print(Text.assemble(("WARNING:", "bold yellow"), f" {w}"), soft_wrap=True)


def print_result(result: Any) -> None:
    """Input notes, the passes that did something, before/after, validation, then notes."""
    if result.input_notes:
        out.print(f"inputs: {result.data_source or 'generated'}", markup=False)
        for n in result.input_notes:
            out.print(f"  {n}", markup=False, soft_wrap=True)
    _print_passes(result.pipeline)
    factorized = (result.pipeline.notes or {}).get("factorize-lowrank", {}).get("layers")
    if factorized:
        _print_factorized(factorized)
    _print_before_after(result)
    if result.validation is not None:
        _print_validation(result.validation)
    if result.validation_skipped == "--no-validate":
        out.print("note: not validated (--no-validate): the written model was not compared with "
                  "the original", markup=False, soft_wrap=True)
    elif result.checks:
        out.print("note: checked instead of validated: " + "; ".join(result.checks), markup=False,
                  soft_wrap=True)
    said = any(w.startswith("latency not measured") for w in result.warnings)
    if result.bench_skipped and not said:
        out.print(f"note: latency not measured ({result.bench_skipped})", markup=False,
                  soft_wrap=True)
    for w in result.warnings:
        if not w.startswith((_SKIPPED, _DROPPED)):  # already said at the top
            out.print(f"note: {w}", markup=False, soft_wrap=True)
    for g in result.guard:  # trials: which model-dependent rewrites were kept, measured
        if "trial" in g:
            out.print(f"note: {g['message']}", markup=False, soft_wrap=True)


def _print_passes(pipeline: Any) -> None:
    rows, idle = [], []
    for r in pipeline.summary():
        if not r["changed"] and not r["stats"]:
            idle.append(r["name"])
            continue
        did = ", ".join(f"{k}={v}" for k, v in sorted(r["stats"].items()))
        rows.append([r["name"], str(r["runs"]), did, _signed(-r["nodes_removed"]),
                     _signed(-r["params_removed"]), f"{r['seconds']:.3f}"])
    if rows:
        header = ["pass", "runs", "what it did", "nodes", "params", "seconds"]
        out.print(_table("Passes", header, rows, left=("pass", "what it did")))
    if idle:
        out.print(("no change: " if rows else "passes: nothing to change (ran ") + ", ".join(idle)
                  + ("" if rows else ")"), markup=False)


def _print_before_after(result: Any) -> None:
    b, a = result.before, result.after
    rows = [["nodes", str(b.nodes), str(a.nodes), _pct(b.nodes, a.nodes)]]
    if b.parameters or a.parameters:
        rows.append(["parameters", _fmt_int(b.parameters), _fmt_int(a.parameters),
                     _pct(b.parameters, a.parameters)])
    rows.append(["file size", _fmt_bytes(b.size_bytes), _fmt_bytes(a.size_bytes),
                 _pct(b.size_bytes, a.size_bytes)])
    if b.macs is not None or a.macs is not None:
        rows.append(["MACs (est.)", _fmt_int(b.macs), _fmt_int(a.macs), _pct(b.macs, a.macs)])
    title = "Before / after"
    if result.latency:
        lb, la = result.latency["before"], result.latency["after"]
        rows.append(["latency median", f"{lb.median_ms:.3f} ms", f"{la.median_ms:.3f} ms",
                     _pct(lb.median_ms, la.median_ms)])
        rows.append(["latency p90", f"{lb.p90_ms:.3f} ms", f"{la.p90_ms:.3f} ms",
                     _pct(lb.p90_ms, la.p90_ms)])
        clock = "CPU time" if lb.clock == "thread_time" else "wall clock"
        threads = f"{lb.threads} thread{'s' if lb.threads > 1 else ''}"
        title += f" (latency: {lb.repeats} runs, {threads}, {clock})"
    v = result.validation
    if v is not None and v.accuracy_before is not None:
        rows.append(["accuracy (labels)", f"{v.accuracy_before:.2%}", f"{v.accuracy_after:.2%}",
                     f"{(v.accuracy_after - v.accuracy_before) * 100:+.2f} pt"])
    out.print(_table(title, ["", "before", "after", "change"], rows))


def summary_line(result: Any) -> str:
    """The run in one line: what was written, what changed, and whether it was validated."""
    b, a = result.before, result.after
    parts = [f"nodes {b.nodes} -> {a.nodes}",
             f"size {_fmt_bytes(b.size_bytes)} -> {_fmt_bytes(a.size_bytes)}"]
    if result.latency:
        lb, la = result.latency["before"], result.latency["after"]
        parts.append(f"latency {lb.median_ms:.3f} -> {la.median_ms:.3f} ms "
                     f"({_pct(lb.median_ms, la.median_ms)})")
    elif result.bench_skipped == "--no-bench":
        parts.append("latency not measured (--no-bench)")
    else:
        parts.append("latency not measured")
    v = result.validation
    if v is not None:
        parts.append(f"validated on {v.samples} feeds from {v.source}")
        if v.accuracy_before is not None:
            parts.append(f"accuracy {v.accuracy_before:.2%} -> {v.accuracy_after:.2%}")
    elif result.validation_skipped == "--no-validate":
        parts.append("NOT validated (--no-validate)")
    else:
        parts.append("NOT validated (see the warning)")
    return f"wrote {result.output}: " + ", ".join(parts)


def _bounded(value: float | None, low: float | None, fmt: str) -> str:
    """``value (>= low)``: an estimate and the lower confidence bound the floor checks."""
    if value is None:
        return "-"
    return format(value, fmt) + ("" if low is None else f" (>= {format(low, fmt)})")


def _print_validation(v: Any) -> None:
    rows = [
        [o.name, f"{o.max_abs:.3g}", f"{o.max_rel:.3g}", _bounded(o.cosine, o.cosine_low, ".6f"),
         "-" if o.top1_agreement is None else f"{o.top1_agreement:.2%}",
         _bounded(o.top1_expected, o.top1_expected_low, ".2%"), o.tolerance or "",
         "ok" if o.passed else "FAIL"]
        for o in v.outputs
    ]
    header = ["output", "max abs", "max rel", "cosine", "top-1 agree", "expected", "tolerance",
              "result"]
    out.print(_table(f"Validation on {v.samples} feeds from {v.source}", header, rows,
                     left=("output", "tolerance")))


class _IfCounted(ProgressColumn):
    """``column`` while the task has a total; a phase without one is a spinner and text."""

    def __init__(self, column: ProgressColumn) -> None:
        super().__init__()
        self.column = column

    def render(self, task: Task) -> RenderableType:
        return self.column.render(task) if task.total else Text("")


class _Activity:
    """What runs now, on stderr, transient: a spinner, and a bar (count, time left) while a loop ticks.

    Disabled (every call a no-op) when stderr is not a terminal or with -q.
    """

    def __init__(self, enabled: bool) -> None:
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"),
            *(_IfCounted(c) for c in (BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())),
            console=err, transient=True,
        ) if enabled else None
        self.task: TaskID | None = None

    def __enter__(self) -> _Activity:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def say(self, message: str) -> None:
        """A new phase: its own line, without a bar until it ticks."""
        if self.progress is None:
            return
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(message, total=None)

    def tick(self, done: int, total: int) -> None:
        if self.progress is None:
            return
        if self.task is None:
            self.say("working")
        self.progress.update(self.task, completed=done, total=total or None)  # type: ignore[arg-type]


@app.command()
def optimize(
    model: Annotated[Path, typer.Argument(
        metavar="MODEL", help="Input .onnx file.", show_default=False)],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="PATH", help="Output path. Default: <model>.opt.onnx.")] = None,
    level: Annotated[int | None, typer.Option(
        metavar="0|1",
        help="Preset of exact passes (0: cleanup, 1: all lossless). Default 1 unless --pass is given.")] = None,
    passes: Annotated[list[str] | None, typer.Option(
        "--pass", metavar="NAME[:KEY=VALUE,...]",
        help="Run a pass by name, with options (repeatable, in order, after --level).")] = None,
    data: Annotated[Path | None, typer.Option(
        metavar="FILE.npz|DIR",
        help="Validation inputs: .npz named after the model inputs (first axis = samples; optional "
        "'labels'), or a directory of .npz feeds. Default: generated.")] = None,
    calibration_data: Annotated[Path | None, typer.Option(
        metavar="FILE.npz|DIR",
        help="Calibration inputs for lossy passes (.npz or directory).")] = None,
    input_shape: InputShape = None,
    atol: Annotated[float | None, typer.Option(
        metavar="FLOAT", help="Absolute tolerance for exact pipelines (default 1e-4).")] = None,
    rtol: Annotated[float | None, typer.Option(
        metavar="FLOAT", help="Relative tolerance for exact pipelines (default 1e-3).")] = None,
    min_cosine: Annotated[float | None, typer.Option(
        metavar="FLOAT", help="Cosine floor for lossy pipelines (default 0.99).")] = None,
    validate: Annotated[bool, typer.Option(
        "--validate/--no-validate", show_default=False,
        help="Compare outputs with the original in onnxruntime before writing (default: on).")] = True,
    require_validation: Annotated[bool, typer.Option(
        "--require-validation", show_default=False,
        help="Fail, writing nothing, when validation cannot run (e.g. generated inputs do not fit "
        "the model) instead of writing with a warning.")] = False,
    allow_growth: Annotated[bool, typer.Option(
        "--allow-growth", show_default=False,
        help="Let a lossless run write a bigger file (folded constants); by default a pass that "
        "grows the file beyond 1% (or 16 KiB) is dropped and named.")] = False,
    target: Annotated[str | None, typer.Option(
        metavar="RUNTIME", help="Also fuse into ops only RUNTIME runs: 'onnxruntime' (its com.microsoft "
        "Attention, SkipLayerNormalization, BiasGelu/FastGelu). The output then needs that runtime and "
        "says so in its metadata (onnxopt.requires).")] = None,
    bench: Annotated[bool, typer.Option(
        "--bench/--no-bench", show_default=False,
        help="Measure latency before and after (default: on).")] = True,
    repeats: Annotated[int, typer.Option(
        min=3, metavar="N", help="Latency repetitions per model.")] = 100,
    threads: Annotated[int, typer.Option(
        min=1, metavar="N", help="onnxruntime intra-op threads for latency.")] = 1,
    verify_each: Annotated[bool, typer.Option(
        "--verify-each", show_default=False,
        help="Run onnx.checker after every pass to blame the one that breaks a graph.")] = False,
    report: Annotated[Path | None, typer.Option(
        metavar="FILE.json", help="Write the full report as JSON.")] = None,
    report_html: Annotated[Path | None, typer.Option(
        "--report-html", metavar="FILE.html",
        help="Write the report as one self-contained HTML page with plots (opens offline).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", show_default=False,
        help="Check the model, output directory, pipeline, requirements and input shapes; run nothing.")] = False,
    seed: Seed = 0,
    quantize: Annotated[str | None, typer.Option(
        metavar="METHOD", help="Compress: int8 (static QDQ, calibrated), dynamic, int8-weight, int4 or fp16. Kept only "
        "when within the accuracy budget and faster than the float model on this machine.")] = None,
    prune: Annotated[float | None, typer.Option(
        metavar="FRACTION", min=0.0, max=0.95, help="Compress: remove about FRACTION of the prunable "
        "channels, heads and hidden units (structured pruning, refit by least squares on the "
        "calibration data), where it costs least accuracy; composes with --quantize in one budget. "
        "Kept only when within the budget and faster.")] = None,
    factorize: Annotated[float | None, typer.Option(
        metavar="FRACTION", min=0.0, max=0.95, help="Compress: factorize MatMul, Gemm and Conv weights "
        "through a rank of FRACTION of full rank (activation-aware SVD, refit by least squares on the "
        "calibration data); composes with --prune and --quantize in one budget. Kept only when within "
        "the budget and faster.")] = None,
    max_accuracy_drop: Annotated[float | None, typer.Option(
        metavar="POINTS", help="With --quantize: allowed task-accuracy drop in percentage points (needs 'labels' in the "
        "data; default 1.0). Without labels: cosine >= --min-cosine and top-1 agreement >= 98%.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", show_default=False, help="With --quantize/--prune: write the compressed model even when it is slower or over budget.")] = False,
    executor: ExecutorOption = "local",
    ray_address: RayAddressOption = "auto",
    measure_on: MeasureOnOption = None,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Optimize MODEL, validate it against the original, measure both, and write it."""
    _setup_logging(verbose, quiet)
    with _user_errors(verbose > 0):
        from onnxopt.api import optimize_file
        from onnxopt.data import parse_input_shapes
        from onnxopt.manager import DEFAULT_LEVEL, resolve
        from onnxopt.validate import EXACT_ATOL, EXACT_RTOL, LOSSY_MIN_COSINE, Tolerance

        if level is None and not passes:
            level = DEFAULT_LEVEL
        shapes = parse_input_shapes(input_shape)
        if report_html is not None:
            from onnxopt.report_html import check_destination

            check_destination(report_html)
        if quantize is not None or prune is not None or factorize is not None:
            if passes:
                raise OnnxoptError("--quantize/--prune/--factorize run their own pipeline (level 1, then the lossy "
                                   "methods); use them or --pass, not both")
            if target is not None:
                raise OnnxoptError("--target applies to lossless runs; drop --quantize/--prune/--factorize or --target")
            methods = ([f"prune:{prune:g}"] if prune is not None else []) + (
                [f"factorize:{factorize:g}"] if factorize is not None else []) + (
                [quantize] if quantize is not None else [])
            _compress(model, output, methods, data, calibration_data, shapes, level, max_accuracy_drop,
                      min_cosine, force, threads, repeats, report, seed, dry_run, validate=validate,
                      bench=bench, verify_each=verify_each, atol=atol, rtol=rtol, quiet=quiet,
                      report_html=report_html, executor=executor, ray_address=ray_address, measure_on=measure_on)
            return
        if executor != "local" or measure_on is not None:
            raise OnnxoptError("--executor/--measure-on distribute the lossy driver's tasks; add --quantize, "
                               "--prune or --factorize")
        preset, explicit = resolve(level, passes, target)
        if require_validation and not validate:
            raise OnnxoptError("--require-validation and --no-validate contradict each other; "
                               "drop one")
        if dry_run:
            _dry_run(model, output, preset, explicit, data, calibration_data, shapes,
                     needs_inputs=validate or bench, quiet=quiet)
            return
        exact = all(p.exact for p in explicit)
        tolerance = Tolerance(
            exact=exact, atol=atol if atol is not None else EXACT_ATOL,
            rtol=rtol if rtol is not None else EXACT_RTOL,
            min_cosine=min_cosine if min_cosine is not None else LOSSY_MIN_COSINE,
        )
        with _Activity(err.is_terminal and not quiet) as activity:
            result = optimize_file(
                model, output, level, passes, data=data, calibration_data=calibration_data,
                input_shapes=shapes, tolerance=tolerance, validate=validate, bench=bench,
                bench_repeats=repeats, threads=threads, verify_each=verify_each, report_path=report,
                seed=seed, progress=activity.say, tick=activity.tick,
                require_validation=require_validation, allow_growth=allow_growth, target=target,
            )
        print_warnings(result)
        if not quiet:
            print_result(result)
        out.print(summary_line(result), markup=False, soft_wrap=True)
        _write_report_html(report_html, result)


def _write_report_html(path: Path | None, result: Any) -> None:
    """The HTML report, and the one line that names it."""
    if path is None:
        return
    from onnxopt.report_html import write_html

    write_html(path, result.to_dict())
    out.print(f"report: {path}", markup=False, soft_wrap=True)


def _dry_run(
    model: Path, output: Path | None, preset: Sequence[Any], explicit: Sequence[Any],
    data: Path | None, calibration_data: Path | None, shapes: Mapping[str, Sequence[int]],
    needs_inputs: bool, quiet: bool,
) -> None:
    """Check all that needs no model run and name every problem at once."""
    from onnxopt import data as data_mod
    from onnxopt.api import default_output
    from onnxopt.graph_utils import node_count
    from onnxopt.io import load_model, opset_of
    from onnxopt.manager import check_requirements

    lines: list[str] = []
    problems: list[str] = []

    def check(fn: Any) -> Any:
        try:
            return fn()
        except OnnxoptError as e:
            problems.append(str(e))
            return None

    m = check(lambda: load_model(model))
    if m is not None:
        n = node_count(m)
        lines.append(f"model: {model} ({n} node{'' if n == 1 else 's'}, opset {opset_of(m)})")
    dst = output or default_output(model)
    if dst.is_dir():
        problems.append(f"{dst}: is a directory")
    elif not dst.parent.exists():
        problems.append(f"{dst}: directory '{dst.parent}' does not exist")
    lines.append(f"output: {dst}")
    if preset:
        lines.append("passes (to fixpoint): " + ", ".join(p.name for p in preset))
    if explicit:
        lines.append(f"passes (once each{', after' if preset else ''}): "
                     + ", ".join(_fmt_pass(p) for p in explicit))
    check(lambda: check_requirements([*preset, *explicit], calibration_data, shapes))
    for flag, path in (("--data", data), ("--calibration-data", calibration_data)):
        if path is not None and not path.exists():
            problems.append(f"{flag} {path}: no such file or directory")
    if m is not None and data is not None and data.exists():
        dataset = check(lambda: data_mod.load(data, m))
        if dataset is not None:
            lines.append(f"inputs: {len(dataset)} feeds from {data}")
    elif m is not None and needs_inputs:
        # the dims a run would probe must at least have candidates; say which are tried first
        resolved = check(lambda: data_mod.resolve_shapes(m, shapes))
        if resolved is not None:
            lines.append(f"inputs: generated at {_fmt_shapes(resolved[0]) or 'no inputs'}")
            lines.extend(f"  {n}" for n in resolved[1])
    if not quiet:
        for line in lines:
            out.print(line, markup=False, soft_wrap=True)
    if problems:
        detail = "\n".join("  " + line for p in problems for line in p.splitlines())
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise OnnxoptError(f"--dry-run found {count}; nothing was run\n{detail}")
    out.print("dry run: ok; nothing was run", markup=False)


def _compress(
    model: Path, output: Path | None, methods: list[str], data: Path | None, calibration_data: Path | None,
    shapes: dict[str, tuple[int, ...]], level: int | None, max_accuracy_drop: float | None,
    min_cosine: float | None, force: bool, threads: int, repeats: int, report: Path | None,
    seed: int, dry_run: bool, *, validate: bool = True, bench: bool = True,
    verify_each: bool = False, atol: float | None = None, rtol: float | None = None,
    quiet: bool = False, report_html: Path | None = None,
    executor: str = "local", ray_address: str = "auto", measure_on: str | None = None,
) -> None:
    from onnxopt.api import _write_json, default_output
    from onnxopt.executors import make
    from onnxopt.lossy import DEFAULT_MIN_COSINE, QUANTIZERS, compress, resolve_methods
    from onnxopt.manager import DEFAULT_LEVEL
    from onnxopt.validate import EXACT_ATOL, EXACT_RTOL, Tolerance

    flag = next((f"--{m.split(':')[0]}" for m in methods if ":" in m), "--quantize")
    for method in methods:
        if ":" not in method and method not in QUANTIZERS:
            raise OnnxoptError(f"--quantize '{method}': choose one of {', '.join(QUANTIZERS)}")
    resolved = resolve_methods(methods)
    if not validate:
        raise OnnxoptError(f"{flag} needs validation: a lossy method is never kept unjudged; "
                           "drop --no-validate")
    if not bench and not force:
        raise OnnxoptError(f"--no-bench: with {flag} the latency verdict decides whether the "
                           "compressed model is kept; add --force to write it without measuring")
    # --atol/--rtol apply to the lossless step's check against the source
    exact = Tolerance(atol=EXACT_ATOL if atol is None else atol,
                      rtol=EXACT_RTOL if rtol is None else rtol)
    if dry_run:
        out.print(f"compress: level {DEFAULT_LEVEL if level is None else level}, then "
                  + ", then ".join(m.pass_name for m in resolved)
                  + "; one budget, per-layer sensitivity and allocation, latency check; nothing run")
        return
    with make(executor, ray_address, measure_on) as ex, _Activity(err.is_terminal and not quiet) as activity:
        result = compress(
            model, output or default_output(model), resolved, calibration_data=calibration_data,
            eval_data=data, max_accuracy_drop=max_accuracy_drop,
            min_cosine=min_cosine if min_cosine is not None else DEFAULT_MIN_COSINE, force=force,
            bench=bench, threads=threads, repeats=repeats,
            level=DEFAULT_LEVEL if level is None else level, input_shapes=shapes,
            exact_tolerance=exact, verify_each=verify_each, seed=seed,
            progress=activity.say, tick=activity.tick, executor=ex,
        )
    for w in dict.fromkeys(result.warnings):
        err.print(f"[bold yellow]WARNING:[/bold yellow] {w}", soft_wrap=True)
    print_compress_result(result, quiet)
    if report is not None:
        _write_json(report, result.to_dict())
    _write_report_html(report_html, result)


def print_compress_result(result: Any, quiet: bool = False) -> None:
    """One candidates table (only the columns with values), the top sensitivities, the decision."""
    if not quiet:
        _print_candidates(result)
        if result.sensitivity:
            _print_sensitivity(result.sensitivity, result.float_layers)
        for step in result.steps:
            _print_step(step)
        for note in dict.fromkeys(result.notes):
            out.print(f"note: {note}", markup=False, soft_wrap=True)
    out.print(f"decision: {result.reason}", markup=False, soft_wrap=True)
    check = "" if result.validation_passed is None else (
        "; against the source: " + ("" if result.validation_passed else "OVER BUDGET: ")
        + result.validation_detail)
    out.print(f"wrote {result.output} ({result.written} model){check}",
              markup=False, soft_wrap=True)


SENSITIVITY_ROWS = 10  # the console shows the most sensitive layers; the JSON report has them all


def _print_step(step: Any) -> None:
    """One line per composed step: what it changed, per layer (the JSON report has every figure)."""
    name = step.step if step.method == step.step else f"{step.step} ({step.method})"
    if not step.applied:
        out.print(f"{name}: not applied: {step.reason}", markup=False, soft_wrap=True)
        return
    changed = {k: v for k, v in step.layers.items()}
    levels: dict[str, int] = {}
    for info in changed.values():
        level = info["level"]
        key = (f"keep {float(level):.0%}" if step.step == "prune" else
               f"rank {float(level):.0%}" if step.step == "factorize" else str(level))
        levels[key] = levels.get(key, 0) + 1
    out.print(f"{name}: {len(changed)} layer(s) changed ("
              + ", ".join(f"{n} at {lv}" for lv, n in levels.items()) + f"); {step.reason}"
              + (f"; {len(step.skipped)} left alone" if step.skipped else ""), markup=False, soft_wrap=True)
    details = {k: v["pass"] for k, v in changed.items() if v.get("pass", {}).get("rank") is not None}
    if details:
        _print_factorized(details)


FACTORIZED_ROWS = 20  # the console shows the first factorized layers; the JSON report has them all


def _print_factorized(layers: Mapping[str, Mapping[str, Any]]) -> None:
    """factorize-lowrank per layer: rank, parameters and MACs per row, output error before and
    after the refit (on calibration rows), and the layer and its pair each timed alone."""
    def arrow(a: Any, b: Any, fmt: str) -> str:
        return "" if a is None or b is None else f"{a:{fmt}} -> {b:{fmt}}"

    rows = [[name, str(v.get("form", "")), f"{v['rank']}/{v['full_rank']}",
             arrow(v.get("params_before"), v.get("params_after"), ","),
             arrow(v.get("macs_before"), v.get("macs_after"), ","),
             arrow(v.get("error_before_refit"), v.get("error_after_refit"), ".3g"),
             arrow(v.get("latency_ms_before"), v.get("latency_ms_after"), ".3f")]
            for name, v in list(layers.items())[:FACTORIZED_ROWS]]
    header = ["layer", "form", "rank", "params", "MACs/row", "rel. error (refit)", "ms alone (layer -> pair)"]
    out.print(_table("Factorized layers", header, rows, left=("layer", "form")))
    if len(layers) > FACTORIZED_ROWS:
        out.print(f"... {len(layers) - FACTORIZED_ROWS} more (all in the --report JSON)", markup=False)


def _print_candidates(result: Any) -> None:
    # titles as plain lines: a table title wraps to the table's width
    out.print(f"Compression ({result.method}) on {result.evaluation_samples} feeds from "
              f"{result.evaluation_source}; budget: {result.budget}", markup=False, soft_wrap=True)
    header = ["candidate", "accuracy", "drop", "min cosine", "top-1 agree", "expected top-1",
              "latency", "size", "verdict"]
    rows = [[
        c.label,
        "" if c.accuracy is None else f"{c.accuracy:.2%}",
        "" if c.accuracy_drop_pp is None else f"{c.accuracy_drop_pp:+.2f} pt",
        _bounded(c.min_cosine, c.min_cosine_low, ".5f"),
        "" if c.min_top1 is None else f"{c.min_top1:.2%}",
        "" if c.min_top1_expected is None else
        _bounded(c.min_top1_expected, c.min_top1_expected_low, ".2%"),
        "" if c.latency_ms is None else f"{c.latency_ms:.3f} ms",
        _fmt_bytes(c.size_bytes),
        c.verdict,
    ] for c in result.candidates]
    out.print(_compact_table(header, rows, left=("candidate", "verdict")))


def _print_sensitivity(sensitivity: dict[str, float], float_layers: list[str]) -> None:
    ranked = sorted(sensitivity.items(), key=lambda kv: -kv[1])
    shown = ranked[:SENSITIVITY_ROWS]
    more = len(ranked) - len(shown)
    out.print("Sensitivity: 1 - cosine with only that layer changed"
              + (f" (top {len(shown)} of {len(ranked)})" if more else ""), markup=False)
    rows = [[name, f"{value:.3g}", "yes" if name in float_layers else ""] for name, value in shown]
    out.print(_compact_table(["layer", "1 - cosine", "kept in float"], rows, left=("layer",)))
    if more:
        out.print(f"... {more} more (all in the --report JSON)", markup=False)
    if set(float_layers) - {name for name, _ in shown}:
        out.print("kept in float: " + ", ".join(float_layers), markup=False, soft_wrap=True)


def _compact_table(header: list[str], rows: list[list[str]], left: tuple[str, ...]) -> Table:
    """A table without the columns that are empty in every row; cells are plain text, not markup."""
    from rich.text import Text

    keep = [i for i in range(len(header)) if i == 0 or any(r[i] not in ("", "-") for r in rows)]
    table = Table()
    for i in keep:
        table.add_column(header[i], justify="left" if header[i] in left else "right")
    for r in rows:
        table.add_row(*(Text(r[i]) for i in keep))
    return table


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(
        metavar="MODEL", help="The .onnx file.", show_default=False)],
    other: Annotated[Path | None, typer.Argument(
        metavar="OTHER", help="With --diff: the model to compare MODEL with.", show_default=False)] = None,
    diff: Annotated[bool, typer.Option(
        "--diff", show_default=False,
        help="Compare MODEL and OTHER side by side: op histogram, nodes, parameters, size, MACs "
        "(e.g. your output against a peer tool's).")] = False,
    input_shape: InputShape = None,
    as_json: Annotated[bool, typer.Option(
        "--json", show_default=False, help="Machine-readable output.")] = False,
    groups: Annotated[bool, typer.Option(
        "--groups", show_default=False,
        help="Also list the channel groups prune-channels sees, and why others are frozen.")
    ] = False,
) -> None:
    """Show MODEL's inputs, outputs, opsets, op histogram, parameters, size and MACs (--diff: two models)."""
    with _user_errors():
        from onnxopt.data import model_inputs, parse_input_shapes
        from onnxopt.manager import REQUIRES_KEY

        pins = parse_input_shapes(input_shape)
        if diff or other is not None:
            if other is None or not diff:
                raise OnnxoptError("compare two models with: onnxopt inspect --diff MODEL OTHER")
            _print_diff(model, other, pins, as_json)
            return
        m, info, shapes, unresolved = _describe(model, pins)
        stats_ops: dict[str, int] = info["ops"]
        macs, size = info["macs"], info["file_bytes"]
        unranked = unresolved.startswith("input '")
        group_rows = _channel_groups(m) if groups else None
        if group_rows is not None:
            info["groups"] = group_rows
        if as_json:
            out.print_json(json.dumps(info))
            return
        out.print(Text.assemble((str(model), "bold"), f"  IR {m.ir_version}, opsets "
                  + ", ".join(f"{k} {v}" for k, v in info["opsets"].items())
                  + (f", producer {info['producer']}" if info["producer"] else "")))
        if needs := info["metadata"].get(REQUIRES_KEY):  # --target outputs: not portable
            out.print(f"needs {needs} (it uses that runtime's own ops; metadata {REQUIRES_KEY})", markup=False)
        rows = [[kind, v["name"], v["dtype"], v["shape"]]
                for kind, items in (("in", info["inputs"]), ("out", info["outputs"]))
                for v in items]
        out.print(_table("Inputs and outputs", ["", "name", "dtype", "shape"], rows,
                         left=("", "name", "dtype", "shape")))
        out.print(f"nodes {info['nodes']}, parameters {_fmt_int(info['parameters'])}, size "
                  f"{_fmt_bytes(size + info['external_data_bytes'])}", markup=False)
        sized_ops = {"Conv", "ConvTranspose", "QLinearConv", "ConvInteger", "MatMul",
                     "MatMulInteger", "QLinearMatMul", "Gemm", "MatMulNBits"}
        if macs is not None:
            line = f"MACs {_fmt_int(macs)}" + (f" at {_fmt_shapes(shapes)}" if shapes else "")
        elif unranked:
            line = f"MACs: unknown ({unresolved})"
        elif unresolved:
            line = f"MACs: unknown (dynamic dims: pin them with {_pin_hint(model_inputs(m), pins)})"
        elif sized_ops & set(stats_ops):
            line = "MACs: unknown (shape inference could not size the Conv/MatMul/Gemm nodes)"
        else:
            line = "MACs: none counted (no Conv, MatMul or Gemm)"
        out.print(line, markup=False, soft_wrap=True)
        rows = [[op, str(n)] for op, n in sorted(stats_ops.items(), key=lambda kv: -kv[1])]
        out.print(_table("Ops", ["op", "count"], rows, left=("op",)))
        if group_rows is not None:
            rows = [[g["key"], str(g["channels"]), str(g["members"]), _fmt_int(g["params"]),
                     _fmt_int(g["macs"]), g["frozen"] or ""] for g in group_rows]
            prunable = sum(1 for g in group_rows if not g["frozen"])
            out.print(_table(f"Channel groups ({prunable} prunable of {len(group_rows)})",
                             ["key", "channels", "members", "params", "MACs", "frozen"], rows,
                             left=("key", "frozen")))


def _describe(model: Path, pins: Mapping[str, Sequence[int]], own_pins: bool = False,
              ) -> tuple[Any, dict[str, Any], dict[str, Any], str]:
    """(proto, what ``inspect --json`` prints, the input shapes MACs were counted at, why MACs are
    unknown or ""). ``own_pins`` (--diff): only the pins that name this model's inputs apply."""
    from onnxopt.bench import model_stats
    from onnxopt.data import model_inputs, resolve_shapes
    from onnxopt.io import load_model

    m = load_model(model)
    if own_pins:
        names = {s.name for s in model_inputs(m)}
        pins = {k: v for k, v in pins.items() if k in names}
    shapes: dict[str, tuple[int, ...]] = {}
    unresolved = ""
    try:
        shapes = resolve_shapes(m, pins)[0]
    except OnnxoptError as e:
        if pins:  # the shapes asked for do not fit: say why
            raise
        unresolved = str(e)
    unranked = [s.name for s in model_inputs(m) if s.shape is None and s.name not in pins]
    if unranked:  # MACs at a guessed rank would mislead
        unresolved = f"input '{unranked[0]}' declares no shape: pin it with --input-shape {unranked[0]}=..."
    size = model.stat().st_size
    data_file = model.with_name(model.name + ".data")
    stats = model_stats(m, shapes if not unresolved else {}, size_bytes=size)
    macs = stats.macs if not unresolved else None
    inits = {t.name for t in m.graph.initializer}
    info = {
        "inputs": [_vi(v) for v in m.graph.input if v.name not in inits],
        "outputs": [_vi(v) for v in m.graph.output],
        "opsets": {(i.domain or "ai.onnx"): i.version for i in m.opset_import},
        "ir_version": m.ir_version,
        "producer": f"{m.producer_name} {m.producer_version}".strip(),
        "functions": [f"{f.domain}::{f.name}" for f in m.functions],
        "metadata": {p.key: p.value for p in m.metadata_props},
        **stats.to_dict(),
        "macs": macs,
        "macs_input_shapes": None if macs is None else {k: list(v) for k, v in shapes.items()},
        "file_bytes": size,
        "external_data_bytes": data_file.stat().st_size if data_file.exists() else 0,
    }
    return m, info, shapes, unresolved


def _print_diff(a: Path, b: Path, pins: Mapping[str, Sequence[int]], as_json: bool) -> None:
    """Two models side by side: the totals, then every op whose count differs, then the rest."""
    infos = [_describe(p, pins, own_pins=True)[1] for p in (a, b)]
    if unknown := [n for n in pins if not any(v["name"] == n for i in infos for v in i["inputs"])]:
        raise OnnxoptError(f"--input-shape names '{unknown[0]}', an input of neither model; inputs: "
                           + "; ".join(f"{p.name}: " + ", ".join(v["name"] for v in i["inputs"])
                                       for p, i in zip((a, b), infos, strict=True)))
    totals = {key: [i[key] if key != "size_bytes" else i["file_bytes"] + i["external_data_bytes"]
                    for i in infos]
              for key in ("nodes", "parameters", "size_bytes", "macs")}
    ops = {op: [i["ops"].get(op, 0) for i in infos] for op in sorted(set(infos[0]["ops"]) | set(infos[1]["ops"]))}
    opsets = [", ".join(f"{k} {v}" for k, v in i["opsets"].items()) for i in infos]
    if as_json:
        out.print_json(json.dumps({"models": [str(a), str(b)], **totals, "ops": ops, "opsets": opsets,
                                   "macs_input_shapes": [i["macs_input_shapes"] for i in infos]}))
        return
    fmt = {"nodes": str, "parameters": _fmt_int, "size_bytes": _fmt_bytes, "macs": _fmt_int}
    names = {"nodes": "nodes", "parameters": "parameters", "size_bytes": "file size", "macs": "MACs"}
    rows = [[names[k], fmt[k](x), fmt[k](y), _pct(x, y)] for k, (x, y) in totals.items()]
    rows.append(["opsets", opsets[0], opsets[1], "" if opsets[0] == opsets[1] else "differ"])
    header = ["", a.name, b.name if b.name != a.name else str(b), "change"]
    out.print(_table("Models", header, rows, left=("",)))
    # ops that differ first (largest difference first), then the ones both have alike
    order = sorted(ops, key=lambda op: (ops[op][0] == ops[op][1], -abs(ops[op][1] - ops[op][0]), op))
    rows = [[op, str(x), str(y), _signed(y - x) or "="] for op in order for x, y in [ops[op]]]
    out.print(_table("Ops", ["op", *header[1:3], "change"], rows, left=("op",)))
    for path, macs in zip((a, b), totals["macs"], strict=True):
        if macs is None:
            out.print(f"MACs of {path.name}: unknown; `onnxopt inspect {path}` says why", markup=False,
                      soft_wrap=True)


def _channel_groups(m: Any) -> list[dict[str, Any]]:
    """The dependency groups of ``prune-channels``: key, channels, members, params, MACs per
    sample (dynamic dims as 1), frozen reason."""
    from onnxopt.io import to_graph
    from onnxopt.passes._groups import build_groups
    from onnxopt.shapes import apply_shapes

    graph = to_graph(m)
    apply_shapes(graph, m)
    return [{"key": g.key, "channels": g.channels, "members": len(g.members), "params": g.params,
             "macs": g.macs, "frozen": g.frozen, "detail": g.detail} for g in build_groups(graph)]


def _pin_hint(specs: Sequence[Any], pins: Mapping[str, Sequence[int]]) -> str:
    """``--input-shape x=1,3,H,W`` per input with a dynamic dim: letters where a size is needed."""
    hints = []
    for spec in specs:
        static = spec.shape is not None and all(isinstance(d, int) and d > 0 for d in spec.shape)
        if spec.name in pins or spec.shape is None or static:
            continue
        dims = [str(d) if isinstance(d, int) and d > 0 else
                "1" if i == 0 or (isinstance(d, str) and "batch" in d.lower()) else
                (d[0].upper() if isinstance(d, str) and d[:1].isalpha() else "N")
                for i, d in enumerate(spec.shape)]
        hints.append(f"--input-shape {spec.name}={','.join(dims)}")
    return " ".join(hints) or "--input-shape NAME=1,3,224,224"


def _vi(v: Any) -> dict[str, str]:
    import onnx

    kind = v.type.WhichOneof("value")
    if kind != "tensor_type":
        return {"name": v.name, "dtype": kind or "?", "shape": "-"}
    tt = v.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_string(tt.elem_type).replace("TensorProto.", "").lower() if tt.elem_type else "?"
    shape = "?" if not tt.HasField("shape") else "[" + ", ".join(
        str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim) + "]"
    return {"name": v.name, "dtype": dtype, "shape": shape}


@app.command()
def validate(
    reference: Annotated[Path, typer.Argument(
        metavar="REFERENCE", help="The original model.", show_default=False)],
    candidate: Annotated[Path, typer.Argument(
        metavar="CANDIDATE", help="The model to check against it.", show_default=False)],
    data: DataOption = None,
    input_shape: InputShape = None,
    atol: Annotated[float, typer.Option(metavar="FLOAT", help="Absolute tolerance.")] = 1e-4,
    rtol: Annotated[float, typer.Option(metavar="FLOAT", help="Relative tolerance.")] = 1e-3,
    min_cosine: Annotated[float | None, typer.Option(
        metavar="FLOAT",
        help="Judge by cosine similarity (lossy models) instead of elementwise tolerance.")] = None,
    seed: Seed = 0,
) -> None:
    """Compare two models' outputs in onnxruntime; exit 1 if they differ beyond tolerance."""
    with _user_errors():
        from onnxopt.api import load_data
        from onnxopt.data import parse_input_shapes
        from onnxopt.io import load_model
        from onnxopt.validate import Tolerance, compare

        ref = load_model(reference)
        load_model(candidate)
        dataset = load_data(ref, data, parse_input_shapes(input_shape), seed)
        tol = Tolerance(exact=min_cosine is None, atol=atol, rtol=rtol,
                        min_cosine=min_cosine if min_cosine is not None else 0.99)
        report = compare(reference, candidate, dataset, tol)
        _print_validation(report)
        if report.accuracy_before is not None:
            out.print(f"accuracy: {report.accuracy_before:.2%} -> {report.accuracy_after:.2%}")
        if not report:
            err.print("onnxopt: error: outputs differ: " + "; ".join(
                o.describe(tol) for o in report.failures), markup=False, soft_wrap=True)
            raise typer.Exit(1)
        out.print("outputs match")


@app.command()
def bench(
    models: Annotated[list[Path], typer.Argument(
        metavar="MODEL",
        help="One or more .onnx files, timed interleaved.", show_default=False)],
    data: DataOption = None,
    input_shape: InputShape = None,
    threads: Annotated[int, typer.Option(
        min=1, metavar="N", help="onnxruntime intra-op threads.")] = 1,
    repeats: Annotated[int, typer.Option(min=3, metavar="N", help="Repetitions per model.")] = 50,
    seed: Seed = 0,
) -> None:
    """Measure latency (median, p90) of one or more models in onnxruntime, interleaved."""
    with _user_errors():
        from onnxopt.api import load_data
        from onnxopt.bench import measure_latency
        from onnxopt.data import parse_input_shapes
        from onnxopt.io import load_model

        first = load_model(models[0])
        for m in models[1:]:
            load_model(m)
        dataset = load_data(first, data, parse_input_shapes(input_shape), seed, count=4)
        with _Activity(err.is_terminal) as activity:
            activity.say("measuring latency")
            lat = measure_latency({str(m): m for m in models}, dataset.feeds, threads=threads,
                                  repeats=repeats, tick=activity.tick)
        base = lat[str(models[0])].median_ms
        rows = [[name, f"{v.median_ms:.3f}", f"{v.p90_ms:.3f}", f"{v.min_ms:.3f}",
                 f"{v.median_ms / base:.3f}x"] for name, v in lat.items()]
        out.print(_table(f"Latency, {threads} thread(s), {repeats} interleaved repeats",
                         ["model", "median ms", "p90 ms", "min ms", "vs first"], rows, left=("model",)))


@app.command(name="report")
def render_report(
    report_json: Annotated[Path, typer.Argument(
        metavar="REPORT.json", help="A report written by `optimize --report`.", show_default=False)],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="PATH", help="Output .html. Default: REPORT.html beside the JSON.")] = None,
) -> None:
    """Render a saved JSON report as one self-contained HTML page."""
    with _user_errors():
        from onnxopt.report_html import render_file

        dst = output or report_json.with_suffix(".html")
        render_file(report_json, dst)
        out.print(f"wrote {dst}", markup=False, soft_wrap=True)


@app.command(name="passes")
def list_passes() -> None:
    """List every pass: name, exact or lossy, what it needs, and what it does."""
    import dataclasses

    from onnxopt.manager import PRESETS
    from onnxopt.registry import registry

    header = ["name", "kind", "levels", "needs", "options", "description"]
    rows = []
    for name, cls in registry().items():
        levels = ",".join(str(lv) for lv, names in PRESETS.items() if name in names) or "-"
        needs = ", ".join(r.value for r in cls.requires) or "-"
        opts = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls.Options)) or "-"
        rows.append([name, "exact" if cls.exact else "lossy", levels, needs, opts, cls.summary()])
    out.print(_table("Passes", header, rows, left=header))


@app.command()
def export(
    factory: Annotated[str, typer.Argument(
        metavar="MODULE:FACTORY",
        help="MODULE:FACTORY, where MODULE is a file (models/zoo.py:resnet18) or an importable "
        "module (mypkg.nets:build) and FACTORY() returns a torch.nn.Module.", show_default=False)],
    output: Annotated[Path, typer.Option(
        "--output", "-o", metavar="PATH", help="Output .onnx path.", show_default=False)],
    input_shape: Annotated[list[str], typer.Option(
        "--input-shape", metavar="NAME=1,3,224,224[:DTYPE]",
        help="One per forward() argument, in order: NAME=1,3,224,224, or "
        "NAME=1,128:int64 for an integer input (repeatable).", show_default=False)],
    dynamic_batch: Annotated[bool, typer.Option(
        "--dynamic-batch", show_default=False, help="Make dim 0 of every input and output dynamic.")] = False,
    opset: Annotated[int | None, typer.Option(
        metavar="N", help="ONNX opset (default: the exporter's).")] = None,
    keep_batchnorm: Annotated[bool, typer.Option(
        "--keep-batchnorm", show_default=False,
        help="Leave BatchNormalization unfolded, for `onnxopt optimize` to fold.")] = False,
    exporter: Annotated[str, typer.Option(
        metavar="dynamo|torchscript",
        help="dynamo (torch.export + onnxscript) or torchscript (legacy tracer, dynamo=False).")] = "dynamo",
    atol: Annotated[float, typer.Option(
        metavar="FLOAT", help="Absolute tolerance of the check against torch.")] = 1e-4,
    rtol: Annotated[float, typer.Option(
        metavar="FLOAT", help="Relative tolerance of the check against torch.")] = 1e-3,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed for the check's random inputs.")] = 0,
    verbose: Verbose = 0,
) -> None:
    """Export a PyTorch model to ONNX and check it against torch before writing.

    Uses torch.onnx's dynamo exporter (torch.export + onnxscript) by default;
    --exporter torchscript selects the legacy TorchScript one. Needs PyTorch (the torch extra).
    """
    _setup_logging(verbose, False)
    with _user_errors(verbose > 0):
        from onnxopt.export import export as export_model
        from onnxopt.export import parse_input_specs

        shapes, dtypes = parse_input_specs(input_shape)
        with err.status("exporting", spinner="dots"):
            rep = export_model(factory, output, shapes, dynamic_batch=dynamic_batch, opset=opset,
                               keep_batchnorm=keep_batchnorm, input_dtypes=dtypes, exporter=exporter,
                               atol=atol, rtol=rtol, seed=seed)
        rows = [[c.name, f"{c.max_abs:.3g}", f"{c.cosine:.6f}", "ok" if c.passed else "FAIL"] for c in rep.checks]
        out.print(_table(f"Export check against torch ({rep.exporter} exporter, opset {rep.opset}, "
                         f"torch {rep.torch_version})", ["output", "max abs", "cosine", "result"], rows,
                         left=("output",)))
        out.print(f"nodes {rep.nodes}, BatchNormalization {rep.batchnorm_nodes}, {rep.seconds:.1f} s", markup=False)
        out.print(f"wrote {rep.output}", markup=False)


app.command(name="optimize-many")(optimize_many)  # onnxopt.many: a directory of models, resumable


def main() -> None:
    app()
