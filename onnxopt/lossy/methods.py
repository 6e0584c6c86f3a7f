"""Lossy methods as declared things: a pass, a per-layer knob, and how an assignment becomes options.

A method's *layers* are whatever its pass reports it can change (quantizers: the nodes they
quantized; pruning: the channel groups it could shrink). Its *levels* run from the identity
(the layer left as it is) to the most aggressive setting; an *assignment* ``{layer: level}``
(layers not named stay at the identity) becomes the pass's options through ``options``.

Composition runs methods in a fixed order of their ``step``: prune, factorize, quantize.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

STEP_ORDER = ("prune", "factorize", "quantize")
FLOAT = "float"


@dataclasses.dataclass(frozen=True)
class Method:
    """One lossy method the driver can allocate per layer."""

    name: str  # what the user asked for: "int8", "prune", ...
    step: str  # one of STEP_ORDER
    pass_name: str
    knob: str  # what a level means, for the report: "precision", "fraction kept"
    levels: tuple[Any, ...]  # identity first, then ever more aggressive
    to_options: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]
    layers_of: Callable[[Mapping[str, Any]], dict[str, dict[str, Any]]]  # pass notes -> layers
    skipped_of: Callable[[Mapping[str, Any]], dict[str, str]]  # pass notes -> layer: why not
    base_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    min_opset: int = 1
    needs_calibration: bool = False
    # a target caps how much of the step's layers the allocation may change (prune 0.3: at most
    # 30% of the prunable channels removed); None: as much as the budget allows
    target: float | None = None
    uniform: Any = None  # the level of the first candidate, when it is not the target's or ``full``
    # options for the per-layer sensitivity probes only: what is too costly to do once per
    # (layer, level) and only ranks the layers (pruning's refit: it runs for every candidate)
    probe_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # options of the first (uniform) candidate, which also lists the layers the pass can change
    first_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # what a changed layer's MAC costs against a float one, for ranking only (int8: 0.25);
    # None: the saving is measured as the MACs the rewrite removes from the graph
    mac_cost: float | None = None
    per_layer: bool = True  # False: all or nothing (no sensitivity, no allocation)
    # a candidate's name from its assignment and the method's layers
    label: Callable[[Method, Mapping[str, Any], Mapping[str, Any]], str] | None = None
    # fits weights to calibration data (refits), so calibration must not also evaluate
    fits_data: bool = False

    @property
    def identity(self) -> Any:
        return self.levels[0]

    @property
    def full(self) -> Any:
        """The level every layer gets in the method's first, uniform candidate."""
        return self.levels[-1]

    def options(self, assignment: Mapping[str, Any], layers: Mapping[str, Any]) -> dict[str, Any]:
        return {**self.base_options, **self.to_options(assignment, layers)}

    def name_of(self, assignment: Mapping[str, Any], layers: Mapping[str, Any]) -> str:
        return self.label(self, assignment, layers) if self.label is not None else self.name

    def float_layers(self, assignment: Mapping[str, Any], layers: Mapping[str, Any]) -> list[str]:
        """The layers an assignment keeps in float (quantizers; none for the other methods)."""
        return [x for x in layers if assignment.get(x, self.identity) == FLOAT]

    def describe(self, level: Any) -> str:
        if self.step == "prune":
            return f"keep {float(level):.0%}"
        if self.step == "factorize":
            return f"rank {float(level):.0%}"
        return str(level)


# ---- quantization: per layer, quantized or kept in float


def _quantize_options(assignment: Mapping[str, Any], layers: Mapping[str, Any]) -> dict[str, Any]:
    kept = sorted(name for name in layers if assignment.get(name, FLOAT) == FLOAT)
    return {"exclude": tuple(kept)} if kept else {}


def _quantized_layers(notes: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: {} for name in notes.get("quantized", [])}


def _quantize_skipped(notes: Mapping[str, Any]) -> dict[str, str]:
    return dict(notes.get("skipped", {}))


QUANTIZED_MAC_COST = 0.25  # an int8 MAC against a float one, for ranking only: latency decides


def _quantized_label(m: Method, assignment: Mapping[str, Any], layers: Mapping[str, Any]) -> str:
    k = len(m.float_layers(assignment, layers))
    return m.name + (f", {k} layer{'s' if k > 1 else ''} in float" if k else "")


def _quantizer(name: str, pass_name: str, options: Mapping[str, Any], min_opset: int,
               calibrates: bool = False, per_layer: bool = True) -> Method:
    return Method(name, "quantize", pass_name, "precision", (FLOAT, name), _quantize_options,
                  _quantized_layers, _quantize_skipped, dict(options), min_opset, calibrates,
                  mac_cost=QUANTIZED_MAC_COST, per_layer=per_layer, label=_quantized_label)


