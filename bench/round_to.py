"""Which channel multiple pays for pruned Convs on this CPU (``prune-channels`` option ``round_to``).

    python bench/round_to.py                  # writes bench/ROUND_TO.md, about 2 minutes
    python bench/round_to.py --no-int8 --repeats 50 --out /tmp/ROUND_TO.md

A stack of ``LAYERS`` Conv 3x3 (pad 1) + Relu layers, every one ``c`` channels in and out, as a
pruned ResNet stage is: ``c`` = 48..64 at 28x28 and 112..128 at 14x14 (the 64- and 128-channel
stages of ResNet-18 at a 112x112 input). Random weights; every count of one family is timed in
one interleaved run (``onnxopt.bench.measure_latency``: all onnxruntime graph optimizations on,
1 intra-op thread, the calling thread's CPU time, medians), in float and, with ``--int8``
(default on), after onnxopt's static int8 QDQ pass (what ``--prune 0.3 --quantize int8`` runs).

*ns/MAC* is the median divided by the MACs: if a count is not a multiple the kernels like, it
shows as a higher cost per MAC than its neighbours. Rounding pays only where a count is *slower*
than a larger multiple (then keeping more channels is free), or clearly costlier per MAC than the
multiple just below it.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
LAYERS = 4
FAMILIES = ((64, 28), (128, 14))  # (largest channel count, spatial size)
SPAN = 16  # counts c_max - SPAN .. c_max


def conv_stack(c: int, hw: int, layers: int = LAYERS, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i in range(layers):
        w = (rng.standard_normal((c, c, 3, 3)) * np.sqrt(2.0 / (9 * c))).astype(np.float32)
        b = (rng.standard_normal(c) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}",
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        out = "y" if i == layers - 1 else f"r{i}"
        nodes.append(helper.make_node("Relu", [f"c{i}"], [out], name=f"relu{i}"))
        x = out
    graph = helper.make_graph(nodes, f"conv{c}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, hw, hw])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def macs(c: int, hw: int, layers: int = LAYERS) -> int:
    return layers * c * c * 9 * hw * hw


def feeds(c: int, hw: int, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, c, hw, hw)).astype(np.float32)} for _ in range(n)]


def quantized(model: onnx.ModelProto, c: int, hw: int) -> onnx.ModelProto:
    import onnxopt

    out, _ = onnxopt.optimize(model, level=1, passes=["quantize-qdq"], calibration=feeds(c, hw, 8, seed=1))
    return out


def time_family(c_max: int, hw: int, int8: bool, repeats: int, max_seconds: float) -> dict[str, dict[int, float]]:
    """Median ms per count, float (and int8), each precision's counts interleaved in one run."""
    counts = list(range(c_max - SPAN, c_max + 1))
    out: dict[str, dict[int, float]] = {}
    for precision in ("float", "int8") if int8 else ("float",):
        models = {}
        for c in counts:
            m = conv_stack(c, hw)
            models[str(c)] = quantized(m, c, hw) if precision == "int8" else m
        # measure_latency feeds every model the same feeds, and each count has its own input
        # shape: the same loop, with per-model feeds
        lat = _interleaved(models, {str(c): feeds(c, hw, 4, seed=2) for c in counts}, repeats, max_seconds)
        out[precision] = {int(k): v for k, v in lat.items()}
    return out


def _interleaved(models: dict[str, onnx.ModelProto], inputs: dict[str, list[dict[str, np.ndarray]]],
                 repeats: int, max_seconds: float) -> dict[str, float]:
    """``onnxopt.bench.measure_latency``'s loop (1 thread, thread_time, round-robin), per-model feeds."""
    import time

    from onnxopt.runtime import session

    sessions = {k: session(m, optimize=True, threads=1) for k, m in models.items()}
    for k, sess in sessions.items():  # warm-up, as measure_latency does
        for _ in range(3):
            for f in inputs[k]:
                sess.run(None, f)
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    start = time.perf_counter()
    for r in range(repeats):
        for k, sess in sessions.items():
            f = inputs[k][r % len(inputs[k])]
            t0 = time.thread_time()
            sess.run(None, f)
            samples[k].append((time.thread_time() - t0) * 1e3)
        if r >= 4 and time.perf_counter() - start > max_seconds:
            break
    return {k: float(np.median(s)) for k, s in samples.items()}


def _cpu() -> tuple[str, str]:
    name, flags = platform.processor() or "unknown CPU", ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("Flags:"):
                have = set(line.split(":", 1)[1].split())
                flags = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                                             "avx512_bf16", "amx_int8") if f in have)
    except (OSError, subprocess.CalledProcessError):
        pass
    return name, flags


