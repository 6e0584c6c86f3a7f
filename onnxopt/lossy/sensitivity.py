"""Per-layer sensitivity at every level: a map of independent tasks.

For each layer and each non-identity level of a method, one candidate changes *only that
layer* to that level; its error against the reference (``budget.error_of`` on a few
evaluation feeds) and the cost it saves (MACs) are what the allocation spends the budget
on. Each (layer, level) is its own task, so ``executor`` (``map``-like; the default runs
them in order) can spread them over processes or, later, a cluster; results come back in
task order whatever ran them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

Executor = Callable[[Callable[[Any], Any], Iterable[Any]], Iterable[Any]]


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
    probe: Callable[[str, Any], Probe],
    executor: Executor = map,
    tick: Callable[[int, int], None] | None = None,
) -> dict[str, dict[Any, Probe]]:
    """``{layer: {level: Probe}}`` for every layer and every level in ``levels``."""
    tasks = [(layer, level) for layer in layers for level in levels]
    out: dict[str, dict[Any, Probe]] = {layer: {} for layer in layers}
    for i, result in enumerate(executor(lambda task: probe(*task), tasks)):
        out[result.layer][result.level] = result
        if tick is not None:
            tick(i + 1, len(tasks))
    return out


def ranking(table: Mapping[str, Mapping[Any, Probe]]) -> dict[str, float]:
    """Layer -> error at its most aggressive level measured (what the report sorts by)."""
    return {layer: (list(by_level.values())[-1].error if by_level else 0.0)
            for layer, by_level in table.items()}
