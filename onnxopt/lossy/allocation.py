"""Allocation under one budget: spend it where a unit of error buys the most saved cost.

Each (layer, level) probe becomes a *move* from the layer's previous level to this one,
with its marginal error and marginal saving. Moves are ordered greedily by saving per unit
of error, a layer's levels always in their own order (a layer reaches keep 50% only after
keep 85%). The candidate after the first ``k`` moves applies them all; the error grows with
``k``, so the largest ``k`` within budget is found by stepping down from the top (``n - 1``,
``n - 2``, ``n - 4``, ...) and then bisecting: about ``2 log2(n)`` evaluations on the whole
evaluation split, instead of one per layer. A method with a target (prune 0.3) only
considers the moves that keep the removed share within the target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from onnxopt.lossy.sensitivity import Probe

ERROR_FLOOR = 1e-9  # a move with no measurable error is ranked by its saving alone


@dataclasses.dataclass(frozen=True)
class Move:
    layer: str
    level: Any
    error: float  # marginal: this level's error less the previous level's
    saved: float  # marginal saving
    share: float = 0.0  # of the method's target this move uses (pruned channels / all channels)

    @property
    def efficiency(self) -> float:
        return self.saved / max(self.error, ERROR_FLOOR)


def order(table: Mapping[str, Mapping[Any, Probe]], levels: Sequence[Any],
          shares: Mapping[str, Mapping[Any, float]] | None = None) -> list[Move]:
    """Every move, best saving per unit of error first, each layer's levels in order."""
    chains: dict[str, list[Move]] = {}
    for layer, by_level in table.items():
        prev_err = prev_saved = prev_share = 0.0
        chain = []
        for level in levels[1:]:
            probe = by_level.get(level)
            if probe is None or not probe.applied:
                break
            share = (shares or {}).get(layer, {}).get(level, 0.0)
            chain.append(Move(layer, level, max(probe.error - prev_err, 0.0),
                              max(probe.saved - prev_saved, 0.0), share - prev_share))
            prev_err, prev_saved, prev_share = probe.error, probe.saved, share
        chains[layer] = chain
    heads = {layer: 0 for layer in chains}
    moves: list[Move] = []
    while True:
        ready = [(chains[layer][i], layer) for layer, i in heads.items() if i < len(chains[layer])]
        if not ready:
            return moves
        # ties (equal efficiency): the larger saving first, then the layer name (deterministic)
        best, layer = max(ready, key=lambda m: (m[0].efficiency, m[0].saved, m[1]))
        moves.append(best)
        heads[layer] += 1


def within_target(moves: Sequence[Move], target: float | None) -> list[Move]:
    """The longest prefix whose shares add up to at most ``target`` (all, without a target)."""
    if target is None:
        return list(moves)
    kept, used = [], 0.0
    for move in moves:
        if used + move.share > target + 1e-9:
            break
        kept.append(move)
        used += move.share
    return kept


def assignment(moves: Sequence[Move]) -> dict[str, Any]:
    """``{layer: level}`` after applying ``moves`` in order (later levels of a layer win)."""
    out: dict[str, Any] = {}
    for move in moves:
        out[move.layer] = move.level
    return out


def largest_within_budget(n: int, attempt: Callable[[int], bool], known_fail: int | None = None) -> int:
    """Largest ``k`` in ``0..n`` with ``attempt(k)`` true, assuming larger ``k`` only does worse.

    ``k = 0`` (nothing changed) always holds and is not attempted; ``known_fail`` is a ``k``
    already seen to fail (the uniform candidate), so the search starts below it.
    """
    high = known_fail if known_fail is not None else n + 1  # smallest k known to fail
    if known_fail is None and n and attempt(n):
        return n
    high = top = min(high, n)
    low, step = 0, 1  # low: largest k known to hold
    k = top - step
    while k > low:
        if attempt(k):
            low = k
            break
        high, step = k, step * 2
        k = max(low, top - step)
    while high - low > 1:
        mid = (low + high) // 2
        if attempt(mid):
            low = mid
        else:
            high = mid
    return low
