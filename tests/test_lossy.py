"""The lossy framework: allocation, composition order, and a budget judged the way the task is."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxopt.bench import Latency
from onnxopt.data import Dataset
from onnxopt.errors import OnnxoptError
from onnxopt.lossy import allocation, compress, resolve_methods
from onnxopt.lossy.budget import Budget
from onnxopt.lossy.methods import FLOAT, QUANTIZERS
from onnxopt.lossy.sensitivity import Probe
from onnxopt.pass_base import Pass, PassContext, PassResult
from onnxopt.testing import make_model, vi
from onnxopt.validate import OutputDiff, Tolerance, ValidationReport, compare


def _probe(layer: str, level: Any, error: float, saved: float) -> Probe:
    return Probe(layer, level, error, saved)


def test_moves_spend_the_budget_where_error_buys_the_most_saving() -> None:
    levels = (1.0, 0.7, 0.5)
    table = {
        # a: cheap first level, expensive second; b: robust; c: costly for little saving
        "a": {0.7: _probe("a", 0.7, 0.001, 100), 0.5: _probe("a", 0.5, 0.1, 150)},
        "b": {0.7: _probe("b", 0.7, 0.002, 100), 0.5: _probe("b", 0.5, 0.003, 180)},
        "c": {0.7: _probe("c", 0.7, 0.05, 10), 0.5: _probe("c", 0.5, 0.2, 20)},
    }
    moves = allocation.order(table, levels)
    # efficiencies: a->0.7 1e5, b->0.7 5e4, b->0.5 8e4 (marginal 80 / 0.001), a->0.5 ~505, c ...
    assert [(m.layer, m.level) for m in moves] == [
        ("a", 0.7), ("b", 0.7), ("b", 0.5), ("a", 0.5), ("c", 0.7), ("c", 0.5)]
    assert allocation.assignment(moves[:3]) == {"a": 0.7, "b": 0.5}
    # a target caps the share of channels the moves may take
    shares = {k: {1.0: 0.0, 0.7: 0.1, 0.5: 1 / 6} for k in table}
    capped = allocation.within_target(allocation.order(table, levels, shares), 0.3)
    assert [(m.layer, m.level) for m in capped] == [("a", 0.7), ("b", 0.7), ("b", 0.5)]


class _Perturb(Pass):
    """A fake lossy method with known per-layer errors: adds ``scale * R`` to each MatMul weight."""

    name = "test-perturb"
    exact = False

    @dataclasses.dataclass(frozen=True)
    class Options:
        exclude: tuple[str, ...] = ()

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        done = []
        for node in graph.nodes:
            if node.op != "MatMul" or node.name in self.options.exclude:
                continue
            w = node.inputs[1]
            scale = {"m0": 0.01, "m1": 0.6, "m2": 0.02, "m3": 0.9}[node.name]
            # seeds apart from the weights' own (seed 0): noise equal to a weight only rescales it
            noise = np.random.default_rng(100 + int(node.name[1])).standard_normal(w.values.shape)
            w.values = (w.values + scale * noise * np.abs(w.values).mean()).astype(np.float32)
            done.append(node.name)
        ctx.notes[self.name] = {"quantized": done}
        return PassResult(bool(done), {"perturbed": len(done)})


def _branches(tmp_path: Path) -> tuple[Path, Dataset]:
    rng = np.random.default_rng(0)
    # outputs named as features: judged by cosine alone (no top-1 among random near-ties)
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"feature{i}"], name=f"m{i}") for i in range(4)]
    inits = {f"w{i}": rng.standard_normal((16, 16)).astype(np.float32) for i in range(4)}
    model = make_model(nodes, [vi("x", [8, 16])], [vi(f"feature{i}", [8, 16]) for i in range(4)], inits)
    path = tmp_path / "branches.onnx"
    onnx.save(model, path)
    feeds = [{"x": rng.standard_normal((8, 16)).astype(np.float32)} for _ in range(8)]
    return path, Dataset(feeds, source="test")


def test_a_fake_method_with_known_errors_is_allocated_as_expected(tmp_path: Path, monkeypatch) -> None:
    from onnxopt import manager

    real = manager.get_pass
    monkeypatch.setattr(manager, "get_pass", lambda n: _Perturb if n == _Perturb.name else real(n))
    fake = dataclasses.replace(QUANTIZERS["dynamic"], name="perturb", pass_name=_Perturb.name, min_opset=1)
    path, data = _branches(tmp_path)

    def measure(models: Any, feeds: Any) -> dict[str, Latency]:
        return {k: Latency(1.0 if k == "float" else 0.5, 1, 1, 1, 1, "fake") for k in models}

    result = compress(path, tmp_path / "o.onnx", fake, eval_data=data, min_cosine=0.99, measure=measure)
    # m1 and m3 break the floor (cosine well below 0.99); m0 and m2 cost almost nothing
    assert [c.label for c in result.candidates][:2] == ["float (lossless passes)", "perturb"]
    assert result.candidates[1].within_budget is False  # the uniform candidate
    assert sorted(result.sensitivity, key=result.sensitivity.get) == ["m0", "m2", "m1", "m3"]
    assert result.written == "compressed"
    assert result.float_layers == ["m1", "m3"]
    assert sorted(result.steps[0].layers) == ["m0", "m2"]
    # checked independently: the written model perturbs exactly m0 and m2
    written = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / "o.onnx").graph.initializer}
    source = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    assert [k for k in sorted(source) if not np.array_equal(source[k], written[k])] == ["w0", "w2"]


def test_composition_runs_in_a_fixed_order_and_one_method_per_step() -> None:
    assert [m.step for m in resolve_methods(["int8", "prune:0.3"])] == ["prune", "quantize"]
    assert resolve_methods("prune:0.3")[0].levels == (1.0, 0.85, 0.7, 0.55)
    with pytest.raises(OnnxoptError, match="one method per step"):
        resolve_methods(["int8", "dynamic"])
    with pytest.raises(OnnxoptError, match="unknown lossy method 'int3'"):
        resolve_methods("int3")
    assert QUANTIZERS["int8"].options({"a": FLOAT, "b": "int8"}, {"a": {}, "b": {}}) == {"exclude": ("a",)}


def _seq_model(flip: bool) -> onnx.ModelProto:
    # softmax over classes of [samples, frames, classes]; the candidate swaps two classes' logits
    # in frame 0 of sample 0 only when the input there favours class 0
    perm = np.eye(5, dtype=np.float32)
    if flip:
        perm[[0, 1]] = perm[[1, 0]]
    mask = np.zeros((4, 12, 1), np.float32)
    mask[0, 0, 0] = 1.0
    nodes = [helper.make_node("MatMul", ["x", "p"], ["xp"]), helper.make_node("Mul", ["xp", "m"], ["a"]),
             helper.make_node("Mul", ["x", "nm"], ["b"]), helper.make_node("Add", ["a", "b"], ["z"]),
             helper.make_node("Softmax", ["z"], ["ctc_probs"], axis=-1)]
    return make_model(nodes, [vi("x", [4, 12, 5])], [vi("ctc_probs", [4, 12, 5])],
                      {"p": perm, "m": mask, "nm": 1.0 - mask})


def test_sequences_are_judged_per_position_and_per_whole_sequence() -> None:
    x = np.tile(np.array([3.0, 2.9, 0, 0, 0], np.float32), (4, 12, 1))  # every frame: class 0, barely
    data = Dataset([{"x": x}] * 6, source="test")
    report = compare(_seq_model(False), _seq_model(True), data, Tolerance(exact=False, min_top1=0.98))
    out = report.outputs[0]
    # one frame in 48 flips per feed: positions agree 47/48, whole sequences 3/4
    assert out.position_agreement == pytest.approx(47 / 48)
    assert out.sequence_agreement == pytest.approx(0.75)
    assert out.cosine > 0.99  # the cosine alone would let it through
    assert not out.passed
    assert "whole sequences 75.00%" in out.describe(report.tolerance)


def _report(before: float, after: float, stderr: float, other_passes: bool) -> ValidationReport:
    tol = Tolerance(exact=False, min_top1=0.98)
    scored = OutputDiff("logits", 0.1, 0.1, 0.999, 0.99, 0, 10, False)
    other = OutputDiff("boxes", 0.1, 0.1, 0.999 if other_passes else 0.9, None, 0, 10, other_passes)
    return ValidationReport((scored, other), 100, "test", tol, before, after, stderr, "logits")


def test_accuracy_budget_uses_its_confidence_bound_and_every_other_output_counts() -> None:
    budget = Budget(1.0, Tolerance(exact=False, min_top1=0.98))
    # the scored output failing its own fidelity floor does not matter: its accuracy decides
    assert budget.judge(_report(0.90, 0.897, 0.001, True)).ok  # 0.3 pt, bound 0.5 pt
    # 2 flips in 100 paired samples: drop 0.6 pt, but the bound is 0.6 + 2 * 100 * se
    se = math.sqrt((2 * (1 - 0.02) ** 2 + 98 * 0.02**2) / 99) / math.sqrt(100)
    verdict = budget.judge(_report(0.90, 0.894, se, True))
    assert not verdict.ok
    assert verdict.drop_bound_pp == pytest.approx(0.6 + 200 * se)
    # within the accuracy budget, but another output breaks the floor
    verdict = budget.judge(_report(0.90, 0.90, 0.0, False))
    assert not verdict.ok and "output 'boxes'" in verdict.detail


def test_progress_ticks_through_calibration_and_latency(tmp_path: Path) -> None:
    from onnxopt.testing import mlp_model

    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(sizes=(16, 32, 8), batch="N"), path)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(10)]
    ticks: list[tuple[int, int]] = []
    compress(path, tmp_path / "o.onnx", "int8", calibration_data=Dataset(feeds, source="t"),
             repeats=3, tick=lambda done, total: ticks.append((done, total)))
    # the first 5 feeds calibrate (one tick per run), then the latency rounds tick to their total
    assert ticks[:5] == [(i, 5) for i in range(1, 6)]
    assert ticks[-1][0] == ticks[-1][1] > 0


def test_lossy_and_lossless_reports_share_their_top_level_keys(tmp_path: Path) -> None:
    from onnxopt.api import optimize_file
    from onnxopt.testing import mlp_model

    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(sizes=(16, 32, 8), batch="N"), path)
    lossless = optimize_file(path, tmp_path / "a.onnx", bench=False).to_dict()
    lossy = compress(path, tmp_path / "b.onnx", "dynamic", force=True, bench=False).to_dict()
    shared = {"output", "pipeline", "validation", "before", "after", "inputs", "input_notes", "warnings"}
    assert shared <= set(lossless) and shared <= set(lossy)
    assert lossy["before"]["nodes"] == lossless["before"]["nodes"]
    assert lossy["after"]["ops"].get("MatMulInteger", 0) + lossy["after"]["ops"].get(
        "DynamicQuantizeMatMul", 0) > 0
    assert lossy["inputs"] == lossless["inputs"] == {"x": [1, 16]}


def test_cli_prune_then_int8_on_the_demo_model_in_one_budget(tmp_path: Path, monkeypatch) -> None:
    import json

    from typer.testing import CliRunner

    from onnxopt.cli import app
    from onnxopt.lossy import driver
    from onnxopt.runtime import session

    root = Path(__file__).resolve().parents[1]
    src, data = root / "models" / "digits_cnn.onnx", root / "models" / "digits_val.npz"
    # the verdict is pinned: each step's result is faster than float, the composed one fastest
    times = {"float": 1.0}

    def measure(models: Any, feeds: Any) -> dict[str, Latency]:
        return {k: Latency(times.get(k, 0.9 if "int8" not in k else 0.5), 1, 1, 1, 1, "fake") for k in models}

    monkeypatch.setattr(driver, "default_measure", lambda *_: measure)
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    res = CliRunner().invoke(app, ["optimize", str(src), "--prune", "0.3", "--quantize", "int8", "--data",
                                   str(data), "-o", str(out), "--report", str(report)])
    assert res.exit_code == 0, res.output
    payload = json.loads(report.read_text())
    assert [s["step"] for s in payload["steps"]] == ["prune", "quantize"]
    assert all(s["applied"] for s in payload["steps"])
    assert payload["written"] == "compressed"
    assert payload["reason"].startswith("prune, ") and " + int8 is within budget" in payload["reason"]
    pruned = payload["steps"][0]["layers"]
    assert pruned and all(0 < info["level"] < 1 for info in pruned.values())
    # fewer parameters than the source, stored as int8 (checked on the written file)
    written = onnx.load(out)
    ops = {n.op_type for n in written.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert payload["after"]["parameters"] < payload["before"]["parameters"]
    # held-out accuracy measured here: the second half of the labelled digits, which evaluated
    z = np.load(data)
    x, labels = z["image"], z["labels"]
    acc = {}
    for name, path in (("source", src), ("written", out)):
        sess = session(path, optimize=True)
        acc[name] = float(np.mean(np.argmax(sess.run(None, {"image": x})[0], 1) == labels))
    assert acc["source"] - acc["written"] <= 0.02
    assert f"prune: {len(pruned)} layer(s) changed" in res.output


def test_three_methods_compose_in_order_prune_factorize_quantize(tmp_path: Path, monkeypatch) -> None:
    import json

    from typer.testing import CliRunner

    from onnxopt.cli import app
    from onnxopt.lossy import driver, factorization

    assert [m.step for m in resolve_methods(["int8", "factorize:0.5", "prune:0.3"])] == [
        "prune", "factorize", "quantize"]
    assert factorization(0.5).levels == (1.0, 0.75, 0.5, 0.25)

    def measure(models: Any, feeds: Any) -> dict[str, Latency]:  # each later step faster
        return {k: Latency(1.0 / (1 + k.count("+") + (k != "float")), 1, 1, 1, 1, "fake") for k in models}

    monkeypatch.setattr(driver, "default_measure", lambda *_: measure)
    root = Path(__file__).resolve().parents[1]
    report = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["optimize", str(root / "models" / "digits_cnn.onnx"), "--prune", "0.3",
                                   "--factorize", "0.5", "--quantize", "int8", "--data",
                                   str(root / "models" / "digits_val.npz"), "-o", str(tmp_path / "o.onnx"),
                                   "--report", str(report)])
    assert res.exit_code == 0, res.output
    payload = json.loads(report.read_text())
    assert [s["step"] for s in payload["steps"]] == ["prune", "factorize", "quantize"]
    assert payload["method"] == "prune 0.3 + factorize 0.5 + int8"
    applied = [s for s in payload["steps"] if s["applied"]]
    assert {s["step"] for s in applied} >= {"prune", "quantize"}  # two steps to compose at least
    # the written model is the composition of every applied step, in order
    assert payload["written"] == "compressed"
    assert payload["reason"].startswith(" + ".join(payload["candidates"][s["candidate"]]["label"] for s in applied))
    # ... in its graph too: quantized (int8) and with fewer weights than the source (pruned before)
    written, source = onnx.load(tmp_path / "o.onnx"), onnx.load(root / "models" / "digits_cnn.onnx")
    assert "QuantizeLinear" in {n.op_type for n in written.graph.node}

    def weights(m: onnx.ModelProto) -> int:
        return sum(int(np.prod(t.dims)) for t in m.graph.initializer if len(t.dims) >= 2)

    assert weights(written) < 0.9 * weights(source)


def test_a_small_evaluation_split_is_said_to_be_weak(tmp_path: Path) -> None:
    from onnxopt.testing import mlp_model

    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(sizes=(16, 32, 8), batch="N"), path)
    rng = np.random.default_rng(0)
    small = Dataset([{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(5)], source="t")
    result = compress(path, tmp_path / "o.onnx", "dynamic", eval_data=small, force=True, bench=False)
    assert any(w.startswith("the budget is judged on 20 evaluation samples") for w in result.warnings)
    big = Dataset([{"x": rng.standard_normal((16, 16)).astype(np.float32)} for _ in range(5)], source="t")
    result = compress(path, tmp_path / "o.onnx", "dynamic", eval_data=big, force=True, bench=False)
    assert not any("evaluation samples" in w for w in result.warnings)
