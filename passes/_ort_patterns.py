"""Matching helpers shared by the ``fuse-ort-*`` passes (onnxruntime contrib-op fusions).

Not a pass. What lives here is what more than one fusion reads: scalar and vector
constants, the last dims a Reshape target spells out (a constant, or a ``Concat`` of
runtime dims and constants, as both torch exporters write it), a projection
``x @ W (+ b)``, the ``com.microsoft`` node builder, and ``probe``: evaluating the
subgraph behind a tensor on made-up inputs in onnxruntime, which is how a fusion
checks that an index or mask computed from the graph inputs is what the fused op
computes internally (an arange of positions, a key-padding mask), whatever ops the
exporter used to compute it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnxopt.passes._pattern import op_is

from onnxopt.graph_utils import (
    add_node,
    constant_value,
    is_graph_input,
    is_graph_output,
    producer,
)
from onnxopt.pass_base import PassContext

MS_DOMAIN = "com.microsoft"
# the oldest onnxruntime that runs every op these passes write, with the inputs and
# attributes they use (Attention's ``scale`` and ``mask_filter_value``, MultiHeadAttention's
# 2-D key padding mask on CPU, SkipLayerNormalization's fourth output)
REQUIRES = (MS_DOMAIN, "onnxruntime>=1.16")  # a pass's ``requires_runtime``: (domain, requirement)


def scalar(tensor: gs.Tensor) -> float | None:
    """The value of a one-element float constant (``[]`` or ``[1]``), else None."""
    value = constant_value(tensor)
    if value is None or value.size != 1 or value.dtype.kind != "f":
        return None
    return float(value.reshape(()))


def vector(tensor: gs.Tensor, length: int | None = None) -> np.ndarray | None:
    """A 1-D float constant (of ``length`` elements when given), else None."""
    value = constant_value(tensor)
    if value is None or value.ndim != 1 or value.dtype.kind != "f":
        return None
    if length is not None and value.shape[0] != length:
        return None
    return value


def int_attr(node: gs.Node, name: str, default: int) -> int:
    return int(node.attrs.get(name, default))


def is_free(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    """Whether an intermediate value has exactly one consumer and is no graph output."""
    return len(tensor.outputs) == 1 and not is_graph_output(graph, tensor)


def reshape_tail(shape: gs.Tensor, count: int) -> tuple[int, ...] | None:
    """The last ``count`` entries of a Reshape target, when they are constant (positive or -1).

    The target is a constant, or a ``Concat`` of pieces where only the trailing ones need
    to be constant (the leading ones are the runtime batch and sequence dims).
    """
    value = constant_value(shape)
    if value is not None:
        tail = [int(v) for v in value.reshape(-1)[-count:]] if value.size >= count else []
    else:
        node = producer(shape)
        if not op_is(node, "Concat"):
            return None
        tail = []
        for piece in reversed(node.inputs):
            if len(tail) >= count:
                break
            part = constant_value(piece)
            if part is None:
                return None
            tail[:0] = [int(v) for v in part.reshape(-1)]
        tail = tail[-count:]
    # -1 (inferred) is kept for the caller to resolve; 0 (copy a dim, or an empty dim) is not
    if len(tail) != count or any(v == 0 or v < -1 for v in tail) or tail.count(-1) > 1:
        return None
    return tuple(tail)


def resolve_tail(tail: tuple[int, ...] | None, width: int | None) -> tuple[int, ...] | None:
    """``tail`` (the split of a last dim of ``width``) with a -1 entry worked out."""
    if tail is None or -1 not in tail:
        return tail
    known = int(np.prod([v for v in tail if v != -1]))
    if width is None or width % known:
        return None
    return tuple(width // known if v == -1 else v for v in tail)


def reshape_entries(shape: gs.Tensor) -> list[int | None] | None:
    """A Reshape target entry by entry, None where computed at run time (a one-element piece)."""
    value = constant_value(shape)
    if value is not None:
        return [int(v) for v in value.reshape(-1)]
    node = producer(shape)
    if not op_is(node, "Concat"):
        return None
    entries: list[int | None] = []
    for piece in node.inputs:
        part = constant_value(piece)
        if part is not None:
            entries += [int(v) for v in part.reshape(-1)]
        elif piece.shape is None or list(piece.shape) == [1]:
            entries.append(None)  # the exporters' runtime dims: Unsqueeze(Gather(Shape(t), i))
        else:
            return None
    return entries


def reshape_rank(shape: gs.Tensor) -> int | None:
    """How many dims a Reshape target has (its length), when known."""
    value = constant_value(shape)
    if value is not None:
        return int(value.size)
    return int(shape.shape[0]) if shape.shape and isinstance(shape.shape[0], int) else None


@dataclasses.dataclass(eq=False)
class Projection:
    """``out = x @ weight (+ bias)``: ``matmul_out`` is the product before the bias."""

    x: gs.Tensor
    matmul_out: gs.Tensor
    out: gs.Tensor
    weight: np.ndarray | None  # [K, N] when constant
    bias: np.ndarray | None  # [N] when there is a constant bias
    nodes: tuple[gs.Node, ...]

    @property
    def width(self) -> int | None:
        """N, the projection's output width, when known."""
        if self.weight is not None:
            return int(self.weight.shape[1])
        last = self.out.shape[-1] if self.out.shape else None
        return last if isinstance(last, int) else None


