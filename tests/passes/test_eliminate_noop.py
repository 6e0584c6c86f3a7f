from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt import optimize
from onnxopt.testing import assert_equivalent, make_model, op_histogram, tensor, vi

NAME = "eliminate-noop"
I64 = np.int64


def _wrap(noop: onnx.NodeProto, shape, opset: int, inits=(), extra_inputs=(), out_shape=None):
    """x -> noop -> t -> Relu -> y, so the no-op output is an ordinary intermediate."""
    return make_model(
        [noop, helper.make_node(_tail(opset), ["t"], ["y"])],
        [vi("x", shape), *extra_inputs],
        [vi("y", out_shape or shape)],
        list(inits),
        opset=opset,
    )


def _tail(opset: int) -> str:
    return "Relu" if opset >= 6 else "Identity"  # onnxruntime has no Relu-1


def _node(op: str, inputs: list[str], **attrs) -> onnx.NodeProto:
    return helper.make_node(op, ["x", *inputs], ["t"], **attrs)


NOOPS = [
    # (id, op, extra inputs, attrs, initializers, input shape, opset)
    ("cast-13", "Cast", [], {"to": TensorProto.FLOAT}, {}, [2, 3], 13),
    ("cast-21", "Cast", [], {"to": TensorProto.FLOAT}, {}, [2, 3], 21),
    ("castlike", "CastLike", ["like"], {}, {"like": np.zeros(1, np.float32)}, [2, 3], 15),
    ("reshape-static", "Reshape", ["s"], {}, {"s": np.array([2, 3, 4], I64)}, [2, 3, 4], 13),
    ("reshape-zero-copy", "Reshape", ["s"], {}, {"s": np.array([0, 3, -1], I64)}, ["N", 3, 4], 13),
    ("reshape-minus-one", "Reshape", ["s"], {}, {"s": np.array([-1, 3, 4], I64)}, ["N", 3, 4], 11),
    (
        "reshape-allowzero-0dim",
        "Reshape",
        ["s"],
        {"allowzero": 1},
        {"s": np.array([2, 3], I64)},
        [2, 3],
        14,
    ),
    ("transpose", "Transpose", [], {"perm": [0, 1, 2]}, {}, [2, 3, 4], 13),
    ("transpose-rank1", "Transpose", [], {}, {}, [5], 13),
    ("pad-2-attr", "Pad", [], {"pads": [0, 0, 0, 0]}, {}, [2, 3], 2),
    ("pad-11-input", "Pad", ["p"], {}, {"p": np.zeros(4, I64)}, [2, 3], 11),
    ("pad-13-reflect", "Pad", ["p"], {"mode": "reflect"}, {"p": np.zeros(4, I64)}, [2, 3], 13),
    (
        "pad-18-axes",
        "Pad",
        ["p", "", "ax"],
        {},
        {"p": np.zeros(2, I64), "ax": np.array([1], I64)},
        [2, 3],
        18,
    ),
    ("slice-9-attr", "Slice", [], {"starts": [0], "ends": [2**31 - 1], "axes": [1]}, {}, [2, 3], 9),
    (
        "slice-13-ends-dim",
        "Slice",
        ["st", "en"],
        {},
        {"st": np.array([0, 0], I64), "en": np.array([2, 3], I64)},
        [2, 3],
        13,
    ),
    (
        "slice-13-negative",
        "Slice",
        ["st", "en", "ax"],
        {},
        {"st": np.array([-3], I64), "en": np.array([2**63 - 1], I64), "ax": np.array([-1], I64)},
        ["N", 3],
        13,
    ),
    ("expand", "Expand", ["s"], {}, {"s": np.array([3, 1], I64)}, [2, 3, 4], 13),
    ("expand-dynamic-ones", "Expand", ["s"], {}, {"s": np.array([1, 1], I64)}, ["N", 3], 13),
    ("tile", "Tile", ["r"], {}, {"r": np.ones(2, I64)}, [2, 3], 13),
    ("squeeze-11", "Squeeze", [], {}, {}, [2, 3], 11),
    ("squeeze-13", "Squeeze", [], {}, {}, [2, 3], 13),
    ("flatten", "Flatten", [], {"axis": 1}, {}, [2, 3], 13),
    ("concat-single", "Concat", [], {"axis": 0}, {}, [2, 3], 13),
]


