from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnxopt.passes import _channel_multiple
from onnxopt.passes._groups import build_groups

from onnxopt import optimize
from onnxopt.io import to_graph
from onnxopt.runtime import run_model
from onnxopt.shapes import apply_shapes
from onnxopt.testing import make_model, vi

PASS = "prune-channels"
ROOT = Path(__file__).resolve().parents[2]


class Builder:
    """Nodes and initializers of a small test model; weights random, channels zeroed on demand."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}

    def w(self, name: str, shape: tuple[int, ...]) -> str:
        self.inits[name] = self.rng.standard_normal(shape).astype(np.float32)
        return name

    def conv(self, x: str, name: str, cin: int, cout: int, group: int = 1, k: int = 3) -> str:
        self.w(f"{name}.w", (cout, cin // group, k, k))
        self.w(f"{name}.b", (cout,))
        self.nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name],
                                           name=name, pads=[k // 2] * 4, group=group))
        return name

    def bn(self, x: str, name: str, c: int) -> str:
        self.inits[f"{name}.g"] = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        self.w(f"{name}.beta", (c,))
        self.w(f"{name}.mean", (c,))
        self.inits[f"{name}.var"] = self.rng.uniform(0.5, 2, c).astype(np.float32)
        self.nodes.append(helper.make_node(
            "BatchNormalization", [x] + [f"{name}.{p}" for p in ("g", "beta", "mean", "var")],
            [name], name=name))
        return name

    def op(self, op: str, inputs: list[str], name: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def zero_out(self, name: str, channels: list[int]) -> None:
        """A producer's output channels: weight rows and bias."""
        self.inits[f"{name}.w"][channels] = 0
        self.inits[f"{name}.b"][channels] = 0

    def zero_in(self, name: str, channels: list[int], axis: int = 1) -> None:
        """A consumer's input channels: its output no longer depends on them."""
        w = self.inits[f"{name}.w"]
        index = [slice(None)] * w.ndim
        index[axis] = channels
        w[tuple(index)] = 0

    def model(self, inputs: list, outputs: list, opset: int = 17) -> onnx.ModelProto:
        return make_model(self.nodes, inputs, outputs, self.inits, opset=opset)


def _prune(model: onnx.ModelProto, spec: str = PASS, calibration: list | None = None
           ) -> tuple[onnx.ModelProto, dict, dict]:
    out, report = optimize(model, passes=[spec], calibration=calibration)
    return out, report.stats(PASS), report.notes[PASS]


def _params(model: onnx.ModelProto) -> int:
    """Independent count: the sizes of every initializer."""
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _assert_same(a: onnx.ModelProto, b: onnx.ModelProto, feeds: list[dict]) -> None:
    onnx.checker.check_model(b, full_check=True)
    for ra, rb in zip(run_model(a, feeds), run_model(b, feeds), strict=True):
        for x, y in zip(ra, rb, strict=True):
            assert x.shape == y.shape
            np.testing.assert_allclose(y, x, atol=1e-5, rtol=1e-5)


