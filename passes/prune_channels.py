"""Structured pruning: remove whole channels and hidden units, then refit the layers after them.

Channels are removed per dependency group (``passes/_groups.py``): a Conv's output channels
together with its bias, the BatchNormalization after it, element-wise partners (a residual
Add loses the same indices on both branches), Concat offsets, and the input channels of
every consumer; MatMul/Gemm hidden units likewise. Removing channel ``c`` of a group is

    W_producer[c, ...], b[c], BN params[c], per-channel constants[c]   dropped
    W_consumer[:, c, ...] (Conv), W[c, :] (MatMul rows)                 dropped

so initializers, activations, parameters and MACs all shrink. Depthwise Convs follow the
kept count (``group``), Split sizes, Slice bounds and literal Reshape targets are rewritten,
and the shapes of the activations that shrank are inferred again.

Which channels go (``criterion``), per channel summed over the group's members:
``l1``/``l2``: ``sum |w|`` / ``sum w^2`` over the Conv/MatMul/Gemm weights of the group
(producer rows and consumer columns); ``bn-gamma``: ``|gamma|`` of its BatchNormalizations
(before folding; groups without one fall back to ``l1``, counted as
``criterion-fallback``); ``activation``: mean ``|a|`` of the activations the consumer
layers read, on the calibration data (``onnxopt.capture``).

How many: ``ratio`` of every prunable group (uniform), or, with ``global_ranking``, the
``ratio`` of all prunable channels with the lowest importance normalised by its group's
mean; ``keep`` (JSON: group key -> fraction kept) overrides both for the groups it names.
Kept counts are rounded to the nearest multiple of ``round_to`` (and of the conv groups of a
grouped Conv), at least ``min_channels``. By default (``round_to`` unset) Conv channel groups
use the multiple measured to pay on this machine (``passes/_channel_multiple.py``: a Conv with
a count between two multiples costs as much as the multiple above, so keeping it loses
accuracy for nothing), cached per machine; other groups (MatMul hidden units, attention heads)
are not rounded. The notes say which multiple was used (``round_to``, ``round_to_source``).

Reconstruction (``reconstruct``, with calibration data): in topological order, every
Conv/Gemm/MatMul that lost input channels is refit by ridge least squares
(``onnxopt.reconstruct``) so that, on the calibration rows, the pruned model's actual
input to that layer (upstream refits included) maps to the output of the same layer in
the model as it was before pruning (the reference; equal to ``source_model`` when the
earlier passes are exact, and robust to the tensors they renamed). The fit is checked on
a quarter of the calibration feeds held out whole (fit on the rest; with fewer than 4 feeds,
a quarter of the rows): a refit that does not lower the relative error there is not
applied; one that does is fit again on everything. Holding out rows of the same inputs is
not enough: on MiniLM a refit that lowered every layer's error on rows of its calibration
sentences raised it on other sentences. A MatMul's intercept
joins the constant bias Add that follows it (a transformer's Linear); Gemm has its own.

Groups that are not understood are frozen, never guessed (``skipped:<reason>`` once per
group; the reasons are listed in ``passes/_groups.py``). ``ctx.notes["prune-channels"]``:
``groups`` (prunable groups: ``channels``, ``kept``, ``params_removed``, ``macs_removed``;
the figures of a group count it alone against the original shapes), ``frozen``
(key -> reason), ``reconstruction`` (layer -> ``error_before``, ``error_after``,
``applied``), and the measured totals ``params_removed``, ``macs_removed``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnxopt.passes._groups import WEIGHT_ROLES, Group, build_groups, remove_channels

from onnxopt.errors import MissingRequirementError, PassOptionError
from onnxopt.graph_utils import constant_value, make_constant
from onnxopt.pass_base import Pass, PassContext, PassResult, current_model, parse_fractions
from onnxopt.shapes import apply_shapes

logger = logging.getLogger(__name__)

_NCHW_SAMPLES = 256  # samples of a Conv activation kept for refits and importance
_ROWS = 4096
_CAPTURE_BYTES = 1 << 29  # reference outputs captured at once (layers in chunks of this)


def parse_keep(spec: str) -> dict[str, float]:
    """``keep``: a JSON object, or a path to a JSON file, of group key -> fraction kept."""
    return parse_fractions("prune-channels", spec, "group", "kept fractions")


def kept_count(channels: int, fraction: float, multiple: int, min_channels: int) -> int:
    """Channels kept: ``fraction`` of ``channels`` rounded to ``multiple``, at least
    ``min_channels`` (rounded up), at most all."""
    k = multiple * math.floor(channels * fraction / multiple + 0.5)
    floor = multiple * math.ceil(max(min_channels, 1) / multiple)
    return min(max(k, floor), channels)


def select_removed(importance: np.ndarray, kept: int, chunks: int = 1) -> np.ndarray:
    """Indices of the channels to remove: the least important, the same count per chunk."""
    c = len(importance)
    size, per = c // chunks, kept // chunks
    keep: list[int] = []
    for i in range(chunks):
        part = importance[i * size:(i + 1) * size]
        # stable: among equal importances the lower index stays
        keep.extend((np.argsort(-part, kind="stable")[:per] + i * size).tolist())
    return np.setdiff1d(np.arange(c), np.asarray(keep, dtype=np.int64))


def magnitude(group: Group, tensors: Mapping[str, gs.Tensor], power: int,
              roles: frozenset[str] = WEIGHT_ROLES) -> np.ndarray:
    """Per channel: ``sum |w|^power`` over the group's members with ``roles``."""
    imp = np.zeros(group.channels)
    for m in group.members:
        if m.role not in roles:
            continue
        value = constant_value(tensors[m.tensor])
        if value is None:
            continue
        a = np.abs(value.astype(np.float64)) ** power
        if m.role == "grouped-in":
            rows, cpg = a.shape[0] // m.conv_groups, a.shape[1]
            per = a.reshape(m.conv_groups, rows, cpg, -1).sum(axis=(1, 3)).reshape(-1)
            imp[m.start:m.start + m.length] += per[m.start:m.start + m.length]
            continue
        per_pos = a.sum(axis=tuple(i for i in range(a.ndim) if i != m.axis))
        span = per_pos[m.offset:m.offset + m.length * m.block].reshape(m.length, m.block)
        imp[m.start:m.start + m.length] += span.sum(axis=1)
    return imp


