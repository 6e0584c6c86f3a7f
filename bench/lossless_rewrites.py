"""Do the level-1 lossless rewrites pay in onnxruntime on this CPU? Writes bench/LOSSLESS_REWRITES.md.

    python bench/lossless_rewrites.py                 # rewrites, then level 1 beside the peers: ~15 minutes
    python bench/lossless_rewrites.py --no-peers --repeats 40 --out /tmp/LOSSLESS_REWRITES.md

Each row times a small model as the exporters write it ("before") against the same model after
the rewrite ("after"), in one interleaved run (``onnxopt.bench.measure_latency``: all onnxruntime
graph optimizations on, 1 intra-op thread, the calling thread's CPU time, medians). A rewrite
joins level 1 only if its ratio is not above 1 beyond noise (``NOISE``). The "after" models are
built by running the pass itself on the "before" model, so the row times what level 1 writes.

Rows: constant chains (x*a*b, x+a-b), a per-channel scale after Conv and MatMul, Pad before Conv,
the decomposed activations against the standard op (HardSigmoid 6, HardSwish 14, Gelu 20,
LayerNormalization 17), and a 3-D MatMul + bias against Reshape -> Gemm -> Reshape (onnxsim's
rewrite, which ``fuse-matmul-add`` does not do; see the README).
"""

from __future__ import annotations

import argparse
import datetime
import math
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
NOISE = 1.02  # ratios within 2% count as equal (interleaved medians on a shared 2-core machine)
LAYERS = 4    # each model repeats its pattern this many times, so per-op overheads add up


def _model(build: Callable[[str, int, list, list], str], x_shape: Sequence[int | str], opset: int,
           y_shape: Sequence[int | str] | None = None) -> onnx.ModelProto:
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = "x"
    for i in range(LAYERS):
        x = build(x, i, nodes, inits)
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    from onnxopt.testing import make_model, vi

    return make_model(nodes, [vi("x", list(x_shape))], [vi("y", list(y_shape or x_shape))], inits, opset=opset)


def _const(inits: list, name: str, value: np.ndarray) -> str:
    inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
    return name


def _node(nodes: list, op: str, inputs: list[str], out: str, **attrs: object) -> str:
    nodes.append(helper.make_node(op, inputs, [out], **attrs))
    return out


def chain_mul(x: str, i: int, nodes: list, inits: list) -> str:
    t = _node(nodes, "Mul", [x, _const(inits, f"a{i}", np.full(64, 1.01))], f"t{i}")
    return _node(nodes, "Div", [t, _const(inits, f"b{i}", [1.02])], f"u{i}")


def chain_add(x: str, i: int, nodes: list, inits: list) -> str:
    t = _node(nodes, "Add", [x, _const(inits, f"a{i}", np.full(64, 0.1))], f"t{i}")
    return _node(nodes, "Sub", [t, _const(inits, f"b{i}", [0.05])], f"u{i}")


def conv_scale(x: str, i: int, nodes: list, inits: list) -> str:
    rng = np.random.default_rng(i)
    w = _const(inits, f"w{i}", rng.standard_normal((32, 32, 3, 3)) * 0.1)
    c = _node(nodes, "Conv", [x, w, _const(inits, f"b{i}", np.zeros(32))], f"c{i}", pads=[1, 1, 1, 1])
    return _node(nodes, "Mul", [c, _const(inits, f"s{i}", rng.uniform(0.5, 2, (32, 1, 1)))], f"m{i}")


def matmul_scale(x: str, i: int, nodes: list, inits: list) -> str:
    w = _const(inits, f"w{i}", np.random.default_rng(i).standard_normal((384, 384)) * 0.05)
    m = _node(nodes, "MatMul", [x, w], f"mm{i}")
    return _node(nodes, "Div", [m, _const(inits, f"s{i}", [8.0])], f"d{i}")


def pad_conv(x: str, i: int, nodes: list, inits: list) -> str:
    p = _node(nodes, "Pad", [x, _const_i64(inits, f"p{i}", [0, 0, 1, 1, 0, 0, 1, 1])], f"pd{i}")
    w = _const(inits, f"w{i}", np.random.default_rng(i).standard_normal((32, 32, 3, 3)) * 0.1)
    return _node(nodes, "Conv", [p, w], f"c{i}")


