"""The latency verdict: a lossy candidate is kept only if it is faster on this machine.

The float model and every candidate still in the running are timed in one interleaved
measurement (medians; with one thread the calling thread's CPU time), so drift in the
machine's load hits them alike. The fastest candidate that is at least ``min_speedup``
times faster than float wins; otherwise float is written, and the verdict says why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import onnx

from onnxopt.bench import Latency, measure_latency
from onnxopt.data import Feed

Measure = Callable[[Mapping[str, onnx.ModelProto], Sequence[Feed]], Mapping[str, Latency]]
MIN_SPEEDUP = 1.03
LATENCY_FEEDS = 4


def default_measure(threads: int, repeats: int,
                    tick: Callable[[int, int], None] | None = None) -> Measure:
    def measure(models: Mapping[str, onnx.ModelProto], feeds: Sequence[Feed]) -> Mapping[str, Latency]:
        return measure_latency(dict(models), feeds, threads=threads, repeats=repeats, tick=tick)

    return measure


@dataclasses.dataclass(frozen=True)
class LatencyVerdict:
    chosen: str | None  # the candidate's label, or None: float stays
    ms: dict[str, float]  # label -> median ms ("float" included)
    reason: str


def decide(measure: Measure, float_model: onnx.ModelProto, candidates: Mapping[str, onnx.ModelProto],
           feeds: Sequence[Feed], min_speedup: float = MIN_SPEEDUP) -> LatencyVerdict:
    """Time float and ``candidates`` together; keep the fastest that beats float by ``min_speedup``."""
    lat = measure({"float": float_model, **candidates}, list(feeds)[:LATENCY_FEEDS])
    ms = {k: v.median_ms for k, v in lat.items()}
    base = ms["float"]
    label = min(candidates, key=lambda k: ms[k])
    speedup = base / ms[label] if ms[label] > 0 else float("inf")
    if speedup >= min_speedup:
        return LatencyVerdict(label, ms, f"{label} is {speedup:.2f}x faster than float "
                              f"({ms[label]:.3f} vs {base:.3f} ms)")
    return LatencyVerdict(None, ms, f"not faster on this machine: {label} {ms[label]:.3f} ms vs "
                          f"{base:.3f} ms float ({speedup:.2f}x, needs >= {min_speedup:g}x)")
