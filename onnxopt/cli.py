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
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from onnxopt import __version__
from onnxopt.errors import OnnxoptError

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
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
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else
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


Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logging (-vv for debug).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and the final table.")]
InputShape = Annotated[
    list[str] | None,
    typer.Option("--input-shape", help="Pin an input's shape: NAME=1,3,224,224 (repeatable)."),
]


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


def print_result(result: Any) -> None:
    """Per-pass table, then the before/after table."""
    passes = Table(title="Passes", title_justify="left")
    for col in ("pass", "runs", "changed", "what it did", "nodes", "params", "seconds"):
        passes.add_column(col, justify="right" if col in ("runs", "nodes", "params", "seconds") else "left")
    for row in result.pipeline.summary():
        stats = ", ".join(f"{k}={v}" for k, v in sorted(row["stats"].items())) or "-"
        passes.add_row(row["name"], str(row["runs"]), "yes" if row["changed"] else "no", stats,
                       f"{-row['nodes_removed']:+d}", f"{-row['params_removed']:+d}", f"{row['seconds']:.3f}")
    out.print(passes)

    b, a = result.before, result.after
    table = Table(title="Before / after", title_justify="left")
    for col in ("", "before", "after", "change"):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row("nodes", str(b.nodes), str(a.nodes), _pct(b.nodes, a.nodes))
    table.add_row("parameters", _fmt_int(b.parameters), _fmt_int(a.parameters), _pct(b.parameters, a.parameters))
    table.add_row("file size", _fmt_bytes(b.size_bytes), _fmt_bytes(a.size_bytes), _pct(b.size_bytes, a.size_bytes))
    table.add_row("MACs (est.)", _fmt_int(b.macs), _fmt_int(a.macs), _pct(b.macs, a.macs))
    lat = result.latency
    if lat:
        lb, la = lat["before"], lat["after"]
        table.add_row(f"latency median ({lb.clock}, {lb.threads} thr)", f"{lb.median_ms:.3f} ms",
                      f"{la.median_ms:.3f} ms", _pct(lb.median_ms, la.median_ms))
        table.add_row("latency p90", f"{lb.p90_ms:.3f} ms", f"{la.p90_ms:.3f} ms", _pct(lb.p90_ms, la.p90_ms))
    v = result.validation
    if v is not None and v.accuracy_before is not None:
        table.add_row("accuracy (labels)", f"{v.accuracy_before:.2%}", f"{v.accuracy_after:.2%}",
                      f"{(v.accuracy_after - v.accuracy_before) * 100:+.2f} pt")
    out.print(table)
    if v is not None:
        _print_validation(v)
    for w in result.warnings:
        out.print(f"note: {w}", markup=False)


def _bounded(value: float | None, low: float | None, fmt: str) -> str:
    """``value (>= low)``: an estimate and the lower confidence bound the floor checks."""
    if value is None:
        return "-"
    return format(value, fmt) + ("" if low is None else f" (>= {format(low, fmt)})")


def _print_validation(v: Any) -> None:
    table = Table(title=f"Validation on {v.samples} feeds from {v.source}", title_justify="left")
    for col in ("output", "max abs", "max rel", "cosine", "top-1 agree", "expected", "result"):
        table.add_column(col, justify="left" if col == "output" else "right")
    for o in v.outputs:
        table.add_row(o.name, f"{o.max_abs:.3g}", f"{o.max_rel:.3g}",
                      _bounded(o.cosine, o.cosine_low, ".6f"),
                      "-" if o.top1_agreement is None else f"{o.top1_agreement:.2%}",
                      _bounded(o.top1_expected, o.top1_expected_low, ".2%"),
                      "ok" if o.passed else "FAIL")
    out.print(table)


