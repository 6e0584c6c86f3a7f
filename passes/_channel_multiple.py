"""prune-channels' helper: which channel multiple pays for a pruned Conv on this machine.

Convolution kernels work on blocks of channels: on an AMD EPYC with AVX512-VNNI, float Convs
with 52, 56 or 60 channels cost as much as 64, and only 48 is faster (``bench/ROUND_TO.md``).
Keeping such a count removes accuracy and saves no time; rounding the kept count to the
multiple the kernels like keeps the speed-up and more of the layer. The multiple differs from
CPU to CPU, so it is measured once per machine (``onnxopt.machine.measured``, key
``prune-round-to``) and cached: a stack of ``LAYERS`` Conv 3x3 (pad 1) + Relu of ``c``
channels in and out at 28x28, every ``c`` of ``COUNTS`` timed in one interleaved run
(``onnxopt.bench.measure_latency``: 1 intra-op thread, the calling thread's CPU time,
medians), float, as the pass sees the model. About 2 s.

The multiple chosen is the largest of ``MULTIPLES`` whose rounding (to the nearest multiple,
as the pass rounds kept counts) never makes a measured count slower than it is, within
``NOISE``; 1 when none does. ``bench/round_to.py`` runs the wider table (two channel ranges,
int8 too) and writes ``bench/ROUND_TO.md``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

KEY = "prune-round-to"
VERSION = 1
LAYERS = 4
C_MAX, HW = 64, 28  # the 64-channel stage of ResNet-18 at a 112x112 input
COUNTS = tuple(range(C_MAX - 16, C_MAX + 1))
MULTIPLES = (2, 4, 8, 16)
NOISE = 1.03  # timings this close count as equal


def conv_stack(c: int, hw: int, layers: int = LAYERS, width: int | None = None,
               seed: int = 0) -> onnx.ModelProto:
    """``layers`` x (Conv 3x3 pad 1, ``c`` -> ``c`` channels, + Relu) on ``[1, width, hw, hw]``.

    The input has ``width`` channels (default ``c``) and the stack reads its first ``c``
    (a Slice, a copy of ``c * hw * hw`` values next to ``9 c^2 hw^2`` MACs a layer), so that
    models of every count take the same input and are timed together.
    """
    width = c if width is None else width
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    if width != c:
        inits += [numpy_helper.from_array(np.array(v, np.int64), n)
                  for n, v in (("lo", [0]), ("hi", [c]), ("axis", [1]))]
        nodes.append(helper.make_node("Slice", ["x", "lo", "hi", "axis"], ["xs"], name="slice"))
        x = "xs"
    for i in range(layers):
        w = (rng.standard_normal((c, c, 3, 3)) * np.sqrt(2.0 / (9 * c))).astype(np.float32)
        b = (rng.standard_normal(c) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}",
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        out = "y" if i == layers - 1 else f"r{i}"
        nodes.append(helper.make_node("Relu", [f"c{i}"], [out], name=f"relu{i}"))
        x = out
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(nodes, f"conv{c}",
                              [helper.make_tensor_value_info("x", f32, [1, width, hw, hw])],
                              [helper.make_tensor_value_info("y", f32, [1, c, hw, hw])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def stack_feeds(width: int, hw: int, n: int = 4, seed: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, width, hw, hw)).astype(np.float32)} for _ in range(n)]


def time_counts(models: Mapping[int, onnx.ModelProto], width: int, hw: int, repeats: int,
                max_seconds: float) -> dict[int, float]:
    """Median milliseconds per channel count, the counts interleaved in one run."""
    from onnxopt.bench import measure_latency

    lat = measure_latency({str(c): m for c, m in models.items()}, stack_feeds(width, hw),
                          threads=1, repeats=repeats, max_seconds=max_seconds)
    return {int(k): v.median_ms for k, v in lat.items()}


def nearest(c: int, m: int) -> int:
    """``c`` rounded to the nearest multiple of ``m`` (halves up), as ``kept_count`` rounds."""
    return m * math.floor(c / m + 0.5)


def up(c: int, m: int) -> int:
    """``c`` rounded up to a multiple of ``m`` (how factorize-lowrank rounds ranks)."""
    return m * math.ceil(c / m)


def paying_multiple(ms: Mapping[int, float], multiples: Iterable[int] = MULTIPLES,
                    rounding: Callable[[int, int], int] = nearest) -> int:
    """The largest multiple whose rounding makes no measured count slower (within ``NOISE``).

    For every measured count ``c`` off the multiple whose rounded count (``rounding(c, m)``)
    was measured too, the rounded count must take at most ``NOISE`` times ``c``'s time; 1 when
    no multiple holds. Shared with factorize-lowrank, which rounds ranks up.
    """
    best = 1
    for m in sorted(multiples):
        pairs = [(c, rounding(c, m)) for c in ms if c % m and rounding(c, m) in ms]
        if pairs and all(ms[r] <= ms[c] * NOISE for c, r in pairs):
            best = m
    return best


def measure(repeats: int = 20, max_seconds: float = 2.0) -> dict[str, Any]:
    """The in-run measurement: the float stack at every count of ``COUNTS``, the multiple."""
    models = {c: conv_stack(c, HW, width=C_MAX) for c in COUNTS}
    ms = time_counts(models, C_MAX, HW, repeats, max_seconds)
    return {"ms": {str(c): round(t, 4) for c, t in ms.items()}, "multiple": paying_multiple(ms),
            "counts": f"{COUNTS[0]}..{COUNTS[-1]} channels at {HW}x{HW}, {LAYERS} Conv 3x3 layers"}


@functools.lru_cache(maxsize=1)
def measured_round_to() -> int:
    """This machine's channel multiple: from the per-machine cache, else measured now."""
    from onnxopt import machine

    return int(machine.measured(KEY, measure, version=VERSION)["multiple"])
