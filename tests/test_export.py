"""onnxopt export: a tiny torch module exported, checked, and its user errors."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

from onnxopt import optimize  # noqa: E402
from onnxopt.cli import app  # noqa: E402
from onnxopt.errors import ExportError  # noqa: E402
from onnxopt.export import export, load_factory, parse_input_specs  # noqa: E402
from onnxopt.runtime import run, session  # noqa: E402
from onnxopt.testing import assert_equivalent, op_histogram  # noqa: E402

NETS = '''
import torch
from torch import nn


def convnet():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():  # non-trivial statistics, so folding BN changes the weights
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
        net[1].weight.uniform_(0.5, 1.5)
    return net.eval()


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(32, 8)

    def forward(self, ids, mask):
        return (self.emb(ids) * mask.unsqueeze(-1)).sum(1)


class Eig(nn.Module):
    def forward(self, x):
        return torch.linalg.eig(x)[0].real


def not_a_module():
    return 42


def broken():
    raise RuntimeError("bad config")
'''


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("nets") / "nets.py"
    path.write_text(textwrap.dedent(NETS))
    return path


def _torch_out(nets: Path, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return load_factory(f"{nets}:convnet")()(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_matches_torch_and_folds_batchnorm(nets: Path, tmp_path: Path, exporter: str) -> None:
    out = tmp_path / "net.onnx"
    report = export(f"{nets}:convnet", out, {"x": (1, 3, 8, 8)}, exporter=exporter)
    assert report.exporter == exporter
    assert report.inputs == {"x": (1, 3, 8, 8)}
    assert [c.name for c in report.checks] == ["output"]
    assert all(c.passed for c in report.checks)
    assert report.max_abs < 1e-5
    assert report.cosine > 0.99999
    model = onnx.load(out)
    assert "BatchNormalization" not in op_histogram(model)  # the exporter folded it
    x = np.random.default_rng(5).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(session(out), {"x": x})[0], _torch_out(nets, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_keep_batchnorm_leaves_bn_for_the_pipeline(nets: Path, tmp_path: Path, exporter: str) -> None:
    out = tmp_path / "net.onnx"
    report = export(f"{nets}:convnet", out, {"x": (1, 3, 8, 8)}, keep_batchnorm=True, exporter=exporter)
    model = onnx.load(out)
    assert report.batchnorm_nodes == 1
    assert op_histogram(model)["BatchNormalization"] == 1
    folded, rep = optimize(model, passes=["fold-batchnorm"])
    assert "BatchNormalization" not in op_histogram(folded)
    assert rep.stats("fold-batchnorm") == {"folded": 1}
    assert_equivalent(model, folded, atol=1e-5, rtol=1e-4)


def test_dynamic_batch_runs_at_other_batch_sizes(nets: Path, tmp_path: Path) -> None:
    out = tmp_path / "net.onnx"
    export(f"{nets}:convnet", out, {"x": (1, 3, 8, 8)}, dynamic_batch=True, opset=18)
    model = onnx.load(out)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert next(i.version for i in model.opset_import if i.domain == "") == 18
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(session(out), {"x": x})[0], _torch_out(nets, x), atol=1e-5, rtol=1e-4)


def test_integer_inputs_and_named_dynamic_axes(nets: Path, tmp_path: Path) -> None:
    shapes, dtypes = parse_input_specs(["ids=2,5:int64", "mask=2,5:float32"])
    assert shapes == {"ids": (2, 5), "mask": (2, 5)}
    assert dtypes == {"ids": "int64", "mask": "float32"}
    out = tmp_path / "embed.onnx"
    dims = {"ids": {1: "seq"}, "mask": {1: "seq"}}
    report = export(f"{nets}:Embed", out, shapes, input_dtypes=dtypes, dynamic_dims=dims, exporter="torchscript")
    assert report.checks[0].passed
    model = onnx.load(out)
    assert [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [2, "seq"]
    ids = np.arange(14, dtype=np.int64).reshape(2, 7)
    got = run(session(out), {"ids": ids, "mask": np.ones((2, 7), np.float32)})[0]
    assert got.shape == (2, 8)


def test_python_callable_factory(tmp_path: Path) -> None:
    report = export(lambda: torch.nn.Linear(4, 2).eval(), tmp_path / "lin.onnx", {"x": (1, 4)},
                    exporter="torchscript")
    assert report.checks[0].passed
    assert (tmp_path / "lin.onnx").exists()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon_here", "must look like MODULE:FACTORY"),
        ("{nets}:missing", "has no attribute 'missing'; it defines: Eig, Embed, broken, convnet, not_a_module"),
        ("{nets}:not_a_module", "returned int, not a torch.nn.Module"),
        ("{nets}:broken", "raised RuntimeError: bad config"),
        ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
        ("missing/file.py:build", "no such file"),
    ],
)
def test_bad_factory_is_one_line_error_exit_1(nets: Path, tmp_path: Path, spec: str, message: str) -> None:
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(app, ["export", spec.format(nets=nets), "-o", str(out), "--input-shape", "x=1,4"])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_unsupported_operator_names_it(nets: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"dynamo exporter cannot handle .*linalg_eig.*--exporter torchscript"):
        export(f"{nets}:Eig", tmp_path / "e.onnx", {"x": (4, 4)})
    with pytest.raises(ExportError, match=r"torchscript exporter cannot handle .*linalg_eig"):
        export(f"{nets}:Eig", tmp_path / "e.onnx", {"x": (4, 4)}, exporter="torchscript")
    assert not (tmp_path / "e.onnx").exists()


def test_torch_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(ExportError, match=r"install it with: pip install 'onnxopt\[torch\]'"):
        export("x.py:f", tmp_path / "m.onnx", {"x": (1,)})


def test_cli_export_writes_and_reports(nets: Path, tmp_path: Path) -> None:
    out = tmp_path / "net.onnx"
    result = CliRunner().invoke(app, ["export", f"{nets}:convnet", "-o", str(out), "--input-shape",
                                      "x=1,3,8,8", "--keep-batchnorm", "--exporter", "torchscript"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps the table title
    assert "torchscript exporter" in text
    assert "BatchNormalization 1" in text
    assert f"wrote {out}" in result.output.replace("\n", "")
    assert op_histogram(onnx.load(out))["BatchNormalization"] == 1


def test_cli_help_names_the_exporter() -> None:
    result = CliRunner().invoke(app, ["export", "--help"])
    assert result.exit_code == 0
    assert "dynamo exporter" in " ".join(result.output.split())
