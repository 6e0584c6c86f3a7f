"""Small typed helpers over onnx-graphsurgeon, shared by the passes.

Identity rules: graphsurgeon nodes and tensors are unhashable (tensors compare
equal by name), so maps are keyed by ``id(node)`` or ``tensor.name`` and
membership is tested with ``is``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

# ops whose output differs run to run: never folded, never merged
NONDETERMINISTIC = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli",
     "Multinomial"}
)


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph and every nested subgraph (If branches, Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.nodes:
        for sub in node_subgraphs(node):
            yield from iter_graphs(sub)


def node_subgraphs(node: gs.Node) -> list[gs.Graph]:
    subs: list[gs.Graph] = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            subs.append(value)
        elif isinstance(value, (list, tuple)):
            subs.extend(v for v in value if isinstance(v, gs.Graph))
    return subs


def is_default_domain(node: gs.Node) -> bool:
    return node.domain in (None, "", "ai.onnx")


def constant_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """Values of a tensor known at rewrite time: an initializer or a ``Constant`` node output."""
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        if isinstance(tensor._values, gs.ir.tensor.SparseValues):
            return None
        if isinstance(tensor._values, gs.ir.tensor.LazyValues):
            # not ``tensor.values``: that keeps the loaded array in the graph, so a pass
            # that merely looks at every weight (and declines) doubles a model's memory,
            # and export then re-serializes the array instead of reusing the TensorProto
            return np.asarray(tensor._values.load())
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1:
        node = tensor.inputs[0]
        if node.op == "Constant" and is_default_domain(node) and len(node.outputs) == 1:
            return _constant_node_value(node)
    return None


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs:
        value = attrs["value"]
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
        return None  # sparse_value and friends: leave alone
    if "value_float" in attrs:
        return np.array(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], dtype=np.float32)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], dtype=np.int64)
    return None


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return _is_io(graph, "outputs", tensor)


def is_graph_input(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return _is_io(graph, "inputs", tensor)


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every consumer of ``old`` (subgraph nodes included) read ``new`` instead."""
    for node in list(old.outputs):
        for i, inp in enumerate(node.inputs):
            if inp is old:
                node.inputs[i] = new


def bypass(graph: gs.Graph, src: gs.Tensor, dst: gs.Tensor) -> str | None:
    """Remove the computation ``src -> dst`` by making readers of ``dst`` read ``src``.

    The node that produced ``dst`` is left dangling for ``cleanup()``. When ``dst`` is a
    graph output its name must survive: the producer of ``src`` then writes ``dst``
    directly, which is only legal if ``src`` is an ordinary intermediate value.
    Returns a decline reason, or None on success.
    """
    if not is_graph_output(graph, dst):
        replace_uses(dst, src)
        dst.inputs.clear()
        return None
    if isinstance(src, gs.Constant) or is_graph_input(graph, src) or is_graph_output(graph, src):
        return "graph-output"
    src_producer = producer(src)
    if src_producer is None or not _in_graph(graph, src_producer):
        return "graph-output"
    replace_uses(dst, src)  # other readers of dst (rare) now read src ...
    replace_uses(src, dst)  # ... and then everybody reads dst, which src's producer writes
    dst.inputs.clear()
    for i, out in enumerate(src_producer.outputs):
        if out is src:
            src_producer.outputs[i] = dst
    src.inputs.clear()
    if src.dtype is not None and dst.dtype is None:
        dst.dtype = src.dtype
    return None


def _is_io(graph: gs.Graph, which: str, tensor: gs.Tensor) -> bool:
    """``is_graph_output``/``is_graph_input`` in O(1), for graphs with thousands of outputs.

    Caches name -> position per list (rebuilt when the list is replaced or changes
    length) and confirms a hit with ``is``. Graph I/O names never change, so a tensor
    whose name is not cached is not graph I/O.
    """
    tensors: list[gs.Tensor] = getattr(graph, which)
    key = f"_onnxopt_{which}"
    cache: tuple[list[gs.Tensor], int, dict[str, int]] | None = vars(graph).get(key)
    if cache is None or cache[0] is not tensors or cache[1] != len(tensors):
        cache = (tensors, len(tensors), {t.name: i for i, t in enumerate(tensors)})
        setattr(graph, key, cache)
    i = cache[2].get(tensor.name)
    return i is not None and tensors[i] is tensor