def _const_i64(inits: list, name: str, value: Sequence[int]) -> str:
    inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.int64), name))
    return name


def hardsigmoid(x: str, i: int, nodes: list, inits: list) -> str:
    a = _node(nodes, "Add", [x, _const(inits, f"three{i}", 3.0)], f"a{i}")
    c = _node(nodes, "Clip", [a, _const(inits, f"lo{i}", 0.0), _const(inits, f"hi{i}", 6.0)], f"c{i}")
    return _node(nodes, "Div", [c, _const(inits, f"six{i}", 6.0)], f"d{i}")


def hardswish(x: str, i: int, nodes: list, inits: list) -> str:
    h = _node(nodes, "HardSigmoid", [x], f"h{i}", alpha=1.0 / 6, beta=0.5)
    return _node(nodes, "Mul", [x, h], f"m{i}")


def hardswish_clip(x: str, i: int, nodes: list, inits: list) -> str:
    c = hardsigmoid(x, i, nodes, inits)
    return _node(nodes, "Mul", [x, c], f"m{i}")


def gelu_erf(x: str, i: int, nodes: list, inits: list) -> str:
    d = _node(nodes, "Div", [x, _const(inits, f"r2{i}", math.sqrt(2))], f"d{i}")
    e = _node(nodes, "Erf", [d], f"e{i}")
    a = _node(nodes, "Add", [e, _const(inits, f"one{i}", 1.0)], f"a{i}")
    m = _node(nodes, "Mul", [x, a], f"m{i}")
    return _node(nodes, "Mul", [m, _const(inits, f"half{i}", 0.5)], f"g{i}")


def gelu_tanh(x: str, i: int, nodes: list, inits: list) -> str:
    p = _node(nodes, "Pow", [x, _const(inits, f"three{i}", 3.0)], f"p{i}")
    c = _node(nodes, "Mul", [p, _const(inits, f"k{i}", 0.044715)], f"c{i}")
    s = _node(nodes, "Add", [x, c], f"s{i}")
    r = _node(nodes, "Mul", [s, _const(inits, f"r{i}", math.sqrt(2 / math.pi))], f"r{i}_")
    t = _node(nodes, "Tanh", [r], f"t{i}")
    a = _node(nodes, "Add", [t, _const(inits, f"one{i}", 1.0)], f"a{i}")
    m = _node(nodes, "Mul", [x, a], f"m{i}")
    return _node(nodes, "Mul", [m, _const(inits, f"half{i}", 0.5)], f"g{i}")


def silu(x: str, i: int, nodes: list, inits: list) -> str:
    s = _node(nodes, "Sigmoid", [x], f"sg{i}")
    return _node(nodes, "Mul", [x, s], f"m{i}")


def layernorm(x: str, i: int, nodes: list, inits: list) -> str:
    mu = _node(nodes, "ReduceMean", [x], f"mu{i}", axes=[-1])
    d = _node(nodes, "Sub", [x, mu], f"d{i}")
    p = _node(nodes, "Pow", [d, _const(inits, f"two{i}", 2.0)], f"p{i}")
    v = _node(nodes, "ReduceMean", [p], f"v{i}", axes=[-1])
    e = _node(nodes, "Add", [v, _const(inits, f"eps{i}", 1e-5)], f"e{i}")
    s = _node(nodes, "Sqrt", [e], f"s{i}")
    n = _node(nodes, "Div", [d, s], f"n{i}")
    rng = np.random.default_rng(i)
    g = _node(nodes, "Mul", [n, _const(inits, f"g{i}", rng.uniform(0.5, 1.5, 384))], f"gm{i}")
    return _node(nodes, "Add", [g, _const(inits, f"b{i}", rng.standard_normal(384) * 0.1)], f"ln{i}")


