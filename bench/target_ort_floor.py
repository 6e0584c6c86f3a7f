"""How fast can a lossless rewrite make ViT and MiniLM in onnxruntime on this CPU? The GEMM floor.

    python bench/target_ort_floor.py [--repeats 200] [--out bench/TARGET_ORT_FLOOR.md]

A fusion, a folded constant or a packed QKV projection keeps every multiply-add of the
model's matrix products: it removes the work *around* them, not the products. So the fastest
such rewrites can make a model is the time of its GEMMs alone. Only a rewrite that proves
products unused goes below (``eliminate-unread-rows``). This script builds both bounds and
times them beside the model:

- the *GEMM floor* of a model: every MatMul, Gemm and Conv of the original, with its own
  weights and at the shapes it runs at, each fed its real input (captured from one run of
  the original on the same feed, ``onnxopt.capture.run_exposed``) as a graph input, and
  nothing else: no attention softmax, no LayerNorm, no Gelu, no residual Add, no Reshape
  (each product is cut to one element by a Slice, so that its output is not copied out);
- the original; ``onnxopt optimize`` level 1; level 1 + ``--target onnxruntime`` (both as
  a user runs them, ``optimize_file`` with the same feed as data); and onnxruntime's own
  transformer optimizer;
- the GEMM floor of level 1's output: ``eliminate-unread-rows`` removes matrix products (a
  classifier's last block on the tokens it drops), so past it the floor is lower.

All are timed together with ``onnxopt.bench.measure_latency`` (interleaved rounds, all
onnxruntime graph optimizations on; 1 thread: the calling thread's CPU time; 2 threads:
wall clock, spinning off), and each ratio to the original gets the paired-bootstrap 95%
interval of ``onnxopt.guard.latency_ratio``. ``1 / floor ratio`` is the largest speed-up
a rewrite that keeps every product could give on this machine, if everything but the GEMMs
cost nothing.

Models, and the variants of onnxopt and onnxruntime, come from ``bench/run.py`` (its zoo
workloads, built into ``$ONNXOPT_CACHE/zoo`` if missing, and its contenders): ViT at one
64x64 image (its trained size), MiniLM at 12 tokens (the benchmark's sentences) and 128.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import run  # bench/run.py beside this file: its zoo workloads and contenders
from onnx import helper, numpy_helper

from onnxopt import machine
from onnxopt.bench import Latency, estimate_macs, measure_latency
from onnxopt.capture import run_exposed
from onnxopt.guard import latency_ratio

ZOO = Path(os.environ.get("ONNXOPT_CACHE", "~/.cache/onnxopt")).expanduser() / "zoo"  # as bench/run.py
GEMMS = ("MatMul", "Gemm", "Conv")
CASES = {  # name: (bench/run.py workload, feed)
    "vit, 1 image 64x64": ("vit", lambda rng: {
        "x": rng.standard_normal((1, 3, 64, 64)).astype(np.float32)}),
    "minilm, 12 tokens": ("minilm", lambda rng: {
        "input_ids": rng.integers(1000, 5000, (1, 12)), "attention_mask": np.ones((1, 12), np.int64)}),
    "minilm, 128 tokens": ("minilm", lambda rng: {
        "input_ids": rng.integers(1000, 5000, (1, 128)), "attention_mask": np.ones((1, 128), np.int64)}),
}


def gemm_floor(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The model's GEMMs alone, their activations as graph inputs, and the feed of those inputs.

    Each GEMM's output is cut to its first element by a Slice, the graph output: returning the
    products whole would time onnxruntime copying megabytes into numpy, not the products. The
    Slices (one tiny kernel per GEMM) make the floor a little slower than the GEMMs alone.
    """
    inits = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in GEMMS and n.domain in ("", "ai.onnx")]
    acts = list(dict.fromkeys(x for n in nodes for x in n.input if x and x not in inits))
    values = next(run_exposed(model, [feed], acts))
    outs = [o for n in nodes for o in n.output]
    ranks = {o: v.ndim for o, v in zip(outs, next(run_exposed(model, [feed], outs)).values(), strict=True)}
    bounds = {r: (numpy_helper.from_array(np.zeros(r, np.int64), f"floor_starts_{r}"),
                  numpy_helper.from_array(np.ones(r, np.int64), f"floor_ends_{r}")) for r in set(ranks.values())}
    cuts = [helper.make_node("Slice", [o, f"floor_starts_{ranks[o]}", f"floor_ends_{ranks[o]}"], [f"{o}_first"])
            for o in outs]
    graph = helper.make_graph(
        nodes + cuts, "gemm_floor",
        [helper.make_tensor_value_info(a, helper.np_dtype_to_tensor_dtype(values[a].dtype), values[a].shape)
         for a in acts],
        [helper.make_tensor_value_info(f"{o}_first", onnx.TensorProto.FLOAT, None) for o in outs],
        [inits[x] for x in dict.fromkeys(x for n in nodes for x in n.input) if x in inits]
        + [t for pair in bounds.values() for t in pair],
    )
    floor = helper.make_model(graph, opset_imports=model.opset_import)
    floor.ir_version = model.ir_version
    return floor, values


