"""Never slower, never bigger: a lossless run drops the pass that made its result worse.

Latency is faked (``onnxopt.api.measure_latency`` replaced by a function that prices each
model by its ops), so the slowdown is known and the test cannot be fooled by machine load;
sizes are real files. The fake keeps the interleaved-rounds shape of the real measurement.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper
from typer.testing import CliRunner

from onnxopt import api, report_html
from onnxopt.bench import Latency
from onnxopt.cli import app
from onnxopt.graph_utils import op_histogram, parameter_count
from onnxopt.guard import SIZE_FLOOR, latency_ratio
from onnxopt.testing import assert_equivalent, make_model, random_feeds, vi

rng = np.random.default_rng(0)


def _gemm_bias_model() -> onnx.ModelProto:
    """Level 1 changes it twice: eliminate-identity drops the Identity, fuse-matmul-add makes a Gemm."""
    return make_model(
        [helper.make_node("Identity", ["x"], ["xi"]), helper.make_node("MatMul", ["xi", "w"], ["h"]),
         helper.make_node("Add", ["h", "b"], ["y"])],
        [vi("x", [4, 16])], [vi("y", [4, 8])],
        {"w": rng.standard_normal((16, 8)).astype(np.float32), "b": rng.standard_normal(8).astype(np.float32)},
    )


def _latency(ms: float, repeats: int, noise: np.random.Generator) -> Latency:
    samples = ms * (1.0 + noise.normal(0.0, 0.02, repeats))
    return Latency(float(np.median(samples)), float(np.percentile(samples, 90)), float(samples.min()),
                   repeats, 1, "thread_time", tuple(float(s) for s in samples))


class FakeClock:
    """Prices a model at 1 ms, times ``slowdown(call, hist)``; counts the measurements."""

    def __init__(self, slowdown: Callable[[int, dict[str, int]], float]) -> None:
        self.slowdown, self.calls, self.models = slowdown, 0, []  # type: ignore[var-annotated]

    def __call__(self, models: Mapping[str, Any], feeds: Any, threads: int = 1, repeats: int = 30,
                 tick: Any = None, **_: Any) -> dict[str, Latency]:
        self.calls += 1
        self.models.append(sorted(models))
        noise = np.random.default_rng(self.calls)
        return {k: _latency(self.slowdown(self.calls, op_histogram(onnx.load(str(m)))), repeats, noise)
                for k, m in models.items()}


def _gemm_costs(call: int, hist: dict[str, int]) -> float:
    return 1.25 if "Gemm" in hist else 1.0


def test_drops_the_pass_that_slows_the_model_and_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst, rep = tmp_path / "m.onnx", tmp_path / "m.opt.onnx", tmp_path / "r.json"
    model = _gemm_bias_model()
    onnx.save(model, src)
    clock = FakeClock(_gemm_costs)
    monkeypatch.setattr(api, "measure_latency", clock)
    result = api.optimize_file(src, dst, report_path=rep, bench_repeats=60)
    written = onnx.load(str(dst))
    # eliminate-identity stays (not slower), fuse-matmul-add goes
    assert op_histogram(written) == {"Add": 1, "MatMul": 1}
    assert result.pipeline.changed_passes == ["eliminate-identity"]
    assert list(result.pipeline.dropped) == ["fuse-matmul-add"]
    assert_equivalent(model, written, atol=1e-6, rtol=1e-6)
    assert result.validation is not None
    assert bool(result.validation)
    # one measurement, then exactly one more with the input, the result and each variant
    assert clock.calls == 2
    assert clock.models[1] == ["after", "before", "without eliminate-identity", "without fuse-matmul-add"]
    warning = next(w for w in result.warnings if w.startswith("dropped "))
    assert warning.startswith("dropped fuse-matmul-add: with it the model measured 1.2")
    saved = json.loads(rep.read_text())["guard"]
    assert [g["dropped"] for g in saved] == [["fuse-matmul-add"]]
    assert saved[0]["reason"] == "slower"
    full = saved[0]["full_pipeline"]
    assert 1.2 < full["second"]["ratio"] < 1.3
    assert full["second"]["slower"]
    assert saved[0]["written"]["ratio"]["slower"] is False
    # both figures: the written model's latency is the variant's, beside the input's
    assert result.latency["after"].median_ms == pytest.approx(1.0, rel=0.03)
    assert saved[0]["full_pipeline"]["median_ms"] == pytest.approx(1.25, rel=0.03)


def test_keeps_everything_when_not_slower(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = tmp_path / "m.onnx", tmp_path / "m.opt.onnx"
    onnx.save(_gemm_bias_model(), src)
    clock = FakeClock(lambda call, hist: 1.0)
    monkeypatch.setattr(api, "measure_latency", clock)
    result = api.optimize_file(src, dst, bench_repeats=60)
    assert op_histogram(onnx.load(str(dst))) == {"Gemm": 1}
    assert clock.calls == 1  # no second measurement when nothing is wrong
    assert result.guard == []
    assert result.pipeline.dropped == {}


def test_a_slowdown_the_second_measurement_does_not_confirm_keeps_the_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    src, dst = tmp_path / "m.onnx", tmp_path / "m.opt.onnx"
    onnx.save(_gemm_bias_model(), src)
    clock = FakeClock(lambda call, hist: 1.25 if call == 1 and "Gemm" in hist else 1.0)
    monkeypatch.setattr(api, "measure_latency", clock)
    result = api.optimize_file(src, dst, bench_repeats=60)
    assert op_histogram(onnx.load(str(dst))) == {"Gemm": 1}
    assert clock.calls == 2
    assert result.pipeline.dropped == {}
    assert result.guard[0]["dropped"] == []
    assert "did not confirm" in result.guard[0]["message"]


def test_writes_the_input_unchanged_when_no_single_pass_accounts_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # slow whenever the graph differs from the input at all: dropping either pass alone is not enough
    src, dst = tmp_path / "m.onnx", tmp_path / "m.opt.onnx"
    model = _gemm_bias_model()
    onnx.save(model, src)
    clock = FakeClock(lambda call, hist: 1.0 if hist == {"Add": 1, "Identity": 1, "MatMul": 1} else 1.25)
    monkeypatch.setattr(api, "measure_latency", clock)
    result = api.optimize_file(src, dst, bench_repeats=60)
    written = onnx.load(str(dst))
    assert op_histogram(written) == op_histogram(model)
    assert onnx.printer.to_text(written.graph) == onnx.printer.to_text(model.graph)
    assert sorted(result.pipeline.dropped) == ["eliminate-identity", "fuse-matmul-add"]
    assert result.pipeline.records == []
    assert clock.calls == 2
    warning = next(w for w in result.warnings if w.startswith("dropped "))
    assert "no single pass accounts for it; wrote the input unchanged" in warning


def test_cli_warns_about_the_dropped_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_gemm_bias_model(), src)
    monkeypatch.setattr(api, "measure_latency", FakeClock(_gemm_costs))
    result = CliRunner().invoke(app, ["optimize", str(src), "--repeats", "60"])
    assert result.exit_code == 0, result.output
    assert "WARNING: dropped fuse-matmul-add: with it the model measured 1.2" in result.output
    assert op_histogram(onnx.load(str(tmp_path / "m.opt.onnx"))) == {"Add": 1, "MatMul": 1}


def _samples(ms: float, n: int, seed: int, spread: float = 0.05) -> Latency:
    samples = ms * (1 + np.random.default_rng(seed).normal(0, spread, n))
    return Latency(ms, ms, ms, n, 1, "thread_time", tuple(float(s) for s in samples))


def test_latency_ratio_is_a_paired_interval_around_the_ratio_of_medians() -> None:
    before, after = _samples(2.0, 100, 1), _samples(2.4, 100, 2)
    r = latency_ratio(before, after)
    oracle = np.median(after.samples_ms) / np.median(before.samples_ms)
    assert r.ratio == pytest.approx(oracle)
    assert r.low < oracle < r.high
    assert r.slower
    assert r.rounds == 100
    # the same distribution measured twice: an interval around 1, not slower
    same = latency_ratio(_samples(2.0, 100, 3), _samples(2.0, 100, 4))
    assert same.low < 1.0 < same.high
    assert not same.slower
    # 2% slower is within the margin (3%) even when certain
    slight = latency_ratio(_samples(2.0, 100, 5, spread=0.001), _samples(2.04, 100, 6, spread=0.001))
    assert slight.low > 1.0
    assert not slight.slower


def _expand_model(rows: int = 128, cols: int = 1024) -> onnx.ModelProto:
    """Expand of one float to rows x cols (512 KiB): under fold-constants' per-node cap of 1 MiB."""
    return make_model(
        [helper.make_node("Expand", ["one", "shape"], ["big"]), helper.make_node("Add", ["x", "big"], ["y"])],
        [vi("x", [rows, cols])], [vi("y", [rows, cols])],
        {"one": np.full(1, 0.5, np.float32), "shape": np.array([rows, cols], np.int64)},
    )