def dynamic_flatten(x: str, i: int, nodes: list, inits: list) -> str:
    """torch's ``x.view(x.size(0), -1)`` between two Relus, as the exporters write it."""
    s = _node(nodes, "Shape", [x], f"s{i}")
    lead = _node(nodes, "Slice", [s, _const_i64(inits, f"st{i}", [0]), _const_i64(inits, f"en{i}", [1])], f"l{i}")
    t = _node(nodes, "Concat", [lead, _const_i64(inits, f"tail{i}", [-1])], f"t{i}", axis=0)
    f = _node(nodes, "Reshape", [x, t], f"f{i}")
    back = _node(nodes, "Concat", [lead, _const_i64(inits, f"chw{i}", [64, 56, 64])], f"b{i}", axis=0)
    return _node(nodes, "Relu", [_node(nodes, "Reshape", [f, back], f"r{i}")], f"o{i}")


def matmul_bias(x: str, i: int, nodes: list, inits: list) -> str:
    w = _const(inits, f"w{i}", np.random.default_rng(i).standard_normal((384, 384)) * 0.05)
    m = _node(nodes, "MatMul", [x, w], f"mm{i}")
    return _node(nodes, "Add", [m, _const(inits, f"b{i}", np.zeros(384))], f"ab{i}")


def matmul_gemm(x: str, i: int, nodes: list, inits: list) -> str:
    """onnxsim's form of ``matmul_bias`` at a static [1, 128, 384] input."""
    w = _const(inits, f"w{i}", np.random.default_rng(i).standard_normal((384, 384)) * 0.05)
    r = _node(nodes, "Reshape", [x, _const_i64(inits, f"flat{i}", [-1, 384])], f"r{i}")
    g = _node(nodes, "Gemm", [r, w, _const(inits, f"b{i}", np.zeros(384))], f"g{i}")
    return _node(nodes, "Reshape", [g, _const_i64(inits, f"back{i}", [1, 128, 384])], f"o{i}")


# (row, before builder, after: a pass name run on "before" or a builder, input shape, opset)
ROWS: tuple[tuple[str, Callable, str | Callable, tuple[int | str, ...], int], ...] = (
    ("x * a / b (chain)", chain_mul, "fold-arithmetic-chains", (1, 64, 56, 64), 17),
    ("x + a - b (chain)", chain_add, "fold-arithmetic-chains", (1, 64, 56, 64), 17),
    ("Conv -> Mul per channel", conv_scale, "fold-scale", (1, 32, 56, 56), 17),
    ("MatMul -> Div by 8", matmul_scale, "fold-scale", (1, 128, 384), 17),
    ("Pad -> Conv", pad_conv, "fuse-pad", (1, 32, 56, 56), 17),
    ("clip(x+3, 0, 6)/6 -> HardSigmoid", hardsigmoid, "fuse-hardswish", (1, 32, 56, 56), 17),
    ("x * HardSigmoid(x) -> HardSwish", hardswish, "fuse-hardswish", (1, 32, 56, 56), 17),
    ("x * clip(x+3, 0, 6)/6 -> HardSwish", hardswish_clip, "fuse-hardswish", (1, 32, 56, 56), 17),
    ("Gelu erf form -> Gelu", gelu_erf, "fuse-gelu", (1, 128, 1536), 20),
    ("Gelu tanh form -> Gelu(tanh)", gelu_tanh, "fuse-gelu", (1, 128, 1536), 20),
    ("LayerNorm decomposed -> LayerNormalization", layernorm, "fuse-layernorm", (1, 128, 384), 17),
    ("x * Sigmoid(x) -> Swish", silu, "fuse-swish", (1, 32, 56, 56), 24),
    ("Reshape(x, Concat(Shape(x)[:1], [-1])) -> Reshape(x, [0, -1])", dynamic_flatten, "fold-reshape-target",
     ("N", 64, 56, 64), 17),
    ("MatMul + bias 3-D -> Reshape Gemm Reshape", matmul_bias, matmul_gemm, (1, 128, 384), 17),
)


def after(before: onnx.ModelProto, how: str | Callable, shape: tuple[int | str, ...],
          opset: int) -> tuple[onnx.ModelProto, str]:
    """The rewritten model and what did it (the pass's stats, or 'hand-built')."""
    if callable(how):
        return _model(how, shape, opset), "hand-built (onnxsim's form)"
    from onnxopt import optimize

    out, report = optimize(before, passes=[how])
    return out, f"{how}: {report.stats(how)}"


