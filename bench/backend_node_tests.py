"""Run onnx's ~1,900 backend node tests through onnxopt's default level and report.

    python bench/backend_node_tests.py [--processes 2] [--filter REGEX] [--out FILE.md]

Each case's original model must first reproduce onnx's expected outputs in
onnxruntime; those that do are optimized (level 1) and checked again against the
same expected outputs (see ``onnxopt.backend_suite`` for the outcomes). Prints a
summary, writes a markdown report, and exits 1 when any case is CRASH or WRONG.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import onnx
import onnxruntime

from onnxopt import __version__
from onnxopt import backend_suite as bs

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, choices=(1, 2))
    parser.add_argument("--filter", help="only cases whose name matches this regex")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per case")
    parser.add_argument("--out", type=Path, default=HERE / "BACKEND_RESULTS.md")
    args = parser.parse_args()

    t0 = time.perf_counter()
    cases = bs.load_cases()
    if args.filter:
        cases = [c for c in cases if re.search(args.filter, c.name)]
    passes, missing = bs.level1_passes()
    unregistered = f"; not registered: {', '.join(missing)}" if missing else ""
    print(f"{len(cases)} cases loaded in {time.perf_counter() - t0:.0f} s; "
          f"passes: {', '.join(passes)}{unregistered}")
    done = 0

    def progress(r: bs.CaseResult) -> None:
        nonlocal done
        done += 1
        if r.outcome in bs.BUGS:
            print(f"  {r.outcome}: {r.name}: {r.reason}", flush=True)
        if done % 200 == 0:
            print(f"  {done}/{len(cases)}", flush=True)

    t1 = time.perf_counter()
    results = bs.run_suite(cases, passes, processes=args.processes, timeout=args.timeout,
                           progress=progress)
    seconds = time.perf_counter() - t1
    counts = bs.counts(results)
    print(f"{len(results)} cases in {seconds:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    command = "python bench/backend_node_tests.py" + "".join(
        f" {shlex.quote(a)}" for a in sys.argv[1:])
    args.out.write_text(render(results, counts, passes, missing, command, seconds))
    print(f"wrote {args.out}")
    return 1 if any(counts[b] for b in bs.BUGS) else 0


def render(results: list[bs.CaseResult], counts: dict[str, int], passes: list[str],
           missing: list[str], command: str, seconds: float) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# onnx backend node tests through `onnxopt.optimize` (level 1)",
        "",
        f"- date: {now}; onnxopt {__version__} (commit {_commit()})",
        f"- onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"Python {sys.version.split()[0]}",
        f"- command: `{command}` ({seconds:.0f} s for {len(results)} cases)",
        f"- level-1 passes run: {', '.join(passes)}",
    ]
    if missing:
        lines.append(f"- level-1 passes not registered at the time of the run: "
                     f"{', '.join(missing)}")
    lines += [
        "",
        "Each case's original model runs in onnxruntime (graph optimizations off) against the",
        "expected outputs at the case's tolerance (rtol 1e-3, atol 1e-7). Cases onnxruntime",
        "cannot run or does not match are `ort-unsupported` / `ort-mismatch` and not judged.",
        "The rest are optimized and checked again: `preserved` (no pass changed the graph),",
        "`changed-but-correct`, `refused` (an OnnxoptError), and the bugs `CRASH` (any other",
        "exception, including a pass's exception wrapped in PassFailedError) and `WRONG`",
        "(invalid model, onnxruntime failure, or outputs that differ; the reason names the",
        "first pass whose pipeline prefix is already wrong).",
        "",
        "| outcome | cases |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    lines += ["", "## Cases not preserved", "",
              "| case | op | outcome | reason |", "|---|---|---|---|"]
    order = {o: i for i, o in enumerate((bs.CRASH, bs.WRONG, bs.REFUSED, bs.CHANGED,
                                         bs.ORT_MISMATCH, bs.ORT_UNSUPPORTED))}
    rows = sorted((r for r in results if r.outcome != bs.PRESERVED),
                  key=lambda r: (order.get(r.outcome, 99), r.name))
    lines += [f"| {r.name} | {r.ops} | {r.outcome} | {_cell(r.reason)} |" for r in rows]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, check=True,
                             capture_output=True, text=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
