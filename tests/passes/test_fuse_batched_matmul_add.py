from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnxopt.passes import fuse_batched_matmul_add as mod

from onnxopt import optimize
from onnxopt.testing import assert_declined, assert_equivalent, make_model, op_histogram, vi

PASS = "fuse-batched-matmul-add"
FORCED = f"{PASS}:force=true"
K, N = 6, 5


def projection(x_shape: list, c: np.ndarray | None = None, opset: int = 17, dtype: int = TensorProto.FLOAT,
               extra_outputs: tuple[str, ...] = (), swap: bool = False) -> onnx.ModelProto:
    """x -> MatMul(x, W[K, N]) -> z -> Add(z, c) -> y."""
    np_dt = helper.tensor_dtype_to_np_dtype(dtype)
    rng = np.random.default_rng(0)
    inits = {"W": rng.standard_normal((K, N)).astype(np_dt),
             "c": (rng.standard_normal(N) if c is None else c).astype(np_dt)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z"]),
             helper.make_node("Add", ["c", "z"] if swap else ["z", "c"], ["y"])]
    y_shape = [*x_shape[:-1], N]
    outputs = [vi("y", y_shape, dtype)] + [vi(n, y_shape, dtype) for n in extra_outputs]
    return make_model(nodes, [vi("x", x_shape, dtype)], outputs, inits, opset=opset)


def _run(model: onnx.ModelProto, spec: str = FORCED) -> tuple[onnx.ModelProto, dict[str, int]]:
    out, report = optimize(model, passes=[spec])
    return out, report.stats(PASS)


@pytest.mark.parametrize(("x_shape", "extra"), [
    ([2, 3, K], {}),                                   # static: constant target
    (["B", 7, K], {}),                                 # one dynamic dim: -1
    (["B", "S", K], {"Shape": 1, "Concat": 1}),        # two: Shape(start, end) + Concat
    ([2, "S", 3, K], {}),
])
def test_rewrites_into_reshape_gemm_reshape(x_shape: list, extra: dict) -> None:
    model = projection(x_shape)
    out, stats = _run(model)
    assert op_histogram(out) == {"Gemm": 1, "Reshape": 2, **extra}
    assert stats == {"fused": 1}
    concrete = [3 if isinstance(d, str) else d for d in x_shape]
    assert_equivalent(model, out, shapes={"x": concrete})
    # and at another size: nothing size-specific baked in
    other = [5 if isinstance(d, str) else d for d in x_shape]
    assert_equivalent(model, out, shapes={"x": other})


@pytest.mark.parametrize("opset", [9, 11, 13, 21])
def test_two_dynamic_dims_across_opsets(opset: int) -> None:
    model = projection(["B", "S", K], opset=opset, swap=True)
    out, stats = _run(model)
    assert stats == {"fused": 1}
    hist = op_histogram(out)
    assert hist["Gemm"] == 1
    assert hist.get("Slice", 0) == (1 if opset < 15 else 0)
    assert_equivalent(model, out, shapes={"x": [2, 4, K]})


@pytest.mark.parametrize("c", [np.ones((1, N)), np.ones((1, 1, N)), np.array(0.5), np.ones(1)])
def test_bias_broadcast_forms(c: np.ndarray) -> None:
    model = projection([2, 3, K], c=c)
    out, stats = _run(model)
    assert stats == {"fused": 1}
    assert_equivalent(model, out)


def test_declines_when_not_measured_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mod, "measured_ratio", lambda: 1.0)
    assert_declined(projection([2, 3, K]), PASS, "not-faster")


def test_rewrites_when_measured_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mod, "measured_ratio", lambda: 0.9)
    out, stats = _run(projection([2, 3, K]), PASS)
    assert stats == {"fused": 1}
    assert op_histogram(out)["Gemm"] == 1


def test_measurement_is_read_from_the_machine_cache(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    calls = []
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    monkeypatch.setattr(mod, "measure", lambda: calls.append(1) or {"shapes": {}, "ratio": 0.5})
    mod.measured_ratio.cache_clear()
    try:
        assert mod.measured_ratio() == 0.5
        mod.measured_ratio.cache_clear()
        assert mod.measured_ratio() == 0.5  # second process-level read: from the file
        assert calls == [1]
    finally:
        mod.measured_ratio.cache_clear()


@pytest.mark.parametrize(("c", "reason"), [
    (np.ones((2, 1)), "broadcast"),            # varies along another axis
    (np.ones((1, 1, 1, N)), "broadcast"),      # raises the rank
])
def test_declines_broadcast(c: np.ndarray, reason: str) -> None:
    assert_declined(projection([2, 3, K], c=c), PASS, reason, spec=FORCED)


def test_declines_shared_and_graph_output_and_non_constant() -> None:
    assert_declined(projection([2, 3, K], extra_outputs=("z",)), PASS, "graph-output", spec=FORCED)
    model = projection([2, 3, K])
    model.graph.node.append(helper.make_node("Relu", ["z"], ["r"]))
    model.graph.output.append(vi("r", [2, 3, N]))
    assert_declined(model, PASS, "matmul-output-shared", spec=FORCED)
    model = projection([2, 3, K])
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "c"))
    model.graph.input.append(vi("c", [N]))
    assert_declined(model, PASS, "non-constant", spec=FORCED)


def test_declines_float16_and_leaves_2d_to_fuse_matmul_add() -> None:
    assert_declined(projection([2, 3, K], dtype=TensorProto.FLOAT16), PASS, "dtype", spec=FORCED)
    model = projection([3, K])
    out, stats = _run(model)
    assert stats == {}
    assert op_histogram(out) == op_histogram(model)


def test_idempotent() -> None:
    once, _ = _run(projection(["B", "S", K]))
    _, report = optimize(once, passes=[FORCED])
    assert report.records[-1].changed is False