def test_growth_is_refused_by_default_and_allowed_when_asked(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    model = _expand_model()
    onnx.save(model, src)
    before = src.stat().st_size
    result = api.optimize_file(src, tmp_path / "a.onnx", bench=False)
    assert (tmp_path / "a.onnx").stat().st_size <= before + SIZE_FLOOR
    assert op_histogram(onnx.load(str(tmp_path / "a.onnx"))) == {"Add": 1, "Expand": 1}
    assert result.pipeline.stats("fold-constants") == {"skipped:growth-budget": 1}
    grown = api.optimize_file(src, tmp_path / "b.onnx", bench=False, allow_growth=True)
    written = onnx.load(str(tmp_path / "b.onnx"))
    assert op_histogram(written) == {"Add": 1}
    assert (tmp_path / "b.onnx").stat().st_size > before + 128 * 1024 * 4
    assert grown.guard == []
    assert_equivalent(model, written, atol=0, rtol=0)


def test_a_pass_that_grows_the_file_is_dropped_and_named(tmp_path: Path) -> None:
    # fold-constants asked for by name without its budget: the run-level size check still holds
    src, dst, rep = tmp_path / "m.onnx", tmp_path / "m.opt.onnx", tmp_path / "r.json"
    model = _expand_model()
    onnx.save(model, src)
    result = api.optimize_file(src, dst, level=None,
                               passes=["fold-constants:max_run_growth=inf"], bench=False, report_path=rep)
    assert dst.stat().st_size <= src.stat().st_size + SIZE_FLOOR
    assert op_histogram(onnx.load(str(dst))) == {"Add": 1, "Expand": 1}
    assert list(result.pipeline.dropped) == ["fold-constants"]
    assert result.after.size_bytes == dst.stat().st_size
    saved = json.loads(rep.read_text())["guard"][0]
    assert saved["reason"] == "bigger"
    assert saved["dropped"] == ["fold-constants"]
    assert saved["full_pipeline"]["size_bytes"] > src.stat().st_size + 128 * 1024 * 4
    assert saved["written"]["size_bytes"] == dst.stat().st_size
    assert any(w.startswith("dropped fold-constants: with it the file grew") for w in result.warnings)


def test_cli_allow_growth(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_expand_model(), src)
    runner = CliRunner()
    refused = runner.invoke(app, ["optimize", str(src), "-o", str(tmp_path / "a.onnx"), "--no-bench",
                                  "--pass", "fold-constants:max_run_growth=inf"])
    assert refused.exit_code == 0, refused.output
    assert "WARNING: dropped fold-constants: with it the file grew" in refused.output
    assert "--allow-growth" in refused.output
    allowed = runner.invoke(app, ["optimize", str(src), "-o", str(tmp_path / "b.onnx"), "--no-bench",
                                  "--allow-growth"])
    assert allowed.exit_code == 0, allowed.output
    assert "WARNING: dropped" not in allowed.output
    assert (tmp_path / "b.onnx").stat().st_size > src.stat().st_size + 128 * 1024 * 4


@pytest.mark.parametrize("opset", [13, 17])
def test_fold_budget_counts_a_shared_weight_copied_per_reader(opset: int) -> None:
    """Silero VAD's shape: one weight read through two Unsqueezes; folding both keeps two copies."""
    from onnxopt.api import optimize

    w = rng.standard_normal((256, 256)).astype(np.float32)  # 256 KiB, each copy as big
    axes = {"axes": np.array([0], np.int64)}
    unsq = [helper.make_node("Unsqueeze", ["w", "axes"], [f"w{i}"]) for i in (1, 2)]
    model = make_model(
        [*unsq, helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("MatMul", ["x", "w2"], ["b"]),
         helper.make_node("Add", ["a", "b"], ["y"])],
        [vi("x", [1, 2, 256])], [vi("y", [1, 2, 256])], {"w": w, **axes}, opset=opset,
    )
    kept, report = optimize(model, passes=["fold-constants"])
    assert report.stats("fold-constants") == {"skipped:growth-budget": 2}
    assert parameter_count(kept) == parameter_count(model)
    folded, report = optimize(model, passes=["fold-constants:max_run_growth=inf"])
    assert report.stats("fold-constants") == {"folded-nodes": 2}
    assert parameter_count(folded) == 2 * w.size
    feeds = random_feeds(model, 2)
    assert_equivalent(model, kept, feeds=feeds)
    assert_equivalent(model, folded, feeds=feeds)


def test_dropping_a_pass_keeps_external_data_consistent(tmp_path: Path) -> None:
    # the input keeps its weights in a side file: the variant that replaces the staged output
    # is a complete model by itself (weights loaded, written inline below 2 GB) in the output's
    # directory, and no scratch directory is left behind
    src, dst = tmp_path / "m.onnx", tmp_path / "out" / "m.opt.onnx"
    dst.parent.mkdir()
    model = _expand_model()
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((64, 64), np.float32), "unused"))
    onnx.save(model, src, save_as_external_data=True, location="m.onnx.data", size_threshold=1024)
    result = api.optimize_file(src, dst, level=None, passes=["fold-constants:max_run_growth=inf"], bench=False)
    assert list(result.pipeline.dropped) == ["fold-constants"]
    written = onnx.load(str(dst))  # loads its external data, if any, from beside it
    assert op_histogram(written) == {"Add": 1, "Expand": 1}
    assert sorted(p.name for p in dst.parent.iterdir()) == ["m.opt.onnx"]
    assert not [p for p in tmp_path.rglob(".onnxopt-*")]  # staging and variant directories are gone
    assert_equivalent(model, written, atol=0, rtol=0)


