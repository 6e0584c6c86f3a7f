"""The pass interface: ``Pass``, its typed ``Options``, ``PassResult`` and ``PassContext``.

A pass mutates the manager's private ``gs.Graph`` in place and returns what it
did. ``exact`` drives two policies: presets contain only exact passes, and
validation uses tight tolerances when every pass that ran is exact.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.errors import PassOptionError


class Requirement(enum.Enum):
    """Inputs a pass needs beyond the model; the value is how the CLI user supplies it."""

    CALIBRATION_DATA = "--calibration-data FILE.npz"
    STATIC_INPUT_SHAPES = "--input-shape NAME=1,3,224,224"


@dataclasses.dataclass(frozen=True)
class PassResult:
    """What a pass did: whether the graph changed, and counters (``folded``, ``skipped:<why>``)."""

    changed: bool
    stats: Mapping[str, int] = dataclasses.field(default_factory=dict)


class NameGenerator:
    """Fresh tensor/node names that collide with nothing in the graph (subgraphs included)."""

    def __init__(self, graph: gs.Graph) -> None:
        self._used: set[str] = set()
        # next suffix to try per base: without it, n names from one base cost O(n^2)
        self._next: dict[str, int] = {}
        self.refresh(graph)

    def refresh(self, graph: gs.Graph) -> None:
        from onnxopt.graph_utils import iter_graphs

        for g in iter_graphs(graph):
            self._used.update(g.tensors().keys())
            self._used.update(n.name for n in g.nodes if n.name)

    def fresh(self, base: str) -> str:
        base = base or "t"
        name, i = base, self._next.get(base, 0)
        if i:
            name = f"{base}__{i}"
        while name in self._used:
            i += 1
            name = f"{base}__{i}"
        self._used.add(name)
        self._next[base] = i + 1
        return name


@dataclasses.dataclass
class PassContext:
    """What passes may read besides the graph."""

    names: NameGenerator
    opset: int
    calibration: Sequence[Mapping[str, np.ndarray]] | None = None
    input_shapes: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)
    seed: int = 0
    # free-form per-run state a lossy pass may hand to validation or the report
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    # activation ranges kept across runs on the *same* float model and calibration feeds
    # (the compression driver quantizes one model many times, excluding different layers):
    # settings key -> tensor name -> (lo, hi), or None for a tensor that held no finite value
    calibration_cache: dict[Any, dict[str, tuple[float, float] | None]] | None = None
    # progress of a long loop inside a pass (calibration runs): tick(done, total)
    tick: Callable[[int, int], None] | None = None


class Pass(abc.ABC):
    """Base class of every pass; subclasses set ``name`` and implement ``run``."""

    name: ClassVar[str]
    exact: ClassVar[bool] = True
    requires: ClassVar[frozenset[Requirement]] = frozenset()
    # A rewrite whose payoff depends on the model, not only on the machine: the name of the
    # boolean option that makes it rewrite every candidate without its own prediction.
    # ``optimize_file`` sets it and keeps the pass only if the whole model then measures
    # faster with it than without it (``onnxopt.guard.Guard.trial``).
    trial: ClassVar[str | None] = None

    @dataclasses.dataclass(frozen=True)
    class Options:
        pass

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def check(self, graph: gs.Graph, ctx: PassContext) -> None:  # noqa: B027 (optional hook)
        """Raise ``PreconditionError`` if this graph cannot be handled at all."""

    @abc.abstractmethod
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Rewrite ``graph`` in place and report what changed."""

    @classmethod
    def parse_options(cls, items: Mapping[str, str] | Iterable[tuple[str, str]]) -> Any:
        """Build ``cls.Options`` from strings, converting each by its field type."""
        fields = {f.name: f for f in dataclasses.fields(cls.Options)}
        hints = typing.get_type_hints(cls.Options)
        values: dict[str, Any] = {}
        pairs = items.items() if isinstance(items, Mapping) else items
        for key, raw in pairs:
            key = key.strip().replace("-", "_")
            if key not in fields:
                valid = ", ".join(f"{k}: {_type_name(hints[k])}" for k in fields) or "none"
                raise PassOptionError(
                    f"pass '{cls.name}' has no option '{key}'; valid options: {valid}"
                )
            values[key] = _convert(cls.name, key, raw, hints[key])
        return cls.Options(**values)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(pass_name: str, key: str, raw: Any, tp: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    try:
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            if raw.lower() in ("none", "null", ""):
                return None
            return _convert(pass_name, key, raw, args[0])
        if origin in (tuple, list):
            parts = [p for p in raw.replace("+", ";").split(";") if p]
            inner = args[0] if args else str
            return tuple(_convert(pass_name, key, p, inner) for p in parts)
        if tp is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if tp is int:
            return int(float(raw)) if float(raw).is_integer() else int(raw)
        if tp is float:
            return float(raw)
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return tp(raw)
        if typing.get_origin(tp) is typing.Literal:
            if raw not in typing.get_args(tp):
                raise ValueError(raw)
            return raw
        return raw
    except (ValueError, TypeError):
        raise PassOptionError(
            f"pass '{pass_name}': option '{key}' expects {_type_name(tp)}, got '{raw}'"
        ) from None


def current_model(graph: gs.Graph, ctx: PassContext) -> Any:
    """The graph a pass is rewriting, as an ``onnx.ModelProto`` (to run it mid-pass).

    Exported with the source model's opsets, metadata and functions when the manager gave
    it (``ctx.notes["source_model"]``); else plainly, at an IR onnxruntime reads.
    """
    import onnx

    from onnxopt.io import export_plain, to_model

    source = ctx.notes.get("source_model")
    if isinstance(source, onnx.ModelProto):
        return to_model(graph, source)
    return export_plain(graph)


def parse_fractions(pass_name: str, spec: str, keys: str, fractions: str) -> dict[str, float]:
    """A ``keep``-style option: a JSON object, or a JSON file's path, of key -> fraction in (0, 1].

    ``keys`` and ``fractions`` name them in errors ("group", "kept fractions").
    """
    import json
    from pathlib import Path

    if not spec.strip():
        return {}
    text = spec
    if not spec.lstrip().startswith("{"):
        path = Path(spec)
        if not path.is_file():
            raise PassOptionError(f"pass '{pass_name}': keep must be a JSON object or a JSON file; "
                                  f"'{spec}' is neither")
        text = path.read_text()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise PassOptionError(f"pass '{pass_name}': keep is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw.values()):
        raise PassOptionError(f"pass '{pass_name}': keep must map {keys} keys to numbers")
    bad = {k: v for k, v in raw.items() if not 0.0 < float(v) <= 1.0}
    if bad:
        raise PassOptionError(f"pass '{pass_name}': {fractions} must be in (0, 1]: {bad}")
    return {str(k): float(v) for k, v in raw.items()}
