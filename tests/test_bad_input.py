"""Bad input never produces a traceback, a partial file, or a modified input.

Every case runs the CLI and checks: the exit code, a one-line ``onnxopt: error:``
message, no traceback, no output file and no ``.onnxopt-*`` staging directory left
behind, and the input file unchanged (hash before and after).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from typer.testing import CliRunner

from onnxopt.cli import app
from onnxopt.testing import make_model, op_histogram, vi

runner = CliRunner()
FAST = ["--level", "0", "--no-bench"]  # the core's behaviour, independent of which passes exist


def _conv_bn(channels: int = 4) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    c = channels
    inits = {
        "W": rng.standard_normal((c, c, 3, 3)).astype(np.float32),
        "gamma": rng.uniform(0.5, 1.5, c).astype(np.float32),
        "beta": rng.standard_normal(c).astype(np.float32),
        "mean": rng.standard_normal(c).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, c).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Identity", ["c"], ["i"]),
        helper.make_node("BatchNormalization", ["i", "gamma", "beta", "mean", "var"], ["y"]),
    ]
    return make_model(nodes, [vi("x", [1, c, 8, 8])], [vi("y", [1, c, 8, 8])], inits)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted([path, *path.parent.glob(path.name + ".data")]):
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _staging_dirs(where: Path) -> list[Path]:
    return list(where.glob(".onnxopt-*"))


def _run(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    # a non-SystemExit exception means the CLI crashed instead of reporting
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def _assert_user_error(code: int, output: str, *fragments: str) -> None:
    assert code == 1, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("onnxopt: error:")]
    assert len(errors) == 1, output
    for f in fragments:
        assert f in errors[0], output


def _assert_nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not out.with_name(out.name + ".data").exists()
    assert _staging_dirs(out.parent) == []
    assert _staging_dirs(tmp_path) == []


# ---- inputs that are not a model ----


def test_missing_file(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    code, output = _run("optimize", tmp_path / "nope.onnx", "-o", out, *FAST)
    _assert_user_error(code, output, "nope.onnx: no such file")
    _assert_nothing_written(tmp_path, out)


def test_directory(tmp_path: Path) -> None:
    d = tmp_path / "model.onnx"
    d.mkdir()
    out = tmp_path / "out.onnx"
    code, output = _run("optimize", d, "-o", out, *FAST)
    _assert_user_error(code, output, "is a directory")
    _assert_nothing_written(tmp_path, out)


def _bad_bytes(kind: str) -> bytes:
    good = _conv_bn().SerializeToString()
    return {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "random": np.random.default_rng(1).bytes(4096),
        "text": b"this is not a model\n",
    }[kind]


@pytest.mark.parametrize(("kind", "message"), [
    ("empty", "file is empty"),
    ("truncated", "not a valid ONNX protobuf"),
    ("random", "not a valid ONNX protobuf"),
    ("text", "not"),
])
def test_not_a_model(tmp_path: Path, kind: str, message: str) -> None:
    src = tmp_path / "model.onnx"
    src.write_bytes(_bad_bytes(kind))
    before = _digest(src)
    out = tmp_path / "out.onnx"
    code, output = _run("optimize", src, "-o", out, *FAST)
    _assert_user_error(code, output, "model.onnx", message)
    _assert_nothing_written(tmp_path, out)
    assert _digest(src) == before


@pytest.mark.parametrize("command", [["inspect"], ["validate", "{src}"], ["bench"]])
def test_other_commands_reject_truncated_model(tmp_path: Path, command: list[str]) -> None:
    src = tmp_path / "model.onnx"
    src.write_bytes(_bad_bytes("truncated"))
    args = [command[0], src, *[a.format(src=src) for a in command[1:]]]
    code, output = _run(*args)
    _assert_user_error(code, output, "not a valid ONNX protobuf")


def test_model_failing_the_checker_is_blamed_on_the_input(tmp_path: Path) -> None:
    # 'nope' is read but never produced
    model = make_model([helper.make_node("Relu", ["nope"], ["y"])], [vi("x", [2])], [vi("y", [2])],
                       check=False)
    src = tmp_path / "model.onnx"
    onnx.save(model, src)
    before = _digest(src)
    out = tmp_path / "out.onnx"
    code, output = _run("optimize", src, "-o", out, *FAST)
    _assert_user_error(code, output, "model.onnx: not a valid ONNX model (onnx.checker)")
    _assert_nothing_written(tmp_path, out)
    assert _digest(src) == before


def test_unknown_default_domain_op(tmp_path: Path) -> None:
    model = make_model([helper.make_node("NoSuchOp", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])],
                       check=False)
    src = tmp_path / "model.onnx"
    onnx.save(model, src)
    out = tmp_path / "out.onnx"
    code, output = _run("optimize", src, "-o", out, *FAST)
    _assert_user_error(code, output, "No Op registered for NoSuchOp")
    _assert_nothing_written(tmp_path, out)


def _custom_op_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Identity", ["x"], ["a"]),
        helper.make_node("Frobnicate", ["a"], ["b"], domain="com.example", strength=3),
        helper.make_node("Relu", ["b"], ["y"]),
    ]
    return make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], extra_opsets={"com.example": 1})


def test_custom_domain_op_cannot_be_validated_so_validation_is_skipped(tmp_path: Path) -> None:
    src = tmp_path / "model.onnx"
    onnx.save(_custom_op_model(), src)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, output = _run("optimize", src, "-o", out, "--report", report, *FAST)
    assert code == 0, output
    saved = json.loads(report.read_text())
    assert saved["validation"] is None
    assert "onnxruntime cannot load the model" in saved["validation_skipped"]
    assert "com.example:Frobnicate" in saved["validation_skipped"]
    # the advice must be right: no data makes onnxruntime run an op it does not know
    assert "--data" not in saved["warnings"][0]
    assert saved["checks"][:2] == ["onnx.checker: ok", "strict shape inference: ok"]
    assert saved["checks"][2].startswith("onnxruntime load: fails on the original model too")
    assert op_histogram(onnx.load(out)) == {"Relu": 1, "com.example::Frobnicate": 1}
    # and scripts that need the guarantee get an error, with nothing written
    out.unlink()
    code, output = _run("optimize", src, "-o", out, "--require-validation", *FAST)
    _assert_user_error(code, output, "--require-validation", "com.example:Frobnicate")
    _assert_nothing_written(tmp_path, out)


def test_custom_domain_op_is_kept_with_no_validate(tmp_path: Path) -> None:
    src = tmp_path / "model.onnx"
    model = _custom_op_model()
    onnx.save(model, src)
    out = tmp_path / "out.onnx"
    # benchmarking is on: it cannot run either, which is a note, not a failure
    code, output = _run("optimize", src, "-o", out, "--level", "0", "--no-validate", "--repeats", "3",
                        "--report", tmp_path / "r.json")
    assert code == 0, output
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["validation_skipped"] == "--no-validate"
    assert saved["bench_skipped"] == "the original model does not run on the generated inputs"
    written = onnx.load(out)
    assert op_histogram(written) == {"Relu": 1, "com.example::Frobnicate": 1}
    custom = next(n for n in written.graph.node if n.domain == "com.example")
    original = next(n for n in model.graph.node if n.domain == "com.example")
    assert list(custom.input) == ["x"]  # the Identity before it was removed
    assert (custom.op_type, list(custom.output), list(custom.attribute)) == (
        original.op_type, list(original.output), list(original.attribute))
    assert {i.domain: i.version for i in written.opset_import}["com.example"] == 1


def test_missing_external_data(tmp_path: Path) -> None:
    src = tmp_path / "model.onnx"
    onnx.save(_conv_bn(), src, save_as_external_data=True, location="weights.bin", size_threshold=0)
    (tmp_path / "weights.bin").unlink()
    before = src.read_bytes()
    out = tmp_path / "out.onnx"
    code, output = _run("optimize", src, "-o", out, *FAST)
    _assert_user_error(code, output, "missing external-data file 'weights.bin'")
    _assert_nothing_written(tmp_path, out)
    assert src.read_bytes() == before


# ---- outputs that cannot be written ----


def test_output_directory_missing(tmp_path: Path) -> None:
    src = tmp_path / "model.onnx"
    onnx.save(_conv_bn(), src)
    out = tmp_path / "no" / "such" / "out.onnx"
    code, output = _run("optimize", src, "-o", out, *FAST)
    _assert_user_error(code, output, "does not exist")
    assert not out.parent.exists()


def test_output_is_a_directory(tmp_path: Path) -> None:
    src = tmp_path / "model.onnx"
    onnx.save(_conv_bn(), src)
    out = tmp_path / "out.onnx"
    out.mkdir()
    code, output = _run("optimize", src, "-o", out, *FAST)
    _assert_user_error(code, output, "is a directory")
    assert out.is_dir() and not any(out.iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a read-only directory")
def test_unwritable_output_directory(tmp_path: Path) -> None:
    src = tmp_path / "model.onnx"
    onnx.save(_conv_bn(), src)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, output = _run("optimize", src, "-o", ro / "out.onnx", *FAST)
    finally:
        ro.chmod(0o700)
    _assert_user_error(code, output, "cannot write to")
    assert list(ro.iterdir()) == []


def test_unwritable_output_directory_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the same failure for root (CI containers): creating the staging directory is refused
    src = tmp_path / "model.onnx"
    onnx.save(_conv_bn(), src)
    out_dir = tmp_path / "ro"
    out_dir.mkdir()

    def refuse(*args: object, **kwargs: object) -> str:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr("tempfile.mkdtemp", refuse)
    code, output = _run("optimize", src, "-o", out_dir / "out.onnx", *FAST)
    _assert_user_error(code, output, "cannot write to", "Permission denied")
    assert list(out_dir.iterdir()) == []


def _enospc(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "model.onnx"
    onnx.save(_conv_bn(), src)
    before = _digest(src)
    out = tmp_path / "out.onnx"
    monkeypatch.setattr(onnx, "save_model", _enospc)
    code, output = _run("optimize", src, "-o", out, *FAST)
    _assert_user_error(code, output, "write failed", "No space left on device")
    _assert_nothing_written(tmp_path, out)
    assert _digest(src) == before


def test_full_disk_while_moving_into_place_keeps_old_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the old output has external data; the new one is staged with its data file and the
    # second move (the model) fails: the data file already moved must be rolled back
    src = tmp_path / "model.onnx"
    # 8 channels: the Conv weight is over write_model's 1 KiB external-data threshold
    onnx.save(_conv_bn(8), src, save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    before = _digest(src)
    real_replace = os.replace
    calls: list[str] = []

    def flaky_replace(a: object, b: object, *args: object, **kwargs: object) -> None:
        calls.append(str(b))
        if len(calls) == 2:
            _enospc()
        real_replace(a, b, *args, **kwargs)

    from onnxopt import io as io_mod

    monkeypatch.setattr(io_mod, "_has_external", lambda model: True)
    monkeypatch.setattr(io_mod.os, "replace", flaky_replace)
    code, output = _run("optimize", src, "-o", src, *FAST)
    _assert_user_error(code, output, "cannot move the output into place", "No space left")
    assert calls[0].endswith(".data") and calls[1].endswith("model.onnx")  # then the rollback
    assert _digest(src) == before  # model and data file both as they were
    assert _staging_dirs(tmp_path) == []


# ---- writing over the input ----


@pytest.mark.parametrize("external", [False, True])
def test_output_equal_to_input_is_replaced_atomically(tmp_path: Path, external: bool) -> None:
    src = tmp_path / "model.onnx"
    model = _conv_bn()
    if external:  # onnx.save converts the proto it is given: save a copy
        onnx.save(onnx.ModelProto.FromString(model.SerializeToString()), src, save_as_external_data=True, location="model.onnx.data",
                  size_threshold=0)
    else:
        onnx.save(model, src)
    code, output = _run("optimize", src, "-o", src, *FAST)
    assert code == 0, output
    written = onnx.load(src)
    assert op_histogram(written) == {"BatchNormalization": 1, "Conv": 1}  # level 0 drops Identity
    from onnxopt.testing import assert_equivalent

    assert_equivalent(model, written, atol=1e-5, rtol=1e-5)
    assert _staging_dirs(tmp_path) == []


def test_failed_validation_leaves_input_and_output_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = tmp_path / "model.onnx"
    onnx.save(_conv_bn(), src)
    before = _digest(src)
    from onnxopt import api
    from onnxopt.validate import OutputDiff, Tolerance, ValidationReport

    def failing(reference: object, candidate: object, data: object, tol: Tolerance,
                **_: object) -> ValidationReport:
        diff = OutputDiff("y", 1.0, 1.0, 0.5, None, 3, 64, False)
        return ValidationReport((diff,), 1, "test", tol)

    monkeypatch.setattr(api, "compare", failing)
    code, output = _run("optimize", src, "-o", src, *FAST)
    assert code == 1 and "Traceback" not in output
    assert output.count("onnxopt: error: validation failed") == 1
    assert _digest(src) == before
    assert _staging_dirs(tmp_path) == []


# ---- interrupts ----

_HOOK = textwrap.dedent("""
    import signal, sys, time
    ready, phase, src, out = sys.argv[1:5]
    # as at a terminal: a test run in the background inherits SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def stall(*args, **kwargs):
        open(ready, "w").close()
        time.sleep(120)

    if phase == "pass":
        from onnxopt.passes.eliminate_identity import EliminateIdentityPass
        EliminateIdentityPass.run = stall
    else:
        import onnxopt.api
        onnxopt.api.compare = stall
    from onnxopt.cli import app
    sys.argv = ["onnxopt", "optimize", src, "-o", out, "--level", "0", "--no-bench"]
    app()