def _feeds(shape: tuple[int, ...], n: int = 2, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _groups(model: onnx.ModelProto) -> dict:
    graph = to_graph(model)
    apply_shapes(graph, model)
    return {g.key: g for g in build_groups(graph)}


# ---- exact removal of channels that do not matter ----

@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("batch", [2, "N"])
def test_conv_bn_relu_chain_removes_zero_channels_exactly(opset: int, batch: int | str) -> None:
    b = Builder()
    h = b.op("Relu", [b.bn(b.conv("x", "c1", 3, 8), "bn1", 8)], "r1")
    h = b.op("Relu", [b.bn(b.conv(h, "c2", 8, 8), "bn2", 8)], "r2")
    b.conv(h, "c3", 8, 4)
    b.zero_out("c1", [1, 5]), b.zero_in("c2", [1, 5])
    b.zero_out("c2", [0, 3]), b.zero_in("c3", [0, 3])
    model = b.model([vi("x", [batch, 3, 8, 8])], [vi("c3", [batch, 4, 8, 8])], opset=opset)
    out, stats, notes = _prune(model, f"{PASS}:ratio=0.25")
    _assert_same(model, out, _feeds((2, 3, 8, 8)))
    w = _inits(out)
    assert w["c1.w"].shape == (6, 3, 3, 3)
    assert w["bn1.g"].shape == (6,)
    assert w["c2.w"].shape == (6, 6, 3, 3)
    assert w["bn2.var"].shape == (6,)
    assert w["c3.w"].shape == (4, 6, 3, 3)
    # c1.w, c1.b, bn1, c2.w, c2.b, bn2, c3.w, c3.b after pruning
    after = 6 * 3 * 9 + 6 + 4 * 6 + 6 * 6 * 9 + 6 + 4 * 6 + 4 * 6 * 9 + 4
    assert _params(out) == after
    assert notes["params_removed"] == _params(model) - after
    assert stats["pruned-channels"] == 4
    assert stats["skipped:graph-output"] == 1
    assert notes["groups"]["c1"] == {
        "channels": 8, "kept": 6, "params_removed": 2 * (3 * 9 + 1 + 4 + 8 * 9),
        "macs_removed": 2 * 64 * (27 + 72), "multiple": 1, "min_channels": 1}
    assert notes["frozen"] == {"c3": "graph-output"}


def test_residual_add_merges_both_branches() -> None:
    b = Builder()
    r = b.op("Relu", [b.conv("x", "ca", 3, 8)], "ra")
    s = b.op("Add", [r, b.conv(r, "cb", 8, 8)], "sum")
    b.conv(b.op("Relu", [s], "rs"), "cc", 8, 4)
    for name in ("ca", "cb"):
        b.zero_out(name, [2, 6])
    b.zero_in("cb", [2, 6]), b.zero_in("cc", [2, 6])
    model = b.model([vi("x", [1, 3, 8, 8])], [vi("cc", [1, 4, 8, 8])])
    groups = _groups(model)
    assert set(groups) == {"ca", "cc"}
    assert groups["ca"].frozen is None
    out, stats, _notes = _prune(model, f"{PASS}:ratio=0.25")
    _assert_same(model, out, _feeds((1, 3, 8, 8)))
    w = _inits(out)
    assert w["ca.w"].shape == (6, 3, 3, 3)
    assert w["cb.w"].shape == (6, 6, 3, 3)
    assert w["cc.w"].shape == (4, 6, 3, 3)
    assert stats["pruned-channels"] == 2


def test_concat_offsets() -> None:
    b = Builder()
    cat = b.op("Concat", [b.conv("x", "ca", 3, 4), b.conv("x", "cb", 3, 4)], "cat", axis=1)
    b.conv(b.op("Relu", [cat], "rc"), "cc", 8, 4)
    b.zero_out("ca", [1]), b.zero_out("cb", [2]), b.zero_in("cc", [1, 4 + 2])
    model = b.model([vi("x", [1, 3, 8, 8])], [vi("cc", [1, 4, 8, 8])])
    out, _stats, _ = _prune(model, f"{PASS}:ratio=0.25")
    _assert_same(model, out, _feeds((1, 3, 8, 8)))
    w = _inits(out)
    assert w["ca.w"].shape == (3, 3, 3, 3)
    assert w["cb.w"].shape == (3, 3, 3, 3)
    assert w["cc.w"].shape == (4, 6, 3, 3)
    # the kept input columns of cc are exactly the non-zeroed ones, in order
    ref = _inits(model)["cc.w"]
    np.testing.assert_array_equal(w["cc.w"], ref[:, [0, 2, 3, 4, 5, 7]])


def test_depthwise_conv_passes_channels_through() -> None:
    b = Builder()
    r = b.op("Relu", [b.conv("x", "ca", 3, 8)], "ra")
    d = b.op("Relu", [b.conv(r, "dw", 8, 8, group=8)], "rd")
    b.conv(d, "cc", 8, 4)
    b.zero_out("ca", [0, 7]), b.zero_out("dw", [0, 7]), b.zero_in("cc", [0, 7])
    model = b.model([vi("x", ["N", 3, 8, 8])], [vi("cc", ["N", 4, 8, 8])])
    out, _, _ = _prune(model, f"{PASS}:ratio=0.25")
    _assert_same(model, out, _feeds((2, 3, 8, 8)))
    assert _inits(out)["dw.w"].shape == (6, 1, 3, 3)
    dw = next(n for n in out.graph.node if n.name == "dw")
    assert helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 6


def test_grouped_conv_keeps_groups_consistent() -> None:
    b = Builder()
    g = b.conv(b.op("Relu", [b.conv("x", "ca", 3, 8)], "ra"), "cg", 8, 8, group=2)
    b.conv(b.op("Relu", [g], "rg"), "cc", 8, 4)
    b.zero_out("ca", [1, 6])  # one channel in each conv group
    b.inits["cg.w"][0:4, 1] = 0  # input channel 1 = group 0, local 1
    b.inits["cg.w"][4:8, 2] = 0  # input channel 6 = group 1, local 2
    b.zero_out("cg", [0, 5]), b.zero_in("cc", [0, 5])
    model = b.model([vi("x", [1, 3, 8, 8])], [vi("cc", [1, 4, 8, 8])])
    groups = _groups(model)
    assert groups["ca"].chunks == 2
    assert groups["cg"].chunks == 2
    out, stats, _ = _prune(model, f"{PASS}:ratio=0.25")
    _assert_same(model, out, _feeds((1, 3, 8, 8)))
    assert _inits(out)["cg.w"].shape == (6, 3, 3, 3)
    assert stats["pruned-channels"] == 4


def test_mlp_gemm_matmul_hidden_units() -> None:
    b = Builder()
    b.w("fc1.w", (12, 16)), b.w("fc1.b", (12,))
    b.nodes.append(helper.make_node("Gemm", ["x", "fc1.w", "fc1.b"], ["h1"], name="fc1",
                                    transB=1))
    h = b.op("Relu", ["h1"], "r1")
    b.w("fc2.w", (12, 8)), b.w("fc2.b", (8,))
    m = b.op("MatMul", [h, "fc2.w"], "fc2")
    h = b.op("Relu", [b.op("Add", [m, "fc2.b"], "fc2_bias")], "r2")
    b.w("fc3.w", (8, 3)), b.w("fc3.b", (3,))
    b.nodes.append(helper.make_node("Gemm", [h, "fc3.w", "fc3.b"], ["y"], name="fc3"))
    b.zero_out("fc1", [3, 4, 9]), b.zero_in("fc2", [3, 4, 9], axis=0)
    b.zero_in("fc2", [1, 6], axis=1)
    b.inits["fc2.b"][[1, 6]] = 0
    b.zero_in("fc3", [1, 6], axis=0)
    model = b.model([vi("x", ["N", 16])], [vi("y", ["N", 3])])
    out, _stats, notes = _prune(model, f"{PASS}:ratio=0.25")
    _assert_same(model, out, _feeds((5, 16)))
    w = _inits(out)
    assert w["fc1.w"].shape == (9, 16)
    assert w["fc2.w"].shape == (9, 6)
    assert w["fc2.b"].shape == (6,)
    assert w["fc3.w"].shape == (6, 3)
    assert set(notes["groups"]) == {"fc1", "fc2"}
    assert notes["frozen"] == {"fc3": "graph-output"}


@pytest.mark.parametrize("pool", [True, False])
def test_flatten_into_gemm(pool: bool) -> None:
    b = Builder()
    h = b.op("Relu", [b.conv("x", "ca", 3, 4)], "ra")
    h = b.op("GlobalAveragePool", [h], "gap") if pool else b.op("MaxPool", [h], "mp",
                                                                  kernel_shape=[4, 4],
                                                                  strides=[4, 4])
    flat = b.op("Flatten", [h], "flat")
    per = 1 if pool else 4
    b.w("fc.w", (4 * per, 3)), b.w("fc.b", (3,))
    b.nodes.append(helper.make_node("Gemm", [flat, "fc.w", "fc.b"], ["y"], name="fc"))
    b.zero_out("ca", [2])
    b.inits["fc.w"][2 * per:3 * per] = 0
    model = b.model([vi("x", [2, 3, 8, 8])], [vi("y", [2, 3])])
    out, _, _ = _prune(model, f"{PASS}:ratio=0.25")
    _assert_same(model, out, _feeds((2, 3, 8, 8)))
    assert _inits(out)["fc.w"].shape == (3 * per, 3)


def test_reshape_with_literal_size_into_matmul_is_rewritten() -> None:
    b = Builder()
    h = b.op("Relu", [b.conv("x", "ca", 3, 4, k=1)], "ra")
    b.inits["to2d"] = np.array([0, 4 * 16], np.int64)  # [N, C*H*W] written out
    flat = b.op("Reshape", [h, "to2d"], "flat")
    b.w("fc.w", (64, 3))
    b.op("MatMul", [flat, "fc.w"], "y")
    b.zero_out("ca", [1])
    b.inits["fc.w"][16:32] = 0
    model = b.model([vi("x", ["N", 3, 4, 4])], [vi("y", ["N", 3])])
    out, _, _ = _prune(model, f"{PASS}:ratio=0.25")
    _assert_same(model, out, _feeds((2, 3, 4, 4)))
    assert _inits(out)["fc.w"].shape == (48, 3)
    target = next(v for k, v in _inits(out).items() if k.startswith("flat") or k == "to2d")
    assert target.tolist() == [0, 48]


def test_inspect_groups_prints_the_groups() -> None:
    from typer.testing import CliRunner

    from onnxopt.cli import app

    result = CliRunner().invoke(
        app, ["inspect", "--groups", "--json", str(ROOT / "models" / "digits_cnn.onnx")])
    assert result.exit_code == 0, result.output
    groups = {g["key"]: g for g in json.loads(result.output)["groups"]}
    assert groups["/3/Conv"]["channels"] == 32
    assert groups["/3/Conv"]["frozen"] is None
    assert groups["/13/Gemm"]["frozen"] == "graph-output"
    result = CliRunner().invoke(
        app, ["inspect", "--groups", str(ROOT / "models" / "digits_cnn.onnx")])
    assert "Channel groups (3 prunable of 4)" in result.output


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split_on_channels_rewrites_sizes(opset: int) -> None:
    b = Builder()
    a = b.conv("x", "ca", 3, 8)
    split_in = [a]
    attrs: dict = {"axis": 1}
    if opset >= 18:
        attrs["num_outputs"] = 2
    elif opset >= 13:
        b.inits["sizes"] = np.array([4, 4], np.int64)
        split_in.append("sizes")
    else:
        attrs["split"] = [4, 4]
    b.nodes.append(helper.make_node("Split", split_in, ["s0", "s1"], name="split", **attrs))
    cat = b.op("Concat", [b.conv("s0", "c0", 4, 4), b.conv("s1", "c1", 4, 4)], "cat", axis=1)
    b.conv(cat, "cc", 8, 2)
    b.zero_out("ca", [1, 5, 6]), b.zero_in("c0", [1]), b.zero_in("c1", [1, 2])
    b.zero_out("c0", [3]), b.zero_out("c1", [0]), b.zero_in("cc", [3, 4])
    model = b.model([vi("x", [1, 3, 8, 8])], [vi("cc", [1, 2, 8, 8])], opset=opset)
    out, _, _ = _prune(model, f"{PASS}:ratio=0.25,keep={{\"ca\": 0.625}}")
    _assert_same(model, out, _feeds((1, 3, 8, 8)))
    w = _inits(out)
    assert w["c0.w"].shape == (3, 3, 3, 3)
    assert w["c1.w"].shape == (3, 2, 3, 3)


# ---- frozen groups ----

def test_frozen_graph_output_unknown_op_and_channel_reduction() -> None:
    b = Builder()
    b.conv("x", "out", 3, 4)  # a graph output
    b.conv(b.op("DepthToSpace", [b.conv("x", "d2s", 3, 4)], "d", blocksize=2), "after", 1, 2)
    b.op("Softmax", [b.conv("x", "soft", 3, 4)], "sm", axis=1)
    model = b.model([vi("x", [1, 3, 8, 8])],
                    [vi("out", [1, 4, 8, 8]), vi("after", [1, 2, 16, 16]), vi("sm", [1, 4, 8, 8])])
    out, stats, notes = _prune(model)
    assert notes["frozen"]["out"] == "graph-output"
    assert notes["frozen"]["d2s"] == "unknown-op"
    assert notes["frozen"]["soft"] == "channel-reduction"
    assert stats["skipped:graph-output"] == 2  # out and after
    assert stats["skipped:unknown-op"] == 1
    assert stats["skipped:channel-reduction"] == 1
    assert "pruned-channels" not in stats
    assert _params(out) == _params(model)


def test_frozen_grouped_conv_that_cannot_stay_consistent() -> None:
    b = Builder()
    cat = b.op("Concat", [b.conv("x", "ca", 3, 4), b.conv("x", "cb", 3, 4)], "cat", axis=1)
    b.conv(cat, "cg", 8, 4, group=2)
    b.conv("cg", "cc", 4, 2)
    model = b.model([vi("x", [1, 3, 8, 8])], [vi("cc", [1, 2, 8, 8])])
    _, stats, notes = _prune(model)
    assert notes["frozen"]["ca"] == notes["frozen"]["cb"] == "grouped-conv"
    assert stats["skipped:grouped-conv"] == 2
    assert notes["groups"]["cg"]["kept"] == 2  # chunks of 2: 0.7 * 4 rounded to a multiple of 2


def _if_model(read_in_branch: bool) -> onnx.ModelProto:
    b = Builder()
    r = b.op("Relu", [b.conv("x", "ca", 3, 8)], "ra")
    b.conv(r, "cc", 8, 4)
    b.zero_out("ca", [1, 5]), b.zero_in("cc", [1, 5])
    src = "ra" if read_in_branch else "x"
    then = helper.make_graph([helper.make_node("ReduceSum", [src], ["t"], keepdims=0)], "then",
                             [], [vi("t", None)])
    other = helper.make_graph([helper.make_node("ReduceMax", [src], ["e"], keepdims=0)], "else",
                              [], [vi("e", None)])
    b.inits["cond"] = np.array(True)
    b.nodes.append(helper.make_node("If", ["cond"], ["z"], then_branch=then, else_branch=other))
    return b.model([vi("x", [1, 3, 8, 8])], [vi("cc", [1, 4, 8, 8]), vi("z", [])], opset=13)


def test_frozen_when_a_subgraph_reads_the_channels() -> None:
    model = _if_model(read_in_branch=True)
    out, stats, notes = _prune(model, f"{PASS}:ratio=0.25")
    assert notes["frozen"]["ca"] == "subgraph"
    assert stats["skipped:subgraph"] == 1
    assert _params(out) == _params(model)


def test_if_elsewhere_does_not_block_pruning() -> None:
    model = _if_model(read_in_branch=False)
    out, stats, _ = _prune(model, f"{PASS}:ratio=0.25")
    _assert_same(model, out, _feeds((1, 3, 8, 8)))
    assert _inits(out)["ca.w"].shape == (6, 3, 3, 3)
    assert stats["pruned-channels"] == 2


def test_frozen_shared_weight_and_attention_reshape() -> None:
    b = Builder()
    b.w("w", (4, 3, 1, 1))
    b.nodes += [helper.make_node("Conv", ["x", "w"], ["c1"], name="c1"),
                helper.make_node("Conv", ["x", "w"], ["c2"], name="c2")]
    s = b.op("Add", ["c1", "c2"], "s")
    b.conv(s, "cc", 4, 2)
    b.w("q.w", (8, 8))
    q = b.op("MatMul", ["t", "q.w"], "q")
    b.inits["heads"] = np.array([0, 0, 2, 4], np.int64)
    b.op("Reshape", [q, "heads"], "qh")
    model = b.model([vi("x", [1, 3, 8, 8]), vi("t", [1, 5, 8])],
                    [vi("cc", [1, 2, 8, 8]), vi("qh", [1, 5, 2, 4])])
    _, stats, notes = _prune(model)
    assert notes["frozen"]["c1"] == "shared-weight"
    assert notes["frozen"]["q"] == "attention-graph-output"  # split into heads, read outside
    assert stats["skipped:shared-weight"] == 1


# ---- criteria and how many ----

def _criterion_model() -> onnx.ModelProto:
    b = Builder()
    b.conv(b.op("Relu", [b.bn(b.conv("x", "ca", 3, 4), "bn", 4)], "ra"), "cc", 4, 2)
    b.inits["ca.w"][0] *= 0.01  # channel 0: smallest weights ...
    b.inits["cc.w"][:, 0] *= 0.01
    b.inits["bn.g"][:] = [2.0, 1.0, 1.5, 0.1]  # ... channel 3: smallest gamma
    return b.model([vi("x", [1, 3, 8, 8])], [vi("cc", [1, 2, 8, 8])])


@pytest.mark.parametrize(("criterion", "gone"), [("l1", 0), ("l2", 0), ("bn-gamma", 3)])
def test_criterion_picks_expected_channel(criterion: str, gone: int) -> None:
    model = _criterion_model()
    out, _, _ = _prune(model, f"{PASS}:ratio=0.25,criterion={criterion}")
    ref, got = _inits(model)["ca.w"], _inits(out)["ca.w"]
    np.testing.assert_array_equal(got, np.delete(ref, gone, axis=0))


def test_activation_criterion_uses_calibration_data() -> None:
    b = Builder()
    b.conv(b.op("Relu", [b.conv("x", "ca", 3, 4)], "ra"), "cc", 4, 2)
    b.inits["ca.b"][:] = [1.0, 1.0, -50.0, 1.0]  # channel 2 is dead after the Relu
    model = b.model([vi("x", [1, 3, 8, 8])], [vi("cc", [1, 2, 8, 8])])
    out, _, _ = _prune(model, f"{PASS}:ratio=0.25,criterion=activation,reconstruct=false",
                       calibration=_feeds((1, 3, 8, 8), n=4))
    np.testing.assert_array_equal(_inits(out)["ca.w"], np.delete(_inits(model)["ca.w"], 2, 0))
    # dead channel: removing it is exact
    _assert_same(model, out, _feeds((1, 3, 8, 8)))


def _two_groups(scale_b: float = 1.0) -> onnx.ModelProto:
    b = Builder()
    h = b.op("Relu", [b.conv("x", "ca", 3, 8)], "ra")
    h = b.op("Relu", [b.conv(h, "cb", 8, 8)], "rb")
    b.conv(h, "cc", 8, 2)
    b.inits["ca.w"][:] = np.sign(b.inits["ca.w"])  # equal l1 in every channel of ca
    b.inits["cb.w"][:4] *= 1e-3  # four weak channels in cb
    b.inits["cc.w"][:, :4] *= 1e-3
    return b.model([vi("x", [1, 3, 8, 8])], [vi("cc", [1, 2, 8, 8])])


def test_global_ranking_takes_the_weakest_channels_anywhere() -> None:
    model = _two_groups()
    _, _, uniform = _prune(model, f"{PASS}:ratio=0.25")
    assert uniform["groups"]["ca"]["kept"] == uniform["groups"]["cb"]["kept"] == 6
    _, _, ranked = _prune(model, f"{PASS}:ratio=0.25,global_ranking=true")
    assert ranked["groups"]["ca"]["kept"] == 8
    assert ranked["groups"]["cb"]["kept"] == 4


def test_keep_json_and_file_and_round_to(tmp_path: Path) -> None:
    model = _two_groups()
    _, _, notes = _prune(model, f"{PASS}:ratio=0.3,keep={{\"cb\": 0.5}}")
    assert notes["groups"]["cb"]["kept"] == 4
    assert notes["groups"]["ca"]["kept"] == 6
    path = tmp_path / "keep.json"
    path.write_text(json.dumps({"ca": 0.25}))
    _, _, notes = _prune(model, f"{PASS}:ratio=0.0,keep={path}")
    assert notes["groups"]["ca"]["kept"] == 2
    assert notes["groups"]["cb"]["kept"] == 8
    _, _, notes = _prune(model, f"{PASS}:ratio=0.3,round_to=4")  # 5.6 -> 4
    assert notes["groups"]["ca"]["kept"] == notes["groups"]["cb"]["kept"] == 4
    _, _, notes = _prune(model, f"{PASS}:ratio=0.9,min_channels=3")
    assert notes["groups"]["ca"]["kept"] == 3


# ---- the channel multiple measured on this machine ----

REAL_ROUND_TO = _channel_multiple.measured_round_to  # before conftest injects 1


def _conv_and_gemm() -> onnx.ModelProto:
    """A Conv group (ca, 16 channels) and a Gemm hidden-unit group (fc1, 16 units)."""
    b = Builder()
    h = b.op("Relu", [b.conv("x", "ca", 3, 16)], "ra")
    f = b.op("Flatten", [b.op("GlobalAveragePool", [h], "gap")], "flat")
    b.w("fc1.w", (16, 16)), b.w("fc1.b", (16,))
    b.nodes.append(helper.make_node("Gemm", [f, "fc1.w", "fc1.b"], ["h1"], name="fc1"))
    b.w("fc2.w", (16, 3)), b.w("fc2.b", (3,))
    b.nodes.append(helper.make_node("Gemm", [b.op("Relu", ["h1"], "r1"), "fc2.w", "fc2.b"], ["y"],
                                    name="fc2"))
    return b.model([vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 3])])


