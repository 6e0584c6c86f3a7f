"""``onnxopt optimize-many 'models/**/*.onnx' --out-dir opt/``: a directory of models, resumable.

Each model is one task (``run_job``) on an executor (``onnxopt.executors``: in process, a
process pool or a Ray cluster) that runs the same driver as ``optimize``: the lossy methods
(``compress``) when one is asked for, else the lossless passes (``optimize_file``).

Resumable: every finished model appends one line to ``<out-dir>/optimize-many.jsonl``, keyed
by the model's content hash (external data included), the options and the tool version; a
rerun skips the models whose key is there and whose output still exists. A model the tool
refuses (bad input) is a finished "failed" row; an interrupted run or a lost cluster records
nothing for the models it did not finish. ``<out-dir>/summary.csv`` has one row per model.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from onnxopt import __version__
from onnxopt.errors import OnnxoptError

if TYPE_CHECKING:
    from onnxopt.executors import Executor

RESULTS = "optimize-many.jsonl"
SUMMARY = "summary.csv"
COLUMNS = ("model", "status", "output", "latency_ratio", "size_before", "size_after", "fidelity", "reason",
           "seconds", "key")

# ---- the executor options ``optimize`` and ``optimize-many`` share (the CLI imports this module
# at start-up: onnx, numpy and the executors are imported when a command runs)

ExecutorOption = Annotated[str, typer.Option(
    "--executor", metavar="local|processes|ray",
    help="Where the lossy driver's tasks (sensitivity probes, candidate evaluations, latency) run: "
    "local (this process), processes (a pool sized to the cores) or ray (a Ray cluster; "
    "pip install 'onnxopt[ray]'). The decisions do not depend on it.")]
RayAddressOption = Annotated[str, typer.Option(
    "--ray-address", metavar="auto|HOST:PORT",
    help="With --executor ray: the cluster (auto: the one 'ray start --head' runs on this machine).")]
MeasureOnOption = Annotated[str | None, typer.Option(
    "--measure-on", metavar="RESOURCE",
    help="With --executor ray: time the latency verdict on a node offering this custom resource "
    "(ray start --resources '{\"RESOURCE\": 1}'), e.g. the deployment machine.")]


@dataclasses.dataclass(frozen=True)
class Job:
    """One model's task: everything ``run_job`` needs, picklable, no open files."""

    source: str
    output: str
    key: str
    methods: tuple[str, ...]  # ("prune:0.3", "int8"); () runs the lossless passes
    options: dict[str, Any]  # keyword arguments of compress / optimize_file (JSON-able)
    measure_on: str | None = None  # a Ray resource the latency task is pinned to
    # on a cluster: the model (and its external data) and its data files as bytes, so a node
    # needs no shared filesystem; the written files come back the same way ("files" of the row)
    files: dict[str, bytes] | None = None


def find_models(pattern: str, out_dir: Path) -> tuple[list[Path], Path]:
    """The ``.onnx`` files ``pattern`` matches (``**`` recursive), outside ``out_dir``; and their root.

    The root is the pattern's directory before its first wildcard: outputs keep their path
    below it, so ``a/m.onnx`` and ``b/m.onnx`` do not overwrite each other.
    """
    out = out_dir.resolve()
    found = sorted({Path(p) for p in glob.glob(pattern, recursive=True)
                    if p.endswith(".onnx") and Path(p).is_file()})
    found = [p for p in found if out not in p.resolve().parents]
    parts = Path(pattern).parts
    fixed = [part for part in parts[:-1]] if not any(c in pattern for c in "*?[") else \
        list(parts[:next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))])
    return found, Path(*fixed) if fixed else Path(".")


def model_files(path: Path) -> dict[str, bytes]:
    """The model file and every external-data file it names (relative name -> bytes)."""
    import onnx

    files = {path.name: path.read_bytes()}
    try:
        model = onnx.load(str(path), load_external_data=False)
        locations = sorted({e.value for t in model.graph.initializer for e in t.external_data
                            if e.key == "location"})
    except Exception:  # not loadable: its bytes are its identity; run_job says why
        locations = []
    for loc in locations:
        if (path.parent / loc).is_file():
            files[loc] = (path.parent / loc).read_bytes()
    return files