""")


@pytest.mark.parametrize("phase", ["pass", "validation"])
def test_sigint_exits_130_and_writes_nothing(tmp_path: Path, phase: str) -> None:
    src = tmp_path / "model.onnx"
    onnx.save(_conv_bn(), src)
    before = _digest(src)
    ready = tmp_path / "ready"
    out = tmp_path / "out.onnx"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOOK, str(ready), phase, str(src), str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never reached the hook"
            time.sleep(0.05)
        if phase == "validation":  # the staged output exists at this point
            assert len(_staging_dirs(tmp_path)) == 1
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stdout + stderr
    assert "onnxopt: interrupted; nothing was written" in stderr
    _assert_nothing_written(tmp_path, out)
    assert _digest(src) == before


def test_rerun_with_an_old_data_file_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # onnx.save_model(save_as_external_data=True) refuses when the data file's name exists
    # relative to the working directory: rerunning where the last output lies failed
    src = tmp_path / "model.onnx"
    onnx.save(_conv_bn(8), src, save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    from onnxopt import io as io_mod

    monkeypatch.setattr(io_mod, "_has_external", lambda model: True)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        code, output = _run("optimize", "model.onnx", "-o", "out.onnx", *FAST)
        assert code == 0, output
    assert (tmp_path / "out.onnx.data").exists()
    assert _staging_dirs(tmp_path) == []