def test_a_bigger_then_slower_result_drops_both_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The size check drops fold-constants; the slower check then drops fuse-matmul-add as well,
    its variants built without fold-constants (``already``), and both drops are named."""
    gemm = _gemm_bias_model()
    model = make_model(  # _gemm_bias_model beside _expand_model's graph, on its own input z
        [*gemm.graph.node, helper.make_node("Expand", ["one", "shape"], ["big"]),
         helper.make_node("Add", ["z", "big"], ["y2"])],
        [*gemm.graph.input, vi("z", [128, 1024])], [*gemm.graph.output, vi("y2", [128, 1024])],
        {**{t.name: onnx.numpy_helper.to_array(t) for t in gemm.graph.initializer},
         "one": np.full(1, 0.5, np.float32), "shape": np.array([128, 1024], np.int64)},
    )
    src, dst = tmp_path / "m.onnx", tmp_path / "m.opt.onnx"
    onnx.save(model, src)
    clock = FakeClock(_gemm_costs)
    monkeypatch.setattr(api, "measure_latency", clock)
    result = api.optimize_file(src, dst, level=None, passes=[
        "fold-constants:max_run_growth=inf", "eliminate-identity", "fuse-matmul-add"])
    written = onnx.load(str(dst))
    assert op_histogram(written) == {"MatMul": 1, "Add": 2, "Expand": 1}
    assert sorted(result.pipeline.dropped) == ["fold-constants", "fuse-matmul-add"]
    assert [(g["reason"], g["dropped"]) for g in result.guard] == [
        ("bigger", ["fold-constants"]), ("slower", ["fold-constants", "fuse-matmul-add"])]
    assert clock.models[1] == ["after", "before", "without eliminate-identity, fold-constants",
                               "without fold-constants, fuse-matmul-add"]
    assert dst.stat().st_size <= src.stat().st_size + SIZE_FLOOR
    assert result.validation is not None
    assert bool(result.validation)
    assert_equivalent(model, written, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- trials: kept only where faster


def _batched_bias_model() -> onnx.ModelProto:
    """A MatMul + bias Add on 3-D activations: fuse-batched-matmul-add's one candidate, a trial."""
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        [vi("x", [2, 5, 16])], [vi("y", [2, 5, 8])],
        {"w": rng.standard_normal((16, 8)).astype(np.float32), "b": rng.standard_normal(8).astype(np.float32)},
    )


