"""eliminate-unread-rows: a transformer classifier computes only the token it reads.

Oracles: onnxruntime running the original graph (numerics), onnx shape inference on the
rewritten graph (the MLP's MatMuls now see one token), and MACs counted by hand.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxopt.testing import assert_equivalent, make_model, op_histogram, run_pass, vi

PASS = "eliminate-unread-rows"
rng = np.random.default_rng(0)
B, S, D, H, F = 2, 5, 8, 2, 16  # batch, tokens, width, heads, MLP width


def _w(*shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.3).astype(np.float32)


def vit_tail(index: int | list[int] = 0, seq: int | str = S, batch: int | str = B, opset: int = 17,
             decomposed_norm: bool = False, also_output: bool = False) -> onnx.ModelProto:
    """One pre-norm block (packed QKV split by Gathers, as torch exports timm's ViT), the final
    LayerNorm, ``Gather(axis=1, index)`` of the CLS token, and a Gemm head."""
    d = D // H
    inits = {
        "g1": _w(D), "b1": _w(D), "wqkv": _w(D, 3 * D), "bqkv": _w(3 * D),
        "qkv_shape": np.array([0, 0, 3, H, d], np.int64), "iq": np.array(0, np.int64),
        "ik": np.array(1, np.int64), "iv": np.array(2, np.int64), "scale": np.array(np.sqrt(d), np.float32),
        "merge": np.array([0, 0, D], np.int64), "wo": _w(D, D), "bo": _w(D), "g2": _w(D), "b2": _w(D),
        "w1": _w(D, F), "bf1": _w(F), "w2": _w(F, D), "bf2": _w(D), "g3": _w(D), "b3": _w(D),
        "cls": np.array(index, np.int64), "head": _w(3, D), "hb": _w(3),
    }

    def norm(x: str, g: str, b: str, y: str) -> list[onnx.NodeProto]:
        if not decomposed_norm:
            return [helper.make_node("LayerNormalization", [x, g, b], [y], axis=-1, epsilon=1e-5)]
        inits.setdefault("eps", np.array(1e-5, np.float32))
        return [helper.make_node("ReduceMean", [x], [f"{y}_m"], axes=[-1]),
                helper.make_node("Sub", [x, f"{y}_m"], [f"{y}_c"]),
                helper.make_node("Mul", [f"{y}_c", f"{y}_c"], [f"{y}_sq"]),
                helper.make_node("ReduceMean", [f"{y}_sq"], [f"{y}_v"], axes=[-1]),
                helper.make_node("Add", [f"{y}_v", "eps"], [f"{y}_ve"]),
                helper.make_node("Sqrt", [f"{y}_ve"], [f"{y}_s"]),
                helper.make_node("Div", [f"{y}_c", f"{y}_s"], [f"{y}_n"]),
                helper.make_node("Mul", [f"{y}_n", g], [f"{y}_g"]),
                helper.make_node("Add", [f"{y}_g", b], [y])]

    nodes = [
        *norm("x", "g1", "b1", "n1"),
        helper.make_node("MatMul", ["n1", "wqkv"], ["qkv0"]), helper.make_node("Add", ["qkv0", "bqkv"], ["qkv"]),
        helper.make_node("Reshape", ["qkv", "qkv_shape"], ["qkv5"]),
        helper.make_node("Transpose", ["qkv5"], ["heads"], perm=[2, 0, 3, 1, 4]),
        helper.make_node("Gather", ["heads", "iq"], ["q"], axis=0),
        helper.make_node("Gather", ["heads", "ik"], ["k"], axis=0),
        helper.make_node("Gather", ["heads", "iv"], ["v"], axis=0),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]), helper.make_node("Div", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1 if opset >= 13 else 3),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "merge"], ["ctx_m"]),
        helper.make_node("MatMul", ["ctx_m", "wo"], ["o0"]), helper.make_node("Add", ["o0", "bo"], ["o"]),
        helper.make_node("Add", ["x", "o"], ["r1"]),
        *norm("r1", "g2", "b2", "n2"),
        helper.make_node("MatMul", ["n2", "w1"], ["f0"]), helper.make_node("Add", ["f0", "bf1"], ["f1"]),
        helper.make_node("Relu", ["f1"], ["f2"]),
        helper.make_node("MatMul", ["f2", "w2"], ["f3"]), helper.make_node("Add", ["f3", "bf2"], ["f4"]),
        helper.make_node("Add", ["r1", "f4"], ["r2"]),
        *norm("r2", "g3", "b3", "n3"),
        helper.make_node("Gather", ["n3", "cls"], ["tok"], axis=1),
    ]
    outputs = [vi("tok", [batch, len(np.atleast_1d(index)), D])]
    if np.ndim(index) == 0:
        nodes.append(helper.make_node("Gemm", ["tok", "head", "hb"], ["logits"], transB=1))
        outputs = [vi("logits", [batch, 3])]
    if also_output:
        outputs.append(vi("n3", [batch, seq, D]))
    return make_model(nodes, [vi("x", [batch, seq, D])], outputs, inits, opset=opset, check=False)


def _dims(model: onnx.ModelProto, name: str) -> list[int | str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    for v in list(inferred.graph.value_info) + list(inferred.graph.output):
        if v.name == name:
            return [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
    raise AssertionError(f"{name} not typed")


def _matmul_macs(model: onnx.ModelProto) -> int:
    """MACs of every MatMul, from the shapes onnx infers on the rewritten graph."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    total = 0
    for n in model.graph.node:
        if n.op_type == "MatMul":
            a, b = shapes[n.input[0]], shapes[n.input[1]]
            total += int(np.prod(a)) * b[-1]
    return total


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_the_cls_token_of_a_vit_block_is_computed_alone(opset: int) -> None:
    model = vit_tail(opset=opset, decomposed_norm=opset < 17)
    out, stats = run_pass(model, PASS)
    assert stats["narrowed"] == 1
    assert_equivalent(model, out, atol=1e-5, rtol=1e-5)
    # the MLP and the output projection see one token; Q too, K and V all of them
    mlp = next(n for n in out.graph.node if n.op_type == "MatMul" and n.input[1] == "w1")
    assert _dims(out, mlp.output[0]) == [B, 1, F]
    kv = [n for n in out.graph.node if n.op_type == "MatMul" and n.input[1] == "wqkv"]
    assert len(kv) == 1
    assert _dims(out, kv[0].output[0]) == [B, S, 3 * D]
    # by hand: QKV on every token, everything else on one
    d = D // H
    before = B * S * D * 3 * D + 2 * B * H * S * S * d + B * S * D * D + 2 * B * S * D * F
    after = B * S * D * 3 * D + 2 * B * H * 1 * S * d + B * 1 * D * D + 2 * B * 1 * D * F
    assert _matmul_macs(model) == before
    assert _matmul_macs(out) == after
    hist = op_histogram(out)
    assert hist["Squeeze"] == 1  # the scalar index keeps the axis until the end
    assert hist["MatMul"] == op_histogram(model)["MatMul"]


@pytest.mark.parametrize("index", [[0, 3], [-1], -2])
def test_a_list_or_negative_index(index: int | list[int]) -> None:
    model = vit_tail(index=index)
    out, stats = run_pass(model, PASS)
    assert stats["narrowed"] == 1
    assert_equivalent(model, out, atol=1e-5, rtol=1e-5)
    mlp = next(n for n in out.graph.node if n.op_type == "MatMul" and n.input[1] == "w1")
    assert _dims(out, mlp.output[0]) == [B, len(np.atleast_1d(index)), F]


def test_dynamic_batch_and_sequence() -> None:
    model = vit_tail(seq="seq", batch="batch")
    out, stats = run_pass(model, PASS)
    assert stats["narrowed"] == 1
    for seq in (3, 7):
        assert_equivalent(model, out, atol=1e-5, rtol=1e-5, shapes={"x": [2, seq, D]})


def test_rows_also_read_as_a_graph_output_are_left_alone() -> None:
    model = vit_tail(also_output=True)  # the final LayerNorm's output is also a graph output
    out, stats = run_pass(model, PASS)
    assert "narrowed" not in stats
    assert op_histogram(out) == op_histogram(model)
    assert_equivalent(model, out)


def test_a_column_select_after_matmul_is_not_row_wise() -> None:
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"]),
                        helper.make_node("Gather", ["y", "i"], ["z"], axis=2)],
                       [vi("x", [2, 5, 4])], [vi("z", [2, 5])],
                       {"w": _w(4, 6), "i": np.array(1, np.int64)})
    out, stats = run_pass(model, PASS)
    assert stats == {"skipped:no-gain": 1}
    assert op_histogram(out) == op_histogram(model)