def render(results: dict[tuple[int, int], dict[str, dict[int, float]]], meta: dict[str, str]) -> str:
    lines = ["# Which channel multiple pays for pruned Convs (`prune-channels` `round_to`)", "",
             f"- date: {meta['date']}", f"- machine: {meta['cpu']} (lscpu flags: {meta['flags']}), "
             f"{meta['cores']} cores shared with other work", f"- versions: {meta['versions']}",
             f"- command: `{meta['command']}`", "",
             f"A stack of {LAYERS} Conv 3x3 (pad 1) + Relu, every layer `c` channels in and out, batch 1, random "
             "weights; all counts of a family timed in one interleaved run (1 intra-op thread, the calling "
             "thread's CPU time, medians of up to "
             f"{meta['repeats']} repetitions), all onnxruntime graph optimizations on. *int8*: after onnxopt's "
             "static QDQ pass (onnxruntime's QLinearConv). *vs max*: median against the full count's. *ns/MAC*: "
             "median / MACs; a count the kernels dislike shows as a higher cost per MAC than its neighbours.", ""]
    for (c_max, hw), by in results.items():
        precisions = list(by)
        lines += [f"## c = {c_max - SPAN}..{c_max} at {hw}x{hw}", "",
                  "| c | mod 4 | mod 8 | mod 16 | MACs M | " + " | ".join(
                      f"{p} ms | {p} vs max | {p} ns/MAC" for p in precisions) + " |",
                  "|---|---|---|---|---|" + "---|---|---|" * len(precisions)]
        for c in sorted(by[precisions[0]], reverse=True):
            cells = []
            for p in precisions:
                ms = by[p][c]
                cells += [f"{ms:.3f}", f"{ms / by[p][c_max]:.3f}", f"{ms * 1e6 / macs(c, hw):.3f}"]
            lines.append(f"| {c} | {c % 4} | {c % 8} | {c % 16} | {macs(c, hw) / 1e6:.1f} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Rounding, computed from the tables", "",
              "For each count `c` that is not a multiple of `m`: the median time of the multiple below "
              "(`down`, fewer channels) and above (`up`, more channels) against `c`'s own. Below 1: faster than "
              "the exact count.", "", meta["conclusion"], ""]
    return "\n".join(lines)


def conclude(results: dict[tuple[int, int], dict[str, dict[int, float]]]) -> str:
    """What rounding to a multiple does, computed from the tables: for every count ``c`` that is
    not a multiple of ``m``, the time of the multiple below (``down``) and above (``up``) against
    ``c``'s own time; medians over those counts."""
    lines = ["| family | precision | m | counts off the multiple | t(down)/t(c) | t(up)/t(c) | "
             "counts slower than the multiple above |", "|---|---|---|---|---|---|---|"]
    for (c_max, hw), by in results.items():
        for p, ms in by.items():
            for m in (4, 8, 16):
                off = [c for c in ms if c % m and (c // m) * m in ms and -(-c // m) * m in ms]
                if not off:
                    continue
                down = float(np.median([ms[(c // m) * m] / ms[c] for c in off]))
                up = float(np.median([ms[-(-c // m) * m] / ms[c] for c in off]))
                slower = sum(ms[c] > ms[-(-c // m) * m] for c in off)
                lines.append(f"| {c_max - SPAN}..{c_max} at {hw}x{hw} | {p} | {m} | {len(off)} | {down:.3f} | "
                             f"{up:.3f} | {slower} of {len(off)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--max-seconds", type=float, default=90.0, help="per family and precision")
    parser.add_argument("--no-int8", dest="int8", action="store_false")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "ROUND_TO.md")
    args = parser.parse_args(argv)
    from importlib.metadata import version

    results = {}
    for c_max, hw in FAMILIES:
        print(f"c = {c_max - SPAN}..{c_max} at {hw}x{hw}", file=sys.stderr, flush=True)
        results[(c_max, hw)] = time_family(c_max, hw, args.int8, args.repeats, args.max_seconds)
    cpu, flags = _cpu()
    import os

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
            "flags": flags, "cores": str(os.cpu_count()), "repeats": str(args.repeats),
            "versions": ", ".join(f"{p} {version(p)}" for p in ("onnxruntime", "onnx", "numpy")),
            "command": " ".join(["python bench/round_to.py", *(argv if argv is not None else sys.argv[1:])]),
            "conclusion": conclude(results)}
    args.out.write_text(render(results, meta))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