def variants(w: run.Workload, feed: dict[str, np.ndarray], tmp: Path) -> dict[str, Path]:
    """onnxopt level 1, level 1 + --target onnxruntime and onnxruntime's transformer optimizer, as
    ``bench/run.py``'s contenders build them, with ``feed`` as the calibration (and data) feed."""
    out = {}
    for label, contender in (("onnxopt level 1", "onnxopt-l1"), ("onnxopt --target onnxruntime", "onnxopt-ort"),
                             ("ort transformer optimizer", "ort-transformer")):
        out[label] = tmp / f"{contender}.onnx"
        run.CONTENDERS[contender].build(w.path, [feed], out[label], w)
    return out


def peak_gmacs() -> float:
    """This core's float32 GEMM throughput: one 1024x1024x1024 MatMul in onnxruntime, 1 thread."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((1024, 1024)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "peak",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1024, 1024])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1024, 1024])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    lat = measure_latency({"peak": model}, [{"x": rng.standard_normal((1024, 1024)).astype(np.float32)}],
                          repeats=20, max_seconds=20)
    return 1024**3 / (lat["peak"].median_ms * 1e-3) / 1e9


def table(lat: dict[str, Latency]) -> list[str]:
    ref = lat["original"]
    rows = ["| variant | median ms | ratio | 95% interval | speed-up |", "|---|---|---|---|---|"]
    for k, v in lat.items():
        r = latency_ratio(ref, v)
        rows.append(f"| {k} | {v.median_ms:.3f} | {r.ratio:.3f} | {r.low:.3f}-{r.high:.3f} | {1 / r.ratio:.2f}x |")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("TARGET_ORT_FLOOR.md"))
    args = parser.parse_args(argv)
    started, load = time.time(), os.getloadavg()
    lines = ["# --target onnxruntime against the GEMM floor", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"- machine: {machine.summary()} (load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at the start)",
             f"- command: `python bench/target_ort_floor.py --repeats {args.repeats}`", "",
             __doc__.split("\n\n", 2)[2].strip(), "",
             f"This core's float32 GEMM peak: {peak_gmacs():.1f} GMAC/s (one 1024x1024x1024 MatMul, 1 thread).", ""]
    workloads = {"vit": run.zoo_workload("vit", ZOO, tiny=False, n_calib=1, n_eval=1, rebuild=False),
                 "minilm": run.minilm_workload(ZOO, n_calib=1, rebuild=False)}  # built if missing
    for case, (name, make_feed) in CASES.items():
        w = workloads[name]
        src = w.path
        feed = make_feed(np.random.default_rng(0))
        with tempfile.TemporaryDirectory() as tmp:
            built = variants(w, feed, Path(tmp))
            floors = {"GEMM floor": gemm_floor(onnx.load(str(src)), feed),
                      "GEMM floor of level 1": gemm_floor(onnx.load(str(built["onnxopt level 1"])), feed)}
            models = {"original": src, **built, **{k: f for k, (f, _) in floors.items()}}
            lines += [f"## {case}", ""]
            macs = {}
            for label, (floor, floor_feed) in floors.items():
                macs[label] = estimate_macs(floor, {k: v.shape for k, v in floor_feed.items()}) or 0
                gemms = sum(n.op_type in GEMMS for n in floor.graph.node)
                lines.append(f"- {label}: {gemms} MatMul/Gemm/Conv nodes, {macs[label] / 1e6:.1f}M MACs.")
            lines.append("")
            feeds = [{**feed, **{k: v for _, ff in floors.values() for k, v in ff.items()}}]
            for threads in (1, 2):
                lat = measure_latency(models, feeds, threads=threads, repeats=args.repeats, max_seconds=90)
                if threads == 1:
                    rate = macs["GEMM floor"] / (lat["GEMM floor"].median_ms * 1e-3) / 1e9
                    lines += [f"At 1 thread the GEMM floor runs at {rate:.1f} GMAC/s.", ""]
                lines += [f"### {threads} thread{'s' if threads > 1 else ''}", "", *table(lat), ""]
                print(case, threads, {k: round(v.median_ms, 3) for k, v in lat.items()}, flush=True)
    load = os.getloadavg()
    lines += [f"Total time: {time.time() - started:.0f} s; load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} "
              "at the end.", ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