def projection(tensor: gs.Tensor) -> Projection | None:
    """Read ``tensor`` as ``MatMul(x, W)``, optionally followed by ``Add`` of a 1-D constant."""
    node = producer(tensor)
    bias = None
    nodes: list[gs.Node] = []
    if op_is(node, "Add"):
        for i in (0, 1):
            b = vector(node.inputs[1 - i])
            if b is not None and op_is(producer(node.inputs[i]), "MatMul"):
                bias, nodes = b, [node]
                node = producer(node.inputs[i])
                break
        else:
            return None
    if not op_is(node, "MatMul"):
        return None
    weight = constant_value(node.inputs[1])
    if weight is not None and (weight.ndim != 2 or weight.dtype != np.float32):
        weight = None
    if bias is not None and weight is not None and bias.shape[0] != weight.shape[1]:
        return None
    return Projection(node.inputs[0], node.outputs[0], tensor, weight, bias, (node, *nodes))


def peel_scale(tensor: gs.Tensor) -> tuple[gs.Tensor, float, list[gs.Node]]:
    """Walk back over ``Mul``/``Div`` by scalar constants: (source, product of factors, nodes)."""
    factor, nodes = 1.0, []
    while True:
        node = producer(tensor)
        if op_is(node, "Mul"):
            for i in (0, 1):
                s = scalar(node.inputs[1 - i])
                if s is not None:
                    factor, tensor = factor * s, node.inputs[i]
                    break
            else:
                return tensor, factor, nodes
        elif op_is(node, "Div") and (s := scalar(node.inputs[1])) is not None and s != 0.0:
            factor, tensor = factor / s, node.inputs[0]
        else:
            return tensor, factor, nodes
        nodes.append(node)


def ms_node(graph: gs.Graph, op: str, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Tensor],
            attrs: Mapping[str, object], name: str) -> gs.Node:
    """Append a ``com.microsoft`` node and declare the domain in the graph's opset imports."""
    imports = list(graph.import_domains or [])
    if not any(imp.domain == MS_DOMAIN for imp in imports):
        imports.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
        graph.import_domains = imports
    return add_node(graph, op, inputs, outputs, attrs=dict(attrs), name=name, domain=MS_DOMAIN)


def cast(graph: gs.Graph, tensor: gs.Tensor, to: int, name: str) -> gs.Variable:
    out = gs.Variable(name, dtype=onnx.helper.tensor_dtype_to_np_dtype(to), shape=tensor.shape)
    add_node(graph, "Cast", [tensor], [out], attrs={"to": to}, name=name)
    return out


def as_int32(graph: gs.Graph, tensor: gs.Tensor, ctx: PassContext, cache: dict[str, gs.Tensor]) -> gs.Tensor:
    """``tensor`` as the int32 index the contrib ops read: itself when int32, else one Cast per
    tensor (``cache``: name -> cast, so every layer reading the same ids shares it)."""
    if tensor.dtype is not None and np.dtype(tensor.dtype) == np.int32:
        return tensor
    if tensor.name not in cache:
        cache[tensor.name] = cast(graph, tensor, onnx.TensorProto.INT32, ctx.names.fresh(f"{tensor.name}_int32"))
    return cache[tensor.name]


def cone(tensor: gs.Tensor) -> tuple[list[gs.Node], list[gs.Tensor]] | None:
    """The nodes ``tensor`` is computed from, and the graph inputs they read (None: not a function
    of the graph inputs and constants alone, e.g. it depends on a subgraph or outer scope)."""
    nodes: dict[int, gs.Node] = {}
    inputs: dict[str, gs.Tensor] = {}
    stack = [tensor]
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        if t.name in seen or isinstance(t, gs.Constant):
            continue
        seen.add(t.name)
        node = producer(t)
        if node is None:
            if not t.inputs and t.name:
                inputs[t.name] = t
                continue
            return None
        if id(node) not in nodes:
            if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
                return None
            nodes[id(node)] = node
            stack.extend(i for i in node.inputs if i.name)
    return list(nodes.values()), list(inputs.values())


Feeds = Mapping[str, np.ndarray]


def probe(graph: gs.Graph, tensor: gs.Tensor, feeds: Sequence[Feeds], opset: int) -> list[np.ndarray] | None:
    """Values of ``tensor`` on each of ``feeds`` (graph input name -> array), run in onnxruntime.

    None when ``tensor`` reads a value that is not a graph input named in the feeds, or the
    evaluation fails.
    """
    from onnxopt.runtime import session

    found = cone(tensor)
    if found is None:
        return None
    nodes, inputs = found
    if any(not is_graph_input(graph, t) or t.name not in feeds[0] for t in inputs):
        return None
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    nodes.sort(key=lambda n: order.get(id(n), 0))
    try:
        sub = gs.Graph(nodes=nodes, inputs=inputs, outputs=[tensor], opset=opset,
                       import_domains=graph.import_domains)
        model = gs.export_onnx(sub, do_type_check=False)
        del model.graph.output[:]
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor.name))
        model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import), True)
        sess = session(model)  # as written, one thread
        return [np.asarray(sess.run(None, {t.name: f[t.name] for t in inputs})[0]) for f in feeds]
    except Exception:  # an unevaluable cone is a pattern we do not recognise, not an error
        return None


def fastest(key: str, candidates: Mapping[str, Callable[[], onnx.ModelProto]], feed: Feeds,
            repeats: int = 200) -> str:
    """Which of ``candidates`` (name -> model builder) onnxruntime runs fastest on this machine,
    as a user runs it (all graph optimizations on: what it fuses at session start counts);
    measured once per machine and ``key`` (``onnxopt.machine.measured``), interleaved medians of
    ``onnxopt.bench.measure_latency``.
    """
    from onnxopt import machine
    from onnxopt.bench import measure_latency

    def measure() -> dict[str, float]:
        models = {name: build() for name, build in candidates.items()}
        latency = measure_latency(models, [dict(feed)], repeats=repeats, max_seconds=10.0)
        return {name: lat.median_ms * 1e3 for name, lat in latency.items()}

    medians = machine.measured(key, measure, version=2)
    return min(candidates, key=lambda name: medians.get(name, float("inf")))
