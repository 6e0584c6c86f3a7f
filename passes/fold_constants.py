"""Replace computations on constants by their values, evaluated in onnxruntime.

    y = op(c1, c2, ...)   every input a constant (initializer, Constant node, or folded)
->  y = <value of op(c1, c2, ...)>

Shapes fold too, from statically known dims: ``Shape(x)`` (with opset-15 ``start``/``end``)
and ``Size(x)`` when the dims they read are static, and ``Gather(Shape(x), c)`` /
``Slice(Shape(x), ...)`` (axis 0) when the picked dims are, even if others are dynamic.
Declared shapes of graph outputs are not trusted.

Each graph (and If/Loop/Scan body, where outer-scope constants count as constants) is
walked once in topological order. The foldable nodes that lead to a value read by a
non-folded node, a subgraph or a graph output are evaluated in ONE onnxruntime session
(no re-implemented kernels, graph optimizations off). Folded intermediates become
initializers with their own names; a folded graph output keeps its name and is produced
by a ``Constant`` node (valid in subgraphs too, and for every onnxruntime version).

Size cap: a node is not folded when an output is larger than ``max_output_bytes`` AND
larger than ``max_growth`` times its inputs (Tile/Expand/ConstantOfShape/Range of big
outputs stay computed at run time; a Transpose or Concat of big weights still folds).
The cap is checked before evaluation from inferred shapes and again on the real values.

Growth budget, for the whole run: the bytes folding adds to the model (the folded values
minus the constants that only their computation read) may total ``max_run_growth`` times
the model's constant bytes when the pipeline started, or 16 KiB if that is more, summed
over every graph and every fixpoint iteration (``ctx.notes["fold-constants"]``). A
per-node rule cannot see this: Silero VAD's two LSTMs read each weight through an
Unsqueeze of their own, and folding both copies grew the file from 2.22 to 3.17 MB
without any node growing. Past the budget, the largest folded values are declined
until the rest fits (``skipped:growth-budget``). ``max_run_growth=inf`` (``--allow-growth``)
lifts it.

Never folded:
- nondeterministic ops (RandomNormal[Like], RandomUniform[Like], Bernoulli, Multinomial):
  ``skipped:nondeterministic``;
- custom-domain ops: ``skipped:custom-domain``;
- ``skipped:size-cap``: the size rule above;
- ``skipped:growth-budget``: the run's growth budget above;
- QuantizeLinear/DequantizeLinear/DynamicQuantizeLinear (folding a DequantizeLinear of
  int8 weights would undo the quantization), nodes with subgraphs (If/Loop/Scan), and
  values onnxruntime returns as sequences/optionals;
- ``skipped:fold-error``: onnxruntime could not build or run the evaluation graph; that
  graph is left as it was (shape folds already done stay, they are exact).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.graph_utils import (
    NONDETERMINISTIC,
    constant_value,
    is_default_domain,
    is_graph_output,
    iter_graphs,
    node_subgraphs,
    producer,
)
from onnxopt.pass_base import Pass, PassContext, PassResult

logger = logging.getLogger(__name__)

# folding these undoes what they are for (quantized weights stay quantized)
KEEP = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
# the growth budget of a run is at least this: a few folded shape vectors never count
MIN_RUN_GROWTH_BYTES = 16 << 10


def _static_dims(graph: gs.Graph, t: gs.Tensor) -> list[int | None] | None:
    """Dims of ``t`` with None for dynamic ones; None if the rank is unknown or untrusted."""
    if t.shape is None or (is_graph_output(graph, t) and not isinstance(t, gs.Constant)):
        return None
    return [int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None for d in t.shape]


def _nbytes(t: gs.Tensor) -> int | None:
    """Size of ``t``: exact for constants, from the inferred shape otherwise."""
    if isinstance(t, gs.Constant):
        return _stored_bytes(t)
    if t.shape is None or t.dtype is None:
        return None
    if any(not isinstance(d, (int, np.integer)) or d < 0 for d in t.shape):
        return None
    try:
        return int(np.prod(t.shape, dtype=np.int64)) * np.dtype(t.dtype).itemsize
    except TypeError:
        return None


def _stored_bytes(t: gs.Tensor) -> int:
    """Bytes a constant takes in the file, from its shape and dtype (lazy weights stay unloaded)."""
    try:
        return math.prod(t.shape) * np.dtype(t.dtype).itemsize
    except TypeError:
        return int(np.asarray(t.values).nbytes)


def _constant_bytes(graph: gs.Graph) -> int:
    """Bytes of every initializer and Constant node value, subgraphs included, each once."""
    seen: set[int] = set()
    total = 0
    for g in iter_graphs(graph):
        for t in g.tensors().values():
            if isinstance(t, gs.Constant) and id(t) not in seen:
                seen.add(id(t))
                total += _stored_bytes(t)
        for node in g.nodes:
            value = node.attrs.get("value") if node.op == "Constant" else None
            if isinstance(value, gs.Constant):
                total += _stored_bytes(value)
    return total


def _growth_budget(graph: gs.Graph, ctx: PassContext, fraction: float) -> dict[str, float]:
    """The run's growth budget, kept in ``ctx.notes`` across graphs and fixpoint iterations."""
    state = ctx.notes.get(FoldConstantsPass.name)
    if state is None:
        allowed = math.inf if math.isinf(fraction) else max(
            float(MIN_RUN_GROWTH_BYTES), fraction * _constant_bytes(graph))
        state = ctx.notes[FoldConstantsPass.name] = {"budget_bytes": allowed, "grown_bytes": 0.0}
    return state