class PruneChannelsPass(Pass):
    """Remove whole channels and hidden units by dependency group, refit by least squares."""

    name = "prune-channels"
    exact = False

    @dataclasses.dataclass(frozen=True)
    class Options:
        ratio: float = 0.3
        keep: str = ""
        criterion: Literal["l1", "l2", "bn-gamma", "activation"] = "l1"
        global_ranking: bool = False
        round_to: int | None = None  # None: measured on this machine, for Conv channels
        min_channels: int = 1
        reconstruct: bool = True

    def check(self, graph: gs.Graph, ctx: PassContext) -> None:
        o = self.options
        if not 0.0 <= o.ratio < 1.0:
            raise PassOptionError(f"pass 'prune-channels': ratio must be in [0, 1), got {o.ratio}")
        if (o.round_to is not None and o.round_to < 1) or o.min_channels < 1:
            raise PassOptionError("pass 'prune-channels': round_to and min_channels must be >= 1")
        parse_keep(o.keep)
        if o.criterion == "activation" and not ctx.calibration:
            raise MissingRequirementError(
                "pass 'prune-channels' with criterion=activation needs calibration data; "
                "supply --calibration-data FILE.npz")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        stats: Counter[str] = Counter()
        keep = parse_keep(o.keep)
        groups = build_groups(graph)
        prunable = [g for g in groups if g.frozen is None]
        frozen = {g.key: g.frozen for g in groups if g.frozen is not None}
        for g in groups:
            if g.frozen is not None:
                stats[f"skipped:{g.frozen}"] += 1
        known = {g.key for g in groups}
        unknown = sorted(set(keep) - known)
        if unknown:
            raise PassOptionError(
                f"pass 'prune-channels': keep names unknown groups {unknown}; the groups are "
                f"{sorted(g.key for g in prunable)} (onnxopt inspect --groups MODEL)")
        stats["skipped:keep-frozen"] += sum(1 for k in keep if k in frozen)
        tensors = graph.tensors()
        reference = self._snapshot(graph, ctx) if self._refit_wanted(ctx, stats) else None
        importance = {g.key: self._importance(g, graph, tensors, ctx, stats) for g in prunable}
        convs = {n.name for n in graph.nodes if n.op == "Conv"}
        conv_groups = {g.key for g in prunable
                       if any(m.role == "weight-out" and m.node in convs for m in g.members)}
        multiple, source = self._round_to(bool(conv_groups))
        multiples = {g.key: multiple if o.round_to or g.key in conv_groups else 1
                     for g in prunable}
        removed = self._choose(prunable, importance, keep, multiples)
        report: dict[str, Any] = {"groups": {}, "frozen": dict(frozen), "reconstruction": {},
                                  "round_to": multiple, "round_to_source": source}
        for g in prunable:
            r = len(removed.get(g.key, ()))
            per_params = sum(m.params_per_channel for m in g.members)
            per_macs = sum(m.macs_per_channel for m in g.members)
            report["groups"][g.key] = {
                "channels": g.channels, "kept": g.channels - r,
                "params_removed": round(per_params * r), "macs_removed": round(per_macs * r),
                # how kept counts round here (the driver's allocation counts with it)
                "multiple": math.lcm(multiples[g.key], g.chunks), "min_channels": o.min_channels,
            }
        removed = {k: v for k, v in removed.items() if len(v)}
        stats = Counter({k: v for k, v in stats.items() if v})
        if not removed:
            report["params_removed"] = report["macs_removed"] = 0
            ctx.notes[self.name] = report
            return PassResult(changed=False, stats=dict(stats))
        before = _counts(graph)
        remove_channels(graph, prunable, removed, ctx.names, ctx.opset)
        graph.cleanup()
        if any(g.heads is not None and g.key in removed for g in prunable):
            graph.toposort()  # a computed head target gains a Slice and a Concat at the end
        _reinfer(graph)
        stats["pruned-groups"] = len(removed)
        stats["pruned-channels"] = sum(len(v) for v in removed.values())
        if reference is not None:
            from onnxopt.reconstruct import blas_threads

            with blas_threads(1):
                report["reconstruction"] = self._reconstruct(graph, ctx, prunable, removed,
                                                             reference, stats)
        after = _counts(graph)
        report["params_removed"] = before[0] - after[0]
        report["macs_removed"] = before[1] - after[1]
        ctx.notes[self.name] = report
        return PassResult(changed=True, stats=dict(stats))

    # ---- what to remove ----
    def _importance(self, g: Group, graph: gs.Graph, tensors: Mapping[str, gs.Tensor],
                    ctx: PassContext, stats: Counter[str]) -> np.ndarray:
        crit = self.options.criterion
        if crit == "bn-gamma":
            if any(m.role == "norm-scale" for m in g.members):
                return magnitude(g, tensors, 1, frozenset({"norm-scale"}))
            stats["criterion-fallback"] += 1
        if crit == "activation":
            imp = self._activation(g, graph, ctx)
            if imp is not None:
                return imp
            stats["criterion-fallback"] += 1
        return magnitude(g, tensors, 2 if crit == "l2" else 1)

    def _activation(self, g: Group, graph: gs.Graph, ctx: PassContext) -> np.ndarray | None:
        from onnxopt.capture import capture

        if not hasattr(self, "_act_model"):
            self._act_model = current_model(graph, ctx)
            self._act_cache: dict[Any, Any] = {}
        # what the consumer layers read (after activation functions), else every activation
        layer_nodes = {m.node for m in g.members if m.role in ("weight-in", "grouped-in")}
        read = {n.inputs[0].name for n in graph.nodes if n.name in layer_nodes}
        acts = [m for m in g.members if m.role == "activation"]
        acts = [m for m in acts if m.tensor in read] or acts
        tensors = graph.tensors()
        imp = np.zeros(g.channels)
        found = False
        for m in acts:
            shape = tensors[m.tensor].shape
            if shape is None:
                continue
            rank = len(shape)
            axis = m.axis + rank if m.axis < 0 else m.axis
            layout = "nchw" if axis == 1 and rank > 2 else "rows" if axis == rank - 1 else None
            if layout is None:
                continue
            rows = _NCHW_SAMPLES if layout == "nchw" else _ROWS
            assert ctx.calibration is not None
            a = capture(self._act_model, ctx.calibration, {m.tensor: layout}, max_rows=rows,
                        seed=ctx.seed, cache=self._act_cache)[m.tensor]
            a_axis = 1 if layout == "nchw" else a.ndim - 1
            per_pos = np.abs(a.astype(np.float64)).mean(
                axis=tuple(i for i in range(a.ndim) if i != a_axis))
            span = per_pos[m.offset:m.offset + m.length * m.block].reshape(m.length, m.block)
            imp[m.start:m.start + m.length] += span.sum(axis=1)
            found = True
        return imp if found else None

    def _round_to(self, convs: bool) -> tuple[int, str]:
        """The channel multiple kept counts are rounded to, and where it comes from."""
        if self.options.round_to is not None:
            return self.options.round_to, "option"
        if not convs:
            return 1, "no Conv channel group"
        from onnxopt.passes._channel_multiple import KEY, measured_round_to

        return measured_round_to(), f"measured on this machine ({KEY})"

    def _choose(self, groups: Sequence[Group], importance: Mapping[str, np.ndarray],
                keep: Mapping[str, float], multiples: Mapping[str, int]) -> dict[str, np.ndarray]:
        o = self.options
        fraction = {g.key: keep.get(g.key, 1.0 - o.ratio) for g in groups}
        if o.global_ranking:
            ranked = [g for g in groups if g.key not in keep]
            fraction.update(self._global_fractions(ranked, importance))
        out = {}
        for g in groups:
            multiple = math.lcm(multiples[g.key], g.chunks)
            k = kept_count(g.channels, fraction[g.key], multiple, o.min_channels)
            out[g.key] = select_removed(importance[g.key], k, g.chunks)
        return out

    def _global_fractions(self, groups: Sequence[Group],
                          importance: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Kept fraction per group when the ``ratio`` least important channels of all groups
        go, importance divided by its group's mean so that groups compare."""
        o = self.options
        entries = []
        for gi, g in enumerate(groups):
            imp = importance[g.key]
            norm = imp / max(float(imp.mean()), 1e-12)
            entries.extend((float(v), gi) for v in norm)
        budget = round(o.ratio * sum(g.channels for g in groups))
        limit = [g.channels - max(o.min_channels, 1) for g in groups]
        taken = [0] * len(groups)
        for _, gi in sorted(entries, key=lambda e: e[0]):
            if budget == 0:
                break
            if taken[gi] < limit[gi]:
                taken[gi] += 1
                budget -= 1
        return {g.key: (g.channels - t) / g.channels for g, t in zip(groups, taken, strict=True)}

    # ---- reconstruction ----
    def _refit_wanted(self, ctx: PassContext, stats: Counter[str]) -> bool:
        if not self.options.reconstruct or not ctx.calibration:
            return False
        try:
            import onnxopt.capture
            import onnxopt.reconstruct  # noqa: F401
        except ImportError:
            stats["skipped:reconstruct-unavailable"] += 1
            return False
        return True

    @staticmethod
    def _snapshot(graph: gs.Graph, ctx: PassContext) -> onnx.ModelProto:
        return current_model(graph, ctx)

    def _reconstruct(self, graph: gs.Graph, ctx: PassContext, groups: Sequence[Group],
                     removed: Mapping[str, np.ndarray], reference: onnx.ModelProto,
                     stats: Counter[str]) -> dict[str, dict[str, Any]]:
        """Refit the layers that lost input channels, in topological order, each on its input
        in the model with the layers before it already refit.

        The targets (each layer's output in ``reference``) are captured for many layers per
        run; the pruned model's inputs come from one ``capture.Stepwise`` over the graph, which
        runs only what a refit changed: about one pass of the model for all layers.
        """
        from onnxopt.capture import Stepwise, model_runs, sample

        assert ctx.calibration is not None
        touched = {m.node for g in groups if g.key in removed for m in g.members
                   if m.role in ("weight-in", "grouped-in")}
        produced = {o for n in reference.graph.node for o in n.output}
        layers = []
        for node in graph.nodes:
            if node.name not in touched:
                continue
            reason = _refit_decline(node)
            if reason is None and node.outputs[0].name not in produced:
                reason = "no-reference"
            if reason is not None:
                stats[f"skipped:refit-{reason}"] += 1
                continue
            layers.append(node)
        if not layers:
            return {}
        parts = _fit_and_held_feeds(ctx.calibration)
        runs = [list(model_runs(reference, feeds)) for feeds in parts]
        targets = _targets(reference, parts, layers, _out_removed(groups, removed), ctx)
        stepper = Stepwise(graph, [r for part in runs for r in part],
                           export=lambda g: current_model(g, ctx))
        result: dict[str, dict[str, Any]] = {}
        for node in layers:
            layout = _layout(node)
            x_name, y_name = node.inputs[0].name, node.outputs[0].name
            stream = stepper.stream([x_name, y_name])
            got = [sample(itertools.islice(stream, len(part)), {x_name: layout, y_name: layout},
                          _max_rows(layout), ctx.seed) for part in runs]
            entry = _refit_layer(node, [(g[x_name], g[y_name], t) for g, t in
                                        zip(got, targets.pop(node.name), strict=True)], ctx)
            result[node.name] = entry
            stats["reconstructed" if entry["applied"] else "skipped:refit-no-gain"] += 1
            if entry["applied"]:
                stepper.changed(node)  # the MatMul intercept's bias Add comes after it
        logger.info("prune-channels: %d layer(s) refit; %d node runs over the calibration data "
                    "for the inputs (the graph has %d nodes)", len(layers), sum(stepper.stretches),
                    len(graph.nodes))
        return result


def _layout(node: gs.Node) -> str:
    return "nchw" if node.op == "Conv" else "rows"


def _max_rows(layout: str) -> int:
    return _NCHW_SAMPLES if layout == "nchw" else _ROWS


def _out_removed(groups: Sequence[Group], removed: Mapping[str, np.ndarray]
                 ) -> dict[str, np.ndarray]:
    """Per layer output tensor, the positions of its channel axis that pruning removed: the
    reference output loses them before it is compared with the pruned layer's."""
    out: dict[str, np.ndarray] = {}
    for g in groups:
        if g.key not in removed:
            continue
        for m in g.members:
            if m.role == "activation":
                sel = removed[g.key]
                sel = sel[(sel >= m.start) & (sel < m.start + m.length)] - m.start
                pos = (m.offset + sel[:, None] * m.block + np.arange(m.block)[None, :]).reshape(-1)
                prev = out.get(m.tensor, np.zeros(0, np.int64))
                out[m.tensor] = np.union1d(prev, pos).astype(np.int64)
    return out


def _targets(reference: onnx.ModelProto, parts: Sequence[Sequence[Any]], layers: Sequence[gs.Node],
             out_removed: Mapping[str, np.ndarray], ctx: PassContext
             ) -> dict[str, list[np.ndarray]]:
    """Layer -> its output in ``reference`` on each part of the calibration feeds, the removed
    channels dropped; as many layers per run as fit in ``_CAPTURE_BYTES``."""
    from onnxopt.capture import capture

    out: dict[str, list[np.ndarray]] = {}
    for chunk in _chunks(layers):
        for layout in ("nchw", "rows"):
            names = {n.outputs[0].name: layout for n in chunk if _layout(n) == layout}
            if not names:
                continue
            got = [capture(reference, feeds, names, max_rows=_max_rows(layout), seed=ctx.seed)
                   for feeds in parts]
            for n in chunk:
                y = n.outputs[0].name
                if names.get(y) != layout:
                    continue
                axis = 1 if layout == "nchw" else -1
                out[n.name] = [np.delete(g[y], out_removed[y], axis=axis) if y in out_removed
                               else g[y] for g in got]
    return out


def _chunks(layers: Sequence[gs.Node]) -> list[list[gs.Node]]:
    """Consecutive layers whose captured outputs take at most ``_CAPTURE_BYTES`` together
    (sized from the pruned shapes; a layer of unknown size goes alone)."""
    chunks: list[list[gs.Node]] = []
    total = 0
    for n in layers:
        shape = n.outputs[0].shape or []
        dims = shape[1:] if _layout(n) == "nchw" else shape[-1:]
        known = bool(dims) and all(isinstance(d, int) and d > 0 for d in dims)
        size = _max_rows(_layout(n)) * 4 * math.prod(dims) if known else _CAPTURE_BYTES
        if not chunks or total + size > _CAPTURE_BYTES:
            chunks.append([])
            total = 0
        chunks[-1].append(n)
        total += size
    return chunks


def _refit_decline(node: gs.Node) -> str | None:
    if node.op == "Conv":
        if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return "auto-pad"
        w = constant_value(node.inputs[1])
        if w is None or w.ndim != 4:
            return "rank"
    if node.op == "Gemm" and (float(node.attrs.get("alpha", 1.0)) == 0.0):
        return "alpha"
    return None


def _fit_and_held_feeds(feeds: Sequence[Any]) -> list[Sequence[Any]]:
    """Calibration feeds to fit on, and whole feeds held out to check the fit (a quarter).

    Rows of the same sentence or image are alike: a fit that memorises the calibration inputs
    also does well on rows held out from those inputs (seen on MiniLM: better on its
    calibration sentences, worse on others). With fewer than 4 feeds there is one part, and
    rows are held out instead.
    """
    feeds = list(feeds)
    if len(feeds) < 4:
        return [feeds]
    cut = len(feeds) - len(feeds) // 4
    return [feeds[:cut], feeds[cut:]]


def _refit_layer(node: gs.Node, parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                 ctx: PassContext) -> dict[str, Any]:
    """Refit ``node``'s weight (and bias) in place when it lowers the error on held-out inputs.

    ``parts``: (input, current output, reference output) on the fitting feeds and, when there
    are enough, on held-out feeds (``_fit_and_held_feeds``); else a quarter of the rows
    (samples, for a Conv) is held out. The fit must lower the error on what was held out, else
    nothing changes. The weights applied are then fit on everything.
    ``error_before``/``error_after`` are the held-out errors.
    """
    from onnxopt.reconstruct import refit_conv, refit_linear, relative_error

    w_t = node.inputs[1]
    w_old = constant_value(w_t)
    assert w_old is not None
    dtype = w_old.dtype
    gemm = node.op == "Gemm"
    bias_add = None if node.op != "MatMul" else _bias_add(node)

    def fit(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if node.op == "Conv":
            return refit_conv(x[rows], y_ref[rows], kernel=list(w_old.shape[2:]),
                              strides=list(node.attrs.get("strides", [1, 1])),
                              pads=list(node.attrs.get("pads", [0, 0, 0, 0])),
                              dilations=list(node.attrs.get("dilations", [1, 1])),
                              group=int(node.attrs.get("group", 1)), seed=ctx.seed)
        return refit_linear(x[rows], y_ref[rows], bias=gemm or bias_add is not None)

    def predict(rows: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        if node.op == "Conv":
            return _run_conv(x[rows], w, b, node.attrs)
        return x[rows].astype(np.float64) @ w + (b if b is not None else 0.0)

    x = np.concatenate([p[0] for p in parts])
    y_now = np.concatenate([p[1] for p in parts])
    y_ref = np.concatenate([p[2] for p in parts])
    n = len(x)
    if len(parts) == 2:  # whole feeds held out
        train, held = np.arange(len(parts[0][0])), np.arange(len(parts[0][0]), n)
    else:
        order = np.random.default_rng(ctx.seed).permutation(n)
        held, train = (order[:n // 4], order[n // 4:]) if n >= 4 else (order, order)
    before = relative_error(y_now[held], y_ref[held])
    after = relative_error(predict(held, *fit(train)), y_ref[held])
    entry = {"error_before": before, "error_after": after, "applied": after < before}
    if not entry["applied"]:
        return entry
    w, b = fit(np.arange(n))
    if gemm and int(node.attrs.get("transB", 0)):
        w = w.T
    _replace_input(node, 1, w.astype(dtype), ctx)
    if b is not None and node.op == "MatMul":
        # the intercept joins the bias Add after the MatMul (a transformer's Linear)
        assert bias_add is not None
        add, i = bias_add
        old = constant_value(add.inputs[i])
        assert old is not None
        _replace_input(add, i, (old.astype(np.float64) + b).astype(old.dtype), ctx)
    elif b is not None:
        if node.op == "Gemm":
            node.attrs["alpha"], node.attrs["beta"] = 1.0, 1.0
        _replace_input(node, 2, b.astype(dtype), ctx)
    return entry


def _bias_add(node: gs.Node) -> tuple[gs.Node, int] | None:
    """The Add of a constant ``[N]`` bias that alone reads a MatMul's output, and the bias's
    input index: a refit of the MatMul may move its intercept there."""
    y = node.outputs[0]
    w = constant_value(node.inputs[1])
    if len(y.outputs) != 1 or w is None or w.ndim != 2:
        return None
    add = y.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    i = 1 if add.inputs[0] is y else 0
    bias = constant_value(add.inputs[i])
    if add.inputs[1 - i] is not y or bias is None or bias.shape != (w.shape[1],):
        return None
    return add, i


def _replace_input(node: gs.Node, i: int, value: np.ndarray, ctx: PassContext) -> None:
    """Input ``i`` of ``node`` becomes ``value``: in place when it is an initializer only this
    node reads (always so for a pruned layer's weight), else a new constant."""
    old = node.inputs[i] if len(node.inputs) > i and node.inputs[i].name else None
    if isinstance(old, gs.Constant) and len(old.outputs) == 1:
        old.values = np.ascontiguousarray(value)
        return
    new = make_constant(ctx.names.fresh(f"{node.name or node.op}_refit"), value)
    if len(node.inputs) > i:
        node.inputs[i] = new
    else:
        node.inputs.append(new)


def _run_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None,
              attrs: Mapping[str, Any]) -> np.ndarray:
    """The refit Conv on ``x`` in onnxruntime (an oracle apart from the refit's im2col)."""
    from onnx import helper

    from onnxopt.runtime import run_model

    keep = {k: v for k, v in attrs.items() if k in ("strides", "pads", "dilations", "group",
                                                    "auto_pad", "kernel_shape")}
    inits = [onnx.numpy_helper.from_array(w.astype(np.float32), "w")]
    inputs = ["x", "w"]
    if b is not None:
        inits.append(onnx.numpy_helper.from_array(b.astype(np.float32), "b"))
        inputs.append("b")
    f32 = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Conv", inputs, ["y"], **keep)], "refit",
        [helper.make_tensor_value_info("x", f32, None)],
        [helper.make_tensor_value_info("y", f32, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return np.asarray(run_model(model, [{"x": np.ascontiguousarray(x, np.float32)}])[0][0])


def _reinfer(graph: gs.Graph) -> None:
    model = gs.export_onnx(graph, do_type_check=False)
    apply_shapes(graph, model)


def _counts(graph: gs.Graph) -> tuple[int, int]:
    """(parameters, MACs per sample) of the main graph's Conv/MatMul/Gemm and initializers."""
    params = sum(math.prod(t.shape) for t in graph.tensors().values()
                 if isinstance(t, gs.Constant) and t.shape)
    macs = 0
    for n in graph.nodes:
        if n.op not in ("Conv", "MatMul", "Gemm") or len(n.inputs) < 2:
            continue
        w, y = constant_value(n.inputs[1]), n.outputs[0].shape
        if w is None or y is None:
            continue
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in y]
        if n.op == "Conv":
            macs += math.prod(dims) * math.prod(w.shape[1:])
        else:
            k = w.shape[1] if n.op == "Gemm" and int(n.attrs.get("transB", 0)) else w.shape[0]
            macs += math.prod(dims) * k
    return params, macs