def content_hash(path: Path) -> str:
    """sha256 of the model file and of every external-data file it names."""
    h = hashlib.sha256()
    for name, data in model_files(path).items():
        h.update(name.encode())
        h.update(data)
    return h.hexdigest()


def job_key(model_hash: str, methods: Sequence[str], options: Mapping[str, Any], output: str) -> str:
    """What makes a result reusable: the model's content, the options, the tool version (and where
    it is written: two copies of one model are two rows)."""
    blob = json.dumps({"model": model_hash, "methods": list(methods), "options": options,
                       "version": __version__, "output": output}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _resolve_data(template: str | None, model: Path) -> str | None:
    """``--data 'data/{stem}.npz'``: per model; without ``{stem}`` the same file for every model."""
    if template is None:
        return None
    path = template.format(stem=model.stem, name=model.name, dir=str(model.parent))
    if not Path(path).exists():
        raise OnnxoptError(f"{path}: no such file or directory (the data for {model})")
    return path


def shipped(job: Job) -> Job:
    """``job`` with its model, external data and data files as bytes (for nodes without its paths)."""
    files = {f"model/{k}": v for k, v in model_files(Path(job.source)).items()}
    options = dict(job.options)
    for key in ("data", "calibration_data"):
        path = _resolve_data(options[key], Path(job.source))
        if path is None:
            continue
        p = Path(path)
        found = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        files |= {f"{key}/{p.name}/{f.relative_to(p)}" if p.is_dir() else f"{key}/{p.name}": f.read_bytes()
                  for f in found}
        options[key] = f"{key}/{p.name}"  # relative to the task's directory; no {stem} left
    return dataclasses.replace(job, options=options, files=files)


def run_job(job: Job) -> dict[str, Any]:
    """Optimize one model where the task runs; a refused model is a "failed" row, not an exception.

    A shipped job (``files``) runs in a temporary directory and returns what it wrote as bytes.
    """
    if job.files is None:
        return _run_here(job)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="onnxopt-many-") as tmp:
        for name, data in job.files.items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_bytes(data)
        model = Path(tmp) / "model" / Path(job.source).name
        out = Path(tmp) / "out" / Path(job.output).name
        options = {k: (str(Path(tmp) / v) if k in ("data", "calibration_data") and v else v)
                   for k, v in job.options.items()}
        row = _run_here(dataclasses.replace(job, source=str(model), output=str(out), options=options, files=None))
        written = {f.name: f.read_bytes() for f in out.parent.iterdir()} if out.exists() else {}
    row["reason"] = row["reason"] and row["reason"].replace(str(model), job.source).replace(str(out), job.output)
    return row | {"model": job.source, "output": job.output, "files": written}


def _land(row: dict[str, Any]) -> dict[str, Any]:
    """Write what a shipped job returned to its output path (atomically); the row without the bytes."""
    from onnxopt.io import staged_output

    files = row.pop("files", None)
    if files:
        dst = Path(row["output"])
        dst.parent.mkdir(parents=True, exist_ok=True)
        with staged_output(dst) as staged:
            for name, data in files.items():
                (staged.parent / name).write_bytes(data)
    return row


def _run_here(job: Job) -> dict[str, Any]:
    from onnxopt.executors import ClusterError

    start = time.perf_counter()
    row: dict[str, Any] = {"model": job.source, "output": job.output, "key": job.key}
    try:
        Path(job.output).parent.mkdir(parents=True, exist_ok=True)
        opts = dict(job.options)
        data = _resolve_data(opts.pop("data"), Path(job.source))
        calibration = _resolve_data(opts.pop("calibration_data"), Path(job.source))
        if job.methods:
            row |= _compress_row(job, opts, data, calibration)
        else:
            row |= _optimize_row(job, opts, data, calibration)
    except ClusterError:
        raise
    except OnnxoptError as e:
        row = _failed(job, e)
    row["seconds"] = round(time.perf_counter() - start, 2)
    return {c: row.get(c) for c in COLUMNS}