QUANTIZERS: dict[str, Method] = {
    "int8": _quantizer("int8", "quantize-qdq", {}, 13, calibrates=True),
    "dynamic": _quantizer("dynamic", "quantize-dynamic", {}, 11),
    # accuracy_level 4: MatMulNBits computes with int8 activations; the float path
    # (level 0) measured 18x slower than float MatMul on an AVX2 machine
    "int8-weight": _quantizer("int8-weight", "quantize-weight-only", {"bits": 8, "accuracy_level": 4}, 1),
    "int4": _quantizer("int4", "quantize-weight-only", {"bits": 4, "accuracy_level": 4}, 1),
    "fp16": _quantizer("fp16", "convert-fp16", {}, 1, per_layer=False),
}


# ---- structured pruning: per channel group, the fraction of channels kept


def _prune_options(assignment: Mapping[str, Any], layers: Mapping[str, Any]) -> dict[str, Any]:
    keep = {name: float(assignment.get(name, 1.0)) for name in layers}
    return {"ratio": 0.0, "keep": json.dumps(keep, sort_keys=True)}


def _prunable_groups(notes: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: dict(v) for k, v in notes.get("groups", {}).items()}


def _prune_skipped(notes: Mapping[str, Any]) -> dict[str, str]:
    return dict(notes.get("frozen", {}))


def pruning(target: float, criterion: str = "l1") -> Method:
    """``--prune target``: remove about ``target`` of the prunable channels where it costs least.

    Levels are fractions kept per group: the uniform target, half of it, and half again more,
    so the allocation can spare sensitive groups and take more from robust ones.
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"prune target {target} must be between 0 and 1")
    levels = sorted({1.0, round(1 - target / 2, 4), round(1 - target, 4),
                     round(max(0.1, 1 - 1.5 * target), 4)}, reverse=True)
    return Method("prune", "prune", "prune-channels", "fraction kept", tuple(levels),
                  _prune_options, _prunable_groups, _prune_skipped,
                  {"criterion": criterion}, 1, False, target,
                  probe_options={"reconstruct": False}, first_options={"ratio": target},
                  label=_pruned_label, fits_data=True)


def removed_channels(info: Mapping[str, Any], kept: float) -> int:
    """Channels a group loses at a kept fraction, rounded as prune-channels rounds it (the
    group's ``multiple`` and ``min_channels`` in the pass's notes; 1 when absent)."""
    from onnxopt.passes.prune_channels import kept_count

    channels = int(info.get("channels", 0))
    return channels - kept_count(channels, float(kept), int(info.get("multiple", 1)),
                                 int(info.get("min_channels", 1)))


def removed_share(layers: Mapping[str, Mapping[str, Any]], assignment: Mapping[str, Any]) -> float:
    """Share of the groups' channels an assignment of kept fractions removes."""
    total = sum(float(info.get("channels", 0)) for info in layers.values())
    removed = sum(removed_channels(info, assignment.get(k, 1.0)) for k, info in layers.items())
    return removed / total if total else 0.0


def _pruned_label(_m: Method, assignment: Mapping[str, Any], layers: Mapping[str, Any]) -> str:
    return f"prune, {removed_share(layers, assignment):.1%} of channels removed"


def _factorized_label(_m: Method, assignment: Mapping[str, Any], layers: Mapping[str, Any]) -> str:
    n = sum(1 for v in assignment.values() if float(v) < 1.0)
    return f"factorize, {n} layer{'s' if n != 1 else ''} at low rank"


# ---- low-rank factorization: per layer, the fraction of full rank kept


def _factorize_options(assignment: Mapping[str, Any], layers: Mapping[str, Any]) -> dict[str, Any]:
    # every layer named: 1.0 (full rank) is declined by the pass, so it stays as it is
    keep = {name: float(assignment.get(name, 1.0)) for name in layers}
    return {"keep": json.dumps(keep, sort_keys=True)}


def _factorized_layers(notes: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: dict(v) for k, v in notes.get("layers", {}).items()}


def factorization(fraction: float) -> Method:
    """``--factorize fraction``: MatMul/Gemm/Conv weights through a rank of ``fraction`` of full rank.

    The first candidate factorizes every layer at ``fraction``; the allocation may keep a
    sensitive layer at full rank, give it 1.5x the rank, or halve the rank of a robust one.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"factorize fraction {fraction} must be between 0 and 1")
    levels = sorted({1.0, round(min(0.9, 1.5 * fraction), 4), round(fraction, 4),
                     round(max(0.05, fraction / 2), 4)}, reverse=True)
    return Method("factorize", "factorize", "factorize-lowrank", "fraction of rank", tuple(levels),
                  _factorize_options, _factorized_layers, _quantize_skipped, {}, 1, False,
                  None, round(fraction, 4), first_options={"rank_fraction": round(fraction, 4)},
                  label=_factorized_label, fits_data=True)


def uniform_level(method: Method) -> Any:
    """The level of the method's first candidate: every layer at the target (or fully lossy)."""
    if method.uniform is not None:
        return method.uniform
    if method.target is not None:
        return round(1 - method.target, 4)
    return method.full