def test_default_round_to_is_the_measured_multiple_for_conv_channels(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_channel_multiple, "measured_round_to", lambda: 8)
    out, _, notes = _prune(_conv_and_gemm(), f"{PASS}:ratio=0.3")  # 11.2 channels kept
    assert notes["groups"]["ca"]["kept"] == 8  # the Conv's: to the nearest multiple of 8
    assert notes["groups"]["fc1"]["kept"] == 11  # hidden units: not rounded
    assert notes["round_to"] == 8
    assert notes["round_to_source"] == "measured on this machine (prune-round-to)"
    assert _inits(out)["ca.w"].shape == (8, 3, 3, 3)
    _, _, notes = _prune(_conv_and_gemm(), f"{PASS}:ratio=0.3,round_to=4")  # the option: all
    assert (notes["groups"]["ca"]["kept"], notes["groups"]["fc1"]["kept"]) == (12, 12)
    assert notes["round_to_source"] == "option"


def test_driver_counts_removed_channels_as_the_pass_rounds(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    """The driver labels candidates and caps its allocation with the share of channels removed;
    with a channel multiple, that is the share the pass really removes (its notes say)."""
    from onnxopt.lossy.methods import removed_share

    monkeypatch.setattr(_channel_multiple, "measured_round_to", lambda: 8)
    _, _, first = _prune(_conv_and_gemm(), f"{PASS}:ratio=0.3")
    assignment = {"ca": 0.55, "fc1": 0.85}
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps(assignment))
    _, _, built = _prune(_conv_and_gemm(), f"{PASS}:ratio=0.0,keep={keep}")
    kept = {k: g["kept"] for k, g in built["groups"].items()}
    assert kept == {"ca": 8, "fc1": 14}  # 8.8 -> 8 (multiple of 8), 13.6 -> 14
    assert removed_share(first["groups"], assignment) == (16 - 8 + 16 - 14) / 32