def test_a_softmax_over_the_selected_axis_stops_the_walk() -> None:
    """Softmax over the tokens mixes them: the Gather stays below it, the Relu above is narrowed."""
    model = make_model([helper.make_node("Relu", ["x"], ["r"]),
                        helper.make_node("Softmax", ["r"], ["s"], axis=1),
                        helper.make_node("Gather", ["s", "i"], ["z"], axis=1)],
                       [vi("x", [2, 5, 4])], [vi("z", [2, 4])], {"i": np.array(0, np.int64)})
    out, stats = run_pass(model, PASS)
    assert stats == {"skipped:no-gain": 1}
    assert_equivalent(model, out)


def test_a_shared_residual_is_selected_where_it_is_read() -> None:
    """h feeds the kept path and another output: it is computed whole, and a Gather reads it."""
    model = make_model([helper.make_node("Relu", ["x"], ["h"]),
                        helper.make_node("MatMul", ["h", "w"], ["m"]),
                        helper.make_node("Add", ["m", "h"], ["a"]),
                        helper.make_node("Gather", ["a", "i"], ["z"], axis=1),
                        helper.make_node("ReduceSum", ["h"], ["total"], keepdims=0)],
                       [vi("x", [2, 5, 4])], [vi("z", [2, 4]), vi("total", [])],
                       {"w": _w(4, 4), "i": np.array(3, np.int64)}, opset=11)
    out, stats = run_pass(model, PASS)
    assert stats == {"narrowed": 1, "nodes-narrowed": 2}
    assert_equivalent(model, out)
    hist = op_histogram(out)
    assert (hist["Gather"], hist["Squeeze"], hist["Relu"]) == (1, 1, 1)
    mm = next(n for n in out.graph.node if n.op_type == "MatMul")
    assert _dims(out, mm.output[0]) == [2, 1, 4]