def _failed(job: Job, e: BaseException) -> dict[str, Any]:
    """A model the tool refused: a finished row, its reason the error's first line."""
    return {c: None for c in COLUMNS} | {"model": job.source, "output": job.output, "key": job.key,
                                         "status": "failed", "reason": (str(e).splitlines() or [type(e).__name__])[0]}


def _compress_row(job: Job, opts: dict[str, Any], data: str | None, calibration: str | None) -> dict[str, Any]:
    from onnxopt.executors import RayExecutor, remote_measure
    from onnxopt.lossy import compress, resolve_methods
    from onnxopt.validate import Tolerance

    tol = opts.pop("exact_tolerance")
    measure = None
    if job.measure_on:  # this task runs on a Ray worker: its latency task goes to the target node
        import ray

        if not ray.is_initialized():
            raise OnnxoptError("--measure-on pins latency tasks to Ray nodes; add --executor ray")
        ray_ex = RayExecutor(None, job.measure_on)
        measure = remote_measure(ray_ex, opts["threads"], opts["repeats"])
    r = compress(job.source, job.output, resolve_methods(list(job.methods)), calibration_data=calibration,
                 eval_data=data, exact_tolerance=Tolerance(**tol), measure=measure, **opts)
    float_c = r.candidates[0]
    written = next((c for c in r.candidates[1:] if c.verdict.startswith("written")), None)
    timed = [c for c in r.candidates[1:] if c.latency_ms is not None]
    best = written or (min(timed, key=lambda c: c.latency_ms) if timed else None)
    ratio = (best.latency_ms / float_c.latency_ms if best is not None and best.latency_ms is not None
             and float_c.latency_ms else None)
    return {"status": "compressed" if r.written == "compressed" else "rolled back",
            "latency_ratio": None if ratio is None else round(ratio, 4),
            "size_before": r.before.size_bytes if r.before else None,
            "size_after": r.after.size_bytes if r.after else None,
            "fidelity": r.validation_detail, "reason": r.reason}


def _optimize_row(job: Job, opts: dict[str, Any], data: str | None, calibration: str | None) -> dict[str, Any]:
    from onnxopt.api import optimize_file
    from onnxopt.validate import Tolerance

    tol = opts.pop("exact_tolerance")
    r = optimize_file(job.source, job.output, opts["level"], data=data, calibration_data=calibration,
                      input_shapes=opts["input_shapes"], tolerance=Tolerance(**tol), bench=opts["bench"],
                      bench_repeats=opts["repeats"], threads=opts["threads"], verify_each=opts["verify_each"],
                      seed=opts["seed"])
    ratio = None
    if r.latency:
        before, after = r.latency["before"].median_ms, r.latency["after"].median_ms
        ratio = round(after / before, 4) if before else None
    v = r.validation
    return {"status": "optimized", "latency_ratio": ratio, "size_before": r.before.size_bytes,
            "size_after": r.after.size_bytes,
            "fidelity": (f"outputs within atol {v.tolerance.atol:g} rtol {v.tolerance.rtol:g}" if v is not None
                         else f"not validated ({r.validation_skipped})"),
            "reason": "; ".join(r.warnings[:1]) or "lossless passes"}


def load_results(out_dir: Path) -> dict[str, dict[str, Any]]:
    """key -> row of every model a previous run finished (a torn last line is ignored)."""
    path = out_dir / RESULTS
    rows: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[row["key"]] = row
    return rows


