from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnxopt.lossy import driver as compress_mod
from onnxopt.bench import Latency
from onnxopt.cli import app
from onnxopt.lossy import compress
from onnxopt.data import load
from onnxopt.runtime import session
from onnxopt.testing import conv_bn_model, mlp_model, op_histogram

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def never_measure(models: Any, feeds: Any) -> dict[str, Latency]:
    raise AssertionError("latency must not be measured on this path")


def fake_measure(float_ms: float, quantized_ms: float):
    def measure(models: Mapping[str, onnx.ModelProto], feeds: Sequence[Any]) -> dict[str, Latency]:
        # the float model and the one quantize step's result, timed together
        assert len(models) == 2 and "float" in models
        assert feeds
        return {k: Latency(v, v, v, 1, 1, "fake")
                for k, v in ((k, float_ms if k == "float" else quantized_ms) for k in models)}

    return measure


@pytest.fixture
def mlp(tmp_path: Path) -> tuple[Path, Path]:
    """A transformer-ish MLP (dynamic batch) and 64 calibration samples."""
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(sizes=(32, 64, 64, 10), batch="N"), path)
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).uniform(0, 1, (64, 32)).astype(np.float32))
    return path, data


@pytest.fixture
def labelled(mlp: tuple[Path, Path], tmp_path: Path) -> Path:
    """The calibration samples with labels (the source's own argmax): the budget is accuracy."""
    model, data = mlp
    x = np.load(data)["x"]
    path = tmp_path / "labelled.npz"
    np.savez(path, x=x, labels=session(model).run(None, {"x": x})[0].argmax(-1))
    return path


# random logits have near-ties, so a flip or two among 64 samples says nothing: the
# latency tests relax top-1 agreement to keep the budget out of their way
LOOSE = {"min_top1": 0.9}


def ops(path: Path) -> dict[str, int]:
    return op_histogram(onnx.load(path))


def test_rolls_back_to_float_when_quantized_is_not_faster(
    mlp: tuple[Path, Path], tmp_path: Path
) -> None:
    model, data = mlp
    out = tmp_path / "out.onnx"
    result = compress(
        model, out, "dynamic", calibration_data=data, measure=fake_measure(1.0, 1.2), **LOOSE
    )
    assert result.written == "float"
    assert "not faster" in result.reason
    assert "wrote the float model" in result.reason
    assert "MatMulInteger" not in ops(out)
    assert "Gemm" in ops(out)
    assert result.candidates[1].within_budget  # rolled back for latency, not for accuracy
    assert result.candidates[1].latency_ms == 1.2
    assert [c.verdict for c in result.candidates] == ["written", "not faster"]


def test_keeps_quantized_when_faster_and_within_budget(
    mlp: tuple[Path, Path], tmp_path: Path
) -> None:
    model, data = mlp
    out = tmp_path / "out.onnx"
    result = compress(
        model, out, "dynamic", calibration_data=data, measure=fake_measure(1.0, 0.5), **LOOSE
    )
    assert result.written == "compressed"
    assert result.float_layers == []
    assert ops(out)["MatMulInteger"] == 3
    assert result.candidates[1].within_budget
    assert result.candidates[1].latency_ms == 0.5
    assert "2.00x faster" in result.reason


@pytest.mark.parametrize(("quantized_ms", "written"), [(0.99, "float"), (0.96, "compressed")])
def test_min_speedup_margin_is_required(
    mlp: tuple[Path, Path], tmp_path: Path, quantized_ms: float, written: str
) -> None:
    model, data = mlp
    result = compress(
        model,
        tmp_path / "o.onnx",
        "dynamic",
        calibration_data=data,
        measure=fake_measure(1.0, quantized_ms),
        **LOOSE,
    )  # 1% faster is within noise (needs 1.03x); 4% is not
    assert result.candidates[1].within_budget  # the latency verdict alone decides
    assert result.written == written
    if written == "float":
        assert "not faster on this machine" in result.reason
        assert "1.01x, needs >= 1.03x" in result.reason
    else:
        assert "1.04x faster than float" in result.reason


