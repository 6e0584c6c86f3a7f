"""Run onnx's backend node tests through onnxopt and classify what happened to each case.

onnx builds its node tests in memory (``onnx.backend.test.loader.load_node_model_tests``:
about 1,900 small models, each with input and expected output data). For each case:

1. the original model runs in onnxruntime (``onnxopt.runtime``: graph optimizations off)
   and is compared with the expected outputs at the case's tolerance (onnx's default:
   rtol 1e-3, atol 1e-7). If onnxruntime cannot run it the case is ``ort-unsupported``,
   if it disagrees with the expectation ``ort-mismatch``; either way onnxopt is not judged.
2. onnxopt rewrites it, in one of two modes:
   - ``data``: the pass manager alone (level 1: the preset run to a fixpoint; passes of
     the preset that are not registered yet are left out and listed by ``level1_passes``);
   - ``no-data``: as a user runs the tool, without the case's inputs: the model is written
     to a file and ``onnxopt.api.optimize_file`` optimizes, validates on inputs it
     generates itself, and writes it (latency not measured).
3. the rewritten model is checked (``onnx.checker`` when the original passes it) and
   run in onnxruntime against the same expected outputs, on the case's own inputs.

Inputs are fed positionally (graph inputs minus initializers); ``onnxopt.runtime.run``
passes bfloat16 and float8 tensors through OrtValues (4-bit and 2-bit types stay
``ort-unsupported``).

Outcomes: ``preserved`` (no pass changed the graph, outputs match), ``changed-but-correct``,
``refused`` (an ``OnnxoptError`` the user can act on), and the two bugs: ``CRASH`` (any
other exception, including ``PassFailedError``, which wraps a pass's own exception)
and ``WRONG`` (the rewritten model is invalid, fails in onnxruntime, or its outputs,
names, dtypes or shapes differ; the reason ends with the first pass of the pipeline
whose prefix is already wrong). In no-data mode a written case also says whether
onnxopt validated it or skipped validation (``CaseResult.validation``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import multiprocessing
import signal
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxopt import runtime
from onnxopt.api import optimize_file
from onnxopt.errors import OnnxoptError, PassFailedError, ValidationError
from onnxopt.manager import PRESETS, PassManager, PassSpec, instantiate
from onnxopt.registry import registry

PRESERVED = "preserved"
CHANGED = "changed-but-correct"
REFUSED = "refused"
CRASH = "CRASH"
WRONG = "WRONG"
ORT_UNSUPPORTED = "ort-unsupported"
ORT_MISMATCH = "ort-mismatch"
OUTCOMES = (PRESERVED, CHANGED, REFUSED, CRASH, WRONG, ORT_UNSUPPORTED, ORT_MISMATCH)
BUGS = (CRASH, WRONG)
WRITTEN = (PRESERVED, CHANGED)

DATA = "data"
NO_DATA = "no-data"
MODES = (DATA, NO_DATA)

VALIDATED = "validated"
SKIPPED = "validation skipped"

_NODE_CASES = "onnx.backend.test.case.node"


@dataclasses.dataclass(frozen=True)
class CaseResult:
    """What happened to one backend test case."""

    name: str
    ops: str
    outcome: str
    reason: str = ""
    seconds: float = 0.0
    # no-data mode, written cases: VALIDATED, or SKIPPED followed by ": <why>"
    validation: str = ""


def load_cases(
    modules: Sequence[str] | None = None, names: Collection[str] | None = None
) -> list[Any]:
    """Node test cases (``onnx.backend.test.case.test_case.TestCase``), in onnx's order.

    ``modules`` (e.g. ``["conv", "batchnorm"]``, modules of ``onnx.backend.test.case.node``)
    imports only those, which is much faster than building all cases (~15 s); ``names``
    then keeps only the cases named (``test_conv_with_strides_padding``).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators overflow casts on purpose
        if modules is None:
            from onnx.backend.test.loader import load_node_model_tests

            cases = list(load_node_model_tests())
        else:
            for module in modules:
                importlib.import_module(f"{_NODE_CASES}.{module}")
            cases = list(importlib.import_module(_NODE_CASES)._NodeTestCases)
    if names is not None:
        wanted = set(names)
        cases = [c for c in cases if c.name in wanted]
    return cases