@pytest.mark.parametrize(
    ("op", "inputs", "attrs", "inits", "shape", "opset"),
    [c[1:] for c in NOOPS],
    ids=[c[0] for c in NOOPS],
)
def test_removes_noop(op, inputs, attrs, inits, shape, opset) -> None:
    model = _wrap(
        _node(op, inputs, **attrs), shape, opset, [tensor(k, v) for k, v in inits.items()]
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {_tail(opset): 1}
    assert report.stats(NAME) == {f"removed-{op.lower()}": 1}
    assert_equivalent(model, optimized, shapes={"x": [2 if d == "N" else d for d in shape]})


KEPT = [
    # not no-ops: kept silently
    ("cast-other-dtype", "Cast", [], {"to": TensorProto.DOUBLE}, {}, [2, 3], 13),
    (
        "reshape-allowzero",
        "Reshape",
        ["s"],
        {"allowzero": 1},
        {"s": np.array([0, 3], I64)},
        [2, 3],
        14,
    ),
    ("reshape-other", "Reshape", ["s"], {}, {"s": np.array([3, 2], I64)}, [2, 3], 13),
    ("transpose-swap", "Transpose", [], {"perm": [1, 0]}, {}, [2, 3], 13),
    ("pad-nonzero", "Pad", ["p"], {}, {"p": np.array([0, 1, 0, 0], I64)}, [2, 3], 13),
    ("pad-2-nonzero", "Pad", [], {"pads": [0, 1, 0, 0]}, {}, [2, 3], 2),
    (
        "slice-step",
        "Slice",
        ["st", "en", "ax", "sp"],
        {},
        {
            "st": np.array([0], I64),
            "en": np.array([3], I64),
            "ax": np.array([1], I64),
            "sp": np.array([2], I64),
        },
        [2, 3],
        13,
    ),
    (
        "slice-crop",
        "Slice",
        ["st", "en"],
        {},
        {"st": np.array([0], I64), "en": np.array([1], I64)},
        [2, 3],
        13,
    ),
    ("expand-grow", "Expand", ["s"], {}, {"s": np.array([2, 2, 3], I64)}, [2, 3], 13),
    ("squeeze-11-negative-axes", "Squeeze", [], {"axes": [-2]}, {}, [2, 1, 3], 11),
    ("squeeze-13-negative-axes", "Squeeze", ["a"], {}, {"a": np.array([-2], I64)}, [2, 1, 3], 13),
    ("squeeze-unit-dim", "Squeeze", [], {}, {}, [2, 1, 3], 13),
    ("flatten-rank3", "Flatten", [], {"axis": 1}, {}, [2, 3, 4], 13),
    ("tile-repeat", "Tile", ["r"], {}, {"r": np.array([1, 2], I64)}, [2, 3], 13),
]


@pytest.mark.parametrize(
    ("op", "inputs", "attrs", "inits", "shape", "opset"),
    [c[1:] for c in KEPT],
    ids=[c[0] for c in KEPT],
)
def test_keeps_real_computation(op, inputs, attrs, inits, shape, opset) -> None:
    model = _wrap(
        _node(op, inputs, **attrs), shape, opset, [tensor(k, v) for k, v in inits.items()]
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == op_histogram(model)
    assert report.stats(NAME) == {}
    assert not report.records[0].changed


DYNAMIC = [
    ("reshape", "Reshape", ["s"], {}, {"s": np.array([2, 3], I64)}, ["N", 3]),
    ("expand", "Expand", ["s"], {}, {"s": np.array([2, 3], I64)}, ["N", 3]),
    (
        "slice",
        "Slice",
        ["st", "en"],
        {},
        {"st": np.array([0], I64), "en": np.array([5], I64)},
        ["N", 3],
    ),
    ("squeeze", "Squeeze", [], {}, {}, ["N", 3]),
]


@pytest.mark.parametrize(
    ("op", "inputs", "attrs", "inits", "shape"),
    [c[1:] for c in DYNAMIC],
    ids=[c[0] for c in DYNAMIC],
)
def test_declines_dynamic_dims(op, inputs, attrs, inits, shape) -> None:
    model = _wrap(_node(op, inputs, **attrs), shape, 13, [tensor(k, v) for k, v in inits.items()])
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == op_histogram(model)
    assert report.stats(NAME) == {"skipped:unknown-shape": 1}


def test_declines_non_constant_shape() -> None:
    model = _wrap(
        _node("Reshape", ["s"]), [2, 3], 13, extra_inputs=[vi("s", [2], TensorProto.INT64)]
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Relu": 1, "Reshape": 1}
    assert report.stats(NAME) == {"skipped:non-constant": 1}


def test_declines_graph_input_to_graph_output() -> None:
    model = make_model(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Cast": 1}
    assert report.stats(NAME) == {"skipped:graph-output": 1}


def test_graph_output_keeps_its_name() -> None:
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Transpose", ["r"], ["y"], perm=[0, 1]),
            helper.make_node("Neg", ["r"], ["z"]),
        ],
        [vi("x", [2, 3])],
        [vi("y", [2, 3]), vi("z", [2, 3])],
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Neg": 1, "Relu": 1}
    assert report.stats(NAME) == {"removed-transpose": 1}
    assert [o.name for o in optimized.graph.output] == ["y", "z"]
    assert_equivalent(model, optimized)


def test_shared_consumers_all_rewired() -> None:
    model = make_model(
        [
            helper.make_node("Reshape", ["x", "s"], ["t"]),
            helper.make_node("Relu", ["t"], ["a"]),
            helper.make_node("Neg", ["t"], ["b"]),
        ],
        [vi("x", [2, 3])],
        [vi("a", [2, 3]), vi("b", [2, 3])],
        {"s": np.array([2, 3], I64)},
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Neg": 1, "Relu": 1}
    assert report.stats(NAME) == {"removed-reshape": 1}
    assert_equivalent(model, optimized)


def test_zero_pad_before_maxpool_removed_nonzero_kept() -> None:
    def model(pads):
        return make_model(
            [
                helper.make_node("Pad", ["x", "p"], ["t"]),
                helper.make_node("MaxPool", ["t"], ["y"], kernel_shape=[2, 2]),
            ],
            [vi("x", [1, 2, 4, 4])],
            [vi("y", [1, 2, None, None])],
            {"p": np.array(pads, I64)},
            opset=13,
        )

    zero = model([0] * 8)
    optimized, report = optimize(zero, passes=[NAME])
    assert op_histogram(optimized) == {"MaxPool": 1}
    assert report.stats(NAME) == {"removed-pad": 1}
    assert_equivalent(zero, optimized)
    padded = model([0, 0, 1, 1, 0, 0, 1, 1])
    optimized, report = optimize(padded, passes=[NAME])
    assert op_histogram(optimized) == {"MaxPool": 1, "Pad": 1}
    assert report.stats(NAME) == {}


def test_unknown_dtype_cast_declined() -> None:
    # the custom op's output has no inferred dtype
    model = make_model(
        [
            helper.make_node("Foo", ["x"], ["f"], domain="com.example"),
            helper.make_node("Cast", ["f"], ["y"], to=TensorProto.FLOAT),
        ],
        [vi("x", [2])],
        [vi("y", [2])],
        extra_opsets={"com.example": 1},
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"Cast": 1, "com.example::Foo": 1}
    assert report.stats(NAME) == {"skipped:unknown-dtype": 1}


def test_inside_if_branch_reading_outer_scope() -> None:
    def branch(name: str, op: str) -> onnx.GraphProto:
        return helper.make_graph(
            [
                helper.make_node("Transpose", ["x"], [f"{name}_t"], perm=[0, 1]),
                helper.make_node(op, [f"{name}_t"], [f"{name}_out"]),
            ],
            name,
            [],
            [vi(f"{name}_out", [2, 3])],
        )

    model = make_model(
        [
            helper.make_node(
                "If",
                ["c"],
                ["y"],
                then_branch=branch("then", "Relu"),
                else_branch=branch("else", "Neg"),
            )
        ],
        [vi("x", [2, 3]), vi("c", [], TensorProto.BOOL)],
        [vi("y", [2, 3])],
    )
    optimized, report = optimize(model, passes=[NAME])
    assert op_histogram(optimized) == {"If": 1, "Neg": 1, "Relu": 1}
    assert report.stats(NAME) == {"removed-transpose": 2}
    for c in (True, False):
        feeds = [{"x": np.arange(6, dtype=np.float32).reshape(2, 3) - 2, "c": np.array(c)}]
        assert_equivalent(model, optimized, feeds=feeds)


def test_custom_domain_left_alone() -> None:
    model = make_model(
        [helper.make_node("Transpose", ["x"], ["y"], perm=[0, 1], domain="com.example")],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
        extra_opsets={"com.example": 1},
    )
    _, report = optimize(model, passes=[NAME])
    assert report.stats(NAME) == {}


def test_idempotent() -> None:
    model = _wrap(_node("Transpose", [], perm=[0, 1]), [2, 3], 17)
    once, _ = optimize(model, passes=[NAME])
    twice, report = optimize(once, passes=[NAME])
    assert not report.records[0].changed
    assert report.stats(NAME) == {}
    assert op_histogram(twice) == {"Relu": 1}
