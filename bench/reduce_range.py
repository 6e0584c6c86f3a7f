"""Full-range vs 7-bit (reduce_range) int8 weights on this CPU: fused kernels against the QDQ graph and float.

    python bench/reduce_range.py          # writes bench/REDUCE_RANGE.md

For the bundled digits CNN and the digits-trained ResNet-18 and MobileNetV2 of the zoo
(built into the cache by ``bench/run.py`` or ``models/zoo.py`` if missing), quantize with
``quantize-qdq`` both ways and report, on the held-out inputs: the cosine between
onnxruntime's fused int8 kernels and the unfused QDQ graph (below 1: the kernels saturate),
the cosine against the float model, and top-1 agreement with it.
"""

from __future__ import annotations

import datetime
import importlib.util
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    from onnxopt import load_model, machine, optimize
    from onnxopt.data import load
    from onnxopt.runtime import session

    spec = importlib.util.spec_from_file_location("benchrun", REPO / "bench" / "run.py")
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    sys.modules["benchrun"] = bench
    spec.loader.exec_module(bench)

    model = load_model(REPO / "models" / "digits_cnn.onnx")
    calib, evaluation = load(REPO / "models" / "digits_val.npz", model).split(0.5)
    cases = [("digits_cnn", model, calib.feeds, evaluation.feeds)]
    cache = Path.home() / ".cache" / "onnxopt" / "zoo"
    cache.mkdir(parents=True, exist_ok=True)
    for name in ("resnet18", "mobilenetv2"):
        w = bench.zoo_workload(name, cache, False, 64, 0, False)
        cases.append((name, load_model(w.path), w.calib, w.eval))
    lines = ["# int8 weights: reduce_range (±64) vs full range (±127)", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- cpu: {machine.summary()}", "- command: `python bench/reduce_range.py`", "",
             "| model | weights | fused vs QDQ graph (cosine) | vs float (cosine) | top-1 agreement |",
             "|---|---|---|---|---|"]
    for name, m, cfeeds, efeeds in cases:
        ref = session(m)
        r = np.concatenate([ref.run(None, f)[0] for f in efeeds])
        for reduce in (True, False):
            q, _ = optimize(m, level=1, passes=[("quantize-qdq", {"reduce_range": reduce})], calibration=cfeeds)
            fused, plain = session(q, optimize=True), session(q, optimize=False)
            a = np.concatenate([fused.run(None, f)[0] for f in efeeds])
            b = np.concatenate([plain.run(None, f)[0] for f in efeeds])
            lines.append(f"| {name} | {'±64 (default)' if reduce else '±127'} | {bench._cos(a, b):.6f} | "
                         f"{bench._cos(a, r):.5f} | {np.mean(a.argmax(1) == r.argmax(1)):.1%} |")
    out = REPO / "bench" / "REDUCE_RANGE.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
