"""Where a low-rank pair beats the dense layer on this CPU (``factorize-lowrank`` ``crossover``).

    python bench/factorize_crossover.py               # writes bench/FACTORIZE_CROSSOVER.md, a few minutes
    python bench/factorize_crossover.py --repeats 10 --out /tmp/FC.md

The full table behind the pass's in-run measurement (``onnxopt/passes/_lowrank.py``, a bounded
subset cached per machine): a dense MatMul ``[1, 128, K] @ [K, N]`` against the pair
``[1, 128, K] @ [K, r] @ [r, N]`` for K, N in {384, 768, 1536, 3072}, and Convs (1x1 and 3x3,
batch 1, same padding) against their channel pair (k x k to r, 1 x 1 to M) and their spatial
pair (k x 1 to r, 1 x k to M), each at the ranks whose pair costs 0.25 .. 1.15 of the dense MACs.
*break-even*: the MAC share (pair / dense) below which the pair is faster, interpolated between
the measured shares (what the pass's ``crossover`` compares against). Then the pair at ranks 40..64
(which multiple pays: a rank that costs as much as the next multiple should be rounded up).
Timing: ``onnxopt.bench.measure_latency`` (1 intra-op thread, the calling thread's CPU time,
interleaved repetitions, medians), all onnxruntime graph optimizations on, random weights.
The conclusion at the end of the .md is written by hand from the tables; a rerun replaces the file.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SIZES = (384, 768, 1536, 3072)
CONVS = ((256, 256, 14, 1), (64, 64, 28, 3), (128, 128, 14, 3), (256, 256, 7, 3), (64, 128, 28, 3))


def _versions() -> str:
    import numpy
    import onnx
    import onnxruntime

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=False).stdout.strip()
    except OSError:
        rev = "?"
    return (f"onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}, numpy {numpy.__version__}, "
            f"python {platform.python_version()}, git {rev or '?'}")


def _ratio_cells(row: dict[str, Any]) -> str:
    return " ".join(f"{sh:.2f}:{t / row['dense_ms']:.2f}" for sh, t in zip(row["shares"], row["pair_ms"], strict=True))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default=str(REPO / "bench" / "FACTORIZE_CROSSOVER.md"))
    args = ap.parse_args(argv)
    from onnxopt.passes import _lowrank as lr

    from onnxopt import machine

    started = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        "# Where a low-rank pair beats the dense layer (`factorize-lowrank` `crossover`)", "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine.summary()}",
        f"- versions: {_versions()}",
        f"- command: `python bench/factorize_crossover.py --repeats {args.repeats}`", "",
        __doc__.split("\n\n", 2)[2].strip().replace("\n", " "), "",
        "Cells *share:time*: the pair's MACs and its median time, both against the dense layer's.", "",
    ]
    result: dict[str, Any] = {"matmul": {}, "conv": {}, "spatial": {}}
    lines += ["## MatMul `[1, 128, K] @ [K, N]`", "",
              "| K | N | dense ms | ns/MAC | pair share:time | break-even |", "|---|---|---|---|---|---|"]
    for k in SIZES:
        for n in SIZES:
            row = lr.measure_matmul(k, n, args.repeats)
            result["matmul"][f"{k}x{n}"] = row
            ns = row["dense_ms"] * 1e6 / (lr.SEQ * k * n)
            lines.append(f"| {k} | {n} | {row['dense_ms']:.3f} | {ns:.4f} | {_ratio_cells(row)} | "
                         f"{row['break_even']:.3f} |")
            print(f"matmul {k}x{n}: break-even {row['break_even']}", file=sys.stderr)
    for form, title in (("conv", "channel pair (k x k to r, 1 x 1 to M)"), ("spatial", "spatial pair (k x 1, 1 x k)")):
        lines += ["", f"## Conv, {title}", "", "| C | M | size | kernel | dense ms | pair share:time | break-even |",
                  "|---|---|---|---|---|---|---|"]
        for c, m, hw, kk in CONVS:
            if kk == 1 and form == "spatial":
                continue
            row = lr.measure_conv(c, m, hw, kk, form == "spatial", args.repeats)
            result[form][f"{c}x{m}x{kk}x{kk}@{hw}"] = row
            lines.append(f"| {c} | {m} | {hw}x{hw} | {kk}x{kk} | {row['dense_ms']:.3f} | {_ratio_cells(row)} | "
                         f"{row['break_even']:.3f} |")
            print(f"{form} {c}x{m}x{kk}@{hw}: break-even {row['break_even']}", file=sys.stderr)
    mult = lr.measure_multiples(args.repeats)
    result["multiples"] = mult
    lines += ["", "## Which rank multiple pays (pairs at ranks 40..64)", "",
              "| rank | mod 8 | mod 16 | MatMul 768x768 ms | vs 64 | Conv 64ch 3x3 @28 ms | vs 64 |",
              "|---|---|---|---|---|---|---|"]
    for r in lr.MULTIPLE_RANKS:
        mm, cv = mult["matmul_ms"][str(r)], mult["conv_ms"][str(r)]
        lines.append(f"| {r} | {r % 8} | {r % 16} | {mm:.3f} | {mm / mult['matmul_ms']['64']:.3f} | {cv:.3f} | "
                     f"{cv / mult['conv_ms']['64']:.3f} |")
    c = lr.summarize(result)
    lines += ["", "## What the pass would use (smallest break-even per form)", "",
              f"- MatMul/Gemm: {c.matmul:.3f}; Conv channel form: {c.conv:.3f}; spatial form: {c.spatial:.3f}",
              f"- rank multiple that pays: MatMul {c.matmul_multiple}, Conv {c.conv_multiple}",
              "- the pass itself measures the bounded subset in `_lowrank.measure_subset` (MatMul "
              + ", ".join(f"{k}x{n}" for k, n in lr.MATMUL_SHAPES) + "; Conv 64 -> 64 3x3 at 28x28) once "
              "per machine, cached by `onnxopt.machine.measured('factorize-crossover')`", ""]
    took = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    lines.append(f"Measured in {took:.0f} s.")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
