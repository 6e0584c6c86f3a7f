"""Time every lossless pass and the default pipeline on graphs of 10k to 100k nodes.

    python bench/scale.py                      # 10k, 20k, 50k, 100k; writes bench/SCALE.md
    python bench/scale.py --sizes 2000 8000 --no-write

Graphs come from ``onnxopt.testing.scale_model`` (blocks of Conv, BatchNormalization,
Identity, Add, Reshape, Transpose, MatMul, Relu, Dropout on small shapes; ``chain`` and
``branchy`` layouts). Each pass runs alone on a freshly imported graph (with shape
inference done, as the manager does); the pipeline row is ``onnxopt.optimize`` end to
end: import, shape inference, passes to a fixpoint, cleanup, export. Figures are
CPU seconds (``time.process_time``: other jobs on a shared machine do not count) per
10,000 nodes: a linear pass shows the same figure at every size.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import onnx

from onnxopt.graph_utils import node_count
from onnxopt.io import opset_of, to_graph
from onnxopt.manager import PRESETS, PassManager
from onnxopt.pass_base import NameGenerator, Pass, PassContext
from onnxopt.registry import registry
from onnxopt.shapes import apply_shapes
from onnxopt.testing import scale_model

LARGE_SECTION = "## Models over 2 GB"


def lossless_passes() -> list[type[Pass]]:
    """Registered exact passes, in preset order first."""
    table = registry()
    order = [n for n in PRESETS[1] if n in table]
    order += [n for n, cls in table.items() if cls.exact and n not in order]
    return [table[n] for n in order]


def time_pass(cls: type[Pass], model: onnx.ModelProto, repeats: int = 1) -> float:
    """Best wall time of ``cls().run`` on freshly imported copies of ``model``."""
    best = float("inf")
    for _ in range(repeats):
        graph = to_graph(model)
        apply_shapes(graph, model)
        ctx = PassContext(names=NameGenerator(graph), opset=opset_of(model))
        p = cls()
        p.check(graph, ctx)
        t0 = time.process_time()
        p.run(graph, ctx)
        best = min(best, time.process_time() - t0)
    return best


def pipeline_manager() -> PassManager:
    table = registry()
    return PassManager([table[n]() for n in PRESETS[1] if n in table])


def time_pipeline(model: onnx.ModelProto, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        pipeline_manager().run(model)
        best = min(best, time.process_time() - t0)
    return best


def measure(
    sizes: list[int], kinds: list[str], say: Callable[[str], None]
) -> dict[str, dict[tuple[str, int], float]]:
    """Row name -> (kind, nodes) -> seconds per 10,000 nodes."""
    rows: dict[str, dict[tuple[str, int], float]] = {}
    for kind in kinds:
        for size in sizes:
            model = scale_model(size, kind)
            n = node_count(model)
            for cls in lossless_passes():
                s = time_pass(cls, model)
                rows.setdefault(cls.name, {})[(kind, size)] = s / n * 1e4
                say(f"{kind:8s} {n:7d} nodes  {cls.name:34s} {s:8.3f}s")
            s = time_pipeline(model)
            rows.setdefault("pipeline (import+passes+export)", {})[(kind, size)] = s / n * 1e4
            say(f"{kind:8s} {n:7d} nodes  {'pipeline':34s} {s:8.3f}s")
    return rows


def table(rows: dict[str, dict[tuple[str, int], float]], sizes: list[int], kinds: list[str]) -> str:
    cols = [(k, s) for k in kinds for s in sizes]
    head = (
        "| pass | " + " | ".join(f"{k} {s // 1000}k" for k, s in cols) + " | largest / smallest |"
    )
    sep = "|---|" + "---:|" * (len(cols) + 1)
    lines = [head, sep]
    for name, cells in rows.items():
        ratio = max(cells[(k, sizes[-1])] / max(cells[(k, sizes[0])], 1e-9) for k in kinds)
        lines.append(
            f"| {name} | " + " | ".join(f"{cells[c]:.3f}" for c in cols) + f" | {ratio:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 20_000, 50_000, 100_000])
    ap.add_argument("--kinds", nargs="+", default=["chain", "branchy"])
    ap.add_argument(
        "--no-write", action="store_true", help="Print only; leave bench/SCALE.md alone."
    )
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = measure(args.sizes, args.kinds, lambda s: print(s, flush=True))
    md = table(rows, args.sizes, args.kinds)
    print(md)
    if args.no_write:
        return
    cmd = "python bench/scale.py" + (
        "" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:])
    )
    text = f"""# Scale: seconds per 10,000 nodes

Produced by `{cmd}` on {datetime.date.today().isoformat()}
({platform.machine()}, Python {platform.python_version()}, onnx {onnx.__version__};
{time.perf_counter() - t0:.0f} s in all). Graphs from `onnxopt.testing.scale_model`: blocks of
Conv, BatchNormalization, Identity, Add, Reshape, Transpose, MatMul, Relu, Dropout on small
shapes, as a chain or as two branches per block. Figures are CPU seconds of this
process (`time.process_time`), so other load on the machine does not inflate them. A pass
row is the pass alone on a freshly imported graph; the pipeline row is the level-1 preset
end to end (import, shape inference, passes to a fixpoint, cleanup, export). A linear pass has the same figure in every column;
the last column is the largest graph's figure over the smallest's (per layout, worst of both).

{md}
"""
    out = Path(__file__).with_name("SCALE.md")
    # the >2 GB section is written by hand from tests/test_large_model.py: keep it
    old = out.read_text() if out.exists() else ""
    keep = old[old.find(LARGE_SECTION) :] if LARGE_SECTION in old else ""
    out.write_text(text + ("\n" + keep if keep else ""))


if __name__ == "__main__":
    main()
