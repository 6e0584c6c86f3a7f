"""MiniLM through ``factorize-lowrank`` alone at fixed settings: why factorization does not pay there.

    python bench/factorize_minilm.py            # writes bench/FACTORIZE_MINILM.md, about 2 minutes

The benchmark's MiniLM workload (``bench/run.py``: all-MiniLM-L6-v2, 37 real calibration sentences,
20 held-out ones). Each row is level 1 plus the pass with the given options, the candidate the
lossy driver's first (uniform) step would build; *per-layer error* is the pass's own relative
squared output error of each factorized layer on the calibration rows (after the refit), the
cosine is of the sentence embedding on the held-out sentences, against the original. The
conclusion at the end of the .md is written by hand; a rerun replaces the file.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SETTINGS = (
    "rank_fraction=0.5,method=svd,refit=false",
    "rank_fraction=0.5,method=svd",
    "rank_fraction=0.5",
    "rank_fraction=0.5,sequential=true",
    "rank_fraction=0.75",
    "energy=0.99",
)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "FACTORIZE_MINILM.md"))
    args = ap.parse_args(argv)
    import onnx

    from onnxopt import machine, optimize
    from onnxopt.runtime import run_model

    spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
    assert spec is not None
    assert spec.loader is not None
    bench_run = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = bench_run
    spec.loader.exec_module(bench_run)
    w = bench_run.minilm_workload(Path("~/.cache/onnxopt/zoo").expanduser(), 64, False)
    src = onnx.load(str(w.path))
    ref = run_model(src, w.eval)
    started = datetime.datetime.now(datetime.timezone.utc)
    lines = ["# MiniLM through `factorize-lowrank` alone", "",
             f"- date: {started:%Y-%m-%d %H:%M} UTC", f"- machine: {machine.summary()}",
             "- command: `python bench/factorize_minilm.py`",
             f"- data: {len(w.calib)} calibration sentences, {len(w.eval)} held-out sentences", "",
             " ".join(__doc__.split("\n\n", 2)[2].split()), "",
             "| options | layers factorized | declined | per-layer error median / max | params | "
             "min cosine | median cosine | FF layer alone -> pair ms |",
             "|---|---|---|---|---|---|---|---|"]
    for opts in SETTINGS:
        out, rep = optimize(src, passes=[f"factorize-lowrank:{opts}"], calibration=w.calib, level=1)
        per = [min(_cosine(g, r) for g, r in zip(gs, rs, strict=True))
               for gs, rs in zip(run_model(out, w.eval), ref, strict=True)]
        notes = rep.notes["factorize-lowrank"]
        layers, skipped = notes["layers"], list(notes["skipped"].values())
        errs = [v["error_after_refit"] for v in layers.values()]
        why = ", ".join(f"{skipped.count(r)} {r}" for r in sorted(set(skipped)))
        before = sum(v["params_before"] for v in layers.values())
        after = sum(v["params_after"] for v in layers.values())
        first = next(iter(layers.values()), {})
        lines.append(
            f"| `{opts}` | {len(layers)} | {why} | "
            + (f"{np.median(errs):.2g} / {max(errs):.2g}" if errs else "-") + " | "
            + (f"{before / 1e6:.2f}M -> {after / 1e6:.2f}M" if layers else "-")
            + f" | {min(per):.4f} | {np.median(per):.4f} | "
            + (f"{first['latency_ms_before']:.3f} -> {first['latency_ms_after']:.3f}" if "latency_ms_before" in first
               else "-") + " |")
        print(lines[-1], file=sys.stderr)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