def test_inside_an_if_branch() -> None:
    def branch(tag: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], [f"m{tag}"]), helper.make_node("Tanh", [f"m{tag}"], [f"t{tag}"]),
             helper.make_node("Gather", [f"t{tag}", "i"], [f"o{tag}"], axis=1)],
            tag, [], [vi(f"o{tag}", [2, 6])])

    model = make_model([helper.make_node("If", ["c"], ["y"], then_branch=branch("a"), else_branch=branch("b"))],
                       [vi("c", [], onnx.TensorProto.BOOL), vi("x", [2, 5, 4])], [vi("y", [2, 6])],
                       {"w": _w(4, 6), "i": np.array(2, np.int64)})
    out, stats = run_pass(model, PASS)
    assert stats["narrowed"] == 2
    for c in (True, False):
        assert_equivalent(model, out, feeds=[{"c": np.array(c), "x": _w(2, 5, 4)}])


def _random_chain(seed: int) -> tuple[onnx.ModelProto, int]:
    """x [2, 6, 5] through 6 random ops (row-wise along some axes, not others), then a Gather of
    a random index on a random axis: the pass must keep the outputs, whatever it narrows."""
    r = np.random.default_rng(seed)
    nodes, inits, cur, dims = [], {}, "x", [2, 6, 5]
    for i in range(6):
        kind = r.choice(["unary", "add_row", "add_col", "matmul", "transpose", "softmax", "norm", "reduce"])
        out = f"t{i}"
        if kind == "unary":
            nodes.append(helper.make_node(str(r.choice(["Relu", "Tanh", "Sigmoid", "Neg"])), [cur], [out]))
        elif kind == "add_row":  # a constant broadcast along the last axis
            inits[f"c{i}"] = _w(dims[-1])
            nodes.append(helper.make_node("Mul", [cur, f"c{i}"], [out]))
        elif kind == "add_col":  # a constant with the middle axis whole, broadcast elsewhere
            inits[f"c{i}"] = _w(1, dims[1], 1)
            nodes.append(helper.make_node("Add", [cur, f"c{i}"], [out]))
        elif kind == "matmul":
            inits[f"w{i}"] = _w(dims[-1], 4)
            nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [out]))
            dims = dims[:-1] + [4]
        elif kind == "transpose":
            perm = [int(p) for p in r.permutation(3)]
            nodes.append(helper.make_node("Transpose", [cur], [out], perm=perm))
            dims = [dims[p] for p in perm]
        elif kind == "softmax":
            nodes.append(helper.make_node("Softmax", [cur], [out], axis=int(r.integers(0, 3))))
        elif kind == "norm":
            inits[f"g{i}"], inits[f"b{i}"] = _w(dims[-1]), _w(dims[-1])
            nodes.append(helper.make_node("LayerNormalization", [cur, f"g{i}", f"b{i}"], [out], axis=-1))
        else:
            nodes.append(helper.make_node("ReduceSum", [cur, f"ax{i}"], [out], keepdims=1))
            inits[f"ax{i}"] = np.array([int(r.integers(0, 3))], np.int64)
            dims = [1 if a == int(inits[f"ax{i}"][0]) else d for a, d in enumerate(dims)]
        cur = out
    axis = int(r.integers(0, 3))
    index = int(r.integers(-dims[axis], dims[axis]))
    inits["idx"] = np.array(index, np.int64)
    nodes.append(helper.make_node("Gather", [cur, "idx"], ["y"], axis=axis))
    out_dims = [d for a, d in enumerate(dims) if a != axis]
    return make_model(nodes, [vi("x", [2, 6, 5])], [vi("y", out_dims)], inits), axis


