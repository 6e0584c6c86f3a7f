"""Model builders and assertions for tests (ours and users').

Graphs are built in code with ``onnx.helper``; numerics are checked in onnxruntime
with its graph optimizations off, so the oracle is the graph as written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxopt.data import generate
from onnxopt.graph_utils import op_histogram, parameter_count
from onnxopt.runtime import run_model

__all__ = [
    "assert_declined",
    "assert_equivalent",
    "conv_bn_model",
    "make_model",
    "op_histogram",
    "parameter_count",
    "random_feeds",
    "run_model",
    "run_pass",
    "tensor",
    "vi",
]

F32 = TensorProto.FLOAT


def vi(name: str, shape: Sequence[int | str | None] | None, dtype: int = F32) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values), name)


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] | Mapping[str, np.ndarray] = (),
    opset: int = 17,
    value_info: Sequence[onnx.ValueInfoProto] = (),
    extra_opsets: Mapping[str, int] | None = None,
    functions: Sequence[onnx.FunctionProto] = (),
    check: bool = True,
) -> onnx.ModelProto:
    """A model from nodes; ``initializers`` may be a name -> array mapping."""
    if isinstance(initializers, Mapping):
        initializers = [tensor(k, v) for k, v in initializers.items()]
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers),
                              value_info=list(value_info))
    imports = [helper.make_opsetid("", opset)]
    imports += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=imports, functions=list(functions))
    # the oldest IR that carries these opsets: onnxruntime may not read the newest IR yet
    model.ir_version = helper.find_min_ir_version_for(imports, ignore_unknown=True)
    if check:
        onnx.checker.check_model(model)
    return model


def assert_declined(
    model: onnx.ModelProto, pass_name: str, reason: str, spec: str | None = None
) -> None:
    """``spec`` (default: the pass alone) changes nothing and counts ``skipped:<reason>`` once."""
    from onnxopt.api import optimize

    out, report = optimize(model, passes=[spec or pass_name])
    assert report.stats(pass_name) == {f"skipped:{reason}": 1}
    assert op_histogram(out) == op_histogram(model)
    assert report.records[-1].changed is False


def run_pass(model: onnx.ModelProto, pass_name: str) -> tuple[onnx.ModelProto, dict[str, int]]:
    """``model`` optimized by the pass ``pass_name`` alone, and that pass's stats."""
    from onnxopt.api import optimize

    out, report = optimize(model, passes=[pass_name])
    return out, report.stats(pass_name)


