"""What a new user meets on the console: progress hooks, help, quiet and dry runs, messages."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from typer.testing import CliRunner, Result

from onnxopt.cli import app
from onnxopt.testing import make_model, vi


def _mul_model() -> onnx.ModelProto:
    return make_model(
        [helper.make_node("Mul", ["x", "two"], ["y"])], [vi("x", ["N", 4])], [vi("y", ["N", 4])],
        {"two": np.array(2.0, np.float32)},
    )


def test_measure_latency_ticks_every_round_and_ends_at_total(tmp_path: Path) -> None:
    from onnxopt.bench import measure_latency

    path = tmp_path / "m.onnx"
    onnx.save(_mul_model(), path)
    ticks: list[tuple[int, int]] = []
    feeds = [{"x": np.ones((1, 4), np.float32)}]
    measure_latency({"a": path, "b": path}, feeds, repeats=5,
                    tick=lambda d, t: ticks.append((d, t)))
    assert ticks == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    ticks.clear()
    # a time budget that ends the rounds early still ends the bar at its total
    measure_latency({"a": path}, feeds, repeats=1000, max_seconds=0.0,
                    tick=lambda d, t: ticks.append((d, t)))
    assert ticks[-1] == (5, 5)
    assert ticks[0] == (1, 1000)


def test_calibration_ticks_every_run_with_the_run_count() -> None:
    from onnxopt.calibration import collect_ranges

    feeds = [{"x": np.full((2, 4), i, np.float32)} for i in range(3)]
    ticks: list[tuple[int, int]] = []
    collect_ranges(_mul_model(), feeds, ["y"], tick=lambda d, t: ticks.append((d, t)))
    assert ticks == [(1, 3), (2, 3), (3, 3)]
    ticks.clear()
    collect_ranges(_mul_model(), iter(feeds), ["y"], tick=lambda d, t: ticks.append((d, t)))
    assert ticks == [(1, 0), (2, 0), (3, 0)]  # a stream: length unknown


def test_optimize_file_passes_the_latency_tick_through(tmp_path: Path) -> None:
    from onnxopt.api import optimize_file

    path = tmp_path / "m.onnx"
    onnx.save(_mul_model(), path)
    ticks: list[tuple[int, int]] = []
    optimize_file(path, tmp_path / "o.onnx", bench_repeats=4, input_shapes={"x": (1, 4)},
                  tick=lambda d, t: ticks.append((d, t)))
    assert ticks[-1] == (4, 4)


def test_pytorch_file_points_to_onnxopt_export(tmp_path: Path) -> None:
    import zipfile

    from onnxopt.errors import ModelLoadError
    from onnxopt.io import load_model

    pt = tmp_path / "model.pt"
    pt.write_bytes(b"\x80\x02}q\x00.")  # an old-style pickle
    renamed = tmp_path / "weights.bin"  # torch.save's zip layout under any name
    with zipfile.ZipFile(renamed, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    for path in (pt, renamed):
        with pytest.raises(ModelLoadError, match=re.escape(
                "this is a PyTorch file; convert it with "
                "`onnxopt export MODULE:FACTORY -o model.onnx --input-shape ...`")):
            load_model(path)


# ---- the CLI as a new user meets it ----

runner = CliRunner()


def _conv_model(path: Path) -> Path:
    """A CNN with dynamic batch, height and width: [batch, 3, height, width]."""
    w = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
    model = make_model(
        [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Identity", ["c"], ["i"]), helper.make_node("Relu", ["i"], ["y"])],
        [vi("x", ["batch", 3, "height", "width"])], [vi("y", ["batch", 8, "height", "width"])],
        {"W": w},
    )
    onnx.save(model, path)
    return path


def _invoke(*args: str | Path) -> Result:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_inspect_prints_symbolic_shapes_and_macs_at_readable_shapes(tmp_path: Path) -> None:
    src = _conv_model(tmp_path / "m.onnx")
    result = _invoke("inspect", src)
    assert result.exit_code == 0, result.output
    assert "[batch, 3, height, width]" in result.output  # not swallowed as rich markup
    assert "[batch, 8, height, width]" in result.output
    macs = next(line for line in result.output.splitlines() if line.startswith("MACs"))
    assert " at x=1x3x" in macs
    assert "{" not in macs
    assert "(" not in macs
    pinned = _invoke("inspect", src, "--input-shape", "x=1,3,32,48")
    # 8 output channels * 27 weights per output * 32*48 positions
    assert "MACs 331.8k at x=1x3x32x48" in pinned.output


def test_inspect_says_why_macs_are_unknown(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    # an input of unknown rank: no shape can be chosen without the user
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vi("x", None)],
                       [vi("y", None)], {"W": np.ones((4, 2), np.float32)}, check=False)
    onnx.save(model, src)
    result = _invoke("inspect", src)
    assert result.exit_code == 0, result.output
    assert "MACs: unknown (input 'x' declares no shape: pin it with --input-shape x=...)" in result.output
    assert "MACs -" not in result.output
    scalar = tmp_path / "s.onnx"
    mul = helper.make_node("Mul", ["sr", "sr"], ["y"])
    onnx.save(make_model([mul], [vi("sr", [])], [vi("y", [])]), scalar)
    result = _invoke("inspect", scalar)
    assert "MACs: none counted (no Conv, MatMul or Gemm)" in result.output
    assert "{'sr': ()}" not in result.output


@pytest.mark.parametrize("command", ["optimize", "inspect", "validate", "bench"])
def test_non_positive_input_shape_is_one_line_error(tmp_path: Path, command: str) -> None:
    src = _conv_model(tmp_path / "m.onnx")
    models = [src, src] if command == "validate" else [src]
    result = _invoke(command, *models, "--input-shape", "x=1,3,48,-1")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("onnxopt: error: --input-shape 'x=1,3,48,-1'")


@pytest.mark.parametrize("command", ["optimize", "inspect"])
def test_pytorch_file_says_how_to_convert_it(tmp_path: Path, command: str) -> None:
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"PK\x03\x04 not onnx")
    result = _invoke(command, pt)
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"onnxopt: error: {pt}: this is a PyTorch file; convert it with "
        "`onnxopt export MODULE:FACTORY -o model.onnx --input-shape ...`")


def test_quiet_prints_only_the_summary_line(tmp_path: Path) -> None:
    src = _conv_model(tmp_path / "m.onnx")
    args = ("optimize", src, "--input-shape", "x=1,3,16,16", "--repeats", "3")
    loud = _invoke(*args)
    quiet = _invoke(*args, "-q")
    assert loud.exit_code == 0, loud.output
    assert quiet.exit_code == 0, quiet.output
    assert "Passes" in loud.output
    assert "Before / after" in loud.output
    lines = quiet.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"wrote {tmp_path / 'm.opt.onnx'}: nodes 3 -> 2")
    assert "validated on 8 feeds" in lines[0]
    assert "latency" in lines[0]
    last = loud.output.strip().splitlines()[-1]
    assert last.split(", latency")[0] == lines[0].split(", latency")[0]


def test_dry_run_prints_pass_options_readably(tmp_path: Path) -> None:
    src = _conv_model(tmp_path / "m.onnx")
    result = _invoke("optimize", src, "--dry-run", "--pass", "fold-constants:max_growth=2")
    assert result.exit_code == 0, result.output
    assert "fold-constants(max_output_bytes=1048576, max_growth=2.0, max_run_growth=0.01)" in result.output
    assert "Options(" not in result.output
    assert "inputs: generated at x=1x3x" in result.output
    assert result.output.strip().endswith("dry run: ok; nothing was run")
    assert not (tmp_path / "m.opt.onnx").exists()


def test_dry_run_checks_file_output_directory_and_dims(tmp_path: Path) -> None:
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"\x80\x02}q\x00.")
    result = _invoke("optimize", tmp_path / "missing.onnx", "--dry-run")
    assert result.exit_code == 1
    assert "missing.onnx: no such file" in result.output
    assert "requirements: ok" not in result.output
    assert "dry run: ok" not in result.output
    result = _invoke("optimize", pt, "--dry-run", "-o", tmp_path / "no" / "such" / "dir.onnx")
    assert result.exit_code == 1
    assert "--dry-run found 2 problems" in result.output
    assert "this is a PyTorch file" in result.output
    assert "directory" in result.output
    unranked = tmp_path / "u.onnx"
    onnx.save(make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", None)], [vi("y", None)],
                         check=False), unranked)
    # an input that declares not even its rank gets a candidate shape, said to be a guess
    result = _invoke("optimize", unranked, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "input 'x' declares no shape: 2x3 (a guess); pin its real shape with --input-shape x=" in result.output
    assert list(tmp_path.glob("*.opt.onnx")) == []


def test_help_shows_no_type_placeholders_beside_flags() -> None:
    result = _invoke("optimize", "--help")
    assert result.exit_code == 0
    text = result.output
    for noise in ("<bool>", "<int>", "<list[str]>", "<float>", "<str>", "--no-dry-run",
                  "--no-force", "--no-verify-each", "default: no-"):
        assert noise not in text, noise
    for flag in ("--validate / --no-validate", "--bench / --no-bench", "--require-validation",
                 "--pass NAME[:KEY=VALUE,...]", "--input-shape NAME=1,3,224,224", "-q, --quiet"):
        assert flag in text, flag


def test_console_tables_hide_noise_and_say_what_was_skipped(tmp_path: Path) -> None:
    src = _conv_model(tmp_path / "m.onnx")
    result = _invoke("optimize", src, "--input-shape", "x=1,3,16,16", "--no-bench")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "changed" not in out  # the column that repeated 'what it did'
    assert "removed-identity=1" in out
    assert "no change: " in out
    assert "│ eliminate-dead-code" not in out
    assert "note: latency not measured (--no-bench)" in out
    assert "tolerance" in out
    assert "float32: atol" in out
    assert "top-1 agree" not in out  # an empty column for this output
    no_val = _invoke("optimize", src, "--input-shape", "x=1,3,16,16", "--no-validate", "--no-bench")
    assert "note: not validated (--no-validate)" in no_val.output
    assert no_val.output.strip().splitlines()[-1].endswith("NOT validated (--no-validate)")
    # latency still runs on generated inputs: no note may claim they validated anything
    timed = _invoke("optimize", src, "--input-shape", "x=1,3,16,16", "--no-validate", "--repeats", "3")
    assert "note: not validated (--no-validate)" in timed.output
    assert "validated on generated" not in timed.output


def test_skipped_validation_is_a_warning_at_the_top(tmp_path: Path) -> None:
    src = tmp_path / "custom.onnx"
    nodes = [helper.make_node("Identity", ["x"], ["a"]),
             helper.make_node("Frobnicate", ["a"], ["y"], domain="com.example")]
    model = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], extra_opsets={"com.example": 1})
    onnx.save(model, src)
    result = _invoke("optimize", src, "--level", "0")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("WARNING: validation skipped: onnxruntime cannot load the model")
    assert sum("validation skipped" in line for line in lines) == 1
    assert "note: checked instead of validated: onnx.checker: ok" in result.output
    assert lines[-1].endswith("NOT validated (see the warning)")
    quiet = _invoke("optimize", src, "--level", "0", "-q")
    firsts = [line.split(":")[0] for line in quiet.output.strip().splitlines()]
    assert firsts == ["WARNING", f"wrote {src.with_name('custom.opt.onnx')}"]


def test_require_validation_reaches_optimize_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxopt.api

    seen: dict[str, object] = {}
    real = onnxopt.api.optimize_file

    def spy(*args: object, **kwargs: object) -> object:
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnxopt.api, "optimize_file", spy)
    src = _conv_model(tmp_path / "m.onnx")
    result = _invoke("optimize", src, "--input-shape", "x=1,3,8,8", "--no-bench",
                     "--require-validation")
    assert result.exit_code == 0, result.output
    assert seen["require_validation"] is True
    both = _invoke("optimize", src, "--no-validate", "--require-validation")
    assert both.exit_code == 1
    assert "contradict" in both.output


def test_activity_shows_a_bar_only_while_a_loop_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    import onnxopt.cli as cli

    monkeypatch.setattr(cli, "err", Console(file=io.StringIO(), force_terminal=True, width=100))
    with cli._Activity(True) as activity:
        activity.say("validating")
        assert activity.progress is not None
        (task,) = activity.progress.tasks
        assert task.description == "validating"
        assert task.total is None
        activity.say("measuring latency")
        activity.tick(3, 10)
        (task,) = activity.progress.tasks
        assert (task.description, task.completed, task.total) == ("measuring latency", 3, 10)
    with cli._Activity(False) as off:  # not a terminal, or -q: nothing at all
        off.say("validating")
        off.tick(1, 2)
        assert off.progress is None