# timings shaped like bench/ROUND_TO.md (48..64 channels at 28x28, AMD EPYC AVX512-VNNI): float
# Convs cost the same from 52 to 64 except for a step at 48; int8 QLinearConv has its cheap
# points at every multiple of 4
FLOAT_MS = {64: 2.069, 63: 2.585, 62: 2.511, 61: 2.474, 60: 2.071, 59: 2.308, 58: 2.240,
            57: 2.171, 56: 2.073, 55: 2.066, 54: 1.975, 53: 1.906, 52: 2.071, 51: 1.794,
            50: 1.736, 49: 1.709, 48: 1.179}
INT8_MS = {64: 0.606, 63: 0.806, 62: 0.790, 61: 0.776, 60: 0.581, 59: 0.761, 58: 0.740,
           57: 0.725, 56: 0.547, 55: 0.713, 54: 0.702, 53: 0.687, 52: 0.512, 51: 0.673,
           50: 0.655, 49: 0.644, 48: 0.387}


def test_paying_multiple_from_timings() -> None:
    assert _channel_multiple.paying_multiple(FLOAT_MS) == 16
    assert _channel_multiple.paying_multiple(INT8_MS) == 4
    # time in proportion to the MACs (c^2): rounding up to any multiple is slower
    assert _channel_multiple.paying_multiple({c: c * c / 1000 for c in range(48, 65)}) == 1


