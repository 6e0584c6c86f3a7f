"""Real exports with dynamic spatial and sequence dims go through `onnxopt optimize` with no flags.

The models come from models/dynamic.py at test size: the zoo's ResNet-18 with
x[batch, 3, height, width], an FPN-like detector with x[N, 3, H, W] that only runs
when H and W are multiples of 32 (and a 6-level one: multiples of 64, so that the
usual first guess 224 fails), and a sequence classifier with ids[dim_0, dim_1]
(dim_1 at most 64, or at most 20; ids below 50). The tool must pick input shapes on
which the original model runs, validate, and write, as a new user runs it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import onnx
import pytest

pytest.importorskip("torch")

from typer.testing import CliRunner

from onnxopt.cli import app

MODELS = Path(__file__).resolve().parent.parent / "models"
runner = CliRunner()


@pytest.fixture(scope="module")
def dynamic() -> Any:
    spec = importlib.util.spec_from_file_location("_dynamic_models_test", MODELS / "dynamic.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(dynamic: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dynamic")
    return {name: recipe(out / f"{name}.onnx") for name, recipe in dynamic.RECIPES.items()}


def _dims(path: Path) -> list[str | int]:
    vi = onnx.load(str(path), load_external_data=False).graph.input[0]
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def test_exports_declare_symbolic_dims(exported: dict[str, Path]) -> None:
    assert _dims(exported["resnet"]) == ["batch", 3, "height", "width"]
    assert _dims(exported["fpn"]) == _dims(exported["fpn-s64"]) == ["N", 3, "H", "W"]
    assert _dims(exported["sequence"]) == _dims(exported["sequence-short"]) == ["dim_0", "dim_1"]


def _optimize(src: Path, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    result = runner.invoke(app, ["optimize", str(src), "-o", str(out), "--report", str(rep)])
    assert result.exit_code == 0, result.output
    assert out.exists()
    report = json.loads(rep.read_text())
    assert report["validation"] is not None, report.get("warnings")
    assert report["validation"]["passed"] is True
    assert isinstance(report.get("input_notes"), list)
    return out, report


STRIDE = {"fpn": 32, "fpn-s64": 64}
MAX_LEN = {"sequence": 64, "sequence-short": 20}


@pytest.mark.parametrize("name", ["resnet", "fpn", "fpn-s64", "sequence", "sequence-short"])
def test_optimize_without_flags_validates(exported: dict[str, Path], tmp_path: Path, name: str) -> None:
    out, report = _optimize(exported[name], tmp_path)
    shapes = report["inputs"]
    (input_name,) = shapes
    shape = shapes[input_name]
    assert all(isinstance(d, int) and d >= 1 for d in shape)
    # the written model keeps its dynamic dims: the chosen shape is for validation only
    assert _dims(out) == _dims(exported[name])
    if name in STRIDE:
        assert shape[1] == 3
        assert shape[2] % STRIDE[name] == 0, shape
        assert shape[3] % STRIDE[name] == 0, shape
    if name in MAX_LEN:
        assert shape[1] <= MAX_LEN[name], shape  # the position table's length