def _record(out_dir: Path, row: Mapping[str, Any]) -> None:
    """Append one finished model, flushed to disk: what a rerun after a crash relies on."""
    with (out_dir / RESULTS).open("a") as f:
        f.write(json.dumps(dict(row), default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


@dataclasses.dataclass
class ManyResult:
    rows: list[dict[str, Any]]  # one per model, in the models' order
    reused: int  # finished by an earlier run
    csv: Path


def run(pattern: str, out_dir: Path, methods: Sequence[str], options: Mapping[str, Any],
        executor: Executor | None = None, measure_on: str | None = None,
        tick: Callable[[int, int], None] | None = None, say: Callable[[str], None] | None = None,
        ) -> ManyResult:
    """Optimize every model ``pattern`` matches into ``out_dir``; skip those already done."""
    from onnxopt.executors import InProcess

    out_dir.mkdir(parents=True, exist_ok=True)
    models, root = find_models(pattern, out_dir)
    if not models:
        raise OnnxoptError(f"'{pattern}' matches no .onnx file")
    done = load_results(out_dir)
    jobs = []
    for m in models:
        rel = m.resolve().relative_to(root.resolve()) if root.resolve() in m.resolve().parents else Path(m.name)
        key = job_key(content_hash(m), methods, options, str(rel))
        jobs.append(Job(str(m), str(out_dir / rel), key, tuple(methods), dict(options), measure_on))
    ex = executor or InProcess()
    reused = {j.key: done[j.key] for j in jobs
              if j.key in done and (done[j.key]["status"] == "failed" or Path(done[j.key]["output"]).exists())}
    todo = [j for j in jobs if j.key not in reused]
    fresh: dict[str, dict[str, Any]] = {}
    if ex.remote:  # a cluster's nodes need not see these paths: the files travel with the task
        ready = []
        for j in todo:
            try:
                ready.append(shipped(j))
            except (OnnxoptError, OSError) as e:  # its data file is missing: a failed row, the others go on
                fresh[j.key] = _failed(j, e)
                _record(out_dir, fresh[j.key])
        todo = ready
    if say is not None:
        say(f"{len(todo)} of {len(jobs)} models to optimize ({len(reused)} done earlier)")

    def each(i: int, row: dict[str, Any]) -> None:
        row = _land(row)  # the output is in place before the model counts as finished
        _record(out_dir, row)
        fresh[todo[i].key] = row

    ex.map(run_job, todo, (), tick, each=each)
    rows = [reused.get(j.key) or fresh[j.key] for j in jobs]
    path = out_dir / SUMMARY
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return ManyResult(rows, len(reused), path)


def command(
    pattern: Annotated[str, typer.Argument(
        metavar="GLOB", help="Models to optimize, e.g. 'models/**/*.onnx' (quote it: ** is expanded here).",
        show_default=False)],
    out_dir: Annotated[Path, typer.Option(
        "--out-dir", metavar="DIR", help="Where the optimized models, results and summary.csv go.")],
    quantize: Annotated[str | None, typer.Option(metavar="METHOD", help="As for optimize.")] = None,
    prune: Annotated[float | None, typer.Option(metavar="FRACTION", min=0.0, max=0.95,
                                                help="As for optimize.")] = None,
    factorize: Annotated[float | None, typer.Option(metavar="FRACTION", min=0.0, max=0.95,
                                                    help="As for optimize.")] = None,
    data: Annotated[str | None, typer.Option(
        metavar="PATH", help="Evaluation data per model: '{stem}' is replaced by the model's name "
        "(data/{stem}.npz); without it, one file for every model. Default: generated.")] = None,
    calibration_data: Annotated[str | None, typer.Option(
        metavar="PATH", help="Calibration data per model, as --data.")] = None,
    input_shape: Annotated[list[str] | None, typer.Option(
        "--input-shape", metavar="NAME=1,3,224,224", help="As for optimize (every model).")] = None,
    level: Annotated[int, typer.Option(metavar="0|1", help="Preset of exact passes.")] = 1,
    max_accuracy_drop: Annotated[float | None, typer.Option(metavar="POINTS", help="As for optimize.")] = None,
    min_cosine: Annotated[float | None, typer.Option(metavar="FLOAT", help="As for optimize.")] = None,
    atol: Annotated[float | None, typer.Option(metavar="FLOAT", help="As for optimize.")] = None,
    rtol: Annotated[float | None, typer.Option(metavar="FLOAT", help="As for optimize.")] = None,
    bench: Annotated[bool, typer.Option("--bench/--no-bench", show_default=False,
                                        help="Measure latency (default: on).")] = True,
    repeats: Annotated[int, typer.Option(min=3, metavar="N", help="Latency repetitions per model.")] = 100,
    threads: Annotated[int, typer.Option(min=1, metavar="N", help="onnxruntime intra-op threads.")] = 1,
    force: Annotated[bool, typer.Option("--force", show_default=False, help="As for optimize.")] = False,
    verify_each: Annotated[bool, typer.Option("--verify-each", show_default=False,
                                              help="As for optimize.")] = False,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed for generated inputs.")] = 0,
    executor: ExecutorOption = "local",
    ray_address: RayAddressOption = "auto",
    measure_on: MeasureOnOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", show_default=False,
                                        help="Print only the last line and errors.")] = False,
) -> None:
    """Optimize every model GLOB matches into --out-dir, one task per model; a rerun skips finished ones."""
    from onnxopt import cli
    from onnxopt.data import parse_input_shapes
    from onnxopt.executors import make
    from onnxopt.lossy import DEFAULT_MIN_COSINE, QUANTIZERS
    from onnxopt.validate import EXACT_ATOL, EXACT_RTOL

    with cli._user_errors():
        if quantize is not None and quantize not in QUANTIZERS:
            raise OnnxoptError(f"--quantize '{quantize}': choose one of {', '.join(QUANTIZERS)}")
        methods = ([f"prune:{prune:g}"] if prune is not None else []) + (
            [f"factorize:{factorize:g}"] if factorize is not None else []) + ([quantize] if quantize else [])
        if not methods and measure_on:
            raise OnnxoptError("--measure-on times the lossy verdict; add --quantize, --prune or --factorize")
        if methods and not bench and not force:
            raise OnnxoptError("--no-bench: the latency verdict decides whether a compressed model is kept; "
                               "add --force to write it without measuring")
        shapes = parse_input_shapes(input_shape)
        tol = {"atol": EXACT_ATOL if atol is None else atol, "rtol": EXACT_RTOL if rtol is None else rtol}
        options: dict[str, Any] = {
            "data": data, "calibration_data": calibration_data, "input_shapes": shapes, "level": level,
            "repeats": repeats, "threads": threads, "verify_each": verify_each, "seed": seed,
            "exact_tolerance": tol, "bench": bench}
        if methods:
            options |= {"max_accuracy_drop": max_accuracy_drop, "force": force,
                        "min_cosine": DEFAULT_MIN_COSINE if min_cosine is None else min_cosine}
        # models are the tasks; --measure-on is the models' latency verdict, pinned from inside them
        try:
            with make(executor, ray_address, measure_on) as ex, \
                    cli._Activity(cli.err.is_terminal and not quiet) as activity:
                activity.say("optimizing models")
                result = run(pattern, out_dir, methods, options, ex, measure_on, activity.tick)
        except KeyboardInterrupt:
            n = len(load_results(out_dir))
            cli.err.print(f"onnxopt: interrupted; {n} finished model{' is' if n == 1 else 's are'} recorded in "
                          f"{out_dir / RESULTS}: the same command resumes", markup=False, soft_wrap=True)
            raise typer.Exit(130) from None
        _print(result, quiet)


def _print(result: ManyResult, quiet: bool) -> None:
    from onnxopt import cli

    if not quiet:
        root = os.path.commonpath([str(Path(r["model"]).parent) for r in result.rows])
        rows = [[os.path.relpath(r["model"], root), r["status"],
                 "" if r["latency_ratio"] is None else f"{r['latency_ratio']:.2f}x",
                 f"{cli._fmt_bytes(r['size_before'])} -> {cli._fmt_bytes(r['size_after'])}"
                 if r.get("size_after") is not None else "", r["fidelity"] or "", r["reason"] or ""]
                for r in result.rows]
        cli.out.print(cli._compact_table(["model", "status", "latency", "size", "fidelity", "reason"], rows,
                                         ("model", "status", "fidelity", "reason")))
    counts: dict[str, int] = {}
    for r in result.rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    cli.out.print(f"{len(result.rows)} models: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                  + f" ({result.reused} done earlier); summary: {result.csv}", markup=False, soft_wrap=True)