def run(repeats: int) -> list[dict[str, object]]:
    from onnxopt.bench import measure_latency
    from onnxopt.graph_utils import op_histogram
    from onnxopt.testing import assert_equivalent

    rows = []
    for label, build, how, shape, opset in ROWS:
        before = _model(build, shape, opset)
        rewritten, note = after(before, how, shape, opset)
        concrete = [1 if isinstance(d, str) else d for d in shape]  # a named dim is dynamic: batch 1
        assert_equivalent(before, rewritten, atol=1e-4, rtol=1e-4, shapes={"x": concrete})  # never time a wrong one
        feeds = [{"x": np.random.default_rng(0).standard_normal(concrete).astype(np.float32)}]
        ms = measure_latency({"before": before, "after": rewritten}, feeds, repeats=repeats, max_seconds=20)
        ratio = ms["after"].median_ms / ms["before"].median_ms
        rows.append({"row": label, "before_ms": ms["before"].median_ms, "after_ms": ms["after"].median_ms,
                     "ratio": ratio, "verdict": "slower" if ratio > NOISE else "not slower",
                     "ops_before": op_histogram(before), "ops_after": op_histogram(rewritten), "note": note})
        print(f"{label:46} {ms['before'].median_ms:8.3f} {ms['after'].median_ms:8.3f} {ratio:6.3f}", flush=True)
    return rows