def test_measurement_is_cached_per_machine_and_sane(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    """The measurement (its timings faked: every count costs its multiple of 8 above) gives 8,
    is written to the per-machine cache, and is read from there the next time."""
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    monkeypatch.delenv("ONNXOPT_NO_MEASURE_CACHE", raising=False)
    timed: list[list[int]] = []

    def fake(models: dict, width: int, hw: int, repeats: int, max_seconds: float) -> dict:
        timed.append(sorted(models))
        assert all(m.graph.input[0].type.tensor_type.shape.dim[1].dim_value == width
                   for m in models.values())  # one input shape: timed together
        return {c: 8 * -(-c // 8) / 10 for c in models}

    monkeypatch.setattr(_channel_multiple, "time_counts", fake)
    REAL_ROUND_TO.cache_clear()
    try:
        assert REAL_ROUND_TO() == 8
        assert timed == [list(_channel_multiple.COUNTS)]
        cached = json.loads(next((tmp_path / "machine").glob("*.json")).read_text())
        assert cached["prune-round-to"]["result"]["multiple"] == 8
        REAL_ROUND_TO.cache_clear()
        assert REAL_ROUND_TO() == 8
        assert len(timed) == 1  # from the cache: not measured again
    finally:
        REAL_ROUND_TO.cache_clear()


def test_keep_with_unknown_group_is_an_error() -> None:
    from onnxopt.errors import PassOptionError

    with pytest.raises(PassOptionError, match="unknown groups"):
        _prune(_two_groups(), f"{PASS}:keep={{\"nope\": 0.5}}")


# ---- reconstruction ----

def _digits() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    model = onnx.load(ROOT / "models" / "digits_cnn.onnx")
    data = np.load(ROOT / "models" / "digits_val.npz")
    return model, data["image"], data["labels"]


def test_reconstruction_beats_no_reconstruction_on_the_demo_model() -> None:
    model, images, _ = _digits()
    calib = [{"image": images[i:i + 45]} for i in range(0, 180, 45)]
    held_out = [{"image": images[180:]}]
    ref = run_model(model, held_out)[0][0]
    errors = {}
    for rec in (False, True):
        out, stats, notes = _prune(model, f"{PASS}:ratio=0.3,reconstruct={rec}", calib)
        got = run_model(out, held_out)[0][0]
        errors[rec] = float(np.sum((got - ref) ** 2) / np.sum(ref**2))
        assert _params(out) < _params(model)
    assert set(notes["reconstruction"]) == {"/3/Conv", "/7/Conv", "/13/Gemm"}
    for layer in notes["reconstruction"].values():
        assert layer["error_after"] < layer["error_before"]
        assert layer["applied"]
    assert stats["reconstructed"] == 3
    assert errors[True] < 0.5 * errors[False]


def test_gemm_refit_matches_an_independent_least_squares_solve() -> None:
    model, images, _ = _digits()
    calib = [{"image": images[:120]}]
    out, _, _ = _prune(model, f"{PASS}:ratio=0.3", calib)
    # the pruned model's input to the last Gemm, read by exposing it as an output
    exposed = onnx.ModelProto()
    exposed.CopyFrom(out)
    exposed.graph.output.append(vi("features_dropped", None))
    x = run_model(exposed, calib)[0][1].astype(np.float64)
    y = run_model(model, calib)[0][0].astype(np.float64)
    ones = np.ones((len(x), 1))
    plain, *_ = np.linalg.lstsq(np.hstack([x, ones]), y, rcond=None)
    got = run_model(out, calib)[0][0]
    # close to the plain least-squares fit (the ridge costs little) ...
    expected = np.hstack([x, ones]) @ plain
    assert np.sum((got - expected) ** 2) / np.sum(expected**2) < 1e-3
    # ... and equal to the documented ridge problem, solved here by an augmented lstsq:
    # min ||Xc W - Yc||^2 + lam ||W||^2, lam = 1e-4 * trace(Xc^T Xc) / k, b = mean(y - x W)
    xc, yc = x - x.mean(0), y - y.mean(0)
    lam = 1e-4 * np.trace(xc.T @ xc) / x.shape[1]
    aug_x = np.vstack([xc, np.sqrt(lam) * np.eye(x.shape[1])])
    aug_y = np.vstack([yc, np.zeros((x.shape[1], y.shape[1]))])
    w_ridge, *_ = np.linalg.lstsq(aug_x, aug_y, rcond=None)
    b_ridge = y.mean(0) - x.mean(0) @ w_ridge
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    w, b = _inits(out)[gemm.input[1]], _inits(out)[gemm.input[2]]
    trans_b = any(a.name == "transB" and a.i for a in gemm.attribute)
    np.testing.assert_allclose(w.T if trans_b else w, w_ridge, atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(b, b_ridge, atol=2e-3, rtol=1e-3)
