"""Per-layer sensitivity at every level: a map of independent tasks.

For each layer and each non-identity level of a method, one candidate changes *only that
layer* to that level; its error against the reference (``budget.error_of`` on a few
evaluation feeds) and the cost it saves (MACs) are what the allocation spends the budget
on. Each (layer, level) is its own task: a top-level ``probe(*shared, (layer, level))``
that ``executor`` (``onnxopt.executors``: in process by default, a process pool, or a Ray
cluster) runs with the step's shared inputs by reference; results come back in task order
whatever ran them, so the allocation sees the same table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from onnxopt.executors import Executor, InProcess


@dataclasses.dataclass(frozen=True)
class Probe:
    """What changing one layer to one level costs and saves."""

    layer: str
    level: Any
    error: float
    saved: float  # cost saved against the base (MACs, or a proxy the method defines)
    applied: bool = True  # False: the pass declined the layer on its own


def measure(
    layers: Sequence[str],
    levels: Sequence[Any],
    probe: Callable[..., Probe],
    shared: Sequence[Any] = (),
    executor: Executor | None = None,
    tick: Callable[[int, int], None] | None = None,
) -> dict[str, dict[Any, Probe]]:
    """``{layer: {level: Probe}}`` for every layer and every level in ``levels``.

    ``probe(*shared, (layer, level))`` is a top-level function (a task a pool or a cluster can
    run); ``shared`` are handles from ``executor.put``.
    """
    tasks = [(layer, level) for layer in layers for level in levels]
    out: dict[str, dict[Any, Probe]] = {layer: {} for layer in layers}
    for result in (executor or InProcess()).map(probe, tasks, shared, tick):
        out[result.layer][result.level] = result
    return out


def ranking(table: Mapping[str, Mapping[Any, Probe]]) -> dict[str, float]:
    """Layer -> error at its most aggressive level measured (what the report sorts by)."""
    return {layer: (list(by_level.values())[-1].error if by_level else 0.0)
            for layer, by_level in table.items()}