def _in_graph(graph: gs.Graph, node: gs.Node) -> bool:
    """Whether ``node`` is in ``graph.nodes`` (and not an outer-scope producer).

    A scan per call made every pass that calls ``bypass`` quadratic, so the membership is
    cached on the graph: topped up when nodes were appended, rebuilt when the list was
    replaced or shrank, and rebuilt once on a miss (a node inserted in the middle). The
    cache holds the nodes themselves, so an id cannot be reused by another object.
    """
    nodes = graph.nodes
    # not getattr: gs.Graph.__getattr__ logs an error for every missing attribute
    cache: tuple[list[gs.Node], dict[int, gs.Node]] | None = vars(graph).get("_onnxopt_members")
    if cache is None or cache[0] is not nodes or len(cache[1]) > len(nodes):
        cache = _cache_members(graph)
    elif len(cache[1]) < len(nodes):
        cache[1].update((id(n), n) for n in nodes[len(cache[1]):])
    if cache[1].get(id(node)) is node:
        return True
    return _cache_members(graph)[1].get(id(node)) is node


def _cache_members(graph: gs.Graph) -> tuple[list[gs.Node], dict[int, gs.Node]]:
    cache = (graph.nodes, {id(n): n for n in graph.nodes})
    graph._onnxopt_members = cache
    return cache


def add_node(
    graph: gs.Graph,
    op: str,
    inputs: Sequence[gs.Tensor],
    outputs: Sequence[gs.Tensor],
    attrs: dict[str, Any] | None = None,
    name: str = "",
    domain: str | None = None,
) -> gs.Node:
    node = gs.Node(
        op=op, name=name, attrs=dict(attrs or {}), inputs=list(inputs), outputs=list(outputs),
        domain=domain,
    )
    graph.nodes.append(node)
    return node


def make_constant(name: str, values: np.ndarray) -> gs.Constant:
    # np.ascontiguousarray would turn a 0-d scalar into shape (1,)
    return gs.Constant(name, np.asarray(values, order="C"))


def layer_key(node: gs.Node) -> str:
    """How quantizers name a layer in notes and ``exclude=``: the node name, else its first output."""
    return node.name or (node.outputs[0].name if node.outputs else "")


def is_float_dtype(dtype: Any) -> bool:
    try:
        return np.issubdtype(np.dtype(dtype), np.floating)
    except TypeError:
        return False


# ---- statistics over ModelProto (used by reports, inspect and tests) ----

def iter_proto_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_proto_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_proto_graphs(g)


def op_histogram(model: onnx.ModelProto, recurse: bool = True) -> dict[str, int]:
    """Op type -> count over the main graph (and subgraphs when ``recurse``)."""
    counts: Counter[str] = Counter()
    graphs = iter_proto_graphs(model.graph) if recurse else [model.graph]
    for g in graphs:
        for node in g.node:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            counts[key] += 1
    return dict(sorted(counts.items()))


def node_count(model: onnx.ModelProto) -> int:
    return sum(op_histogram(model).values())


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's data from dims and dtype (reading ``raw_data`` or ``ByteSize()``
    would copy or serialize the bytes: seconds per GB)."""
    numel = 1
    for d in t.dims:
        numel *= d
    try:
        return numel * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return numel * 4


def _tensor_numel(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims)) if len(t.dims) else 1


def parameter_count(model: onnx.ModelProto) -> int:
    """Number of weight elements: initializers plus tensor-valued Constant nodes (non-scalar)."""
    total = 0
    for g in iter_proto_graphs(model.graph):
        total += sum(_tensor_numel(t) for t in g.initializer if len(t.dims))
        for node in g.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value" and len(a.t.dims):
                        total += _tensor_numel(a.t)
    return total
