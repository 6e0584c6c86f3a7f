from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt import optimize
from onnxopt.testing import assert_declined, assert_equivalent, make_model, op_histogram, run_pass, vi

PASS = "fuse-pad"
I64 = np.int64


def pad_then(
    reader: str,
    pads: list[int],
    x_shape: list[int | str] | None = None,
    opset: int = 17,
    value: float | None = None,
    mode: str | None = None,
    reader_attrs: dict | None = None,
    axes: list[int] | None = None,
    extra_outputs: tuple[str, ...] = (),
) -> onnx.ModelProto:
    """x -> Pad -> p -> reader -> y (a Conv 4 -> 5 channels with a 3x3..x3 kernel, or a pool)."""
    x_shape = x_shape or [2, 4, 7, 6]
    rank = len(x_shape)
    inits: dict[str, np.ndarray] = {}
    pad_attrs: dict = {} if mode is None else {"mode": mode}
    pad_inputs = ["x"]
    if opset < 11:
        pad_attrs["pads"] = pads
        if value is not None:
            pad_attrs["value"] = value
    else:
        inits["pads"] = np.array(pads, I64)
        pad_inputs.append("pads")
        if value is not None:
            inits["v"] = np.array(value, np.float32)
        pad_inputs.append("v" if value is not None else "")
        if axes is not None:
            inits["axes"] = np.array(axes, I64)
            pad_inputs.append("axes")
    nodes = [helper.make_node("Pad", pad_inputs, ["p"], **pad_attrs)]
    attrs = dict(reader_attrs or {})
    if reader == "Conv":
        inits["W"] = np.random.default_rng(0).standard_normal((5, 4) + (3,) * (rank - 2)).astype(np.float32)
        inits["B"] = np.linspace(-1, 1, 5).astype(np.float32)
        nodes.append(helper.make_node("Conv", ["p", "W", "B"], ["y"], **attrs))
    else:
        attrs.setdefault("kernel_shape", [3] * (rank - 2))
        nodes.append(helper.make_node(reader, ["p"], ["y"], **attrs))
    outputs = [vi("y", None)] + [vi(n, None) for n in extra_outputs]
    model = make_model(nodes, [vi("x", x_shape)], outputs, inits, opset=opset, check=False)
    # the checker wants declared output shapes: take them from onnx's shape inference
    inferred = {v.name: v.type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    inferred.update({o.name: o.type for o in onnx.shape_inference.infer_shapes(model).graph.output})
    for o in model.graph.output:
        o.type.CopyFrom(inferred[o.name])
    return model


def _attr(model: onnx.ModelProto, op: str, name: str) -> object:
    node = next(n for n in model.graph.node if n.op_type == op)
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


NEG_FEEDS = [{"x": -np.abs(np.random.default_rng(2).standard_normal((2, 4, 7, 6))).astype(np.float32) - 1}]


@pytest.mark.parametrize("opset", [9, 11, 13, 18, 21])
def test_fuses_zero_pad_into_conv_across_opsets(opset: int) -> None:
    model = pad_then("Conv", [0, 0, 1, 2, 0, 0, 3, 0], opset=opset, reader_attrs={"pads": [1, 0, 0, 1]})
    out, stats = run_pass(model, PASS)
    assert op_histogram(out) == {"Conv": 1}
    assert stats == {"fused": 1}
    assert _attr(out, "Conv", "pads") == [2, 2, 3, 1]  # Conv [h0, w0, h1, w1] + Pad's spatial part
    assert_equivalent(model, out)


@pytest.mark.parametrize(("x_shape", "pads"), [
    (["N", 4, 9], [0, 0, 2, 0, 0, 1]),
    (["N", 4, "H", "W"], [0, 0, 1, 1, 0, 0, 1, 1]),
    ([1, 4, 5, 5, 5], [0, 0, 1, 0, 2, 0, 0, 1, 0, 0]),
])
def test_fuses_conv_of_any_rank_with_dynamic_dims(x_shape: list, pads: list[int]) -> None:
    model = pad_then("Conv", pads, x_shape=x_shape, reader_attrs={"strides": [2] * (len(x_shape) - 2)})
    out, stats = run_pass(model, PASS)
    assert op_histogram(out) == {"Conv": 1}
    assert stats == {"fused": 1}
    concrete = [3 if isinstance(d, str) and d == "N" else 8 if isinstance(d, str) else d for d in x_shape]
    assert_equivalent(model, out, shapes={"x": concrete})


def test_fuses_opset18_axes_and_valid_auto_pad() -> None:
    model = pad_then("Conv", [1, 2, 1, 0], opset=18, axes=[-1, 2], reader_attrs={"auto_pad": "VALID"})
    out, stats = run_pass(model, PASS)
    assert stats == {"fused": 1}
    assert _attr(out, "Conv", "pads") == [2, 1, 0, 1]  # axes [-1, 2]: w +1/+1, h +2/+0
    assert_equivalent(model, out)


@pytest.mark.parametrize("cip", [0, 1])
def test_fuses_into_average_pool_counting_padded_zeros(cip: int) -> None:
    own = [1, 0, 0, 1] if cip else [0, 0, 0, 0]
    model = pad_then("AveragePool", [0, 0, 1, 0, 0, 0, 1, 1],
                     reader_attrs={"pads": own, "count_include_pad": cip})
    out, stats = run_pass(model, PASS)
    assert op_histogram(out) == {"AveragePool": 1}
    assert stats == {"fused": 1}
    assert _attr(out, "AveragePool", "count_include_pad") == 1
    assert_equivalent(model, out)


def test_fuses_negative_infinity_pad_into_max_pool() -> None:
    model = pad_then("MaxPool", [0, 0, 1, 1, 0, 0, 1, 1], value=-np.inf, reader_attrs={"strides": [2, 2]})
    out, stats = run_pass(model, PASS)
    assert op_histogram(out) == {"MaxPool": 1}
    assert stats == {"fused": 1}
    assert_equivalent(model, out, feeds=NEG_FEEDS)


# ---- declines ----------------------------------------------------------------------------------

def test_declines_zero_pad_into_max_pool_which_would_change_negative_windows() -> None:
    model = pad_then("MaxPool", [0, 0, 1, 1, 0, 0, 1, 1])
    assert_declined(model, PASS, "pad-value")
    # the oracle: a fused MaxPool (implicit -inf pads) would differ on all-negative inputs
    fused = pad_then("MaxPool", [0, 0, 0, 0, 0, 0, 0, 0], reader_attrs={"pads": [1, 1, 1, 1]})
    from onnxopt.testing import run_model
    a, b = run_model(model, NEG_FEEDS)[0][0], run_model(fused, NEG_FEEDS)[0][0]
    assert not np.allclose(a, b)


def test_declines_average_pool_that_excludes_its_own_pads() -> None:
    model = pad_then("AveragePool", [0, 0, 1, 1, 0, 0, 1, 1],
                     reader_attrs={"pads": [1, 1, 1, 1], "count_include_pad": 0})
    assert_declined(model, PASS, "count-include-pad")


@pytest.mark.parametrize(("kw", "reason"), [
    ({"mode": "reflect"}, "mode"),
    ({"mode": "edge"}, "mode"),
    ({"value": 1.0}, "pad-value"),
    ({"pads": [0, 0, -1, 0, 0, 0, 0, 0]}, "negative-pads"),
    ({"pads": [0, 1, 0, 0, 0, 0, 0, 0]}, "non-spatial"),
    ({"pads": [1, 0, 0, 0, 0, 0, 0, 0]}, "non-spatial"),
    ({"reader_attrs": {"auto_pad": "SAME_UPPER"}}, "auto-pad"),
])
def test_declines_conv_cases(kw: dict, reason: str) -> None:
    pads = kw.pop("pads", [0, 0, 1, 1, 0, 0, 1, 1])
    assert_declined(pad_then("Conv", pads, **kw), PASS, reason)


def test_declines_pool_pads_reaching_the_kernel() -> None:
    model = pad_then("AveragePool", [0, 0, 2, 1, 0, 0, 1, 1], reader_attrs={"pads": [1, 0, 0, 0],
                                                                             "count_include_pad": 1})
    assert_declined(model, PASS, "pad-exceeds-kernel")


def test_declines_pool_ceil_mode_and_read_indices() -> None:
    model = pad_then("AveragePool", [0, 0, 1, 1, 0, 0, 1, 1], reader_attrs={"ceil_mode": 1})
    assert_declined(model, PASS, "ceil-mode")
    model = pad_then("MaxPool", [0, 0, 1, 1, 0, 0, 1, 1], value=-np.inf)
    model.graph.node[-1].output.append("idx")
    model.graph.output.append(vi("idx", None, TensorProto.INT64))
    assert_declined(model, PASS, "indices")


def test_declines_non_constant_pads() -> None:
    model = pad_then("Conv", [0, 0, 1, 1, 0, 0, 1, 1])
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "pads"))
    model.graph.input.append(vi("pads", [8], TensorProto.INT64))
    assert_declined(model, PASS, "non-constant")


def test_declines_shared_pad_output_and_graph_output() -> None:
    model = pad_then("Conv", [0, 0, 1, 1, 0, 0, 1, 1])
    model.graph.node.append(helper.make_node("Relu", ["p"], ["r"]))
    model.graph.output.append(vi("r", None))
    assert_declined(model, PASS, "pad-output-shared")
    model = pad_then("Conv", [0, 0, 1, 1, 0, 0, 1, 1], extra_outputs=("p",))
    assert_declined(model, PASS, "graph-output")


def test_no_change_and_idempotent() -> None:
    model = pad_then("Conv", [0, 0, 1, 1, 0, 0, 1, 1])
    once, _ = run_pass(model, PASS)
    _, report = optimize(once, passes=[PASS])
    assert report.records[-1].changed is False
    assert report.stats(PASS) == {}