class _Folder:
    """Folding state of one graph (walked once, in topological order)."""

    def __init__(
        self,
        graph: gs.Graph,
        ctx: PassContext,
        options: FoldConstantsPass.Options,
        stats: Counter[str],
    ) -> None:
        self.g, self.ctx, self.opts, self.stats = graph, ctx, options, stats
        self.const: set[int] = set()  # ids of tensors known to be constant
        self.partial: dict[int, list[int | None]] = {}  # shape tensors with some dims known
        self.leaves: dict[int, gs.Node] = {}  # Constant nodes the evaluation graph needs
        self.fold: list[gs.Node] = []  # nodes to evaluate, in topological order
        self.candidates: dict[int, gs.Node] = {}  # nodes that folding may have made dead
        self.changed = False
        self.budget = _growth_budget(graph, ctx, options.max_run_growth)

    # ---- analysis ----

    def is_const(self, t: gs.Tensor) -> bool:
        if not t.name or id(t) in self.const or isinstance(t, gs.Constant):
            return True
        node = producer(t)
        if node is not None and node.op == "Constant" and constant_value(t) is not None:
            self.leaves[id(node)] = node
            return True
        return False

    def in_bytes(self, node: gs.Node) -> int:
        return sum(_nbytes(t) or 0 for t in node.inputs if t.name)

    def too_big(self, node: gs.Node, out_bytes: int) -> bool:
        cap, growth = self.opts.max_output_bytes, self.opts.max_growth
        return out_bytes > cap and out_bytes > growth * self.in_bytes(node)

    def analyse(self) -> None:
        for node in self.g.nodes:
            if node.op == "Constant" and is_default_domain(node):
                continue  # its output is a leaf (see is_const)
            if not all(self.is_const(t) for t in node.inputs):
                if is_default_domain(node):
                    self.fold_shape(node)
                continue
            if not is_default_domain(node):
                self.stats["skipped:custom-domain"] += 1
            elif node.op in NONDETERMINISTIC:
                self.stats["skipped:nondeterministic"] += 1
            elif node.op in KEEP or node_subgraphs(node) or not node.outputs:
                pass
            elif any(self.too_big(node, b) for t in node.outputs if (b := _nbytes(t)) is not None):
                self.stats["skipped:size-cap"] += 1
            else:
                self.fold.append(node)
                self.const.update(id(t) for t in node.outputs)

    def fold_shape(self, node: gs.Node) -> bool:
        """Fold Shape/Size/Gather/Slice of statically known dims; True if folded to a value."""
        dims: list[int | None] | None = None
        if node.op in ("Shape", "Size") or id(node.inputs[0]) in self.partial:
            self.candidates[id(node)] = node
        if node.op in ("Shape", "Size"):
            dims = _static_dims(self.g, node.inputs[0])
            if dims is not None and node.op == "Shape":
                rank = len(dims)
                start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
                dims = dims[slice(start, rank if end is None else int(end))]
            elif dims is not None:
                if any(d is None for d in dims):
                    return False
                self.replace(node.outputs[0], np.array(np.prod(dims, dtype=np.int64)))
                return True
        elif node.op in ("Gather", "Slice") and id(node.inputs[0]) in self.partial:
            dims = self.pick(node, self.partial[id(node.inputs[0])])
        if dims is None or len(node.outputs) != 1:
            return False
        if any(d is None for d in dims):
            self.partial[id(node.outputs[0])] = dims
            return False
        self.replace(node.outputs[0], np.array(dims, dtype=np.int64))
        return True

    def pick(self, node: gs.Node, dims: list[int | None]) -> list[int | None] | None:
        values = [constant_value(t) for t in node.inputs[1:] if t.name]
        if any(v is None for v in values) or len(values) != len(node.inputs) - 1:
            return None
        if node.op == "Gather":
            if int(node.attrs.get("axis", 0)) != 0 or values[0].ndim > 1:
                return None
            idx = values[0].reshape(-1).tolist()
            if not all(-len(dims) <= i < len(dims) for i in idx):
                return None
            picked = [dims[i] for i in idx]
            if values[0].ndim == 0:  # scalar index, the usual x.shape[i]: a scalar result
                if picked[0] is not None:
                    self.replace(node.outputs[0], np.array(picked[0], dtype=np.int64))
                return None
            return picked
        starts, ends = values[0].reshape(-1), values[1].reshape(-1)
        axes = values[2].reshape(-1) if len(values) > 2 else np.zeros(1, np.int64)
        steps = values[3].reshape(-1) if len(values) > 3 else np.ones(1, np.int64)
        if len(starts) != 1 or axes.tolist() not in ([0], [-1]) or steps[0] == 0:
            return None
        # numpy slicing clamps like ONNX Slice for a 1-D tensor
        return dims[slice(int(starts[0]), int(ends[0]), int(steps[0]))]

    # ---- evaluation and rewrite ----

    def replace(self, t: gs.Tensor, value: np.ndarray) -> None:
        """Make ``t`` the constant ``value``; graph outputs keep their name via a Constant node."""
        value = np.asarray(value, order="C")  # (np.ascontiguousarray would make scalars 1-D)
        if is_graph_output(self.g, t):
            t.inputs.clear()
            const = gs.Constant(self.ctx.names.fresh(f"{t.name}_value"), value)
            self.g.nodes.append(gs.Node("Constant", attrs={"value": const}, outputs=[t]))
            if t.dtype is None:
                t.dtype = value.dtype
        else:
            t.to_constant(value)
            t.inputs.clear()
        self.const.add(id(t))
        self.changed = True

    def targets(self) -> list[gs.Tensor]:
        """Folded values something outside the fold set reads, and the nodes computing them."""
        fold_ids = {id(n) for n in self.fold}
        targets = []
        for node in self.fold:
            for t in node.outputs:
                if is_graph_output(self.g, t) or any(id(c) not in fold_ids for c in t.outputs):
                    targets.append(t)
        return targets

    def needed(self, targets: list[gs.Tensor]) -> list[gs.Node]:
        """The fold nodes the targets depend on, in topological order."""
        fold_ids = {id(n) for n in self.fold}
        keep: set[int] = set()
        stack = [producer(t) for t in targets]
        while stack:
            node = stack.pop()
            if node is None or id(node) in keep or id(node) not in fold_ids:
                continue
            keep.add(id(node))
            stack.extend(producer(t) for t in node.inputs if t.name)
        return [n for n in self.fold if id(n) in keep]

    def evaluate(self) -> None:
        targets = self.targets()
        if not targets:
            return
        nodes = self.needed(targets)
        values = self.run(list(self.leaves.values()) + nodes, targets)
        if values is None:
            self.stats["skipped:fold-error"] += 1
            return
        folded: list[tuple[gs.Tensor, np.ndarray]] = []
        for t, value in zip(targets, values, strict=True):
            node = producer(t)
            if not isinstance(value, np.ndarray) or value.dtype == object:
                continue
            if node is not None and self.too_big(node, value.nbytes):
                self.stats["skipped:size-cap"] += 1
                continue
            folded.append((t, value))
        chosen = {id(t) for t, _ in folded}
        for t, value in self.within_budget(folded, [t for t in targets if id(t) not in chosen]):
            self.replace(t, value)
        self.candidates.update((id(n), n) for n in nodes)

    def within_budget(
        self, folded: list[tuple[gs.Tensor, np.ndarray]], computed: list[gs.Tensor],
    ) -> list[tuple[gs.Tensor, np.ndarray]]:
        """``folded`` less its largest values until the run's growth stays in budget; charges it.

        ``computed``: targets that stay computed at run time (their computation keeps its constants).
        Declining is rare (a model over budget), so each decline recomputes the growth exactly.
        """
        left = self.budget["budget_bytes"] - self.budget["grown_bytes"]
        if math.isinf(left):
            return folded
        folded = sorted(folded, key=lambda tv: tv[1].nbytes)
        grown = self.growth(folded, computed)
        while folded and grown > left:
            computed.append(folded.pop()[0])
            self.stats["skipped:growth-budget"] += 1
            grown = self.growth(folded, computed)
        self.budget["grown_bytes"] += grown
        return folded

    def growth(self, folded: Sequence[tuple[gs.Tensor, np.ndarray]], declined: list[gs.Tensor]) -> int:
        """Bytes the model gains when ``folded`` become constants and ``declined`` stay computed:
        the new values minus the constants that only the computation of ``folded`` read."""
        live = {id(n) for n in self.needed(declined)}
        dead = [n for n in self.needed([t for t, _ in folded]) if id(n) not in live]
        dead_ids = {id(n) for n in dead}
        freed, seen = 0, set()
        for node in dead:
            for t in node.inputs:
                if id(t) in seen or not self.is_leaf(t) or is_graph_output(self.g, t):
                    continue
                seen.add(id(t))
                if all(id(c) in dead_ids for c in t.outputs):
                    freed += _stored_bytes(t) if isinstance(t, gs.Constant) else int(
                        np.asarray(constant_value(t)).nbytes)
        return sum(int(v.nbytes) for _, v in folded) - freed

    def is_leaf(self, t: gs.Tensor) -> bool:
        """A constant the graph stores: an initializer or a Constant node's output."""
        if isinstance(t, gs.Constant):
            return True
        node = producer(t)
        return node is not None and id(node) in self.leaves

    def run(self, nodes: list[gs.Node], targets: list[gs.Tensor]) -> list[object] | None:
        import onnxruntime as ort

        try:
            sub = gs.Graph(nodes=nodes, inputs=[], outputs=targets, opset=self.ctx.opset)
            model = gs.export_onnx(sub, do_type_check=False)
            del model.graph.output[:]  # onnxruntime infers the types
            model.graph.output.extend(
                onnx.helper.make_empty_tensor_value_info(t.name) for t in targets
            )
            model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import), True)
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            so.log_severity_level = 4  # failures are logged below, once
            sess = ort.InferenceSession(
                model.SerializeToString(), so, providers=["CPUExecutionProvider"]
            )
            return list(sess.run([t.name for t in targets], {}))
        except Exception as e:  # any failure leaves this graph as it is
            logger.info(
                "fold-constants: evaluation failed in graph %s: %s",
                self.g.name,
                str(e).splitlines()[0][:300] if str(e) else type(e).__name__,
            )
            return None


class FoldConstantsPass(Pass):
    """Evaluate nodes whose inputs are all constant, and shapes with static dims."""

    name = "fold-constants"

    @dataclasses.dataclass(frozen=True)
    class Options:
        max_output_bytes: int = 1 << 20  # outputs above this fold only if not bigger than inputs
        max_growth: float = 1.0  # ... times the node's input bytes
        # the whole run may grow the model's constant bytes by this fraction (inf: no limit)
        max_run_growth: float = 0.01

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: Counter[str] = Counter()
        graph.toposort()
        candidates: dict[int, gs.Node] = {}
        changed = False
        for g in list(iter_graphs(graph)):
            folder = _Folder(g, ctx, self.options, stats)
            folder.analyse()
            folder.evaluate()
            changed |= folder.changed
            candidates.update(folder.candidates)
        if changed:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            alive = {id(n) for g in iter_graphs(graph) for n in g.nodes}
            if folded := sum(key not in alive for key in candidates):
                stats["folded-nodes"] = folded
        return PassResult(changed=changed, stats=dict(stats))
