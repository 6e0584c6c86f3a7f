from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxopt import optimize
from onnxopt.testing import assert_declined, assert_equivalent, make_model, op_histogram, vi

PASS = "fold-reshape-target"
I64 = np.int64


def flatten(x_shape: list, parts: str, opset: int = 17, allowzero: int | None = None, other: bool = False,
            tail: list[int] | None = None) -> onnx.ModelProto:
    """x -> Relu -> r -> Reshape(r, Concat(<batch from Shape>, tail)) -> y, as the exporters write it.

    ``parts``: "slice" (Slice(Shape(r), 0, 1)), "gather" (Unsqueeze(Gather(Shape(r), 0))),
    "shape15" (Shape(r, start=0, end=1)), "two" (dims 0 and 1 gathered, tail [-1]).
    ``other``: take the shape of x (same symbolic batch) instead of r.
    """
    tail = tail if tail is not None else [-1]
    src = "x" if other else "r"
    inits: dict[str, np.ndarray] = {"tail": np.array(tail, I64)}
    nodes = [helper.make_node("Relu", ["x"], ["r"])]
    if parts == "shape15":
        nodes.append(helper.make_node("Shape", [src], ["lead"], start=0, end=1))
    else:
        nodes.append(helper.make_node("Shape", [src], ["s"]))
    if parts == "slice":
        if opset >= 10:
            inits.update(st=np.array([0], I64), en=np.array([1], I64))
            nodes.append(helper.make_node("Slice", ["s", "st", "en"], ["lead"]))
        else:
            nodes.append(helper.make_node("Slice", ["s"], ["lead"], starts=[0], ends=[1]))
    elif parts in ("gather", "two"):
        for k in range(2 if parts == "two" else 1):
            inits[f"i{k}"] = np.array(k, I64)
            nodes.append(helper.make_node("Gather", ["s", f"i{k}"], [f"g{k}"], axis=0))
            if opset >= 13:
                inits[f"ax{k}"] = np.array([0], I64)
                nodes.append(helper.make_node("Unsqueeze", [f"g{k}", f"ax{k}"], [f"u{k}"]))
            else:
                nodes.append(helper.make_node("Unsqueeze", [f"g{k}"], [f"u{k}"], axes=[0]))
    lead = ["u0", "u1"] if parts == "two" else ["u0"] if parts == "gather" else ["lead"]
    nodes.append(helper.make_node("Concat", [*lead, "tail"], ["t"], axis=0))
    attrs = {} if allowzero is None else {"allowzero": allowzero}
    nodes.append(helper.make_node("Reshape", ["r", "t"], ["y"], **attrs))
    out_rank = len(lead) if parts == "two" else 1
    return make_model(nodes, [vi("x", x_shape)], [vi("y", [None] * (out_rank + len(tail)))], inits,
                      opset=opset)


def _run(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    out, report = optimize(model, passes=[PASS, "eliminate-dead-code"])
    return out, report.stats(PASS)


def _target(model: onnx.ModelProto) -> list[int]:
    reshape = next(n for n in model.graph.node if n.op_type == "Reshape")
    init = next(t for t in model.graph.initializer if t.name == reshape.input[1])
    return onnx.numpy_helper.to_array(init).tolist()


SHAPES = {"x": [3, 4, 5]}


@pytest.mark.parametrize(("parts", "opset"), [
    ("slice", 9), ("slice", 13), ("gather", 11), ("gather", 13), ("shape15", 15), ("slice", 21),
])
def test_flatten_with_dynamic_batch_becomes_a_constant_target(parts: str, opset: int) -> None:
    model = flatten(["N", 4, 5], parts, opset=opset)
    out, stats = _run(model)
    assert op_histogram(out) == {"Relu": 1, "Reshape": 1}
    assert stats == {"folded": 1}
    assert _target(out) == [0, -1]
    assert_equivalent(model, out, shapes=SHAPES)
    assert_equivalent(model, out, shapes={"x": [1, 4, 5]})


def test_two_dynamic_dims_copy_both() -> None:
    model = flatten(["N", "S", 6], "two", tail=[2, 3])
    out, stats = _run(model)
    assert stats == {"folded": 1}
    assert _target(out) == [0, 0, 2, 3]
    assert_equivalent(model, out, shapes={"x": [2, 5, 6]})


def test_shape_of_another_tensor_with_the_same_symbol() -> None:
    model = flatten(["N", 4, 5], "slice", other=True)
    out, stats = _run(model)
    assert stats == {"folded": 1}
    assert _target(out) == [0, -1]
    assert_equivalent(model, out, shapes=SHAPES)


def test_static_dims_become_numbers_and_one_unknown_becomes_minus_one() -> None:
    model = flatten([2, 4, 5], "slice", tail=[20])
    out, stats = _run(model)
    assert stats == {"folded": 1}
    assert _target(out) == [2, 20]
    assert_equivalent(model, out)


def test_allowzero_keeps_its_meaning() -> None:
    # allowzero=1 and no literal 0: the copy needs allowzero=0, which reads the target the same way
    model = flatten(["N", 4, 5], "gather", opset=14, allowzero=1)
    out, stats = _run(model)
    assert stats == {"folded": 1}
    node = next(n for n in out.graph.node if n.op_type == "Reshape")
    assert {a.name: a.i for a in node.attribute}.get("allowzero", 0) == 0
    assert_equivalent(model, out, shapes=SHAPES)


def test_allowzero_with_a_literal_zero_declines() -> None:
    # a copy (0) would turn the literal 0 into "copy" too, and -1 is undefined on zero elements
    model = flatten(["N", 0, 5], "gather", opset=14, allowzero=1, tail=[0, 5])
    assert_declined(model, PASS, "dynamic", spec=PASS)


def test_minus_one_is_never_put_beside_a_copied_dim() -> None:
    """[N (copied), S (unknown), 6] -> [0, -1, 6] would fail on N = 0, where the original runs."""
    model = flatten(["N", "S", 6], "two", tail=[6])
    for n in model.graph.node:
        if n.op_type == "Gather" and n.input[1] == "i1":
            n.input[0] = "s_other"
    model.graph.node.insert(1, helper.make_node("Shape", ["z"], ["s_other"]))
    model.graph.input.append(vi("z", ["A", "B"]))
    assert_declined(model, PASS, "dynamic")


def test_declines_two_unknown_dims() -> None:
    model = flatten(["N", "S", 6], "two", tail=[6])
    for n in model.graph.node:
        if n.op_type == "Shape":
            n.input[0] = "z"  # dims of another tensor with other symbols
    model.graph.input.append(vi("z", ["A", "B"]))
    assert_declined(model, PASS, "dynamic")


def test_leaves_constant_targets_alone() -> None:
    model = flatten([2, 4, 5], "slice")
    out, _ = _run(model)
    _, report = optimize(out, passes=[PASS])
    assert report.stats(PASS) == {}
    assert report.records[-1].changed is False


def test_in_level_1() -> None:
    model = flatten(["N", 4, 5], "gather", opset=13)
    out, _ = optimize(model, level=1)
    assert op_histogram(out) == {"Relu": 1, "Reshape": 1}
    assert_equivalent(model, out, shapes=SHAPES)
