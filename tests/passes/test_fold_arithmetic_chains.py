from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt import optimize
from onnxopt.testing import (
    assert_declined,
    assert_equivalent,
    make_model,
    op_histogram,
    run_model,
    run_pass,
    vi,
)

PASS = "fold-arithmetic-chains"
F32 = TensorProto.FLOAT


def chain(
    ops: list[tuple[str, bool]],
    consts: list[np.ndarray],
    x_shape: list[int | str] | None = None,
    dtype: int = F32,
    opset: int = 17,
    extra_outputs: tuple[str, ...] = (),
    extra_consumer: bool = False,
) -> onnx.ModelProto:
    """x -> op0 -> t0 -> op1 -> t1 ... -> y; ``(op, constant_first)`` per step."""
    x_shape = x_shape or [2, 3, 4]
    nodes, prev = [], "x"
    for i, (op, constant_first) in enumerate(ops):
        out = "y" if i == len(ops) - 1 else f"t{i}"
        ins = [f"c{i}", prev] if constant_first else [prev, f"c{i}"]
        nodes.append(helper.make_node(op, ins, [out]))
        prev = out
    # the checker wants declared output shapes: the broadcast of x and the constants, a
    # symbolic dim of x kept (the constants here never have more dims than a dynamic x)
    static = np.broadcast_shapes(tuple(d if isinstance(d, int) else 1 for d in x_shape),
                                 *(c.shape for c in consts))
    shape = [d if isinstance(d, str) else b for d, b in zip(x_shape, static[-len(x_shape):], strict=True)]
    shape = list(static[:len(static) - len(x_shape)]) + shape
    outputs = [vi("y", shape, dtype)] + [vi(name, shape, dtype) for name in extra_outputs]
    if extra_consumer:
        nodes.append(helper.make_node("Neg", ["t0"], ["z"]))
        outputs.append(vi("z", shape, dtype))
    inits = {f"c{i}": c for i, c in enumerate(consts)}
    return make_model(nodes, [vi("x", x_shape, dtype)], outputs, inits, opset=opset)


def _const(model: onnx.ModelProto) -> np.ndarray:
    (init,) = model.graph.initializer
    return onnx.numpy_helper.to_array(init)


C4 = np.array([0.5, -2.0, 3.0, 0.25], np.float32)
C34 = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4) + 0.1


@pytest.mark.parametrize(("ops", "expected_op"), [
    ([("Add", False), ("Add", False)], "Add"),
    ([("Add", True), ("Add", True)], "Add"),
    ([("Sub", False), ("Add", False)], "Add"),
    ([("Add", False), ("Sub", False)], "Add"),
    ([("Sub", True), ("Add", False)], "Sub"),   # (c0 - x) + c1 = (c0 + c1) - x
    ([("Sub", True), ("Sub", True)], "Add"),    # c1 - (c0 - x) = x + (c1 - c0)
    ([("Mul", False), ("Mul", True)], "Mul"),
    ([("Mul", False), ("Div", False)], "Mul"),
    ([("Div", False), ("Div", False)], "Div"),
])
@pytest.mark.parametrize("opset", [9, 13, 21])
def test_merges_two_step_chains(ops: list[tuple[str, bool]], expected_op: str, opset: int) -> None:
    model = chain(ops, [C4, C34], opset=opset)
    out, stats = run_pass(model, PASS)
    assert op_histogram(out) == {expected_op: 1}
    assert stats == {"merged": 1}
    # float rounding only: the constant is rounded once, the op once (see the module docstring)
    assert_equivalent(model, out, atol=1e-6, rtol=1e-6)


def test_merged_constant_matches_hand_computed_value() -> None:
    model = chain([("Sub", False), ("Add", False)],
                  [np.float32([1.5]), np.float32([4.0])])
    out, _ = run_pass(model, PASS)
    np.testing.assert_array_equal(_const(out), np.float32([2.5]))  # x - 1.5 + 4
    model = chain([("Div", False), ("Mul", False)], [np.float32([4.0]), np.float32([3.0])])
    out, _ = run_pass(model, PASS)
    assert op_histogram(out) == {"Mul": 1}
    np.testing.assert_array_equal(_const(out), np.float32([0.75]))


def test_long_chain_collapses_to_one_op_in_one_run() -> None:
    ops = [("Add", False), ("Sub", False), ("Add", True), ("Sub", False), ("Add", False)]
    consts = [np.float32(v) * np.ones(4, np.float32) for v in (1, 2, 3, 4, 5)]
    model = chain(ops, consts)
    out, stats = run_pass(model, PASS)
    assert op_histogram(out) == {"Add": 1}
    assert stats == {"merged": 4}
    np.testing.assert_allclose(_const(out), np.full(4, 1 - 2 + 3 - 4 + 5, np.float32))
    assert_equivalent(model, out, atol=1e-6, rtol=1e-6)