class ThreadClock(FakeClock):
    """Prices the Gemm form at ``costs[threads]`` of the MatMul form's 1 ms."""

    def __init__(self, costs: Mapping[int, float]) -> None:
        super().__init__(lambda call, hist: 1.0)
        self.costs, self.threads = costs, []  # type: ignore[var-annotated]

    def __call__(self, models: Mapping[str, Any], feeds: Any, threads: int = 1, repeats: int = 30,
                 tick: Any = None, **_: Any) -> dict[str, Latency]:
        self.threads.append(threads)
        self.slowdown = lambda call, hist: self.costs[threads] if "Gemm" in hist else 1.0
        return super().__call__(models, feeds, threads, repeats, tick)


@pytest.mark.parametrize(("one", "every", "kept"), [
    (0.9, 0.9, True),  # faster at one thread and at every core: kept
    (1.02, 1.02, False),  # 2% slower: below the never-slower margin, yet not faster, so left out
    (0.9, 1.15, False),  # faster at one thread, slower with every core (ViT's Gemm form here)
])
def test_a_trial_pass_is_kept_only_where_the_model_measures_faster_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one: float, every: float, kept: bool,
) -> None:
    src, dst, rep = tmp_path / "m.onnx", tmp_path / "m.opt.onnx", tmp_path / "r.json"
    model = _batched_bias_model()
    onnx.save(model, src)
    clock = ThreadClock({1: one, 2: every})
    monkeypatch.setattr(api, "measure_latency", clock)
    monkeypatch.setattr(api, "cores", lambda: 2)
    # this machine's micro-benchmark is not asked: the trial rewrites whatever it predicts
    monkeypatch.setattr("onnxopt.passes.fuse_batched_matmul_add.measured_ratio", lambda: 2.0)
    result = api.optimize_file(src, dst, report_path=rep, bench_repeats=60)
    written = onnx.load(str(dst))
    # the first measurement, then input, result and the model without the pass at 1 and 2 threads
    assert clock.threads == [1, 1, 2]
    assert clock.models[1] == clock.models[2] == ["after", "before", "without"]
    saved = json.loads(rep.read_text())["guard"]
    assert [g["trial"] for g in saved] == ["fuse-batched-matmul-add"]
    assert saved[0]["threads"]["1"]["ratio"] == pytest.approx(one, rel=0.03)
    assert saved[0]["threads"]["2"]["ratio"] == pytest.approx(every, rel=0.03)
    if kept:  # faster with it: kept, and the latency is the result's
        assert op_histogram(written)["Gemm"] == 1
        assert "MatMul" not in op_histogram(written)
        assert saved[0]["dropped"] == []
        assert result.latency["after"].median_ms == pytest.approx(one, rel=0.03)
        assert saved[0]["message"].startswith("trial: kept fuse-batched-matmul-add")
    else:
        assert op_histogram(written) == {"MatMul": 1, "Add": 1}
        assert saved[0]["dropped"] == ["fuse-batched-matmul-add"]
        assert list(result.pipeline.dropped) == ["fuse-batched-matmul-add"]
        assert result.latency["after"].median_ms == pytest.approx(1.0, rel=0.03)
        assert saved[0]["message"].startswith("trial: left out fuse-batched-matmul-add")
    assert not any(w.startswith("trial") for w in result.warnings)  # a verdict, not a caveat
    assert_equivalent(model, written, atol=1e-5, rtol=1e-5)
    assert result.validation is not None
    assert bool(result.validation)
    page = report_html.render(json.loads(rep.read_text()))
    passes = page[page.index('id="passes"'):]
    assert html.escape(saved[0]["message"]) in passes  # the passes section shows the verdict
    warnings = page[page.index('<section id="warnings">'):]
    assert "trial:" not in warnings[:warnings.index("</section>")]  # and no warning at the top repeats it


