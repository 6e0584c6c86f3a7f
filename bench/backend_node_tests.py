"""Run onnx's ~1,900 backend node tests through onnxopt's default level and report.

    python bench/backend_node_tests.py [--mode data|no-data|both] [--processes 2]
                                       [--filter REGEX] [--out FILE.md]

Each case's original model must first reproduce onnx's expected outputs in
onnxruntime; those that do are optimized (level 1) and checked again against the
same expected outputs (``backend_suite`` beside this script has the outcomes).
``data`` runs the pass manager; ``no-data`` runs ``optimize_file`` on the model file
alone, as a user runs the tool. Prints a summary, writes each mode's section of a
markdown report (a section of the other mode already in the file is kept), and
exits 1 when any case is CRASH or WRONG.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import backend_suite as bs
import onnx
import onnxruntime

from onnxopt import __version__, machine

HERE = Path(__file__).resolve().parent
TITLE = "# onnx backend node tests through onnxopt (level 1)"
SECTIONS = {bs.DATA: "## Data mode", bs.NO_DATA: "## No-data mode"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=(*bs.MODES, "both"), default=bs.DATA)
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
    command = "python bench/backend_node_tests.py" + "".join(
        f" {shlex.quote(a)}" for a in sys.argv[1:])
    sections = _read_sections(args.out)
    commit = _commit()  # the code the workers run was imported before the cases were loaded
    bugs = 0
    for mode in bs.MODES if args.mode == "both" else (args.mode,):
        results, seconds = _run(cases, passes, mode, args)
        counts = bs.counts(results)
        bugs += sum(counts[b] for b in bs.BUGS)
        sections[mode] = render(mode, results, passes, missing, command, seconds, commit)
        args.out.write_text(_document(sections))
        print(f"wrote the {mode} section of {args.out}")
    return 1 if bugs else 0


def _run(cases: list, passes: list[str], mode: str, args: argparse.Namespace
         ) -> tuple[list[bs.CaseResult], float]:
    done = 0

    def progress(r: bs.CaseResult) -> None:
        nonlocal done
        done += 1
        if r.outcome in bs.BUGS:
            print(f"  {r.outcome}: {r.name}: {r.reason}", flush=True)
        if done % 200 == 0:
            print(f"  {mode}: {done}/{len(cases)}", flush=True)

    t1 = time.perf_counter()
    results = bs.run_suite(cases, passes, processes=args.processes, timeout=args.timeout,
                           progress=progress, mode=mode)
    seconds = time.perf_counter() - t1
    counts = bs.counts(results)
    print(f"{mode}: {len(results)} cases in {seconds:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if mode == bs.NO_DATA:
        runnable, written = _runnable_written(counts)
        print(f"{mode}: {written} of {runnable} cases onnxruntime runs were written "
              f"({_percent(written, runnable)})")
    return results, seconds


def render(mode: str, results: list[bs.CaseResult], passes: list[str], missing: list[str],
           command: str, seconds: float, commit: str) -> str:
    """One mode's section of the report (starts with its ``## `` heading)."""
    counts = bs.counts(results)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    what = ("the pass manager on the model in memory" if mode == bs.DATA
            else "`onnxopt.api.optimize_file(model, out, bench=False)`, without the cases' inputs")
    lines = [
        f"{SECTIONS[mode]}: {what}",
        "",
        f"- command: `{command}` ({seconds:.0f} s for {len(results)} cases)",
        f"- date: {now}; onnxopt {__version__} (commit {commit})",
        f"- versions: onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"Python {sys.version.split()[0]}",
        f"- CPU: {machine.summary()}",
        f"- level-1 passes run: {', '.join(passes)}",
    ]
    if missing:
        lines.append(f"- level-1 passes not registered at the time of the run: "
                     f"{', '.join(missing)}")
    lines.append("")
    if mode == bs.NO_DATA:
        runnable, written = _runnable_written(counts)
        lines += [
            "Each case's model is written to a file and optimized as a user would, with no",
            "data: onnxopt generates its own inputs to validate on. The file it writes is then",
            "judged against the case's expected outputs on the case's own inputs, by the",
            "same rules as in data mode.",
            "",
            f"**{written} of the {runnable} cases onnxruntime runs were optimized and written "
            f"({_percent(written, runnable)}).**",
            "",
        ]
    lines += ["| outcome | cases |", "|---|---:|"]
    split = bs.validation_counts(results) if mode == bs.NO_DATA else {}
    for outcome, n in counts.items():
        lines.append(f"| {outcome} | {n} |")
        for how, m in split.get(outcome, {}).items():
            lines.append(f"| &nbsp;&nbsp;{how} | {m} |")
    refused = [r for r in results if r.outcome == bs.REFUSED]
    if mode == bs.NO_DATA and refused:
        lines += ["", "### Refusals by cause", "", "| cases | cause (names and numbers elided) |",
                  "|---:|---|"]
        causes = Counter(_cause_of(r.reason) for r in refused)
        lines += [f"| {n} | {_cell(c)} |" for c, n in causes.most_common()]
    skipped = [r for r in results if r.validation.startswith(bs.SKIPPED)]
    if skipped:
        lines += ["", "### Written with validation skipped", "", "| case | op | why |",
                  "|---|---|---|"]
        lines += [f"| {r.name} | {r.ops} | {_cell(r.validation.partition(': ')[2])} |"
                  for r in sorted(skipped, key=lambda r: r.name)]
    lines += ["", "### Cases not preserved", "",
              "| case | op | outcome | reason |", "|---|---|---|---|"]
    order = {o: i for i, o in enumerate((bs.CRASH, bs.WRONG, bs.REFUSED, bs.CHANGED,
                                         bs.ORT_MISMATCH, bs.ORT_UNSUPPORTED))}
    rows = sorted((r for r in results if r.outcome != bs.PRESERVED),
                  key=lambda r: (order.get(r.outcome, 99), r.name))
    lines += [f"| {r.name} | {r.ops} | {r.outcome} | {_cell(r.reason)} |" for r in rows]
    return "\n".join(lines) + "\n"


