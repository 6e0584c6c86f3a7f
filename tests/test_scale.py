"""Every lossless pass runs in time linear in the graph size.

Each pass runs on a 1k-node and a 4k-node graph from ``scale_model``; a quadratic
pass would take ~16x as long on the larger one, a linear one ~4x. The check allows 8x
(machine noise, cache effects, the heap left by earlier tests) and takes the best of up
to five runs before failing.
Timings under 50 ms (CPU time) on the large graph are too noisy to judge and pass.
``bench/scale.py`` measures the same up to 100k nodes.
"""

from __future__ import annotations

import functools
import gc
import time

import onnx
import pytest
from onnx import helper

from onnxopt.io import opset_of, to_graph
from onnxopt.manager import PRESETS
from onnxopt.pass_base import NameGenerator, Pass, PassContext
from onnxopt.registry import registry
from onnxopt.testing import make_model, scale_model, vi

SMALL, LARGE = 1000, 4000  # 2k/8k doubles the runtime on a loaded 2-core machine
MAX_RATIO = 8.0
NOISE_FLOOR = 0.05


def _lossless() -> list[str]:
    table = registry()
    names = [n for n in PRESETS[1] if n in table]
    return names + [n for n, cls in table.items() if cls.exact and n not in names]


@functools.cache
def _model(nodes: int, kind: str) -> onnx.ModelProto:
    # shapes inferred once into value_info: every import then starts where the manager would
    model = scale_model(nodes, kind) if kind != "outputs" else _many_outputs(nodes)
    return onnx.shape_inference.infer_shapes(model)


def _many_outputs(n: int) -> onnx.ModelProto:
    """n graph outputs, each an Identity of its own Relu: every removal is a bypass of an output."""
    nodes = []
    for i in range(n // 2):
        nodes += [helper.make_node("Relu", ["x"], [f"r{i}"]),
                  helper.make_node("Identity", [f"r{i}"], [f"y{i}"])]
    return make_model(nodes, [vi("x", [2])], [vi(f"y{i}", [2]) for i in range(n // 2)], check=False)


def _seconds(cls: type[Pass], model: onnx.ModelProto) -> float:
    graph = to_graph(model)
    ctx = PassContext(names=NameGenerator(graph), opset=opset_of(model))
    p = cls()
    p.check(graph, ctx)
    # CPU time: other jobs on the machine do not count; no GC: a full collection's cost
    # depends on the whole heap, not on the pass
    gc.collect()
    gc.disable()
    try:
        t0 = time.process_time()
        p.run(graph, ctx)
        return time.process_time() - t0
    finally:
        gc.enable()


def _ratio(cls: type[Pass], kind: str) -> tuple[float, float, float]:
    small, large = _model(SMALL, kind), _model(LARGE, kind)
    best_small = best_large = float("inf")
    for _ in range(5):
        best_small = min(best_small, _seconds(cls, small))
        best_large = min(best_large, _seconds(cls, large))
        if best_large < NOISE_FLOOR or best_large / best_small < MAX_RATIO / 1.5:
            break
    return best_small, best_large, best_large / best_small


@pytest.mark.parametrize("name", _lossless())
def test_pass_is_linear(name: str) -> None:
    cls = registry()[name]
    small, large, ratio = _ratio(cls, "chain")
    assert large < NOISE_FLOOR or ratio < MAX_RATIO, (
        f"{name}: {small:.3f}s on {SMALL} nodes, {large:.3f}s on {LARGE}: x{ratio:.1f} for 4x")


def test_bypassing_many_graph_outputs_is_linear() -> None:
    # each removal checks that the producer is in this graph: a scan per call was quadratic
    small, large, ratio = _ratio(registry()["eliminate-identity"], "outputs")
    assert large < NOISE_FLOOR or ratio < MAX_RATIO, f"x{ratio:.1f}: {small:.3f}s -> {large:.3f}s"


def test_fresh_names_from_one_base_are_linear() -> None:
    graph = to_graph(_model(SMALL, "chain"))

    def fresh(n: int) -> float:
        names = NameGenerator(graph)
        t0 = time.process_time()
        for _ in range(n):
            names.fresh("w_folded")
        return time.process_time() - t0

    assert fresh(40_000) < 8 * max(fresh(10_000), 0.005)
    names = NameGenerator(graph)
    assert [names.fresh("b0_conv") for _ in range(3)] == ["b0_conv__1", "b0_conv__2", "b0_conv__3"]
