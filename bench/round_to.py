"""Which channel multiple pays for pruned Convs on this CPU (``prune-channels`` option ``round_to``).

    python bench/round_to.py                  # writes bench/ROUND_TO.md, about 2 minutes
    python bench/round_to.py --no-int8 --repeats 50 --out /tmp/ROUND_TO.md

A stack of ``LAYERS`` Conv 3x3 (pad 1) + Relu layers, every one ``c`` channels in and out, as a
pruned ResNet stage is: ``c`` = 48..64 at 28x28 and 112..128 at 14x14 (the 64- and 128-channel
stages of ResNet-18 at a 112x112 input). The model and its timing are prune-channels' own
(``passes/_channel_multiple.py``, which measures a narrow subset once per machine for the
default ``round_to``): every count reads the first ``c`` channels of one ``c_max``-channel input,
so that a family's counts are timed in one interleaved run (``onnxopt.bench.measure_latency``:
all onnxruntime graph optimizations on, 1 intra-op thread, the calling thread's CPU time,
medians). Random weights; in float and, with ``--int8`` (default on), after onnxopt's static
int8 QDQ pass (what ``--prune 0.3 --quantize int8`` runs).

*ns/MAC* is the median divided by the MACs: if a count is not a multiple the kernels like, it
shows as a higher cost per MAC than its neighbours. Rounding pays only where a count is *slower*
than a larger multiple (then keeping more channels is free), or clearly costlier per MAC than the
multiple just below it.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnxopt.passes._channel_multiple import (
    LAYERS,
    conv_stack,
    paying_multiple,
    stack_feeds,
    time_counts,
)

from onnxopt import machine

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ((64, 28), (128, 14))  # (largest channel count, spatial size)
SPAN = 16  # counts c_max - SPAN .. c_max


def macs(c: int, hw: int, layers: int = LAYERS) -> int:
    return layers * c * c * 9 * hw * hw


def quantized(model: onnx.ModelProto, width: int, hw: int) -> onnx.ModelProto:
    import onnxopt

    out, _ = onnxopt.optimize(model, level=1, passes=["quantize-qdq"], calibration=stack_feeds(width, hw, 8, seed=1))
    return out


def time_family(c_max: int, hw: int, int8: bool, repeats: int, max_seconds: float) -> dict[str, dict[int, float]]:
    """Median ms per count, float (and int8), each precision's counts interleaved in one run."""
    counts = list(range(c_max - SPAN, c_max + 1))
    out: dict[str, dict[int, float]] = {}
    for precision in ("float", "int8") if int8 else ("float",):
        models = {}
        for c in counts:
            m = conv_stack(c, hw, width=c_max)
            models[c] = quantized(m, c_max, hw) if precision == "int8" else m
        out[precision] = time_counts(models, c_max, hw, repeats, max_seconds)
    return out


def render(results: dict[tuple[int, int], dict[str, dict[int, float]]], meta: dict[str, str]) -> str:
    lines = ["# Which channel multiple pays for pruned Convs (`prune-channels` `round_to`)", "",
             f"- date: {meta['date']}", f"- machine: {meta['machine']}, shared with other work",
             f"- versions: {meta['versions']}",
             f"- command: `{meta['command']}`", "",
             f"A stack of {LAYERS} Conv 3x3 (pad 1) + Relu, every layer `c` channels in and out (reading the first "
             "`c` channels of one input, a Slice), batch 1, random weights; all counts of a family timed in one "
             "interleaved run (1 intra-op thread, the calling thread's CPU time, medians of up to "
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
    pays = ["", "The multiple prune-channels' rule picks (`_channel_multiple.paying_multiple`: the largest "
            "whose rounding to the nearest multiple makes no count slower, within 3%):", ""]
    for (c_max, hw), by in results.items():
        for p, ms in by.items():
            pays.append(f"- {c_max - SPAN}..{c_max} at {hw}x{hw}, {p}: {paying_multiple(ms)}")
            for m in (4, 8, 16):
                off = [c for c in ms if c % m and (c // m) * m in ms and -(-c // m) * m in ms]
                if not off:
                    continue
                down = float(np.median([ms[(c // m) * m] / ms[c] for c in off]))
                up = float(np.median([ms[-(-c // m) * m] / ms[c] for c in off]))
                slower = sum(ms[c] > ms[-(-c // m) * m] for c in off)
                lines.append(f"| {c_max - SPAN}..{c_max} at {hw}x{hw} | {p} | {m} | {len(off)} | {down:.3f} | "
                             f"{up:.3f} | {slower} of {len(off)} |")
    return "\n".join(lines + pays)


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
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine.summary(), "repeats": str(args.repeats),
            "versions": ", ".join(f"{p} {version(p)}" for p in ("onnxruntime", "onnx", "numpy")),
            "command": " ".join(["python bench/round_to.py", *(argv if argv is not None else sys.argv[1:])]),
            "conclusion": conclude(results)}
    args.out.write_text(render(results, meta))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