_INTRO = """\
Each case's original model runs in onnxruntime (graph optimizations off) against the
expected outputs at the case's tolerance (rtol 1e-3, atol 1e-7). Cases onnxruntime
cannot run or does not match are `ort-unsupported` / `ort-mismatch` and not judged.
The rest are optimized and checked again on the case's inputs: `preserved` (no pass
changed the graph), `changed-but-correct`, `refused` (an OnnxoptError), and the bugs
`CRASH` (any other exception, including a pass's exception wrapped in PassFailedError)
and `WRONG` (invalid model, onnxruntime failure, or outputs that differ; the reason
names the first pass whose pipeline prefix is already wrong).

Two modes: *data* runs the level-1 pipeline on the model in memory (what the passes do);
*no-data* runs the tool as a user does, on the model file alone, with inputs onnxopt
generates to validate on (what a user gets). Written cases in no-data mode are counted as
validated or written with validation skipped.
"""


def _document(sections: dict[str, str]) -> str:
    parts = [TITLE, "", _INTRO]
    parts += [sections[m] for m in bs.MODES if m in sections]
    return "\n".join(parts)


def _read_sections(path: Path) -> dict[str, str]:
    """The mode sections already in ``path`` (kept when only the other mode runs)."""
    if not path.exists():
        return {}
    text = path.read_text()
    found: dict[str, str] = {}
    starts = sorted((text.find("\n" + h) + 1, m) for m, h in SECTIONS.items()
                    if "\n" + h in text)
    for i, (start, mode) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(text)
        found[mode] = text[start:end].rstrip("\n") + "\n"
    return found


def _cause_of(reason: str) -> str:
    """A refusal reason with its specifics elided, to group refusals by cause."""
    text = re.sub(r"'[^']*'", "'…'", reason)
    text = re.sub(r"--input-shape \S+", "--input-shape …", text)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\([^)]*\d[^)]*\)", "…", text)
    return re.sub(r"(?<!\w)-?\d+(\.\d+)?(e-?\d+)?(?!\w)", "N", text)


def _runnable_written(counts: dict[str, int]) -> tuple[int, int]:
    runnable = sum(counts.values()) - counts[bs.ORT_UNSUPPORTED] - counts[bs.ORT_MISMATCH]
    return runnable, counts[bs.PRESERVED] + counts[bs.CHANGED]


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _commit() -> str:
    """HEAD, and whether the product's code differs from it in the working tree."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "onnxopt", "passes"],
                               cwd=HERE.parent, capture_output=True).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" with uncommitted changes in onnxopt/ or passes/" if dirty else "")


if __name__ == "__main__":
    sys.exit(main())