def level1_passes() -> tuple[list[str], list[str]]:
    """(passes of the level-1 preset that are registered, those that are not)."""
    table = registry()
    have = [n for n in PRESETS[1] if n in table]
    return have, [n for n in PRESETS[1] if n not in table]


def case_ops(model: onnx.ModelProto) -> str:
    """A short label: the op of a one-node model, else ``expanded:<n> nodes``."""
    nodes = model.graph.node
    if len(nodes) == 1:
        node = nodes[0]
        return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
    return f"expanded:{len(nodes)} nodes"


def run_case(
    case: Any, passes: Sequence[PassSpec] | None = None, timeout: float = 120.0,
    mode: str = DATA,
) -> CaseResult:
    """Judge one case; ``passes`` (data mode, run as a preset to a fixpoint) default to level 1.

    No-data mode runs ``optimize_file`` at its default level and ignores ``passes``.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}; modes are {', '.join(MODES)}")
    t0 = time.perf_counter()
    ops = case_ops(case.model)
    validation = ""
    try:
        with _deadline(timeout):
            if mode == DATA:
                outcome, reason = _judge(case, passes)
            else:
                outcome, reason, validation = _judge_no_data(case)
    except TimeoutError:
        outcome, reason = CRASH, f"timeout after {timeout:g} s"
    return CaseResult(case.name, ops, outcome, reason, time.perf_counter() - t0, validation)


def _datasets(case: Any) -> list[tuple[list[Any], list[Any]]]:
    return [([_to_value(v) for v in ins], [_to_value(v) for v in outs])
            for ins, outs in case.data_sets]


def _screen(model: onnx.ModelProto, datasets: Sequence[Any], rtol: float, atol: float
            ) -> tuple[str, str] | None:
    """(ort-unsupported or ort-mismatch, why) when onnxruntime cannot be the judge, else None."""
    try:
        got = _run_ort(model, [ins for ins, _ in datasets])
    except OnnxoptError as e:
        return ORT_UNSUPPORTED, str(e)
    for (_, expected), actual in zip(datasets, got, strict=False):
        if why := mismatch(expected, actual, rtol, atol):
            return ORT_MISMATCH, why
    return None


def _judge(case: Any, passes: Sequence[PassSpec] | None) -> tuple[str, str]:
    model = case.model
    rtol, atol = case.rtol, case.atol
    datasets = _datasets(case)
    if screened := _screen(model, datasets, rtol, atol):
        return screened

    specs = list(passes) if passes is not None else level1_passes()[0]
    try:
        optimized, report = PassManager([instantiate(p) for p in specs]).run(model)
    except PassFailedError as e:
        return CRASH, _first_line(e) + _cause(e)
    except OnnxoptError as e:
        return REFUSED, f"{type(e).__name__}: {_first_line(e)}"
    except Exception as e:
        return CRASH, f"{type(e).__name__}: {_first_line(e)}"

    if why := _wrongness(model, optimized, datasets, rtol, atol):
        return WRONG, why + _blame(model, datasets, specs, rtol, atol)
    return _written(report.summary())


def _judge_no_data(case: Any) -> tuple[str, str, str]:
    """(outcome, reason, validation) of ``optimize_file`` run on the case's model alone."""
    model = case.model
    rtol, atol = case.rtol, case.atol
    datasets = _datasets(case)
    if screened := _screen(model, datasets, rtol, atol):
        return (*screened, "")

    with tempfile.TemporaryDirectory(prefix="onnxopt-backend-") as tmp:
        src, dst = Path(tmp) / f"{case.name}.onnx", Path(tmp) / f"{case.name}.opt.onnx"
        onnx.save_model(model, src)
        try:
            result = optimize_file(src, dst, bench=False)
        except PassFailedError as e:
            return CRASH, _first_line(e) + _cause(e), ""
        except OnnxoptError as e:
            return REFUSED, f"{type(e).__name__}: {_refusal(e)}", ""
        except Exception as e:
            return CRASH, f"{type(e).__name__}: {_first_line(e)}" + _cause(e, own=True), ""
        if not dst.exists():
            return WRONG, f"optimize_file returned but wrote nothing to {dst.name}", ""
        optimized = onnx.load_model(dst)
    if why := _wrongness(model, optimized, datasets, rtol, atol):
        return WRONG, why + _blame(model, datasets, level1_passes()[0], rtol, atol), ""
    skipped = getattr(result, "validation_skipped", None)  # set by the API once it can skip
    validation = f"{SKIPPED}: {skipped}" if skipped else VALIDATED
    return (*_written(result.pipeline.summary()), validation)


