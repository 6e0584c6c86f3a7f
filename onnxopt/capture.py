"""Activation capture: intermediate tensors on calibration feeds, streamed, bounded, cached.

A shared analysis for the lossy methods (pruning's refit and importance, low-rank
factorization). ``capture`` exposes the requested tensors as extra graph outputs of the
model (what onnxruntime's calibrator does), runs it in onnxruntime with graph optimizations
off over the feeds one at a time, and keeps at most ``max_rows`` rows of each tensor by
reservoir sampling. ``run_exposed`` is the expose-and-run loop alone; the quantization
ranges (``onnxopt.calibration.collect_stats``) stream through it too.

What a row is, per tensor (``layout``):

- ``"rows"``: every leading dim flattened, the last kept: ``[..., K] -> [n, K]`` (the
  inputs and outputs of MatMul and Gemm, one row per token or sample);
- ``"nchw"``: whole samples along the first axis, ``[N, C, H, W]`` kept as
  ``[n, C, H, W]`` (Conv; the conv refit samples positions itself). A sample is large:
  pass a ``max_rows`` that fits, memory is ``max_rows * C * H * W`` values per tensor.

Sampling is reservoir sampling (Algorithm R) over the stream of rows, with one uniform
draw per row past the first ``max_rows`` from ``numpy.random.default_rng(seed)``. The rows
kept depend only on ``seed`` and on how many rows each run yields, not on the tensor, the
model or how feeds are chunked: two tensors with the same leading dims (a layer's input
and its output, or the same tensor in the original and in the pruned model) keep the
*same* rows, in the same order, so they can be paired for a least-squares refit.

Results are cached in a dict the caller keeps, per tensor, under a key made of the model
fingerprint (graph structure *and* weight contents: pruning keeps tensor names but
changes dims and values), the feeds fingerprint, the layout, ``max_rows`` and ``seed``.
The cached arrays are read-only; a request runs the model only for the tensors missing.

``Stepwise`` serves sequential refits, where each layer's input must come from the model
with the layers before it already changed: it runs a live graph a stretch at a time, keeps
what later stretches read, and after a weight change runs only what depends on it (about
one pass of the model for all layers, instead of one per layer). ``sample`` draws the rows of
any stream of runs as ``capture`` does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxopt.errors import InputDataError
from onnxopt.graph_utils import node_subgraphs
from onnxopt.io import _save_external, export_plain, load_model, over_protobuf_limit
from onnxopt.runtime import session

logger = logging.getLogger(__name__)

LAYOUTS = ("rows", "nchw")
_CHUNK = 32  # samples per run when a batched feed can be split (dynamic first axis)


# --- fingerprints ------------------------------------------------------------------------


def model_fingerprint(model: onnx.ModelProto) -> str:
    """A hash of what decides the model's values: opsets, graph I/O, nodes and weights.

    Nodes contribute op type, domain, inputs, outputs and attributes (subgraphs included,
    serialized deterministically); node names and doc strings do not. Initializers
    contribute name, type, dims and bytes. Cost: one pass of blake2b over every weight
    byte (about 1 GB/s on one core, plus a transient copy of each tensor's bytes), so
    callers that capture repeatedly on one model should compute it once where they can.
    Weights left in external files are hashed by their location, offset and length only.
    """
    h = hashlib.blake2b(digest_size=20)

    def put(*parts: object) -> None:
        for p in parts:
            b = p if isinstance(p, bytes) else str(p).encode()
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)

    for imp in model.opset_import:
        put("opset", imp.domain, imp.version)
    g = model.graph
    for vi in (*g.input, *g.output):
        put("io", vi.SerializeToString(deterministic=True))
    for node in g.node:
        put("node", node.domain, node.op_type, len(node.input), *node.input,
            len(node.output), *node.output)
        for a in node.attribute:
            put(a.SerializeToString(deterministic=True))
    for f in model.functions:
        put("function", f.SerializeToString(deterministic=True))
    for t in (*g.initializer, *(s.values for s in g.sparse_initializer)):
        put("init", t.name, t.data_type, len(t.dims), *t.dims)
        if onnx.external_data_helper.uses_external_data(t):
            put(*(f"{e.key}={e.value}" for e in t.external_data))
        elif t.HasField("raw_data"):
            put(t.raw_data)
        else:  # typed fields (float_data, int64_data, ...): small tensors only in practice
            put(t.SerializeToString(deterministic=True))
    for s in g.sparse_initializer:
        put("sparse", s.indices.SerializeToString(deterministic=True), *s.dims)
    return h.hexdigest()


def feeds_fingerprint(feeds: Iterable[Mapping[str, np.ndarray]]) -> str:
    """A hash of the feeds in order: per feed, each input's name, dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=20)
    for i, feed in enumerate(feeds):
        h.update(f"feed {i}".encode())
        for name in sorted(feed):
            a = np.ascontiguousarray(feed[name])
            h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.reshape(-1).view(np.uint8) if a.dtype.kind != "O" else a.tobytes())
    return h.hexdigest()


