"""Where the time goes with ``--target onnxruntime``, and why SkipLayerNormalization is not written here.

    python bench/target_ort_profile.py [--out bench/TARGET_ORT_PROFILE.md]

1. Per op type, the share of onnxruntime's kernel time (its own profiler, 1 thread, all graph
   optimizations on, as ``bench/run.py`` measures) in the original ViT and MiniLM
   (``~/.cache/onnxopt/zoo``) and in their level 1 + ``--target onnxruntime`` outputs: what
   is left for a lossless fusion to win once attention is one op.
2. The three forms ``fuse-ort-skip-layernorm`` chooses from at [1, 64, H] (the pass's own
   micro-model), timed with ``onnxopt.bench.measure_latency``: the fused op, Add +
   LayerNormalization (which onnxruntime fuses into the same op at session start), and Sum +
   LayerNormalization (which it does not).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxopt.passes.fuse_ort_skip_layernorm import micro_forms

import onnxopt
from onnxopt import machine
from onnxopt.bench import measure_latency

ZOO = Path.home() / ".cache" / "onnxopt" / "zoo"
RUNS = 200


def _feed(name: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if name == "minilm":  # a 12-token sentence, the benchmark's typical length
        return {"input_ids": rng.integers(1000, 5000, (1, 12)), "attention_mask": np.ones((1, 12), np.int64)}
    return {"x": rng.standard_normal((1, 3, 64, 64)).astype(np.float32)}


def op_shares(path: Path, feed: dict[str, np.ndarray]) -> dict[str, float]:
    """Op type -> share of kernel time, from onnxruntime's profiler."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"onnxopt_profile_{os.getpid()}")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(RUNS):
        sess.run(None, feed)
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    times: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            times[e["args"]["op_name"]] += e["dur"]
    total = sum(times.values())
    return {op: t / total for op, t in times.most_common()}


def skip_forms(width: int, keep_sum: bool) -> dict[str, float]:
    """Microseconds per run of each form the pass chooses between (its own micro-models and feed)."""
    builders, feed = micro_forms(width, keep_sum)
    lat = measure_latency({f: build() for f, build in builders.items()}, [feed], repeats=400, max_seconds=20)
    return {f: lat[f].median_ms * 1e3 for f in builders}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("TARGET_ORT_PROFILE.md"))
    args = parser.parse_args(argv)
    started = time.time()
    lines = ["# --target onnxruntime: where the time goes", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"- machine: {machine.summary()} (load average {os.getloadavg()[0]:.1f} at the start)",
             f"- command: `python bench/target_ort_profile.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`",
             "", f"## Kernel time per op type (onnxruntime's profiler, 1 thread, {RUNS} runs, all optimizations on)",
             "", "Share of the kernel time (the profiler's cost per node inflates the small ops' shares; for",
             "latency see `bench/TARGET_ORT.md`). MiniLM at 12 tokens, ViT at one 64x64 image.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in (("vit", ZOO / "vit-digits.onnx"), ("minilm", ZOO / "minilm.onnx")):
            if not path.exists():
                lines.append(f"{name}: {path} not built (python models/zoo.py / models/minilm.py)")
                continue
            optimized, _ = onnxopt.optimize(onnxopt.load_model(path), level=1, target="onnxruntime")
            target = Path(tmp) / f"{name}.ort.onnx"
            onnxopt.save_model(optimized, target)
            rows = {label: op_shares(p, _feed(name)) for label, p in (("original", path), ("--target", target))}
            ops = sorted({op for shares in rows.values() for op in shares},
                         key=lambda op: -max(rows[k].get(op, 0.0) for k in rows))[:10]
            lines += [f"### {name}", "", "| op | original | --target onnxruntime |", "|---|---|---|"]
            lines += [f"| {op} | " + " | ".join(f"{rows[k].get(op, 0.0):.1%}" for k in rows) + " |" for op in ops]
            lines.append("")
    lines += ["## SkipLayerNormalization against the unfused forms (`fuse-ort-skip-layernorm`'s micro-model)", "",
              "[1, 64, H] float32, microseconds per run (median, `onnxopt.bench.measure_latency`, all",
              "optimizations on). *add* is what onnxruntime runs for Add + LayerNormalization: it fuses an Add",
              "read only by the LayerNormalization into SkipLayerNormalization at session start; with a second",
              "reader of the sum (*sum kept*, the pre-LayerNorm residual stream of ViT) it cannot.", "",
              "| H | sum kept | fused | add | Sum + LayerNormalization |", "|---|---|---|---|---|"]
    for width in (192, 384):
        for keep in (False, True):
            t = skip_forms(width, keep)
            lines.append(f"| {width} | {'yes' if keep else 'no'} | {t['fused']:.1f} | {t['add']:.1f} | "
                         + (f"{t['sum']:.1f}" if "sum" in t else "-") + " |")
    lines += ["", f"Total time: {time.time() - started:.0f} s.", ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