@pytest.mark.parametrize("method", ["dynamic", "int8"])
def test_sensitive_layer_is_kept_in_float(tmp_path: Path, method: str) -> None:
    path = tmp_path / "outlier.onnx"
    onnx.save(mlp_model(sizes=(32, 64, 64, 10), batch="N", outlier_layer=1), path)
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).uniform(0, 1, (128, 32)).astype(np.float32))
    out = tmp_path / "out.onnx"
    result = compress(
        path, out, method, calibration_data=data, measure=fake_measure(1.0, 0.5), **LOOSE
    )
    assert not result.candidates[1].within_budget  # fully quantized: the outlier wrecks layer 1
    worst = max(result.sensitivity, key=result.sensitivity.get)
    assert worst.startswith("fc1")
    assert result.sensitivity[worst] > 100 * max(
        v for k, v in result.sensitivity.items() if k != worst
    )
    assert result.written == "compressed"
    assert result.float_layers == [worst]
    assert result.candidates[-1].within_budget
    assert result.candidates[-1].float_layers == [worst]
    written = onnx.load(out)
    producers = {o: n.op_type for n in written.graph.node for o in n.output}
    gemms = {n.name: n for n in written.graph.node if n.op_type in ("Gemm", "MatMul")}
    # dynamic replaces quantized Gemms; QDQ keeps them, reading a dequantized weight
    float_gemms = {
        name for name, n in gemms.items() if producers.get(n.input[1]) != "DequantizeLinear"
    }
    assert float_gemms == {worst}
    assert len(gemms) == (1 if method == "dynamic" else 3)


def test_evaluation_inputs_are_disjoint_from_calibration_inputs(
    mlp: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, data = mlp
    seen: dict[str, list[np.ndarray]] = {"calibration": [], "evaluation": []}
    real_run, real_compare = compress_mod.PassManager.run, compress_mod.compare

    def run(self: Any, m: onnx.ModelProto, calibration: Any = None, **kw: Any) -> Any:
        if calibration is not None:
            seen["calibration"] += [f["x"] for f in calibration]
        return real_run(self, m, calibration=calibration, **kw)

    def compare(ref: Any, cand: Any, ds: Any, *a: Any, **kw: Any) -> Any:
        seen["evaluation"] += [f["x"] for f in ds.feeds]
        return real_compare(ref, cand, ds, *a, **kw)

    monkeypatch.setattr(compress_mod.PassManager, "run", run)
    monkeypatch.setattr(compress_mod, "compare", compare)
    result = compress(
        model, tmp_path / "o.onnx", "int8", calibration_data=data, measure=fake_measure(1, 0.5)
    )
    calib_rows = {r.tobytes() for x in seen["calibration"] for r in x}
    eval_rows = {r.tobytes() for x in seen["evaluation"] for r in x}
    assert calib_rows
    assert eval_rows
    assert not calib_rows & eval_rows
    assert len(calib_rows) + len(eval_rows) == 64
    assert any("split" in w for w in result.warnings)


def test_force_writes_the_quantized_model_anyway(mlp: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = mlp
    out = tmp_path / "out.onnx"
    result = compress(
        model,
        out,
        "dynamic",
        calibration_data=data,
        force=True,
        measure=fake_measure(1.0, 2.0),
        **LOOSE,
    )
    assert result.written == "compressed"
    assert result.candidates[1].within_budget
    assert result.reason.startswith("--force: wrote dynamic although dynamic is within budget but")
    assert "not faster on this machine" in result.reason
    assert result.candidates[1].verdict == "written (--force)"
    assert ops(out)["MatMulInteger"] == 3


def test_over_budget_everywhere_writes_float_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(mlp_model(sizes=(32, 64, 10), batch="N"), path)
    result = compress(
        path,
        tmp_path / "o.onnx",
        "int4",
        min_cosine=0.999999,
        min_top1=1.0,
        measure=never_measure,
    )
    assert result.written == "float"
    assert result.reason.startswith("no int4 variant is within the accuracy budget")
    assert all(not c.within_budget for c in result.candidates[1:])
    assert all(c.latency_ms is None for c in result.candidates)  # never timed
    assert any("GENERATED" in w for w in result.warnings)
    assert any(n.startswith("input 'x' dim 0 ('N') = ") for n in result.notes)  # as probed


def test_fp16_keeps_float32_io(tmp_path: Path) -> None:
    path = tmp_path / "cnn.onnx"
    onnx.save(conv_bn_model(dynamic_batch=True), path)
    out = tmp_path / "o.onnx"
    result = compress(path, out, "fp16", force=True, measure=fake_measure(1.0, 3.0))
    assert result.written == "compressed"
    assert result.candidates[1].within_budget
    assert result.candidates[1].latency_ms == 3.0
    assert result.reason.startswith("--force: wrote fp16 although")
    written = onnx.load(out)
    assert [
        v.type.tensor_type.elem_type for v in list(written.graph.input) + list(written.graph.output)
    ] == [onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT]
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in written.graph.initializer)


def test_old_opset_is_upgraded_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(opset=11, dynamic_batch=True), path)
    result = compress(path, tmp_path / "o.onnx", "int8", force=True, measure=fake_measure(1.0, 0.5))
    assert any("from opset 11 to 13" in n for n in result.notes)
    written = onnx.load(tmp_path / "o.onnx")
    assert [i.version for i in written.opset_import if i.domain in ("", "ai.onnx")] == [13]