@pytest.mark.parametrize("seed", range(40))
def test_random_chains_keep_their_outputs(seed: int) -> None:
    model, _ = _random_chain(seed)
    out, _ = run_pass(model, PASS)
    assert_equivalent(model, out, atol=1e-5, rtol=1e-5)


def test_random_chains_are_narrowed_often() -> None:
    """The random chains above are no vacuous check: most of them are narrowed."""
    narrowed = sum(run_pass(_random_chain(seed)[0], PASS)[1].get("narrowed", 0) for seed in range(40))
    assert narrowed >= 15


@pytest.mark.parametrize(("starts", "ends", "steps", "rows"), [
    ([0], [1], [1], 1),  # x[:, :1]
    ([-1], [2**63 - 1], [1], 1),  # x[:, -1:]
    ([1], [5], [2], 2),  # x[:, 1:5:2]
])
def test_a_slice_of_the_tokens_is_a_root_too(starts: list[int], ends: list[int], steps: list[int], rows: int) -> None:
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["r"]),
                        helper.make_node("Slice", ["r", "st", "en", "ax", "sp"], ["y"])],
                       [vi("x", [2, 5, 4])], [vi("y", [2, rows, 6])],
                       {"w": _w(4, 6), "st": np.array(starts, np.int64), "en": np.array(ends, np.int64),
                        "ax": np.array([1], np.int64), "sp": np.array(steps, np.int64)})
    out, stats = run_pass(model, PASS)
    assert stats == {"narrowed": 1, "nodes-narrowed": 2}
    assert "Slice" not in op_histogram(out)
    mm = next(n for n in out.graph.node if n.op_type == "MatMul")
    assert _dims(out, mm.output[0]) == [2, rows, 6]
    assert_equivalent(model, out)


def test_a_second_run_changes_nothing() -> None:
    """After the first run the query's select reads a Gather of the shared heads: narrowing it
    again would only move Gathers around (it did, once per fixpoint iteration, 3 nodes each)."""
    once, _ = run_pass(vit_tail(), PASS)
    twice, stats = run_pass(once, PASS)
    assert "narrowed" not in stats
    assert op_histogram(twice) == op_histogram(once)


def test_a_gather_of_shape_dims_is_no_root() -> None:
    """Exporters take dims with Shape + Gather: nothing to narrow there, and nothing to report."""
    model = make_model([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "i"], ["d"], axis=0),
                        helper.make_node("Relu", ["x"], ["y"])],
                       [vi("x", [2, 5, 4])], [vi("d", []), vi("y", [2, 5, 4])], {"i": np.array(1, np.int64)})
    out, stats = run_pass(model, PASS)
    assert stats == {}
    assert op_histogram(out) == op_histogram(model)