def _written(summary: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """(preserved or changed-but-correct, what the passes did) from a pipeline summary."""
    changed = [r for r in summary if r["changed"]]
    if not changed:
        return PRESERVED, ""
    return CHANGED, "; ".join(
        f"{r['name']}: " + ", ".join(f"{k}={v}" for k, v in sorted(r["stats"].items()))
        for r in changed
    )


def _wrongness(
    model: onnx.ModelProto, optimized: onnx.ModelProto, datasets: Sequence[Any],
    rtol: float, atol: float,
) -> str | None:
    """Why ``optimized`` is not a correct rewrite of ``model`` on the case's data, or None."""
    if [o.name for o in optimized.graph.output] != [o.name for o in model.graph.output]:
        return "graph output names or order changed"
    if [i.name for i in optimized.graph.input] != [i.name for i in model.graph.input]:
        return "graph input names or order changed"
    if _checker_error(model) is None and (err := _checker_error(optimized)):
        return f"onnx.checker rejects the optimized model: {err}"
    try:
        got = _run_ort(optimized, [ins for ins, _ in datasets])
    except OnnxoptError as e:
        return f"optimized model fails: {e}"
    for (_, expected), actual in zip(datasets, got, strict=False):
        if why := mismatch(expected, actual, rtol, atol):
            return why
    return None


def _blame(
    model: onnx.ModelProto, datasets: Sequence[Any], specs: Sequence[PassSpec],
    rtol: float, atol: float,
) -> str:
    """`` (first wrong with: <pass>)``: the shortest prefix of the pipeline that is wrong."""
    for k in range(1, len(specs) + 1):
        prefix = [instantiate(p) for p in specs[:k]]
        try:
            optimized, _ = PassManager(prefix).run(model)
        except Exception:
            return f" (first wrong with: {prefix[-1].name}, which then fails)"
        if _wrongness(model, optimized, datasets, rtol, atol):
            return f" (first wrong with: {prefix[-1].name})"
    return ""


def _run_ort(model: onnx.ModelProto, feeds: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """Run ``model`` as written on positional inputs; an ``OnnxoptError`` when ORT fails."""
    sess = runtime.session(model)
    return [runtime.run(sess, runtime.positional_feed(sess, values)) for values in feeds]


def _to_value(v: Any) -> Any:
    if isinstance(v, onnx.TensorProto):
        return onnx.numpy_helper.to_array(v)
    if isinstance(v, (list, tuple)):
        return [_to_value(x) for x in v]
    if isinstance(v, np.generic):  # a few cases give scalars; onnxruntime wants arrays
        return np.asarray(v)
    return v


def mismatch(
    expected: Sequence[Any], actual: Sequence[Any], rtol: float, atol: float
) -> str | None:
    """Why ``actual`` outputs differ from ``expected`` (onnx's backend rules), or None."""
    if len(actual) != len(expected):
        return f"{len(actual)} outputs, expected {len(expected)}"
    for i, (exp, act) in enumerate(zip(expected, actual, strict=False)):
        if why := _value_mismatch(exp, act, rtol, atol):
            return f"output {i}: {why}"
    return None


def _value_mismatch(exp: Any, act: Any, rtol: float, atol: float) -> str | None:
    if exp is None or act is None:
        if exp is None and act is None:
            return None
        return f"expected {type(exp).__name__}, got {type(act).__name__}"
    if isinstance(exp, (list, tuple)) or isinstance(act, (list, tuple)):
        if not isinstance(exp, (list, tuple)) or not isinstance(act, (list, tuple)):
            return f"expected {type(exp).__name__}, got {type(act).__name__}"
        if len(exp) != len(act):
            return f"sequence length {len(act)}, expected {len(exp)}"
        for j, (e, a) in enumerate(zip(exp, act, strict=False)):
            if why := _value_mismatch(e, a, rtol, atol):
                return f"[{j}] {why}"
        return None
    exp, act = np.asarray(exp), np.asarray(act)
    if exp.shape != act.shape:
        return f"shape {act.shape}, expected {exp.shape}"
    if exp.dtype == object or act.dtype == object:
        return None if np.array_equal(exp, act) else "strings differ"
    if exp.dtype != act.dtype:
        return f"dtype {act.dtype}, expected {exp.dtype}"
    if exp.dtype.name == "bfloat16":  # numpy cannot promote it; onnx allows two bf16 ULPs
        exp, act, rtol = exp.astype(np.float32), act.astype(np.float32), max(rtol, 2**-6)
    elif exp.dtype.kind not in "biufc":  # float8 / int4 and friends from ml_dtypes
        exp, act = exp.astype(np.float32), act.astype(np.float32)
    try:
        np.testing.assert_allclose(act, exp, rtol=rtol, atol=atol)
    except AssertionError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip().startswith("Max")]
        return "values differ" + (f" ({'; '.join(lines)})" if lines else "")
    return None


def _checker_error(model: onnx.ModelProto) -> str | None:
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        return _first_line(e)
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _refusal(e: OnnxoptError) -> str:
    """The first line of a refusal; for a failed validation, the outputs that failed."""
    if not isinstance(e, ValidationError):
        return _first_line(e)
    details = [ln.strip() for ln in str(e).splitlines()[1:] if ln.startswith("  ")]
    failures = [d for d in details if not d.startswith("nothing was written")]
    return "validation failed: " + "; ".join(failures or [_first_line(e)])


def _cause(e: BaseException, own: bool = False) -> str:
    """Where the exception was raised: the innermost frame in onnxopt's code.

    ``own``: the frame of ``e`` itself, else of the exception it wraps (``PassFailedError``).
    """
    err = e if own else e.__cause__
    if err is None or err.__traceback__ is None:
        return ""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if "/onnxopt/" in f.filename or "/passes/" in f.filename] or frames
    frame = ours[-1]
    return f" [at {Path(frame.filename).name}:{frame.lineno} in {frame.name}]"


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise ``TimeoutError`` after ``seconds`` (main thread only; elsewhere no limit)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _expire(_signum: int, _frame: Any) -> None:
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# cases and options shared with forked workers (inherited, never pickled)
_SHARED: dict[str, Any] = {}