# --- running with intermediate tensors exposed -------------------------------------------


def iter_runs(
    feeds: Iterable[Mapping[str, np.ndarray]],
    input_names: Sequence[str],
    dynamic_batch: bool,
    max_samples: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Feeds cut to the model inputs, big batches split into chunks, up to ``max_samples``."""
    seen = 0
    for feed in feeds:
        missing = [n for n in input_names if n not in feed]
        if missing:
            raise InputDataError(f"calibration feed lacks model input(s): {', '.join(missing)}")
        feed = {n: np.asarray(feed[n]) for n in input_names}
        batch = {a.shape[0] if a.ndim else 1 for a in feed.values()}
        n = batch.pop() if len(batch) == 1 else 1
        step = _CHUNK if dynamic_batch and n > _CHUNK and all(a.ndim for a in feed.values()) else n
        for start in range(0, n, step):
            if seen >= max_samples:
                return
            part = feed if step == n else {k: a[start : start + step] for k, a in feed.items()}
            seen += min(step, n - start)
            yield part


def run_exposed(
    model: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]],
    names: Sequence[str],
    max_samples: int = sys.maxsize,
    tick: Callable[[int, int], None] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Per run, ``{name: value}`` of ``names`` (graph inputs are taken from the feed).

    The session is built now, with ``names`` as extra graph outputs; ``model`` holds them
    only while it is built and is left as it was. Runs are streamed: one feed (or a chunk
    of ``_CHUNK`` samples of a feed whose batch axis is dynamic) at a time, up to
    ``max_samples`` samples. ``tick(done, total)`` is called after each run; ``total`` is
    0 when ``feeds`` is not a sequence (a stream has no known length).
    """
    inits = {t.name for t in model.graph.initializer}
    input_names = [i.name for i in model.graph.input if i.name not in inits]
    wanted = list(dict.fromkeys(names))
    sess = exposed_session(model, [n for n in wanted if n not in input_names])
    fetch = [n for n in wanted if n not in input_names]
    runs: Iterable[dict[str, np.ndarray]] = model_runs(model, feeds, max_samples)
    total = 0
    if tick is not None and isinstance(feeds, Sequence):
        runs = list(runs)  # slices are views: counting the runs copies no data
        total = len(runs)

    def stream() -> Iterator[dict[str, np.ndarray]]:
        for done, feed in enumerate(runs, 1):
            values = dict(zip(fetch, sess.run(fetch, feed), strict=True)) if fetch else {}
            yield {n: feed[n] if n in input_names else values[n] for n in wanted}
            if tick is not None:
                tick(done, total)

    return stream()


def model_runs(model: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]],
               max_samples: int = sys.maxsize) -> Iterator[dict[str, np.ndarray]]:
    """``iter_runs`` for ``model``'s inputs (initializers aside): its batch axis is dynamic
    when every input's first dim is unnamed or symbolic."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    dynamic = all(
        i.type.tensor_type.shape.dim and not i.type.tensor_type.shape.dim[0].HasField("dim_value")
        for i in inputs
    )
    return iter_runs(feeds, [i.name for i in inputs], dynamic, max_samples)


def exposed_session(model: onnx.ModelProto, names: Sequence[str]) -> ort.InferenceSession:
    """A session (no ORT rewrites) of ``model`` with ``names`` added to its graph outputs.

    An added output takes its element type from the graph's value infos when they know
    it, else it is declared without a type and onnxruntime infers it. A model over the
    protobuf limit is written to a temporary directory with external data (its weights are
    read back into the proto afterwards; the augmented copy is not checked with
    onnx.checker, which refuses untyped outputs and would read every weight again).
    """
    g = model.graph
    produced = {o for node in g.node for o in node.output}
    produced |= {i.name for i in g.input} | {t.name for t in g.initializer}
    unknown = [n for n in names if n not in produced]
    if unknown:
        raise ValueError(
            f"no node of the main graph produces {', '.join(map(repr, unknown))}"
        )
    declared = {o.name for o in g.output}
    typed = {v.name: v.type.tensor_type.elem_type for v in g.value_info
             if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type}
    n_declared = len(g.output)
    for n in names:
        if n in declared:
            continue
        if n in typed:
            g.output.append(onnx.helper.make_tensor_value_info(n, typed[n], None))
        else:
            g.output.append(onnx.ValueInfoProto(name=n))
        declared.add(n)
    try:
        if not over_protobuf_limit(model):
            return session(model.SerializeToString(), optimize=False)
        with tempfile.TemporaryDirectory(prefix="onnxopt-capture-") as tmp:
            path = Path(tmp) / "augmented.onnx"
            tensors = onnx.external_data_helper._get_initializer_tensors(model)
            unset = [t for t in tensors if not t.HasField("data_location")]
            try:
                _save_external(model, path, "augmented.onnx.data")
            finally:
                onnx.external_data_helper.load_external_data_for_model(model, tmp)
                for t in unset:  # byte for byte as it was
                    t.ClearField("data_location")
            return session(path, optimize=False)
    finally:
        del g.output[n_declared:]


# --- reservoir sampling ------------------------------------------------------------------


class Reservoir:
    """Up to ``cap`` rows of a stream, a uniform sample without replacement (Algorithm R).

    Row ``t`` (0-based over the whole stream) is kept outright while ``t < cap``; past
    that it replaces slot ``j = floor(u * (t + 1))`` when ``j < cap``, ``u`` one draw of
    ``default_rng(seed).random()`` per such row. Draws come in stream order, so the rows
    kept depend only on ``seed`` and the number of rows, not on how they arrive in chunks.
    ``index`` holds the stream position of the row in each slot.
    """

    def __init__(self, cap: int, seed: int = 0) -> None:
        if cap < 1:
            raise ValueError(f"max_rows must be at least 1, not {cap}")
        self.cap = cap
        self.seen = 0
        self._rng = np.random.default_rng(seed)
        self._parts: list[np.ndarray] = []  # while filling: no buffer of cap rows up front
        self._buf: np.ndarray | None = None
        self._index = np.zeros(0, np.int64)

    def add(self, rows: np.ndarray) -> None:
        first = self._buf if self._buf is not None else (self._parts or [None])[0]
        if first is not None and (rows.shape[1:] != first.shape[1:] or rows.dtype != first.dtype):
            raise InputDataError(f"rows changed from {first.dtype}{list(first.shape[1:])} to "
                                 f"{rows.dtype}{list(rows.shape[1:])} between runs")
        n = len(rows)
        fill = min(max(self.cap - self.seen, 0), n)
        if fill or first is None:
            self._parts.append(np.array(rows[:fill]))
            self._index = np.concatenate([self._index, self.seen + np.arange(fill)])
            self.seen += fill
        rest = rows[fill:]
        if not len(rest):
            return
        buf = self.rows
        t = self.seen + np.arange(len(rest))
        slot = (self._rng.random(len(rest)) * (t + 1)).astype(np.int64)
        hit = np.nonzero(slot < self.cap)[0]
        if len(hit):  # the last row drawn for a slot wins, as in the sequential algorithm
            slots, last = np.unique(slot[hit][::-1], return_index=True)
            src = hit[::-1][last]
            buf[slots] = rest[src]
            self._index[slots] = t[src]
        self.seen += len(rest)

    @property
    def rows(self) -> np.ndarray:
        """The rows kept, ``[min(seen, cap), ...]``, in slot order (the same for every stream)."""
        if self._parts:
            parts = ([self._buf] if self._buf is not None else []) + self._parts
            self._buf = np.concatenate(parts) if len(parts) > 1 else parts[0]
            self._parts = []
        if self._buf is None:
            raise ValueError("no rows added")
        return self._buf

    @property
    def index(self) -> np.ndarray:
        """Stream position of the row in each slot."""
        return self._index


def _rows(value: np.ndarray, layout: str) -> np.ndarray:
    value = np.asarray(value)
    if layout == "nchw":
        return value if value.ndim else value.reshape(1)
    return value.reshape(-1, value.shape[-1] if value.ndim else 1)


# --- capture -----------------------------------------------------------------------------


def capture(
    model: onnx.ModelProto | str | os.PathLike[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    names: Mapping[str, str] | Sequence[str],
    *,
    max_rows: int = 4096,
    seed: int = 0,
    cache: dict | None = None,
) -> dict[str, np.ndarray]:
    """Tensor name -> captured rows (``[n, K]`` for ``"rows"``, ``[n, C, H, W]`` for ``"nchw"``).

    ``names`` maps each tensor to its layout (see the module docstring); a plain sequence
    means ``"rows"`` for all. ``n`` is ``min(total rows, max_rows)``; rows are sampled
    identically for every tensor with the same leading dims, in any model, on the same
    feeds and ``seed``. Memory: one run's outputs plus ``max_rows`` rows per tensor.

    ``cache`` (a dict the caller keeps across calls) holds results per tensor under the
    model and feeds fingerprints, layout, ``max_rows`` and ``seed``; the model runs only
    when some tensor is missing, and only for those. Returned arrays are read-only.
    """
    layouts = dict(names) if isinstance(names, Mapping) else dict.fromkeys(names, "rows")
    bad = {n: lay for n, lay in layouts.items() if lay not in LAYOUTS}
    if bad:
        raise ValueError(f"layout must be one of {LAYOUTS}: {bad}")
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model)
    keys: dict[str, tuple] = {}
    if cache is not None:
        if not isinstance(feeds, Sequence):  # hashed, then run: a stream would be consumed
            feeds = list(feeds)
        base = (model_fingerprint(model), feeds_fingerprint(feeds), max_rows, seed)
        keys = {n: (*base, n, lay) for n, lay in layouts.items()}
    out = {n: cache[keys[n]] for n in layouts if cache is not None and keys[n] in cache}
    missing = [n for n in layouts if n not in out]
    if not missing:
        return out
    got = sample(run_exposed(model, feeds, missing), {n: layouts[n] for n in missing},
                 max_rows, seed)
    for n in missing:
        out[n] = got[n]
        if cache is not None:
            cache[keys[n]] = got[n]
    return {n: out[n] for n in layouts}


def sample(runs: Iterable[Mapping[str, np.ndarray]], layouts: Mapping[str, str],
           max_rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Up to ``max_rows`` rows of each tensor of ``layouts`` over a stream of runs (values per
    run), sampled as ``capture`` does; the arrays returned are read-only."""
    reservoirs = {n: Reservoir(max_rows, seed) for n in layouts}
    count = 0
    for values in runs:
        for n, r in reservoirs.items():
            r.add(_rows(values[n], layouts[n]))
        count += 1
    if count == 0:
        raise InputDataError("calibration data is empty")
    logger.info("capture: %d run(s), %d tensor(s)", count, len(layouts))
    out = {}
    for n, r in reservoirs.items():
        out[n] = r.rows
        out[n].flags.writeable = False
    return out


