from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from typer.testing import CliRunner

from onnxopt.cli import app
from onnxopt.testing import make_model, vi

runner = CliRunner()


def _write_model(path: Path, bias: float = 0.0) -> Path:
    rng = np.random.default_rng(0)
    m = make_model(
        [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("MatMul", ["a", "W"], ["m"]),
         helper.make_node("Add", ["m", "b"], ["y"])],
        [vi("x", ["batch", 8])], [vi("y", ["batch", 4])],
        {"W": rng.standard_normal((8, 4)).astype(np.float32), "b": np.full(4, bias, np.float32)},
    )
    onnx.save(m, path)
    return path


def test_optimize_writes_validated_model_and_json_report(tmp_path: Path) -> None:
    src = _write_model(tmp_path / "m.onnx")
    before = src.read_bytes()
    result = runner.invoke(app, ["optimize", str(src), "--level", "0", "--repeats", "3",
                                 "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "m.opt.onnx"
    assert out.exists() and src.read_bytes() == before
    assert "Identity" not in {n.op_type for n in onnx.load(out).graph.node}
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["validation"]["passed"] is True
    assert report["before"]["nodes"] == 3 and report["after"]["nodes"] == 2
    assert {"before", "after"} <= set(report["latency"])
    assert "Before / after" in result.output and "latency median" in result.output


def test_validation_failure_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _write_model(tmp_path / "m.onnx")
    import onnxopt.manager

    real_run = onnxopt.manager.PassManager.run

    def corrupting_run(self, model, **kwargs):  # a pass that silently changes the numbers
        out, report = real_run(self, model, **kwargs)
        for t in out.graph.initializer:
            if t.name == "b":
                t.CopyFrom(onnx.numpy_helper.from_array(np.full(4, 0.5, np.float32), "b"))
        return out, report

    monkeypatch.setattr(onnxopt.manager.PassManager, "run", corrupting_run)
    result = runner.invoke(app, ["optimize", str(src), "--level", "0", "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 1
    assert "validation failed" in result.output and "output 'y': max |diff| 0.5" in result.output
    assert "nothing was written" in result.output
    assert not (tmp_path / "o.onnx").exists() and not list(tmp_path.glob(".onnxopt-*"))


def test_user_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    result = runner.invoke(app, ["optimize", str(tmp_path / "missing.onnx")])
    assert result.exit_code == 1
    assert result.output.strip() == f"onnxopt: error: {tmp_path / 'missing.onnx'}: no such file"
    src = _write_model(tmp_path / "m.onnx")
    result = runner.invoke(app, ["optimize", str(src), "--pass", "no-such-pass"])
    assert result.exit_code == 1 and "unknown pass 'no-such-pass'" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "m.opt.onnx").exists()


def test_validate_and_bench_and_inspect_commands(tmp_path: Path) -> None:
    a = _write_model(tmp_path / "a.onnx")
    b = _write_model(tmp_path / "b.onnx", bias=0.25)
    same = runner.invoke(app, ["validate", str(a), str(a)])
    assert same.exit_code == 0 and "outputs match" in same.output
    diff = runner.invoke(app, ["validate", str(a), str(b)])
    assert diff.exit_code == 1 and "max |diff| 0.25" in diff.output
    lossy = runner.invoke(app, ["validate", str(a), str(b), "--min-cosine", "0.5"])
    assert lossy.exit_code == 0
    bench = runner.invoke(app, ["bench", str(a), str(b), "--repeats", "3"])
    assert bench.exit_code == 0 and "median ms" in bench.output
    info = runner.invoke(app, ["inspect", str(a), "--json"])
    assert info.exit_code == 0
    data = json.loads(info.output)
    assert data["ops"] == {"Add": 1, "Identity": 1, "MatMul": 1}
    assert data["parameters"] == 36 and data["macs"] == 32  # batch guessed as 1: 1*4*8
    assert data["inputs"][0]["shape"] == "[batch, 8]"


def test_passes_lists_every_pass() -> None:
    from onnxopt.passes import ALL_PASSES

    result = runner.invoke(app, ["passes"])
    assert result.exit_code == 0
    for cls in ALL_PASSES:
        assert cls.name in result.output
