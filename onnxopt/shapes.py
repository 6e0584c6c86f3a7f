"""Shape inference that is cheap for huge models and never changes declared graph I/O.

Inference runs on a copy of the model's structure in which large weights are
replaced by external-data placeholders (shape inference needs only their dims),
so a 2 GB model costs no second copy of its weights. The results fill in dtype
and shape of graph-surgeon tensors that have none; declared graph inputs and
outputs are left as they are.
"""

from __future__ import annotations

import logging

import onnx
import onnx_graphsurgeon as gs

from onnxopt.graph_utils import iter_graphs, tensor_nbytes

logger = logging.getLogger(__name__)

_SMALL = 1024  # bytes: tensors below this keep their data (Reshape targets, axes, ...)


def copy_structure(model: onnx.ModelProto, out: onnx.ModelProto) -> None:
    graph = model.graph
    # by dims, not len(t.raw_data): reading raw_data copies the bytes out of the proto
    big = [t for t in graph.initializer if tensor_nbytes(t) > _SMALL]
    kept = {id(t) for t in big}
    # copy everything but the big initializers, then add shells for them
    out.CopyFrom(onnx.ModelProto(
        ir_version=model.ir_version, opset_import=model.opset_import, functions=model.functions,
    ))
    g = onnx.GraphProto()
    g.name = graph.name
    g.node.extend(graph.node)
    g.input.extend(graph.input)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    g.sparse_initializer.extend(graph.sparse_initializer)
    for t in graph.initializer:
        if id(t) in kept:
            shell = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)
            shell.data_location = onnx.TensorProto.EXTERNAL
            shell.external_data.add(key="location", value="__onnxopt_placeholder__")
            g.initializer.append(shell)
        else:
            g.initializer.append(t)
    out.graph.CopyFrom(g)


def infer(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Name -> inferred type of every value the onnx shape inference can type."""
    try:
        light = onnx.ModelProto()
        copy_structure(model, light)
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception as e:  # inference is an optimisation aid: without it passes decline more
        logger.info("shape inference failed, continuing without it: %s", str(e).splitlines()[0])
        return {}
    types: dict[str, onnx.TypeProto] = {}

    def collect(g: onnx.GraphProto) -> None:
        for vi in list(g.value_info) + list(g.output) + list(g.input):
            types.setdefault(vi.name, vi.type)
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    collect(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        collect(sub)

    collect(inferred.graph)
    return types


def apply_shapes(graph: gs.Graph, model: onnx.ModelProto) -> int:
    """Fill dtype/shape of tensors that lack them; returns how many were filled."""
    types = infer(model)
    filled = 0
    for g in iter_graphs(graph):
        io_ids = {id(t) for t in g.inputs} | {id(t) for t in g.outputs}
        for name, tensor in g.tensors().items():
            if isinstance(tensor, gs.Constant) or id(tensor) in io_ids:
                continue
            tp = types.get(name)
            if tp is None or tp.WhichOneof("value") != "tensor_type":
                continue
            tt = tp.tensor_type
            if tensor.dtype is None and tt.elem_type:
                tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
            if tensor.shape is None and tt.HasField("shape"):
                tensor.shape = [
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in tt.shape.dim
                ]
                filled += 1
    return filled