def _work(index: int) -> CaseResult:
    return run_case(_SHARED["cases"][index], _SHARED["passes"], _SHARED["timeout"],
                    _SHARED["mode"])


def run_suite(
    cases: Sequence[Any],
    passes: Sequence[PassSpec] | None = None,
    processes: int = 2,
    timeout: float = 120.0,
    progress: Callable[[CaseResult], None] | None = None,
    mode: str = DATA,
) -> list[CaseResult]:
    """Judge every case, over up to ``processes`` forked workers; results in case order."""
    passes = list(passes) if passes is not None else level1_passes()[0]
    processes = max(1, min(processes, len(cases)))
    results: dict[int, CaseResult] = {}
    if processes == 1:
        for i, case in enumerate(cases):
            results[i] = run_case(case, passes, timeout, mode)
            if progress:
                progress(results[i])
    else:
        _SHARED.update(cases=cases, passes=passes, timeout=timeout, mode=mode)
        ctx = multiprocessing.get_context("fork")
        try:
            with ctx.Pool(processes, maxtasksperchild=200) as pool:
                indexed = pool.imap(_work, range(len(cases)), chunksize=4)
                for i, result in enumerate(indexed):
                    results[i] = result
                    if progress:
                        progress(result)
        finally:
            _SHARED.clear()
    return [results[i] for i in range(len(cases))]


def counts(results: Sequence[CaseResult]) -> dict[str, int]:
    """Outcome -> number of cases, every outcome listed."""
    c = Counter(r.outcome for r in results)
    return {o: c.get(o, 0) for o in OUTCOMES}


def validation_counts(results: Sequence[CaseResult]) -> dict[str, dict[str, int]]:
    """No-data mode: written outcome -> {validated: n, validation skipped: m}."""
    return {
        o: {v: sum(r.outcome == o and r.validation.startswith(v) for r in results)
            for v in (VALIDATED, SKIPPED)}
        for o in WRITTEN
    }