# --- sequential capture: a graph run a stretch at a time between weight changes ----------


def _reads(node: gs.Node) -> list[gs.Tensor]:
    """What ``node`` reads: its inputs and the outer-scope tensors its subgraphs read."""
    out = [t for t in node.inputs if t.name]
    for g in node_subgraphs(node):
        inner = {t.name for t in g.inputs} | {t.name for n in g.nodes for t in n.outputs}
        for n in g.nodes:
            out += [t for t in _reads(n) if t.name not in inner]
    return out


class Stepwise:
    """A graph run over calibration runs a stretch at a time, for sequential layer-wise refits.

    A refit of layer ``k`` needs ``k``'s input in the model whose earlier layers are already
    refit. Running the whole model once per layer costs ``layers x model``; instead,
    ``stream(names)`` runs only the nodes ``names`` need that have not run since the weights
    they depend on last changed, starting from the tensors kept from earlier stretches (or
    the graph inputs), and ``changed(node)`` forgets what depends on ``node`` once its weights
    change. Over a refit in topological order the model runs about once, plus each refit
    layer a second time; the values equal a whole run of the current graph (the same
    onnxruntime kernels, graph optimizations off, as ``capture``).

    ``graph`` is the live graph the caller edits (weights are read when a stretch is built);
    ``runs`` the feeds, already cut to the graph inputs (``model_runs``). Kept between
    stretches: every run's value of each tensor a node yet to run reads, and of the tensors
    the last ``stream`` returned until the next one (a refit layer's input: the layer runs
    again from it once its weights change), up to ``max_bytes`` in all; a tensor that does
    not fit is computed again when needed. ``export`` turns a stretch (a ``gs.Graph`` over
    the live nodes) into a model, e.g. with the source's opsets.
    """

    def __init__(self, graph: gs.Graph, runs: Sequence[Mapping[str, np.ndarray]], *,
                 export: Callable[[gs.Graph], onnx.ModelProto] | None = None,
                 max_bytes: int = 1 << 29) -> None:
        self.graph = graph
        self.runs = list(runs)
        if not self.runs:
            raise InputDataError("calibration data is empty")
        self.export = export or export_plain
        self.max_bytes = max_bytes
        self.stretches: list[int] = []  # nodes of each stretch run: the work done, for logs
        self._order = {id(n): i for i, n in enumerate(graph.nodes)}
        self._producer = {id(t): n for n in graph.nodes for t in n.outputs}
        self._readers: dict[int, list[gs.Node]] = {}
        for n in graph.nodes:
            for t in _reads(n):
                self._readers.setdefault(id(t), []).append(n)
        self._done: set[int] = set()  # nodes whose outputs are current (ancestor-closed)
        self._kept: dict[str, list[np.ndarray]] = {}  # tensor -> its value in every run
        self._kept_bytes = 0

    def _available(self, t: gs.Tensor) -> bool:
        return (isinstance(t, gs.Constant) or t.name in self._kept or id(t) not in self._producer)

    def _stretch(self, wanted: Sequence[gs.Tensor]) -> tuple[list[gs.Node], list[gs.Tensor]]:
        """The nodes that compute ``wanted`` from what is available, in graph order, and
        the tensors they read from outside."""
        nodes: dict[int, gs.Node] = {}
        border: dict[str, gs.Tensor] = {}
        stack = list(wanted)
        while stack:
            t = stack.pop()
            if self._available(t):
                if not isinstance(t, gs.Constant):
                    border.setdefault(t.name, t)
                continue
            n = self._producer[id(t)]
            if id(n) not in nodes:
                nodes[id(n)] = n
                stack.extend(_reads(n))
        return sorted(nodes.values(), key=lambda n: self._order[id(n)]), list(border.values())

    def stream(self, names: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
        """Per run, ``{name: value}`` of ``names`` in the graph as it is now. What the stretch
        keeps for later ones is recorded with the last run: consume the stream whole."""
        tensors = self.graph.tensors()
        unknown = ", ".join(repr(n) for n in names if n not in tensors)
        if unknown:
            raise ValueError(f"no tensor of the main graph is named {unknown}")
        wanted = [tensors[n] for n in dict.fromkeys(names)]
        nodes, border = self._stretch(wanted)
        ran = {id(n) for n in nodes}
        done = self._done | ran
        # what this stretch computes that a node yet to run reads, and what the caller asked
        # for: kept for later stretches
        asked = {t.name for t in wanted}
        later = [t for n in nodes for t in n.outputs if t.name in asked
                 or any(id(r) not in done for r in self._readers.get(id(t), ()))]
        fetch = list(dict.fromkeys([t.name for t in wanted if id(t) in self._producer
                                    and t.name not in self._kept] + [t.name for t in later]))
        sess = None
        if nodes:
            sess = exposed_session(self._model(nodes, border, fetch), [])
            self.stretches.append(len(nodes))
        keep: dict[str, list[np.ndarray]] = {t.name: [] for t in later}
        budget = self.max_bytes - self._kept_bytes
        for i in range(len(self.runs)):
            feed = {t.name: self._value(t.name, i) for t in border}
            values = dict(zip(fetch, sess.run(fetch, feed), strict=True)) if sess else {}
            for name in list(keep):
                value = values[name]
                if i == 0 and value.nbytes * len(self.runs) > budget:
                    del keep[name]  # too big to keep: computed again when needed
                    continue
                if i == 0:
                    budget -= value.nbytes * len(self.runs)
                keep[name].append(value)
            out = {t.name: values[t.name] if t.name in values else self._value(t.name, i)
                   for t in wanted}
            if i == len(self.runs) - 1:
                self._record(done, keep, asked)
            yield out

    def _record(self, done: set[int], keep: Mapping[str, list[np.ndarray]],
                pinned: set[str]) -> None:
        """After a stretch: its nodes are current; keep what later stretches read."""
        self._done = done
        for name, values in keep.items():
            self._kept[name] = values
            self._kept_bytes += sum(v.nbytes for v in values)
        self._forget(lambda t: t.name not in pinned
                     and all(id(r) in self._done for r in self._readers.get(id(t), ())))

    def changed(self, node: gs.Node) -> None:
        """``node``'s weights changed: it and everything after it must run again."""
        stale: set[int] = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if id(n) in stale:
                continue
            stale.add(id(n))
            stack += [r for t in n.outputs for r in self._readers.get(id(t), ())]
        self._done -= stale
        self._forget(lambda t: id(self._producer.get(id(t))) in stale)

    def _value(self, name: str, i: int) -> np.ndarray:
        return self._kept[name][i] if name in self._kept else np.asarray(self.runs[i][name])

    def _forget(self, drop: Callable[[gs.Tensor], bool]) -> None:
        tensors = self.graph.tensors()
        for name in [n for n in self._kept if drop(tensors[n])]:
            self._kept_bytes -= sum(v.nbytes for v in self._kept.pop(name))

    def _model(self, nodes: list[gs.Node], border: list[gs.Tensor],
               fetch: list[str]) -> onnx.ModelProto:
        """The stretch as a model: ``border`` in, ``fetch`` out, no declared shapes (the
        values decide them; a graph being rewritten may still carry stale ones)."""
        tensors = self.graph.tensors()
        sub = gs.Graph(nodes=nodes, inputs=border, outputs=[tensors[n] for n in fetch],
                       opset=self.graph.opset, import_domains=self.graph.import_domains,
                       functions=self.graph.functions)
        model = self.export(sub)
        del model.graph.value_info[:]
        for vi in (*model.graph.input, *model.graph.output):
            vi.type.tensor_type.ClearField("shape")
        dtypes = {t.name: self._value(t.name, 0).dtype for t in border}
        for vi in model.graph.input:  # a border tensor the graph left untyped
            tt = vi.type.tensor_type
            if vi.name in dtypes and not tt.elem_type:
                tt.elem_type = onnx.helper.np_dtype_to_tensor_dtype(dtypes[vi.name])
        for vi in model.graph.output:  # untyped: onnxruntime infers it
            if not vi.type.tensor_type.elem_type:
                vi.ClearField("type")
        return model