def render(rows: list[dict[str, object]], command: str, seconds: float) -> str:
    from onnxopt import machine

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=REPO).stdout.strip()
    lines = [
        "# Lossless rewrites: do they pay in onnxruntime on this CPU?", "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine.summary()}",
        f"- command: `{command}` (git {git}; {seconds:.0f} s)",
        f"- method: `onnxopt.bench.measure_latency`, {LAYERS} repetitions of the pattern per model, all onnxruntime "
        "graph optimizations on, 1 intra-op thread, CPU time of the calling thread, interleaved medians; "
        f"*ratio* = after / before; above {NOISE} is *slower*. The after model is what the pass writes "
        "(numerics checked against before at 1e-4 first).", "",
        "| rewrite | before ms | after ms | ratio | verdict | ops before -> after | pass stats |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ops = f"{_ops(r['ops_before'])} -> {_ops(r['ops_after'])}"
        lines.append(f"| {r['row']} | {r['before_ms']:.3f} | {r['after_ms']:.3f} | {r['ratio']:.3f} | {r['verdict']} "
                     f"| {ops} | {r['note']} |")
    return "\n".join(lines) + "\n"


def _ops(hist: object) -> str:
    assert isinstance(hist, dict)
    return " ".join(f"{k} {v}" for k, v in hist.items() if k != "Identity")


# ---------------------------------------------------------------- level 1 beside the peers

ZOO_MODELS = ("mlp", "mobilenetv2-digits", "resnet18-digits", "vit-digits", "minilm")
UPGRADE = ["fuse-hardswish:upgrade=true", "fuse-gelu:upgrade=true", "fuse-layernorm:upgrade=true"]
GEMM3D = ["fuse-batched-matmul-add:force=true", "fuse-shape-chains", "eliminate-common-subexpressions",
          "eliminate-dead-code"]


def variants(model: onnx.ModelProto) -> dict[str, onnx.ModelProto | str]:
    """original, onnxopt level 1, onnxsim, onnxslim (a string: why the tool failed)."""
    from onnxopt import optimize
    from onnxopt.io import opset_of

    out: dict[str, onnx.ModelProto | str] = {"original": model}
    try:
        out["onnxopt-l1"], report = optimize(model, level=1)
    except Exception as e:  # (a failing tool is a row, not a crash)
        out["onnxopt-l1"] = f"{type(e).__name__}: {str(e)[:80]}"
    else:
        if report.stats("fuse-batched-matmul-add").get("skipped:not-faster"):
            # what the per-machine measurement declined, forced, with the Reshape pairs merged after it
            out["l1-gemm3d"] = optimize(model, level=1, passes=GEMM3D)[0]
    if opset_of(model) < 20:  # level 1 plus the activation fusions allowed to raise the opset
        try:
            out["l1-upgrade"] = optimize(model, level=1, passes=UPGRADE)[0]
        except Exception as e:  # (the version converter may have no adapter for an op)
            out["l1-upgrade"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    try:
        import onnxsim

        sim, ok = onnxsim.simplify(model)
        out["onnxsim"] = sim if ok else "check failed"
    except Exception as e:
        out["onnxsim"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    try:
        import onnxslim

        out["onnxslim"] = onnxslim.slim(model)
    except Exception as e:
        out["onnxslim"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    return out


def peers(repeats: int, only: str = "") -> list[dict[str, object]]:
    """Per model: op-histogram differences between level 1 and the peers, and their latencies."""
    from onnxopt.bench import measure_latency
    from onnxopt.data import load, synthesize
    from onnxopt.graph_utils import op_histogram

    rows = []
    for name, path in _peer_paths():
        if only and not any(s in name for s in only.split(",")):
            continue
        model = onnx.load(path)
        data = path.parent / "minilm_data" / "eval"  # the sentences bench/run.py evaluates MiniLM on
        feeds = (load(data, model).feeds if name == "minilm" and data.exists()
                 else synthesize(model, model, count=2).feeds)[:2]
        made = variants(model)
        ok = {k: v for k, v in made.items() if isinstance(v, onnx.ModelProto)}
        try:
            diffs = {k: _max_diff(model, v, feeds) for k, v in ok.items() if k.startswith(("onnxopt-l1", "l1-"))}
        except Exception as e:  # (the original itself fails on these inputs: a row saying so)
            rows.append({"model": name, "hists": {k: op_histogram(v) for k, v in ok.items()}, "ms": {},
                         "diffs": {}, "failed": {"run": str(e).splitlines()[0][:120]}})
            continue
        hists = {k: op_histogram(v) for k, v in ok.items()}
        try:
            ms = {k: v.median_ms for k, v in measure_latency(ok, feeds, repeats=repeats, max_seconds=30).items()}
        except Exception as e:  # (a variant onnxruntime cannot run: record it)
            ms = {}
            made = {**made, "timing": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"}
        rows.append({"model": name, "hists": hists, "ms": ms, "diffs": diffs,
                     "failed": {k: v for k, v in made.items() if isinstance(v, str)}})
        print(name, {k: round(v, 3) for k, v in ms.items()}, flush=True)
    return rows


def _max_diff(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: list) -> float:
    """Largest |difference| over the float outputs (onnxruntime, optimizations off), relative to max |ref|."""
    from onnxopt.runtime import run_model

    worst = 0.0
    for ref, got in zip(run_model(reference, feeds), run_model(candidate, feeds), strict=True):
        for a, b in zip(ref, got, strict=True):
            a, b = np.asarray(a), np.asarray(b)
            if a.dtype.kind == "f" and a.size:
                worst = max(worst, float(np.abs(a - b).max() / max(float(np.abs(a).max()), 1e-12)))
    return worst


def _peer_paths() -> list[tuple[str, Path]]:
    import os

    cache = Path(os.environ.get("ONNXOPT_CACHE", "~/.cache/onnxopt")).expanduser()
    paths = [(n, cache / "zoo" / f"{n}.onnx") for n in ZOO_MODELS if (cache / "zoo" / f"{n}.onnx").exists()]
    sys.path.insert(0, str(REPO / "bench"))
    import corpus

    for entry in corpus.entries():
        try:
            paths.append((entry.name, corpus.fetch(entry)))
        except Exception as e:  # (offline: the corpus rows are left out)
            print(f"{entry.name}: not fetched ({e})", file=sys.stderr)
    return paths


def render_peers(rows: list[dict[str, object]]) -> str:
    lines = [
        "", "## Level 1 beside onnxsim and onnxslim", "",
        "Latency: median ms, same method as above (whole models, 30 s per model at most; zoo models at their "
        "bench/RESULTS.md input, MiniLM on its evaluation sentences, corpus models at the shape `onnxopt optimize` "
        "chooses). *ops that differ*: node counts per op type where level 1 and a peer differ "
        "(level 1 / onnxsim / onnxslim; original in brackets). *diff*: the largest |difference| of an output "
        "against the original's, over max |original output| (onnxruntime, optimizations off). "
        "*ms l1+upgrade*: level 1 with "
        f"`{' '.join('--pass ' + u for u in UPGRADE)}` (models below opset 20 only: the model is raised to "
        "opset 20 so that HardSwish, Gelu and LayerNormalization can be written). *ms l1+gemm3d*: level 1 with "
        f"`{' '.join('--pass ' + u for u in GEMM3D)}`, on the models where `fuse-batched-matmul-add` declined "
        "(`skipped:not-faster`): what onnxsim's rewrite would give on its own.", "",
        "Whole-model medians moved by several percent between seven runs of this table on 2026-12-04 "
        "(the 2-core machine "
        "is shared), e.g. ddddocr-rec level 1 / original 0.96 to 1.06 and MiniLM 0.94 to 1.03; what held in every "
        "run: level 1 at 0.89 to 0.93 on the PP-OCRv4 detector and recognizer, and l1+upgrade at 0.65 to 0.69 on "
        "layout-cdla and 0.72 to 0.74 on ppocr-v2-cls.", "",
        "| model | nodes orig / l1 / sim / slim | ms orig | ms l1 | ms l1+upgrade | ms l1+gemm3d | ms onnxsim "
        "| ms onnxslim | diff l1 / l1+upgrade / l1+gemm3d | ops that differ | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        hists, ms, failed = r["hists"], r["ms"], r["failed"]
        assert isinstance(hists, dict)
        assert isinstance(ms, dict)
        assert isinstance(failed, dict)
        nodes = " / ".join(str(sum(hists[k].values())) if k in hists else "-"
                           for k in ("original", "onnxopt-l1", "onnxsim", "onnxslim"))
        diffs = []
        l1 = hists.get("onnxopt-l1", {})
        for op in sorted(set().union(*hists.values())) if l1 else ():  # level 1 failed: nothing to compare
            peer_counts = [hists[k].get(op, 0) for k in ("onnxsim", "onnxslim") if k in hists]
            if any(c != l1.get(op, 0) for c in peer_counts):
                counts = "/".join(str(hists[k].get(op, 0)) if k in hists else "-"
                                  for k in ("onnxopt-l1", "onnxsim", "onnxslim"))
                diffs.append(f"{op} {counts} ({hists['original'].get(op, 0)})")
        cells = [f"{ms[k]:.3f}" if k in ms else "-"
                 for k in ("original", "onnxopt-l1", "l1-upgrade", "l1-gemm3d", "onnxsim", "onnxslim")]
        note = "; ".join(f"{k}: {v}" for k, v in failed.items())
        err = r["diffs"]
        assert isinstance(err, dict)
        errs = " / ".join(f"{err[k]:.1e}" if k in err else "-" for k in ("onnxopt-l1", "l1-upgrade", "l1-gemm3d"))
        differ = ", ".join(diffs) or ("none" if l1 else "-")
        lines.append(f"| {r['model']} | {nodes} | {' | '.join(cells)} | {errs} | {differ} "
                     f"| {note} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--only", default="", help="comma-separated substrings of row names")
    ap.add_argument("--peers-only", default="", help="comma-separated substrings of peer model names")
    ap.add_argument("--no-peers", action="store_true", help="only the rewrite rows")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "LOSSLESS_REWRITES.md")
    args = ap.parse_args(argv)
    global ROWS
    if args.only:
        ROWS = tuple(r for r in ROWS if any(s in r[0] for s in args.only.split(",")))
    t0 = datetime.datetime.now()
    rows = run(args.repeats)
    peer_rows = [] if args.no_peers else peers(min(args.repeats, 30), args.peers_only)
    command = "python bench/lossless_rewrites.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = render(rows, command.strip(), (datetime.datetime.now() - t0).total_seconds())
    args.out.write_text(text + (render_peers(peer_rows) if peer_rows else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
