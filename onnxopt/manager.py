"""The pass manager: resolve a pipeline, check requirements first, run passes, report.

A pipeline is a preset level of exact passes, run to a fixpoint, followed by
explicit passes (``name:key=value,...``) run once each in the order given. The
caller's ``ModelProto`` is never touched: the manager imports a private graph.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import __version__
from onnxopt.errors import MissingRequirementError, OnnxoptError, PassFailedError, PassOptionError
from onnxopt.graph_utils import iter_graphs
from onnxopt.io import opset_of, over_protobuf_limit, to_graph, to_model
from onnxopt.pass_base import NameGenerator, Pass, PassContext, PassResult, Requirement
from onnxopt.registry import get_pass
from onnxopt.shapes import apply_shapes

logger = logging.getLogger(__name__)

# Exact passes only: lossy passes are asked for by name, with their options.
PRESETS: dict[int, tuple[str, ...]] = {
    0: ("eliminate-identity", "eliminate-dead-code"),
    1: (
        "eliminate-identity",
        "eliminate-noop",
        "fold-constants",
        "eliminate-common-subexpressions",
        "fold-batchnorm",
        # activation patterns before the arithmetic folds, which would merge their constants away
        "fuse-hardswish",
        "fuse-gelu",
        "fuse-layernorm",
        "eliminate-unread-rows",  # after the LayerNorm fusion: one op to narrow, not five
        "fold-arithmetic-chains",
        "fold-scale",
        "fold-bias",
        "fuse-matmul-add",
        "fuse-batched-matmul-add",
        "fuse-pad",
        "fold-reshape-target",
        "fuse-shape-chains",
        "eliminate-dead-code",
    ),
}
DEFAULT_LEVEL = 1
REQUIRES_KEY = "onnxopt.requires"  # metadata_props key: the runtime an output needs, if any

# Opt-in passes per runtime, run after the explicit ones: their output needs that runtime
# (onnxruntime's com.microsoft contrib ops), so they are never in a preset.
TARGETS: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("fuse-ort-embed-layernorm", "fuse-ort-attention", "fuse-ort-skip-layernorm",
                    "fuse-ort-bias-gelu", "fuse-ort-gemm-activation"),
}


@dataclasses.dataclass(frozen=True)
class PassRecord:
    """One run of one pass: what it did and what it cost."""

    name: str
    iteration: int
    changed: bool
    stats: Mapping[str, int]
    seconds: float
    nodes_before: int
    nodes_after: int
    params_before: int
    params_after: int
    exact: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"stats": dict(self.stats)}


@dataclasses.dataclass
class PipelineReport:
    """Per-pass records of one pipeline run."""

    records: list[PassRecord] = dataclasses.field(default_factory=list)
    pipeline: tuple[str, ...] = ()
    # what passes left in ``PassContext.notes`` (e.g. which layers a quantizer touched)
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    # passes taken out of the pipeline after it ran, and why (``onnxopt.guard``: the result
    # was slower or bigger than the input with them)
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def exact(self) -> bool:
        return all(r.exact for r in self.records if r.changed)

    @property
    def passes_run(self) -> list[str]:
        return [r.name for r in self.records]

    def stats(self, name: str) -> dict[str, int]:
        """Stats of pass ``name`` over all its runs (see ``merge_stats``)."""
        return merge_stats([r.stats for r in self.records if r.name == name])

    def summary(self) -> list[dict[str, Any]]:
        """Per pass (first-run order): runs, changed, summed stats and seconds, node/param delta."""
        rows: dict[str, dict[str, Any]] = {}
        for r in self.records:
            row = rows.setdefault(r.name, {
                "name": r.name, "runs": 0, "changed": False, "stats": {}, "seconds": 0.0,
                "nodes_removed": 0, "params_removed": 0, "exact": r.exact,
            })
            row["runs"] += 1
            row["changed"] |= r.changed
            row["seconds"] += r.seconds
            row["nodes_removed"] += r.nodes_before - r.nodes_after
            row["params_removed"] += r.params_before - r.params_after
        for row in rows.values():
            row["stats"] = self.stats(row["name"])
        return list(rows.values())

    def to_dict(self) -> dict[str, Any]:
        return {"pipeline": list(self.pipeline), "passes": [r.to_dict() for r in self.records],
                "summary": self.summary(), "dropped": dict(self.dropped)}

    @property
    def changed_passes(self) -> list[str]:
        """Names of the passes that changed the graph in some run, in first-run order."""
        return list(dict.fromkeys(r.name for r in self.records if r.changed))


def merge_stats(runs: Sequence[Mapping[str, int]]) -> dict[str, int]:
    """One pass's counters over its runs: what it did adds up, what it declined does not.

    A preset pass reruns on the same graph at every fixpoint iteration and meets the nodes
    it declined again, so ``skipped:*`` counters take the largest count of any run (each
    node once); the others (``folded``, ``removed-*``) are summed.
    """
    total: dict[str, int] = {}
    for stats in runs:
        for k, v in stats.items():
            total[k] = max(total.get(k, 0), v) if k.startswith("skipped:") else total.get(k, 0) + v
    return total


PassSpec = str | Pass | type[Pass] | tuple[str, Mapping[str, Any]]


def parse_pass_spec(spec: str) -> Pass:
    """``name`` or ``name:key=value,key=value`` -> a configured pass instance."""
    name, _, rest = spec.strip().partition(":")
    cls = get_pass(name.strip())
    pairs: list[tuple[str, str]] = []
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise PassOptionError(f"pass '{cls.name}': option '{item}' must be key=value")
        pairs.append((key, value))
    return cls(cls.parse_options(pairs))


def instantiate(spec: PassSpec) -> Pass:
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, type) and issubclass(spec, Pass):
        return spec()
    if isinstance(spec, tuple):
        name, options = spec
        cls = get_pass(name)
        return cls(cls.parse_options({k: v for k, v in options.items()}))
    return parse_pass_spec(spec)


def resolve(level: int | None, passes: Sequence[PassSpec] | None,
            target: str | None = None) -> tuple[list[Pass], list[Pass]]:
    """(preset passes run to fixpoint, explicit passes run once; a ``target``'s passes last)."""
    if level is not None and level not in PRESETS:
        raise OnnxoptError(f"unknown level {level}; levels are {sorted(PRESETS)}")
    if target is not None and target not in TARGETS:
        raise OnnxoptError(f"unknown target '{target}'; targets are {', '.join(sorted(TARGETS))}")
    preset = [instantiate(n) for n in PRESETS[level]] if level is not None else []
    explicit = [instantiate(p) for p in [*(passes or ()), *TARGETS.get(target or "", ())]]
    return preset, explicit


def lift_growth_budgets(passes: Sequence[Pass]) -> None:
    """``--allow-growth``: passes with a run-wide growth budget (fold-constants) get none."""
    for p in passes:
        if hasattr(p.options, "max_run_growth"):
            p.options = dataclasses.replace(p.options, max_run_growth=math.inf)


def enable_trials(passes: Sequence[Pass]) -> list[str]:
    """Passes with a ``trial`` option rewrite every candidate; the caller measures each one.

    A pass whose trial option is already set (the user forced it) is not a trial: it was asked for.
    """
    names = []
    for p in passes:
        if p.trial and not getattr(p.options, p.trial):
            p.options = dataclasses.replace(p.options, **{p.trial: True})
            names.append(p.name)
    return names


def check_requirements(
    passes: Sequence[Pass], calibration: object | None, input_shapes: Mapping[str, Any] | None
) -> None:
    for p in passes:
        for req in p.requires:
            if req is Requirement.CALIBRATION_DATA and calibration is None:
                raise MissingRequirementError(
                    f"pass '{p.name}' needs calibration data; supply {req.value} "
                    "(arrays named after the model inputs; first axis = samples)"
                )
            if req is Requirement.STATIC_INPUT_SHAPES and not input_shapes:
                raise MissingRequirementError(f"pass '{p.name}' needs static shapes; supply {req.value}")


def graph_counts(graph: gs.Graph) -> tuple[int, int]:
    """(nodes, parameter elements) over the graph and its subgraphs."""
    nodes = params = 0
    for g in iter_graphs(graph):
        nodes += len(g.nodes)
        for t in g.tensors().values():
            if isinstance(t, gs.Constant) and t.shape:
                params += math.prod(t.shape)  # not np.prod: 10x slower on short tuples
        for n in g.nodes:
            if n.op == "Constant":
                v = n.attrs.get("value")
                if isinstance(v, gs.Constant) and v.shape:
                    params += math.prod(v.shape)
    return nodes, params


class PassManager:
    """Runs passes over a private graph and returns ``(ModelProto, PipelineReport)``."""

    def __init__(
        self,
        preset: Sequence[Pass] = (),
        explicit: Sequence[Pass] = (),
        max_iterations: int = 4,
        verify_each: bool = False,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.preset = list(preset)
        self.explicit = list(explicit)
        self.max_iterations = max_iterations
        self.verify_each = verify_each
        self.progress = progress

    @property
    def pipeline(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.preset + self.explicit)

    def without(self, names: Collection[str]) -> PassManager:
        """The same pipeline and settings, less every pass named in ``names``."""
        return PassManager([p for p in self.preset if p.name not in names],
                           [p for p in self.explicit if p.name not in names],
                           self.max_iterations, self.verify_each, self.progress)

    def run(
        self,
        model: onnx.ModelProto,
        calibration: Sequence[Mapping[str, np.ndarray]] | None = None,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        seed: int = 0,
        calibration_cache: dict[Any, Any] | None = None,
        tick: Callable[[int, int], None] | None = None,
    ) -> tuple[onnx.ModelProto, PipelineReport]:
        """Run the pipeline on ``model``.

        ``calibration_cache``: a dict the caller keeps across runs on the same model with the same
        calibration feeds; calibrating passes then measure each tensor's range once.
        """
        check_requirements(self.preset + self.explicit, calibration, input_shapes)
        # a pass may need a newer opset (per-channel DequantizeLinear: 13); upgrade, loudly
        needed = max((getattr(p, "min_opset", 0) for p in self.preset + self.explicit), default=0)
        if opset_of(model) < needed:
            from onnxopt.opset import upgrade_opset

            model = upgrade_opset(model, needed)
        graph = to_graph(model)
        apply_shapes(graph, model)
        ctx = PassContext(
            names=NameGenerator(graph), opset=opset_of(model), calibration=calibration,
            input_shapes=dict(input_shapes or {}), seed=seed, calibration_cache=calibration_cache,
            tick=tick,
        )
        ctx.notes["source_model"] = model
        report = PipelineReport(pipeline=self.pipeline)
        for p in self.preset + self.explicit:
            p.check(graph, ctx)
        changed_any = False
        # counts after the last pass: a pass that changed nothing leaves them valid
        self._counts: tuple[int, int] | None = None
        for iteration in range(self.max_iterations if self.preset else 0):
            changed = False
            for p in self.preset:
                changed |= self._run_one(p, graph, ctx, model, report, iteration)
            changed_any |= changed
            if not changed:
                break
        for p in self.explicit:
            changed_any |= self._run_one(p, graph, ctx, model, report, 0)
        if changed_any:
            graph.cleanup().toposort()
        report.notes = {k: v for k, v in ctx.notes.items() if k != "source_model"}
        provenance = {"onnxopt.pipeline": ",".join(self.pipeline), "onnxopt.version": __version__}
        # a pass that may write another runtime's ops declares (domain, requirement) as
        # ``requires_runtime``; the output carries the requirement when it holds ops of that domain
        claims = [p.requires_runtime for p in self.preset + self.explicit if getattr(p, "requires_runtime", None)]
        domains = {n.domain for g in iter_graphs(graph) for n in g.nodes} if claims else set()
        if needs := sorted({requirement for domain, requirement in claims if domain in domains}):
            provenance[REQUIRES_KEY] = ", ".join(needs)
        result = to_model(graph, model, provenance)
        return result, report

    def _run_one(
        self, p: Pass, graph: gs.Graph, ctx: PassContext, model: onnx.ModelProto,
        report: PipelineReport, iteration: int,
    ) -> bool:
        if self.progress:
            self.progress(p.name)
        nodes_before, params_before = self._counts or graph_counts(graph)
        t0 = time.perf_counter()
        try:
            result = p.run(graph, ctx)
        except OnnxoptError:
            raise
        except Exception as e:
            done = ", ".join(report.passes_run) or "none"
            raise PassFailedError(
                f"pass '{p.name}' failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                f" (passes already run: {done}); rerun without it or report this bug"
            ) from e
        seconds = time.perf_counter() - t0
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {p.name} returned {type(result).__name__}, not PassResult")
        nodes_after, params_after = (
            graph_counts(graph) if result.changed else (nodes_before, params_before))
        self._counts = (nodes_after, params_after)
        report.records.append(PassRecord(
            name=p.name, iteration=iteration, changed=result.changed, stats=dict(result.stats),
            seconds=seconds, nodes_before=nodes_before, nodes_after=nodes_after,
            params_before=params_before, params_after=params_after, exact=p.exact,
        ))
        logger.info("%s: changed=%s %s (%.3fs)", p.name, result.changed, dict(result.stats), seconds)
        if result.changed:
            ctx.names.refresh(graph)
            if self.verify_each:
                self._verify(p, graph, model, report)
        return bool(result.changed)

    @staticmethod
    def _verify(p: Pass, graph: gs.Graph, model: onnx.ModelProto, report: PipelineReport) -> None:
        candidate = to_model(graph.copy(), model)
        try:
            if not over_protobuf_limit(candidate):  # ByteSize() raises past 2 GiB
                onnx.checker.check_model(candidate)
        except onnx.checker.ValidationError as e:
            done = ", ".join(report.passes_run)
            raise PassFailedError(
                f"pass '{p.name}' produced an invalid graph: {str(e).splitlines()[0]} "
                f"(passes run: {done})"
            ) from e