def random_feeds(
    model: onnx.ModelProto, count: int = 2, seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> list[dict[str, np.ndarray]]:
    return generate(model, count=count, pins=shapes, seed=seed).feeds


def assert_equivalent(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    feeds: Sequence[dict[str, np.ndarray]] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> None:
    """Outputs of both models agree on the feeds (random ones by default), names and order too."""
    onnx.checker.check_model(candidate)
    assert [o.name for o in reference.graph.output] == [o.name for o in candidate.graph.output]
    assert [i.name for i in reference.graph.input] == [i.name for i in candidate.graph.input]
    feeds = list(feeds) if feeds is not None else random_feeds(reference, 2, seed, shapes)
    ref_out = run_model(reference, feeds)
    cand_out = run_model(candidate, feeds)
    for r, c in zip(ref_out, cand_out):
        for name, a, b in zip([o.name for o in reference.graph.output], r, c):
            _assert_close(name, a, b, atol, rtol)


def _assert_close(name: str, a: Any, b: Any, atol: float, rtol: float) -> None:
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"output {name}: sequence lengths differ"
        for x, y in zip(a, b):
            _assert_close(name, x, y, atol, rtol)
        return
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, f"output {name}: shape {a.shape} != {b.shape}"
    assert a.dtype == b.dtype, f"output {name}: dtype {a.dtype} != {b.dtype}"
    if a.dtype.kind in "fc":
        np.testing.assert_allclose(b, a, atol=atol, rtol=rtol, err_msg=f"output {name}")
    else:
        np.testing.assert_array_equal(b, a, err_msg=f"output {name}")


def conv_bn_model(
    channels: int = 4, with_bias: bool = False, extra_consumer: bool = False, seed: int = 0,
    opset: int = 17, group: int = 1, dynamic_batch: bool = False,
) -> onnx.ModelProto:
    """x[N,channels,8,8] -> Conv(3x3, pad 1) -> BatchNormalization -> y (optionally Conv output also used)."""
    rng = np.random.default_rng(seed)
    c = channels
    w = rng.standard_normal((c, c // group, 3, 3)).astype(np.float32)
    inits = {
        "W": w,
        "gamma": rng.uniform(0.5, 1.5, c).astype(np.float32),
        "beta": rng.standard_normal(c).astype(np.float32),
        "mean": rng.standard_normal(c).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, c).astype(np.float32),
    }
    conv_inputs = ["x", "W"]
    if with_bias:
        inits["B"] = rng.standard_normal(c).astype(np.float32)
        conv_inputs.append("B")
    nodes = [
        helper.make_node("Conv", conv_inputs, ["c"], pads=[1, 1, 1, 1], group=group),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], epsilon=1e-3),
    ]
    n = "N" if dynamic_batch else 2
    outputs = [vi("y", [n, c, 8, 8])]
    if extra_consumer:
        nodes.append(helper.make_node("Relu", ["c"], ["z"]))
        outputs.append(vi("z", [n, c, 8, 8]))
    return make_model(nodes, [vi("x", [n, c, 8, 8])], outputs, inits, opset=opset)


def mlp_model(
    sizes: Sequence[int] = (32, 64, 64, 10), batch: int | str = 4, gemm: bool = False,
    seed: int = 0, opset: int = 17, outlier_layer: int | None = None, rank: int = 2,
) -> onnx.ModelProto:
    """x[batch, sizes[0]] -> (MatMul + Add [or Gemm] -> Relu) * n -> logits[batch, sizes[-1]].

    Layer ``i`` is the node named ``fc{i}``. With ``outlier_layer=i`` (i >= 1) the layer
    before it emits one huge activation (bias 1000 on one unit) that layer ``i`` reads
    through a near-zero weight row: the float outputs barely notice, but an int8 input
    scale for layer ``i`` becomes coarse enough to wipe out every other feature.
    ``rank=3`` gives x[batch, 8, sizes[0]] (MatMul only), like a transformer's tokens.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], {}
    prev = "x"
    for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        b = (0.1 * rng.standard_normal(n)).astype(np.float32)
        if outlier_layer is not None and i == outlier_layer - 1:
            b[0] = 1000.0
        if outlier_layer is not None and i == outlier_layer:
            w[0, :] = 1e-6
        last = i == len(sizes) - 2
        out = "logits" if last else f"h{i}"
        pre = f"z{i}" if not last else out
        if gemm:
            inits[f"W{i}"], inits[f"b{i}"] = w.T.copy(), b
            nodes.append(helper.make_node("Gemm", [prev, f"W{i}", f"b{i}"], [pre], name=f"fc{i}", transB=1))
        else:
            inits[f"W{i}"], inits[f"b{i}"] = w, b
            nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"m{i}"], name=f"fc{i}"))
            nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [pre], name=f"fc{i}_bias"))
        if not last:
            nodes.append(helper.make_node("Relu", [pre], [out], name=f"relu{i}"))
        prev = out
    in_shape = [batch, sizes[0]] if rank == 2 else [batch, 8, sizes[0]]
    out_shape = [batch, sizes[-1]] if rank == 2 else [batch, 8, sizes[-1]]
    return make_model(nodes, [vi("x", in_shape)], [vi("logits", out_shape)], inits, opset=opset)


def scale_model(nodes: int, kind: str = "chain", seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """A graph of about ``nodes`` small nodes, for timing passes against graph size.

    Blocks of 12 nodes on x[1, 4, 4, 4]: Conv -> BatchNormalization -> Identity ->
    Add(const) -> Reshape -> Transpose -> MatMul(const) -> Transpose -> Reshape -> Relu
    -> Dropout, closed by a residual Add. ``kind="chain"`` runs the blocks one after
    another; ``"branchy"`` splits every block input into two such branches joined by Add.
    Every block has its own weights, so every rewrite has work proportional to the size.
    """
    rng = np.random.default_rng(seed)
    c = 4
    inits: dict[str, np.ndarray] = {
        "to3d": np.array([1, c, 16], np.int64), "to4d": np.array([1, c, 4, 4], np.int64),
    }
    body: list[onnx.NodeProto] = []

    def block(x: str, p: str) -> str:
        inits[f"{p}w"] = rng.standard_normal((c, c, 1, 1)).astype(np.float32) * 0.5
        inits[f"{p}g"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        inits[f"{p}b"] = rng.standard_normal(c).astype(np.float32) * 0.1
        inits[f"{p}m"] = rng.standard_normal(c).astype(np.float32) * 0.1
        inits[f"{p}v"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
        inits[f"{p}a"] = rng.standard_normal((1, c, 1, 1)).astype(np.float32) * 0.1
        inits[f"{p}k"] = rng.standard_normal((c, 16)).astype(np.float32)[:, :4].copy() * 0.5
        body.extend([
            helper.make_node("Conv", [x, f"{p}w"], [f"{p}conv"]),
            helper.make_node("BatchNormalization", [f"{p}conv", f"{p}g", f"{p}b", f"{p}m", f"{p}v"],
                             [f"{p}bn"]),
            helper.make_node("Identity", [f"{p}bn"], [f"{p}id"]),
            helper.make_node("Add", [f"{p}id", f"{p}a"], [f"{p}add"]),
            helper.make_node("Reshape", [f"{p}add", "to3d"], [f"{p}r3"]),
            helper.make_node("Transpose", [f"{p}r3"], [f"{p}t"], perm=[0, 2, 1]),
            helper.make_node("MatMul", [f"{p}t", f"{p}k"], [f"{p}mm"]),
            helper.make_node("Transpose", [f"{p}mm"], [f"{p}tb"], perm=[0, 2, 1]),
            helper.make_node("Reshape", [f"{p}tb", "to4d"], [f"{p}r4"]),
            helper.make_node("Relu", [f"{p}r4"], [f"{p}relu"]),
            helper.make_node("Dropout", [f"{p}relu"], [f"{p}drop"]),
        ])
        return f"{p}drop"

    h, i = "x", 0
    per_block = 12 if kind == "chain" else 24
    for i in range(max(1, nodes // per_block)):
        if kind == "chain":
            out = block(h, f"b{i}_")
        else:
            out = f"b{i}_join"
            body.append(helper.make_node("Add", [block(h, f"b{i}l_"), block(h, f"b{i}r_")], [out]))
        res = f"b{i}_res"
        body.append(helper.make_node("Add", [out, h], [res]) if kind == "chain" else
                    helper.make_node("Identity", [out], [res]))
        h = res
    body.append(helper.make_node("Identity", [h], ["y"]))
    shape = [1, c, 4, 4]
    return make_model(body, [vi("x", shape)], [vi("y", shape)], inits, opset=opset, check=False)