def test_a_pass_the_user_forced_is_not_a_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = tmp_path / "m.onnx", tmp_path / "m.opt.onnx"
    onnx.save(_batched_bias_model(), src)
    clock = FakeClock(lambda call, hist: 1.02 if "Gemm" in hist else 1.0)
    monkeypatch.setattr(api, "measure_latency", clock)
    result = api.optimize_file(src, dst, level=None, passes=["fuse-batched-matmul-add:force=true"],
                               bench_repeats=60)
    assert op_histogram(onnx.load(str(dst)))["Gemm"] == 1  # asked for: kept though not faster
    assert clock.calls == 1
    assert result.guard == []


def test_no_trial_without_a_measurement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--no-bench: nothing measures the trial, so the pass asks its per-machine prediction."""
    src, dst = tmp_path / "m.onnx", tmp_path / "m.opt.onnx"
    onnx.save(_batched_bias_model(), src)
    monkeypatch.setattr("onnxopt.passes.fuse_batched_matmul_add.measured_ratio", lambda: 2.0)
    result = api.optimize_file(src, dst, bench=False)
    assert "Gemm" not in op_histogram(onnx.load(str(dst)))
    row = next(r for r in result.pipeline.summary() if r["name"] == "fuse-batched-matmul-add")
    assert row["stats"] == {"skipped:not-faster": 1}
    assert result.guard == []


def test_an_unchanged_graph_is_written_as_it_was_without_a_dropped_warning(tmp_path: Path) -> None:
    """No pass changes a chain of 900 Relus, but writing it back adds a value_info per value
    (about 22 KB, past the margin): the input is written as it was, and the note says why."""
    nodes = [helper.make_node("Relu", [f"h{i}" if i else "x"], [f"h{i + 1}" if i < 899 else "y"]) for i in range(900)]
    src, dst = tmp_path / "m.onnx", tmp_path / "m.opt.onnx"
    onnx.save(make_model(nodes, [vi("x", [1, 8])], [vi("y", [1, 8])]), src)
    result = api.optimize_file(src, dst, bench=False)
    assert result.pipeline.changed_passes == []
    assert not any(w.startswith("dropped ") for w in result.warnings)
    assert any(w.startswith("no pass changed the graph; wrote the input as it was") for w in result.warnings)
    assert [g["reason"] for g in result.guard] == ["unchanged"]
    assert dst.stat().st_size <= src.stat().st_size
    assert len(onnx.load(str(dst)).graph.value_info) == 0