def test_power_of_two_divisions_merge_bit_exactly() -> None:
    model = chain([("Div", False), ("Mul", False)], [np.float32([8.0]), np.float32([0.5])])
    out, _ = run_pass(model, PASS)
    feeds = [{"x": np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)}]
    np.testing.assert_array_equal(run_model(out, feeds)[0][0], run_model(model, feeds)[0][0])


@pytest.mark.parametrize("dtype", [TensorProto.INT32, TensorProto.INT64])
def test_integer_add_mul_chains_are_bit_exact_with_wraparound(dtype: int) -> None:
    np_dt = helper.tensor_dtype_to_np_dtype(dtype)
    big = np.iinfo(np_dt).max
    for ops, consts in (
        ([("Add", False), ("Sub", False)], [np.array([big, 3], np_dt), np.array([-5, big], np_dt)]),
        ([("Mul", False), ("Mul", True)], [np.array([big, 7], np_dt), np.array([3, -big], np_dt)]),
    ):
        model = chain(ops, consts, x_shape=[3, 2], dtype=dtype, opset=14)
        out, stats = run_pass(model, PASS)
        assert stats == {"merged": 1}
        feeds = [{"x": np.arange(-3, 3, dtype=np_dt).reshape(3, 2) * (big // 7)}]
        np.testing.assert_array_equal(run_model(out, feeds)[0][0], run_model(model, feeds)[0][0])


def test_declines_integer_division() -> None:
    i64 = [np.array([3], np.int64), np.array([2], np.int64)]
    model = chain([("Div", False), ("Mul", False)], i64, dtype=TensorProto.INT64)
    assert_declined(model, PASS, "integer-div")


def test_declines_when_intermediate_is_shared_or_a_graph_output() -> None:
    assert_declined(chain([("Add", False), ("Add", False)], [C4, C4], extra_consumer=True),
                    PASS, "shared")
    model = chain([("Mul", False), ("Mul", False)], [C4, C4], extra_outputs=("t0",))
    assert_declined(model, PASS, "graph-output")


def test_declines_constant_growth() -> None:
    model = chain([("Add", False), ("Add", False)],
                  [np.ones((3, 1), np.float32), np.ones((1, 4), np.float32)])
    assert_declined(model, PASS, "constant-growth")


def test_declines_merged_constant_out_of_range() -> None:
    big = np.float32([3e38])
    assert_declined(chain([("Mul", False), ("Mul", False)], [big, big]), PASS, "range")
    tiny = np.float32([1e-30])
    assert_declined(chain([("Mul", False), ("Mul", False)], [tiny, tiny]), PASS, "range")


def test_broadcast_result_keeps_shape_with_dynamic_dims() -> None:
    model = chain([("Mul", False), ("Add", False), ("Add", True)],
                  [C4, np.ones((3, 1), np.float32), C34], x_shape=["N", 3, 4])
    out, stats = run_pass(model, PASS)
    assert op_histogram(out) == {"Add": 1, "Mul": 1}
    assert stats == {"merged": 1}
    feeds = [{"x": np.ones((5, 3, 4), np.float32)}, {"x": np.ones((1, 3, 4), np.float32)}]
    assert_equivalent(model, out, atol=1e-6, rtol=1e-6, feeds=feeds)


def test_rank_growing_constant_keeps_output_rank() -> None:
    model = chain([("Add", False), ("Add", False)],
                  [np.ones((1, 1, 1, 4), np.float32), np.ones(4, np.float32)], x_shape=[4])
    out, _ = run_pass(model, PASS)
    assert op_histogram(out) == {"Add": 1}
    assert run_model(out, [{"x": np.ones(4, np.float32)}])[0][0].shape == (1, 1, 1, 4)
    assert_equivalent(model, out)


def test_merges_inside_subgraph() -> None:
    body = helper.make_graph(
        [helper.make_node("Mul", ["x", "a"], ["t"]), helper.make_node("Mul", ["t", "b"], ["o"])],
        "then", [], [vi("o", [4])],
        [onnx.numpy_helper.from_array(C4, "a"), onnx.numpy_helper.from_array(C4, "b")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["o2"])], "else", [], [vi("o2", [4])])
    model = make_model([helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=other)],
                       [vi("cond", [], TensorProto.BOOL), vi("x", [4])], [vi("y", [4])])
    out, stats = run_pass(model, PASS)
    assert stats == {"merged": 1}
    assert op_histogram(out) == {"If": 1, "Identity": 1, "Mul": 1}
    feeds = [{"cond": np.array(True), "x": np.arange(4, dtype=np.float32)}]
    assert_equivalent(model, out, feeds=feeds)


def test_no_change_and_idempotent() -> None:
    mixed = chain([("Add", False), ("Mul", False)], [C4, C4])
    out, stats = run_pass(mixed, PASS)
    assert stats == {}
    assert op_histogram(out) == op_histogram(mixed)
    once, _ = run_pass(chain([("Add", False), ("Add", False)], [C4, C4]), PASS)
    _, report = optimize(once, passes=[PASS])
    assert report.records[-1].changed is False
