"""``onnxopt optimize-many``: every model a task, one row each, and a rerun skips finished models."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import onnx
import pytest
from typer.testing import CliRunner

from onnxopt import many
from onnxopt.cli import app
from onnxopt.testing import mlp_model

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
# int8 without timing (--force writes it): deterministic, and fast enough for three models
ARGS = ["--quantize", "int8", "--no-bench", "--force"]
_RUN_JOB = many.run_job


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """models/a/digits.onnx, models/b/digits.onnx (same bytes, two outputs), models/b/mlp.onnx."""
    for sub in ("a", "b"):
        (tmp_path / "models" / sub).mkdir(parents=True)
        (tmp_path / "models" / sub / "digits.onnx").write_bytes(DIGITS.read_bytes())
    onnx.save(mlp_model(sizes=(16, 32, 8), batch=1), tmp_path / "models" / "b" / "mlp.onnx")
    return tmp_path


def _invoke(tree: Path, *extra: str) -> Any:
    return CliRunner().invoke(app, ["optimize-many", str(tree / "models" / "**" / "*.onnx"),
                                    "--out-dir", str(tree / "opt"), *ARGS, *extra])


def _counting(monkeypatch: pytest.MonkeyPatch, fail_after: int | None = None) -> list[str]:
    """Record the models ``run_job`` is called for; raise Ctrl-C after ``fail_after`` of them."""
    real, calls = _RUN_JOB, []

    def job(j: many.Job) -> dict[str, Any]:
        if fail_after is not None and len(calls) == fail_after:
            raise KeyboardInterrupt
        calls.append(Path(j.source).relative_to(Path(j.source).parents[2]).as_posix())
        return real(j)

    monkeypatch.setattr(many, "run_job", job)
    return calls


def test_a_rerun_after_an_interruption_runs_only_the_unfinished_models(tree: Path, monkeypatch) -> None:
    calls = _counting(monkeypatch, fail_after=1)
    res = _invoke(tree)
    assert res.exit_code == 130, res.output
    assert "interrupted; 1 finished model is recorded" in res.output
    results = tree / "opt" / many.RESULTS
    assert [json.loads(x)["model"] for x in results.read_text().splitlines()] == [
        str(tree / "models" / "a" / "digits.onnx")]
    first = tree / "opt" / "a" / "digits.onnx"
    stamp = first.stat().st_mtime_ns
    assert not (tree / "opt" / "b" / "digits.onnx").exists()

    calls = _counting(monkeypatch)
    res = _invoke(tree)
    assert res.exit_code == 0, res.output
    assert calls == ["models/b/digits.onnx", "models/b/mlp.onnx"]  # not a/digits.onnx again
    assert first.stat().st_mtime_ns == stamp
    assert "3 models: 3 compressed (1 done earlier)" in res.output

    calls = _counting(monkeypatch)
    assert _invoke(tree).exit_code == 0
    assert calls == []
    # the key holds the options and the content: another option reruns all, a changed model itself
    calls = _counting(monkeypatch)
    assert _invoke(tree, "--seed", "1").exit_code == 0
    assert len(calls) == 3
    onnx.save(mlp_model(sizes=(16, 24, 8), batch=1), tree / "models" / "b" / "mlp.onnx")
    calls = _counting(monkeypatch)
    assert _invoke(tree, "--seed", "1").exit_code == 0
    assert calls == ["models/b/mlp.onnx"]


def test_rows_and_files_match_optimize_on_each_model(tree: Path) -> None:
    (tree / "models" / "b" / "broken.onnx").write_bytes(b"not a model")
    res = _invoke(tree)
    assert res.exit_code == 0, res.output
    with (tree / "opt" / many.SUMMARY).open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(many.COLUMNS)
    by_model = {Path(r["model"]).relative_to(tree / "models").as_posix(): r for r in rows}
    assert sorted(by_model) == ["a/digits.onnx", "b/broken.onnx", "b/digits.onnx", "b/mlp.onnx"]
    broken = by_model.pop("b/broken.onnx")
    assert broken["status"] == "failed"
    assert "not a valid ONNX protobuf" in broken["reason"]
    for rel, row in by_model.items():
        out = tree / "opt" / rel
        assert row["status"] == "compressed"
        assert row["output"] == str(out)
        assert int(row["size_after"]) == out.stat().st_size  # the file on disk
        assert int(row["size_before"]) == (tree / "models" / rel).stat().st_size
        # the same bytes as optimize on that model alone
        single = tree / "single.onnx"
        r = CliRunner().invoke(app, ["optimize", str(tree / "models" / rel), "-o", str(single), *ARGS])
        assert r.exit_code == 0, r.output
        assert onnx.load(single).graph == onnx.load(out).graph
        assert {n.op_type for n in onnx.load(out).graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    assert "4 models: 3 compressed, 1 failed" in res.output


def test_no_match_is_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["optimize-many", str(tmp_path / "*.onnx"), "--out-dir", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert res.output.strip() == f"onnxopt: error: '{tmp_path / '*.onnx'}' matches no .onnx file"


def test_measure_on_needs_ray(tree: Path) -> None:
    res = _invoke(tree, "--measure-on", "target")
    assert res.exit_code == 1
    assert "--measure-on pins latency tasks to Ray nodes; add --executor ray" in res.output
    assert not (tree / "opt" / "a").exists()


def test_without_a_method_the_lossless_passes_run_and_match_the_source(tree: Path) -> None:
    import numpy as np

    from onnxopt.runtime import session

    res = CliRunner().invoke(app, ["optimize-many", str(tree / "models" / "b" / "mlp.onnx"), "--out-dir",
                                   str(tree / "opt"), "--no-bench"])
    assert res.exit_code == 0, res.output
    with (tree / "opt" / many.SUMMARY).open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "optimized"
    assert row["latency_ratio"] == ""  # --no-bench
    x = np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)
    want = session(tree / "models" / "b" / "mlp.onnx").run(None, {"x": x})[0]
    got = session(Path(row["output"])).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