@app.command()
def optimize(
    model: Annotated[Path, typer.Argument(help="Input .onnx file.", show_default=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output path. Default: <model>.opt.onnx.")] = None,
    level: Annotated[int | None, typer.Option(
        help="Preset of exact passes (0: cleanup, 1: all lossless). Default 1 unless --pass is given.")] = None,
    passes: Annotated[list[str] | None, typer.Option(
        "--pass", help="Run a pass by name, name:key=value,key=value (repeatable, in order, after --level).")] = None,
    data: Annotated[Path | None, typer.Option(
        help="Validation inputs: .npz named after the model inputs (first axis = samples; optional "
        "'labels'), or a directory of .npz feeds.")] = None,
    calibration_data: Annotated[Path | None, typer.Option(help="Calibration inputs for lossy passes (.npz or directory).")] = None,
    input_shape: InputShape = None,
    atol: Annotated[float | None, typer.Option(help="Absolute tolerance for exact pipelines (default 1e-4).")] = None,
    rtol: Annotated[float | None, typer.Option(help="Relative tolerance for exact pipelines (default 1e-3).")] = None,
    min_cosine: Annotated[float | None, typer.Option(help="Cosine floor for lossy pipelines (default 0.99).")] = None,
    validate: Annotated[bool, typer.Option(help="Compare outputs with the original in onnxruntime before writing.")] = True,
    bench: Annotated[bool, typer.Option(help="Measure latency before and after.")] = True,
    repeats: Annotated[int, typer.Option(min=3, help="Latency repetitions per model.")] = 100,
    threads: Annotated[int, typer.Option(min=1, help="onnxruntime intra-op threads for latency.")] = 1,
    verify_each: Annotated[bool, typer.Option(help="Run onnx.checker after every pass to blame the one that breaks a graph.")] = False,
    report: Annotated[Path | None, typer.Option(help="Write the full report as JSON.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the resolved pipeline and checks; run nothing.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for generated inputs.")] = 0,
    quantize: Annotated[str | None, typer.Option(
        help="Compress: int8 (static QDQ, calibrated), dynamic, int8-weight, int4 or fp16. Kept only "
        "when within the accuracy budget and faster than the float model on this machine.")] = None,
    max_accuracy_drop: Annotated[float | None, typer.Option(
        help="With --quantize: allowed task-accuracy drop in percentage points (needs 'labels' in the "
        "data; default 1.0). Without labels: cosine >= --min-cosine and top-1 agreement >= 98%.")] = None,
    force: Annotated[bool, typer.Option(
        help="With --quantize: write the quantized model even when it is slower or over budget.")] = False,
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
        if quantize is not None:
            if passes:
                raise OnnxoptError("--quantize runs its own pipeline (level 1, then the quantizer); "
                                   "use --quantize or --pass, not both")
            _compress(model, output, quantize, data, calibration_data, shapes, level, max_accuracy_drop,
                      min_cosine, force, threads, repeats, report, seed, dry_run, validate=validate,
                      bench=bench, verify_each=verify_each, atol=atol, rtol=rtol, quiet=quiet)
            return
        preset, explicit = resolve(level, passes)
        if dry_run:
            out.print("preset (to fixpoint): " + (", ".join(p.name for p in preset) or "none"))
            out.print("explicit (once each): " + (", ".join(f"{p.name}{p.options}" for p in explicit) or "none"))
            from onnxopt.manager import check_requirements

            check_requirements(preset + explicit, calibration_data, shapes)
            out.print("requirements: ok")
            return
        exact = all(p.exact for p in explicit)
        tolerance = Tolerance(
            exact=exact, atol=atol if atol is not None else EXACT_ATOL,
            rtol=rtol if rtol is not None else EXACT_RTOL,
            min_cosine=min_cosine if min_cosine is not None else LOSSY_MIN_COSINE,
        )
        with err.status("optimizing", spinner="dots") as status:
            result = optimize_file(
                model, output, level, passes, data=data, calibration_data=calibration_data,
                input_shapes=shapes, tolerance=tolerance, validate=validate, bench=bench,
                bench_repeats=repeats, threads=threads, verify_each=verify_each, report_path=report,
                seed=seed, progress=lambda msg: status.update(msg),
            )
        print_result(result)
        out.print(f"wrote {result.output}", markup=False)


def _compress(
    model: Path, output: Path | None, method: str, data: Path | None, calibration_data: Path | None,
    shapes: dict[str, tuple[int, ...]], level: int | None, max_accuracy_drop: float | None,
    min_cosine: float | None, force: bool, threads: int, repeats: int, report: Path | None,
    seed: int, dry_run: bool, *, validate: bool = True, bench: bool = True,
    verify_each: bool = False, atol: float | None = None, rtol: float | None = None,
    quiet: bool = False,
) -> None:
    from onnxopt.api import _write_json, default_output
    from onnxopt.compress import DEFAULT_MIN_COSINE, METHODS, compress
    from onnxopt.manager import DEFAULT_LEVEL
    from onnxopt.validate import EXACT_ATOL, EXACT_RTOL, Tolerance

    if method not in METHODS:
        raise OnnxoptError(f"--quantize '{method}': choose one of {', '.join(METHODS)}")
    if not validate:
        raise OnnxoptError("--quantize needs validation: a lossy method is never kept unjudged; "
                           "drop --no-validate")
    if not bench and not force:
        raise OnnxoptError("--no-bench: with --quantize the latency verdict decides whether the "
                           "quantized model is kept; add --force to write it without measuring")
    # --atol/--rtol apply to the lossless step's check against the source
    exact = Tolerance(atol=EXACT_ATOL if atol is None else atol,
                      rtol=EXACT_RTOL if rtol is None else rtol)
    if dry_run:
        out.print(f"compress: level {DEFAULT_LEVEL if level is None else level}, then "
                  f"{METHODS[method][0]}; budget, per-layer fallback and latency check; nothing run")
        return
    with err.status("compressing", spinner="dots") as status:
        result = compress(
            model, output or default_output(model), method, calibration_data=calibration_data,
            eval_data=data, max_accuracy_drop=max_accuracy_drop,
            min_cosine=min_cosine if min_cosine is not None else DEFAULT_MIN_COSINE, force=force,
            bench=bench, threads=threads, repeats=repeats,
            level=DEFAULT_LEVEL if level is None else level, input_shapes=shapes,
            exact_tolerance=exact, verify_each=verify_each, seed=seed,
            progress=lambda msg: status.update(msg),
        )
    for w in dict.fromkeys(result.warnings):
        err.print(f"[bold yellow]WARNING:[/bold yellow] {w}", soft_wrap=True)
    print_compress_result(result, quiet)
    if report is not None:
        _write_json(report, result.to_dict())


def print_compress_result(result: Any, quiet: bool = False) -> None:
    """One candidates table (only the columns with values), the top sensitivities, the decision."""
    if not quiet:
        _print_candidates(result)
        if result.sensitivity:
            _print_sensitivity(result.sensitivity, result.float_layers)
        for note in dict.fromkeys(result.notes):
            out.print(f"note: {note}", markup=False, soft_wrap=True)
    out.print(f"decision: {result.reason}", markup=False, soft_wrap=True)
    check = "" if result.validation_passed is None else (
        "; against the source: " + ("" if result.validation_passed else "OVER BUDGET: ")
        + result.validation_detail)
    out.print(f"wrote {result.output} ({result.written} model){check}",
              markup=False, soft_wrap=True)


SENSITIVITY_ROWS = 10  # the console shows the most sensitive layers; the JSON report has them all


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
    out.print("Sensitivity: 1 - cosine with only that layer quantized"
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
    model: Annotated[Path, typer.Argument(help="The .onnx file.", show_default=False)],
    input_shape: InputShape = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show MODEL's inputs, outputs, opsets, op histogram, parameters, size and MACs."""
    with _user_errors():
        from onnxopt.bench import model_stats
        from onnxopt.data import concrete_shape, model_inputs, parse_input_shapes
        from onnxopt.io import load_model

        m = load_model(model)
        pins = parse_input_shapes(input_shape)
        symbols: dict[str, int] = {}
        shapes = {}
        for spec in model_inputs(m):
            with contextlib.suppress(OnnxoptError):
                shapes[spec.name] = concrete_shape(spec, pins, symbols)
        size = model.stat().st_size
        data_file = model.with_name(model.name + ".data")
        stats = model_stats(m, shapes, size_bytes=size)
        info = {
            "inputs": [_vi(v) for v in m.graph.input if v.name not in {t.name for t in m.graph.initializer}],
            "outputs": [_vi(v) for v in m.graph.output],
            "opsets": {(i.domain or "ai.onnx"): i.version for i in m.opset_import},
            "ir_version": m.ir_version,
            "producer": f"{m.producer_name} {m.producer_version}".strip(),
            "functions": [f"{f.domain}::{f.name}" for f in m.functions],
            "metadata": {p.key: p.value for p in m.metadata_props},
            **stats.to_dict(),
            "file_bytes": size,
            "external_data_bytes": data_file.stat().st_size if data_file.exists() else 0,
        }
        if as_json:
            out.print_json(json.dumps(info))
            return
        out.print(f"[bold]{model}[/bold]  IR {m.ir_version}, opsets "
                  + ", ".join(f"{k} {v}" for k, v in info["opsets"].items())
                  + (f", producer {info['producer']}" if info["producer"] else ""))
        io_table = Table(title="Inputs and outputs", title_justify="left")
        for col in ("", "name", "dtype", "shape"):
            io_table.add_column(col)
        for kind, items in (("in", info["inputs"]), ("out", info["outputs"])):
            for v in items:
                io_table.add_row(kind, v["name"], v["dtype"], v["shape"])
        out.print(io_table)
        out.print(f"nodes {stats.nodes}, parameters {_fmt_int(stats.parameters)}, size "
                  f"{_fmt_bytes(size + info['external_data_bytes'])}, MACs "
                  f"{_fmt_int(stats.macs)}" + (f" at {shapes}" if shapes else ""))
        ops = Table(title="Ops", title_justify="left")
        ops.add_column("op")
        ops.add_column("count", justify="right")
        for op, n in sorted(stats.ops.items(), key=lambda kv: -kv[1]):
            ops.add_row(op, str(n))
        out.print(ops)


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
    reference: Annotated[Path, typer.Argument(help="The original model.", show_default=False)],
    candidate: Annotated[Path, typer.Argument(help="The model to check against it.", show_default=False)],
    data: Annotated[Path | None, typer.Option(help="Inputs (.npz or directory); default: generated.")] = None,
    input_shape: InputShape = None,
    atol: Annotated[float, typer.Option(help="Absolute tolerance.")] = 1e-4,
    rtol: Annotated[float, typer.Option(help="Relative tolerance.")] = 1e-3,
    min_cosine: Annotated[float | None, typer.Option(
        help="Judge by cosine similarity (lossy models) instead of elementwise tolerance.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for generated inputs.")] = 0,
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
    models: Annotated[list[Path], typer.Argument(help="One or more .onnx files, timed interleaved.", show_default=False)],
    data: Annotated[Path | None, typer.Option(help="Inputs (.npz or directory); default: generated.")] = None,
    input_shape: InputShape = None,
    threads: Annotated[int, typer.Option(min=1, help="onnxruntime intra-op threads.")] = 1,
    repeats: Annotated[int, typer.Option(min=3, help="Repetitions per model.")] = 50,
    seed: Annotated[int, typer.Option(help="Seed for generated inputs.")] = 0,
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
        lat = measure_latency({str(m): m for m in models}, dataset.feeds, threads=threads, repeats=repeats)
        table = Table(title=f"Latency, {threads} thread(s), {repeats} interleaved repeats", title_justify="left")
        for col in ("model", "median ms", "p90 ms", "min ms", "vs first"):
            table.add_column(col, justify="left" if col == "model" else "right")
        base = lat[str(models[0])].median_ms
        for name, v in lat.items():
            table.add_row(name, f"{v.median_ms:.3f}", f"{v.p90_ms:.3f}", f"{v.min_ms:.3f}", f"{v.median_ms / base:.3f}x")
        out.print(table)


@app.command(name="passes")
def list_passes() -> None:
    """List every pass: name, exact or lossy, what it needs, and what it does."""
    from onnxopt.manager import PRESETS
    from onnxopt.registry import registry

    table = Table(title="Passes", title_justify="left")
    for col in ("name", "kind", "levels", "needs", "options", "description"):
        table.add_column(col)
    for name, cls in registry().items():
        levels = ",".join(str(lv) for lv, names in PRESETS.items() if name in names) or "-"
        needs = ", ".join(r.value for r in cls.requires) or "-"
        import dataclasses

        opts = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls.Options)) or "-"
        table.add_row(name, "exact" if cls.exact else "lossy", levels, needs, opts, cls.summary())
    out.print(table)


@app.command()
def export(
    factory: Annotated[str, typer.Argument(
        help="MODULE:FACTORY, where MODULE is a file (models/zoo.py:resnet18) or an importable "
        "module (mypkg.nets:build) and FACTORY() returns a torch.nn.Module.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .onnx path.", show_default=False)],
    input_shape: Annotated[list[str], typer.Option(
        "--input-shape", help="One per forward() argument, in order: NAME=1,3,224,224, or "
        "NAME=1,128:int64 for an integer input (repeatable).", show_default=False)],
    dynamic_batch: Annotated[bool, typer.Option(help="Make dim 0 of every input and output dynamic.")] = False,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: the exporter's).")] = None,
    keep_batchnorm: Annotated[bool, typer.Option(
        help="Leave BatchNormalization unfolded, for `onnxopt optimize` to fold.")] = False,
    exporter: Annotated[str, typer.Option(
        help="dynamo (torch.export + onnxscript) or torchscript (legacy tracer, dynamo=False).")] = "dynamo",
    atol: Annotated[float, typer.Option(help="Absolute tolerance of the check against torch.")] = 1e-4,
    rtol: Annotated[float, typer.Option(help="Relative tolerance of the check against torch.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed for the check's random inputs.")] = 0,
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
        table = Table(title=f"Export check against torch ({rep.exporter} exporter, opset {rep.opset}, "
                      f"torch {rep.torch_version})", title_justify="left")
        for col in ("output", "max abs", "cosine", "result"):
            table.add_column(col, justify="left" if col == "output" else "right")
        for c in rep.checks:
            table.add_row(c.name, f"{c.max_abs:.3g}", f"{c.cosine:.6f}", "ok" if c.passed else "FAIL")
        out.print(table)
        out.print(f"nodes {rep.nodes}, BatchNormalization {rep.batchnorm_nodes}, {rep.seconds:.1f} s", markup=False)
        out.print(f"wrote {rep.output}", markup=False)


def main() -> None:
    app()