def test_weight_only_methods_write_packed_weights(mlp: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = mlp
    out = tmp_path / "o.onnx"
    result = compress(
        model, out, "int8-weight", eval_data=data, measure=fake_measure(1.0, 0.5), **LOOSE
    )
    assert result.written == "compressed"
    assert result.candidates[1].within_budget
    assert result.candidates[1].latency_ms == 0.5
    assert ops(out) == {"Relu": 2, "com.microsoft::MatMulNBits": 3}
    assert result.calibration_source.startswith("none")
    assert result.evaluation_samples == 4


def test_cli_quantize_end_to_end(
    mlp: tuple[Path, Path], labelled: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, data = mlp[0], labelled
    monkeypatch.setattr(compress_mod, "default_measure", lambda *_: fake_measure(1, 0.5))
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    res = runner.invoke(
        app,
        [
            "optimize",
            str(model),
            "--quantize",
            "dynamic",
            "--calibration-data",
            str(data),
            "--max-accuracy-drop",
            "30",  # a flip among 32 evaluation rows is 3.1 pt, and the bound adds 2 standard errors
            "-o",
            str(out),
            "--report",
            str(report),
            "--repeats",
            "5",
        ],
    )
    assert res.exit_code == 0, res.output
    assert out.exists()
    assert "wrote" in res.output
    assert "Compression (dynamic)" in res.output
    payload = json.loads(report.read_text())
    assert payload["method"] == "dynamic"
    assert payload["written"] == "compressed"
    assert payload["reason"].startswith("dynamic is within budget (accuracy ")
    assert payload["budget"].startswith("task accuracy drop <= 30 pt (upper confidence bound); every other output")
    assert [c["label"] for c in payload["candidates"]] == ["float (lossless passes)", "dynamic"]
    assert [c["latency_ms"] for c in payload["candidates"]] == [1.0, 0.5]
    assert payload["lossless_validation"]["passed"] is True
    assert payload["lossless_validation"]["tolerance"]["exact"] is True
    # the written file against the source, under the same budget
    assert payload["validation_passed"] is True
    assert payload["validation_detail"].startswith("accuracy ")
    assert payload["validation"]["accuracy_before"] == 1.0  # labels are the source's argmax
    assert ops(out)["MatMulInteger"] == 3


def test_cli_refuses_quantize_with_pass_and_unknown_methods(
    mlp: tuple[Path, Path], tmp_path: Path
) -> None:
    model, _ = mlp
    out = tmp_path / "o.onnx"
    both = runner.invoke(
        app,
        [
            "optimize",
            str(model),
            "--quantize",
            "dynamic",
            "--pass",
            "quantize-dynamic",
            "-o",
            str(out),
        ],
    )
    assert both.exit_code == 1
    assert "not both" in both.output
    assert not out.exists()
    bad = runner.invoke(app, ["optimize", str(model), "--quantize", "int3", "-o", str(out)])
    assert bad.exit_code == 1
    assert "choose one of" in bad.output
    assert not out.exists()


def test_cli_warns_loudly_without_data(mlp: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = mlp
    res = runner.invoke(
        app,
        [
            "optimize",
            str(model),
            "--quantize",
            "int8",
            "-o",
            str(tmp_path / "o.onnx"),
            "--repeats",
            "3",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "WARNING" in res.output
    assert "GENERATED" in res.output


@pytest.mark.skipif(
    not (ROOT / "models" / "digits_cnn.onnx").exists(), reason="demo model not built"
)
def test_demo_model_int8_within_one_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = ROOT / "models" / "digits_cnn.onnx", ROOT / "models" / "digits_val.npz"
    # as if int8 were faster here: the quantized path is the one under test
    monkeypatch.setattr(compress_mod, "default_measure", lambda *_: fake_measure(1, 0.5))
    out, report = tmp_path / "digits.int8.onnx", tmp_path / "r.json"
    res = runner.invoke(
        app,
        [
            "optimize",
            str(model),
            "--quantize",
            "int8",
            "--data",
            str(data),
            "--max-accuracy-drop",
            "1.0",
            "-o",
            str(out),
            "--report",
            str(report),
        ],
    )
    assert res.exit_code == 0, res.output
    payload = json.loads(report.read_text())
    # the written model is within budget: measure its accuracy on the held-out half ourselves
    dataset = load(data, onnx.load(model))
    _, held_out = dataset.split(0.5)

    def accuracy(path: Path) -> float:
        sess = session(path, optimize=True)
        logits = np.concatenate([sess.run(None, f)[0] for f in held_out.feeds])
        return float(np.mean(logits.argmax(-1) == held_out.labels))

    assert payload["written"] == "compressed"
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(out).graph.node)
    drop = (accuracy(model) - accuracy(out)) * 100
    assert drop <= 1.0


@pytest.mark.parametrize(("n", "needed"), [(20, 5), (20, 1), (20, 19), (2, 1), (33, 16)])
def test_allocation_search_finds_the_fewest_float_layers(n: int, needed: int) -> None:
    # k moves applied = k layers quantized; the budget holds while at least `needed` stay float
    from onnxopt.lossy.allocation import largest_within_budget

    evaluated: list[int] = []

    def attempt(k: int) -> bool:
        evaluated.append(k)
        return n - k >= needed

    assert largest_within_budget(n, attempt, known_fail=n) == n - needed
    assert n not in evaluated  # the uniform candidate is known to fail: never evaluated again
    assert len(evaluated) <= 2 * (n - 1).bit_length() + 1


def test_allocation_search_steps_down_by_doubling_and_gives_up_at_zero() -> None:
    from onnxopt.lossy.allocation import largest_within_budget

    evaluated: list[int] = []

    def attempt(k: int) -> bool:
        evaluated.append(k)
        return False

    assert largest_within_budget(9, attempt, known_fail=9) == 0
    # 1, 2, 4 and 8 layers in float, as the float-layer search did
    assert evaluated == [8, 7, 5, 1]


def _flip_a_weight_in(monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
    """Make a level-1 pass miscompile: negate the first 2-D weight, once."""
    import onnx_graphsurgeon as gs

    real_run = cls.run
    done: list[bool] = []

    def run(self: Any, graph: Any, ctx: Any) -> Any:
        result = real_run(self, graph, ctx)
        if not done:
            w = next(
                t for t in graph.tensors().values()
                if isinstance(t, gs.Constant) and t.values.ndim == 2
            )
            w.values = -w.values
            done.append(True)
        return result

    monkeypatch.setattr(cls, "run", run)


def test_lossless_miscompile_is_refused_and_nothing_written(
    mlp: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnxopt.passes.fuse_matmul_add import FuseMatMulAddPass

    from onnxopt.errors import ValidationError

    _flip_a_weight_in(monkeypatch, FuseMatMulAddPass)
    model, data = mlp
    out = tmp_path / "o.onnx"
    with pytest.raises(ValidationError, match="lossless passes") as err:
        compress(model, out, "dynamic", calibration_data=data, measure=never_measure, **LOOSE)
    assert "against the source model" in str(err.value)
    assert "nothing was written" in str(err.value)
    assert not out.exists()
    assert not list(tmp_path.glob(".onnxopt-*"))


def test_written_model_is_validated_against_the_source(
    mlp: tuple[Path, Path], tmp_path: Path
) -> None:
    model, data = mlp
    result = compress(
        model, tmp_path / "o.onnx", "dynamic", calibration_data=data,
        measure=fake_measure(1.0, 0.5), **LOOSE,
    )
    assert result.written == "compressed"
    assert result.lossless_validation is not None
    assert result.lossless_validation.tolerance.exact
    assert result.validation is not None
    assert not result.validation.tolerance.exact
    assert result.validation_passed  # within budget against the source, not only the float model
    assert result.validation_detail == "fidelity floor holds on every output"
    assert result.validation.samples == result.evaluation_samples


def test_written_float_model_is_checked_with_the_lossless_tolerance(
    mlp: tuple[Path, Path], tmp_path: Path
) -> None:
    model, data = mlp
    result = compress(
        model, tmp_path / "o.onnx", "dynamic", calibration_data=data,
        measure=fake_measure(1.0, 2.0), **LOOSE,
    )
    assert result.written == "float"
    assert result.validation is not None
    assert result.validation.tolerance.exact
    assert result.validation_passed
    assert result.validation_detail == "outputs within atol 0.0001 rtol 0.001"


@pytest.mark.parametrize(
    "unusable",
    [
        None,  # the first feed ran (as if): compress runs the source on all of them
        "input 'x': generated [2, 31] but the model needs 32 columns",
        "the original model fails on generated inputs (x=2x31): the model needs 32 columns",
    ],
)
def test_lossy_methods_refuse_generated_inputs_the_source_fails_on(
    mlp: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unusable: str | None
) -> None:
    from onnxopt.data import Dataset
    from onnxopt.errors import OnnxoptError

    def synthesize(
        model: Any, reference: Any, count: int = 8, pins: Any = None, seed: int = 0
    ) -> Dataset:
        # one column short of x's 32: the source model itself cannot run on these
        feeds = [{"x": np.zeros((2, 31), np.float32)} for _ in range(count)]
        # unusable: what onnxopt.data found when it ran the model on the first feed
        return Dataset(feeds, generated=True, source=f"generated (seed {seed})", unusable=unusable)

    monkeypatch.setattr(compress_mod.data_mod, "synthesize", synthesize)
    model, _ = mlp
    out = tmp_path / "o.onnx"
    with pytest.raises(OnnxoptError) as err:
        compress(model, out, "int8", measure=never_measure)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("the original model fails on")
    assert message.count("the original model fails") == 1
    assert "generated inputs" in message
    assert "--calibration-data/--data" in message
    assert "needs 32 columns" in message or "Expected: 32" in message
    assert not out.exists()
    res = runner.invoke(app, ["optimize", str(model), "--quantize", "dynamic", "-o", str(out)])
    assert res.exit_code == 1
    assert res.output.startswith("onnxopt: error: the original model fails on")
    assert len(res.output.strip().splitlines()) == 1
    assert not out.exists()


def _quantize_cli(model: Path, data: Path, out: Path, *extra: str) -> Any:
    """``--quantize dynamic`` on labelled data with a budget the quantized model meets."""
    return runner.invoke(
        app,
        ["optimize", str(model), "--quantize", "dynamic", "--data", str(data),
         "--max-accuracy-drop", "30", "-o", str(out), "--repeats", "3", *extra],
    )


def test_cli_quantize_rejects_no_validate(
    mlp: tuple[Path, Path], labelled: Path, tmp_path: Path
) -> None:
    model, data = mlp[0], labelled
    out = tmp_path / "o.onnx"
    res = _quantize_cli(model, data, out, "--no-validate")
    assert res.exit_code == 1
    assert res.output.startswith("onnxopt: error: --quantize needs validation")
    assert len(res.output.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_quantize_no_bench_needs_force(
    mlp: tuple[Path, Path], labelled: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, data = mlp[0], labelled
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    monkeypatch.setattr(compress_mod, "default_measure", lambda *_: never_measure)
    res = _quantize_cli(model, data, out, "--no-bench")
    assert res.exit_code == 1
    assert res.output.startswith("onnxopt: error: --no-bench")
    assert "--force" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not out.exists()
    res = _quantize_cli(model, data, out, "--no-bench", "--force", "--report", str(report))
    assert res.exit_code == 0, res.output
    payload = json.loads(report.read_text())
    assert payload["written"] == "compressed"
    assert "latency not measured (--no-bench)" in payload["reason"]
    assert all(c["latency_ms"] is None for c in payload["candidates"])
    assert ops(out)["MatMulInteger"] == 3


def test_cli_quantize_honours_verify_each(
    mlp: tuple[Path, Path], labelled: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, data = mlp[0], labelled
    seen: list[tuple[tuple[str, ...], bool]] = []
    real_init = compress_mod.PassManager.__init__

    def init(self: Any, *args: Any, **kw: Any) -> None:
        real_init(self, *args, **kw)
        seen.append((self.pipeline, self.verify_each))

    monkeypatch.setattr(compress_mod.PassManager, "__init__", init)
    monkeypatch.setattr(compress_mod, "default_measure", lambda *_: fake_measure(1, 0.5))
    res = _quantize_cli(model, data, tmp_path / "o.onnx", "--verify-each")
    assert res.exit_code == 0, res.output
    assert seen[0][0][0] == "eliminate-identity"  # the lossless preset comes first
    assert all(verify for _, verify in seen)


def test_cli_quantize_honours_atol_rtol_for_the_lossless_step(
    mlp: tuple[Path, Path], labelled: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, data = mlp[0], labelled
    real_run = compress_mod.PassManager.run

    def nudging_run(self: Any, m: onnx.ModelProto, **kw: Any) -> Any:
        result, report = real_run(self, m, **kw)
        if self.preset:  # the lossless step: move every bias by 2e-3
            for t in result.graph.initializer:
                if t.name.startswith("b"):
                    arr = onnx.numpy_helper.to_array(t) + np.float32(2e-3)
                    t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
        return result, report

    monkeypatch.setattr(compress_mod.PassManager, "run", nudging_run)
    monkeypatch.setattr(compress_mod, "default_measure", lambda *_: fake_measure(1, 0.5))
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    strict = _quantize_cli(model, data, out)
    assert strict.exit_code == 1
    assert "onnxopt: error: the lossless passes" in strict.output
    assert "atol 0.0001" in strict.output
    assert "rtol 0.001" in strict.output
    assert not out.exists()
    loose = _quantize_cli(
        model, data, out, "--atol", "0.05", "--rtol", "0.002", "--report", str(report)
    )
    assert loose.exit_code == 0, loose.output
    tol = json.loads(report.read_text())["lossless_validation"]["tolerance"]
    assert (tol["exact"], tol["atol"], tol["rtol"]) == (True, 0.05, 0.002)


def test_cli_quantize_output_is_short_and_says_the_decision_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, out, report = tmp_path / "deep.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(mlp_model(sizes=(32, *[64] * 12, 10), batch="N"), path)
    monkeypatch.setattr(compress_mod, "default_measure", lambda *_: fake_measure(1, 0.5))
    res = runner.invoke(
        app,
        ["optimize", str(path), "--quantize", "int4", "--min-cosine", "0.999", "-o", str(out),
         "--report", str(report)],
    )
    assert res.exit_code == 0, res.output
    payload = json.loads(report.read_text())
    assert len(payload["sensitivity"]) == 13  # the report keeps every layer
    assert payload["written"] == "compressed"
    lines = res.output.splitlines()
    assert len(lines) < 45
    header = next(line for line in lines if "candidate" in line)
    for empty in ("accuracy", "drop"):  # no labels: those columns have no values
        assert empty not in header
    assert sum(f"fc{i}_gemm" in res.output for i in range(13)) == 10  # the top 10 only
    assert "... 3 more (all in the --report JSON)" in res.output
    assert "below the fidelity floor" not in res.output  # said per candidate in the report only
    assert len(payload["candidates"]) > 3
    assert res.output.count("decision: ") == 1
    assert [line for line in lines if line.startswith("decision: ")] == [
        f"decision: {payload['reason']}"
    ]
    assert res.output.count("note: input 'x' dim 0") == 1
    assert lines[-1].startswith(f"wrote {out} (compressed model); against the source: ")
