from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnxopt import compress as compress_mod
from onnxopt.bench import Latency
from onnxopt.cli import app
from onnxopt.compress import compress
from onnxopt.data import load
from onnxopt.runtime import session
from onnxopt.testing import conv_bn_model, mlp_model, op_histogram

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def fake_measure(float_ms: float, quantized_ms: float):
    def measure(models: Mapping[str, onnx.ModelProto], feeds: Sequence[Any]) -> dict[str, Latency]:
        assert set(models) == {"float", "quantized"}
        assert feeds
        return {
            k: Latency(v, v, v, 1, 1, "fake")
            for k, v in (("float", float_ms), ("quantized", quantized_ms))
        }

    return measure


@pytest.fixture
def mlp(tmp_path: Path) -> tuple[Path, Path]:
    """A transformer-ish MLP (dynamic batch) and 64 calibration samples."""
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(sizes=(32, 64, 64, 10), batch="N"), path)
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).uniform(0, 1, (64, 32)).astype(np.float32))
    return path, data


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
    assert [c.verdict for c in result.candidates] == [
        "written (see below)",
        "rolled back: not faster than float",
    ]


def test_keeps_quantized_when_faster_and_within_budget(
    mlp: tuple[Path, Path], tmp_path: Path
) -> None:
    model, data = mlp
    out = tmp_path / "out.onnx"
    result = compress(
        model, out, "dynamic", calibration_data=data, measure=fake_measure(1.0, 0.5), **LOOSE
    )
    assert result.written == "quantized"
    assert result.float_layers == []
    assert ops(out)["MatMulInteger"] == 3
    assert result.candidates[1].within_budget
    assert result.candidates[1].latency_ms == 0.5
    assert "2.00x faster" in result.reason


def test_min_speedup_margin_is_required(mlp: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = mlp
    result = compress(
        model,
        tmp_path / "o.onnx",
        "dynamic",
        calibration_data=data,
        measure=fake_measure(1.0, 0.99),
        **LOOSE,
    )  # 1% faster: within noise
    assert result.written == "float"


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
    assert result.written == "quantized"
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
    assert result.written == "quantized"
    assert result.reason.startswith("--force")
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
        measure=fake_measure(1.0, 0.5),
    )
    assert result.written == "float"
    assert result.reason.startswith("no int4 variant is within the accuracy budget")
    assert all(not c.within_budget for c in result.candidates[1:])
    assert any("GENERATED" in w for w in result.warnings)


def test_fp16_keeps_float32_io(tmp_path: Path) -> None:
    path = tmp_path / "cnn.onnx"
    onnx.save(conv_bn_model(dynamic_batch=True), path)
    out = tmp_path / "o.onnx"
    result = compress(path, out, "fp16", force=True, measure=fake_measure(1.0, 3.0))
    assert result.written == "quantized"
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
    assert result.written == "quantized"
    assert ops(out) == {"Relu": 2, "com.microsoft::MatMulNBits": 3}
    assert result.calibration_source.startswith("none")
    assert result.evaluation_samples == 4


def test_cli_quantize_end_to_end(mlp: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = mlp
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
            "0.5",
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
    assert payload["written"] in ("float", "quantized")
    assert payload["candidates"][0]["label"] == "float (lossless passes)"
    assert (
        all(c["latency_ms"] is not None for c in payload["candidates"] if c["within_budget"])
        or payload["written"] == "float"
    )


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
def test_demo_model_int8_within_one_point(tmp_path: Path) -> None:
    model, data = ROOT / "models" / "digits_cnn.onnx", ROOT / "models" / "digits_val.npz"
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
    # whatever was written is within budget: measure its accuracy on the held-out half ourselves
    dataset = load(data, onnx.load(model))
    _, held_out = dataset.split(0.5)

    def accuracy(path: Path) -> float:
        sess = session(path, optimize=True)
        logits = np.concatenate([sess.run(None, f)[0] for f in held_out.feeds])
        return float(np.mean(logits.argmax(-1) == held_out.labels))

    drop = (accuracy(model) - accuracy(out)) * 100
    assert drop <= 1.0
    if payload["written"] == "quantized":
        assert any(n.op_type == "QuantizeLinear" for n in onnx.load(out).graph.node)


@pytest.mark.parametrize(("n", "needed"), [(20, 5), (20, 1), (20, 19), (2, 1), (33, 16)])
def test_fallback_search_finds_the_fewest_float_layers(n: int, needed: int) -> None:
    from onnxopt.compress import Candidate, _fewest_float_layers

    ranked = [f"layer{i}" for i in range(n)]
    evaluated: list[int] = []

    def quantize(exclude):
        return len(exclude), {}

    def evaluate(label, qmodel, float_layers):
        evaluated.append(qmodel)
        return Candidate(label, float_layers, qmodel >= needed, "")

    candidates: list[Candidate] = []
    chosen, _ = _fewest_float_layers(ranked, quantize, evaluate, candidates, "int8", (None, None))
    assert chosen is not None and chosen[0] == needed
    assert chosen[1].float_layers == ranked[:needed]
    assert len(evaluated) == len(candidates) <= 2 * (n - 1).bit_length() + 1


def test_fallback_search_gives_up_when_only_float_would_do() -> None:
    from onnxopt.compress import Candidate, _fewest_float_layers

    def evaluate(label, qmodel, float_layers):
        return Candidate(label, float_layers, False, "")

    candidates: list[Candidate] = []
    chosen, last = _fewest_float_layers([f"l{i}" for i in range(9)], lambda ex: (len(ex), {}),
                                        evaluate, candidates, "int8", (None, None))
    assert chosen is None and last[0] == 8
    assert [c.float_layers.__len__() for c in candidates] == [1, 2, 4, 8]
