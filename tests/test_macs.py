"""MAC counts (``onnxopt.bench.estimate_macs``) against counts worked out by hand in each test."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.bench import estimate_macs, macs_per_node

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits, opsets=(("", 17),)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])


def _w(name: str, shape: tuple[int, ...], seed: int = 0) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def test_grouped_conv_and_3d_matmul_and_gemm_trans_a() -> None:
    # Conv 8 -> 16 channels, 3x3, group 2, on 10x10 (pad 1): out 16*10*10, each sums 4 in-channels * 9
    # MatMul [2, 5, 16] @ [16, 7]: 2*5*7 outputs of 16 products; Gemm transA: A [16, 2] -> K = 16
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", group=2, kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("MatMul", ["s", "m"], ["y"], name="mm"),
        helper.make_node("Gemm", ["a", "g"], ["z"], name="gemm", transA=1),
    ]
    m = _model(nodes,
               [helper.make_tensor_value_info("x", F, ["batch", 8, "h", "w"]),
                helper.make_tensor_value_info("s", F, [2, 5, 16]),
                helper.make_tensor_value_info("a", F, [16, 2])],
               [helper.make_tensor_value_info(n, F, None) for n in ("c", "y", "z")],
               [_w("w", (16, 4, 3, 3)), _w("m", (16, 7)), _w("g", (16, 3))])
    per = macs_per_node(m, {"x": (1, 8, 10, 10)})
    assert per == {"conv": 16 * 10 * 10 * 4 * 9, "mm": 2 * 5 * 7 * 16, "gemm": 2 * 3 * 16}
    assert estimate_macs(m, {"x": (3, 8, 10, 10)}) == 3 * 16 * 10 * 10 * 36 + 2 * 5 * 7 * 16 + 2 * 3 * 16


def _attention_model() -> onnx.ModelProto:
    # com.microsoft Attention: x [B, S, 32] @ packed [32, 96] (+ bias), 4 heads of 8; then a FusedGemm
    b_, h = 32, 96
    nodes = [
        helper.make_node("Attention", ["x", "wqkv", "bqkv"], ["att"], name="attn", domain="com.microsoft",
                         num_heads=4),
        helper.make_node("Reshape", ["att", "flat"], ["att2"], name="flatten"),
        helper.make_node("FusedGemm", ["att2", "wo"], ["y"], name="fgemm", domain="com.microsoft",
                         activation="Relu"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["batch", "seq", b_])],
                  [helper.make_tensor_value_info("y", F, None)],
                  [_w("wqkv", (b_, h), 1), _w("bqkv", (h,), 2), _w("wo", (b_, 24), 3),
                   numpy_helper.from_array(np.array([-1, b_], np.int64), "flat")],
                  opsets=(("", 17), ("com.microsoft", 1)))


def test_contrib_attention_and_fused_gemm_are_sized() -> None:
    m = _attention_model()
    # the model is real: onnxruntime runs it at the shape the count uses
    x = np.random.default_rng(0).standard_normal((2, 6, 32)).astype(np.float32)
    out = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert out.shape == (12, 24)
    per = macs_per_node(m, {"x": (2, 6, 32)})
    # projection 2*6*32*96; scores B*S*S*Wq = 2*6*6*32; weighted sum B*S*S*Wv = 2*6*6*32
    assert per["attn"] == 2 * 6 * 32 * 96 + 2 * 6 * 6 * 32 * 2
    # FusedGemm [12, 32] @ [32, 24]
    assert per["fgemm"] == 12 * 24 * 32


def test_contrib_multihead_attention_counts_scores_and_sum() -> None:
    # MultiHeadAttention on projected q [B, S, 16], k/v [B, L, 16]: scores B*S*L*16, weighted sum B*S*L*16
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], name="mha", domain="com.microsoft",
                            num_heads=2)
    m = _model([node], [helper.make_tensor_value_info(n, F, ["b", s, 16]) for n, s in
                        (("q", "s"), ("k", "l"), ("v", "l"))],
               [helper.make_tensor_value_info("o", F, None)], [], opsets=(("", 17), ("com.microsoft", 1)))
    assert macs_per_node(m, {"q": (1, 5, 16), "k": (1, 7, 16), "v": (1, 7, 16)}) == {"mha": 2 * 5 * 7 * 16}


@pytest.mark.parametrize("shapes", [{}, {"x": (2, 6)}])
def test_unsized_attention_is_left_out_not_guessed(shapes: dict) -> None:
    # no pinned shape (or a wrong rank): the attention cannot be sized and is not counted
    assert "attn" not in macs_per_node(_attention_model(), shapes)


def test_exported_value_info_naming_input_dims_takes_the_pinned_sizes() -> None:
    # exporters write value_info with the inputs' dim names. Where inference cannot derive a value
    # (an Expand to a shape given at run time, as masks are built), the written ['batch', 8] fills in;
    # an Add with the pinned [1, 8] broadcasts to 'batch', and a Reshape that copies dim 0 keeps it:
    # the MatMul after it is sized only if 'batch' reads as the pinned 1. [1, 2, 4] @ [4, 3]: 6 x 4.
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"),
             helper.make_node("Expand", ["one", "dims"], ["e"], name="expand"),
             helper.make_node("Add", ["h", "e"], ["s"], name="add"),
             helper.make_node("Reshape", ["s", "target"], ["r"], name="reshape"),
             helper.make_node("MatMul", ["r", "w"], ["y"], name="mm")]
    m = _model(nodes, [helper.make_tensor_value_info("x", F, ["batch", 8]),
                       helper.make_tensor_value_info("dims", TensorProto.INT64, [2])],
               [helper.make_tensor_value_info("y", F, ["batch", 2, 3])],
               [numpy_helper.from_array(np.array([0, 2, 4], np.int64), "target"), _w("w", (4, 3)),
                numpy_helper.from_array(np.ones(1, np.float32), "one")])
    m.graph.value_info.append(helper.make_tensor_value_info("e", F, ["batch", 8]))
    feed = {"x": np.ones((1, 8), np.float32), "dims": np.array([1, 8], np.int64)}
    assert ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feed)[0].shape == (1, 2, 3)
    assert macs_per_node(m, {"x": (1, 8), "dims": (2,)}) == {"mm": 1 * 2 * 3 * 4}


def test_negative_dims_in_value_info_are_unknown_not_sizes() -> None:
    # Paddle2ONNX writes -1 for dynamic dims, and its value_info keeps them: [-1, 8] must not
    # stop inference from sizing the MatMul at the pinned batch (3 x 4 outputs of 8 products)
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"), helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")]
    m = _model(nodes, [helper.make_tensor_value_info("x", F, [-1, 8])], [helper.make_tensor_value_info("y", F, [-1, 4])],
               [_w("w", (8, 4))])
    m.graph.value_info.append(helper.make_tensor_value_info("h", F, [-1, 8]))
    assert macs_per_node(m, {"x": (3, 8)}) == {"mm": 3 * 4 * 8}


def test_a_conv_after_pads_computed_through_casts_is_sized() -> None:
    """open-nsfw's pattern: Pad's pads are a constant passed through Cast, Concat and Reshape, where
    onnx's data propagation stops; onnxruntime's symbolic inference sizes the Conv after it."""
    pads = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int32), "pads32")
    nodes = [helper.make_node("Cast", ["pads32"], ["pads_f"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["pads_f"], ["pads64"], to=TensorProto.INT64),
             helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]),
             helper.make_node("Pad", ["xt", "pads64"], ["xp"]),
             helper.make_node("Conv", ["xp", "w"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, ["batch", 8, 8, 3])],
                   [helper.make_tensor_value_info("y", F, None)], [pads, _w("w", (4, 3, 3, 3))])
    # by hand: [1, 4, 8, 8] outputs, each 3 * 3 * 3 multiply-adds
    assert estimate_macs(model, {"x": [1, 8, 8, 3]}) == 1 * 4 * 8 * 8 * 27
