"""Models with dynamic spatial and sequence dims, exported the way real ones are.

    python models/dynamic.py [--out-dir DIR] [--only resnet,fpn,sequence] [--full]
    onnxopt optimize resnet-dyn.onnx -o out.onnx         # no --input-shape: the tool picks one

Third-party models rarely have static inputs: detectors and OCR models declare
``[N, 3, H, W]`` with symbolic H and W, and only some sizes run; sequence models
declare a length the exporter named ``dim_1`` or ``s0``. These recipes build such
models at test size, so that ``onnxopt optimize`` with no flag can be tested end to end:

| name     | what                                                    | declared input               | sizes that run |
|----------|---------------------------------------------------------|------------------------------|----------------|
| resnet   | the zoo's ResNet-18 (BN kept), dynamo exporter          | x[batch, 3, height, width]   | any >= 1       |
| fpn      | FPN-like detector: 5 stride-2 stages, top-down upsample | x[N, 3, H, W]                | H, W multiples of 32 |
|          | + skip Adds, score map and box head at stride 4         |                              |                |
| sequence | token ids -> embedding + learned positions (64) ->      | ids:int64[dim_0, dim_1]      | dim_1 <= 64, ids < 50 |
|          | 2 encoder layers -> mean pool -> 4 logits               |                              |                |
| fpn-s64  | the same FPN with a sixth level (a P6)                  | x[N, 3, H, W]                | multiples of 64 |
| sequence-short | the same classifier with 20 positions             | ids:int64[dim_0, dim_1]      | dim_1 <= 20    |

``fpn`` is exported with the TorchScript exporter and ``dynamic_axes`` (as Paddle's
and older torch exports are): the input stays ``[N, 3, H, W]`` with nothing in its
declaration saying that H = 33 fails in the first skip Add. ``resnet`` and
``sequence`` go through ``onnxopt.export`` (dynamo, checked against torch at two
sizes). Weights are random (seeded) with settled batch-norm statistics; what is
tested is the tool's handling of the shapes, not accuracy.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0


def _zoo() -> Any:
    """models/zoo.py, loaded by path (models/ is not a package)."""
    name = "_onnxopt_models_zoo"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "zoo.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # the zoo's dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


# ---------------------------------------------------------------- FPN detector


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FPNDetector(nn.Module):
    """Backbone C1..C5 at strides 2..32, top-down P5..P2 with nearest 2x upsampling and skip Adds.

    Each stride-2 conv maps H to ceil(H / 2); the upsampled coarser map has twice that,
    so the Add at every level lines up only when H and W are multiples of 2**levels
    (32 with the default 5 levels; 64 with 6, as some detectors with a P6 need).
    """

    def __init__(self, width: int = 8, fpn: int = 16, levels: int = 5) -> None:
        super().__init__()
        chans = [width * 2**min(i, 3) for i in range(levels)]  # C1..C5 (C6)
        stages, cin = [], 3
        for c in chans:
            stages.append(nn.Sequential(_conv(cin, c, 2), _conv(c, c)))
            cin = c
        self.stages = nn.ModuleList(stages)
        self.lateral = nn.ModuleList(nn.Conv2d(c, fpn, 1) for c in chans[1:])  # C2..C5
        self.smooth = _conv(fpn, fpn)
        self.score = nn.Conv2d(fpn, 1, 1)
        self.boxes = nn.Conv2d(fpn, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        p = self.lateral[-1](feats[-1])
        for lateral, c in zip(reversed(self.lateral[:-1]), reversed(feats[1:-1]), strict=True):
            p = lateral(c) + nn.functional.interpolate(p, scale_factor=2.0, mode="nearest")
        p = self.smooth(p)  # stride 4
        return torch.sigmoid(self.score(p)), self.boxes(p)


def fpn(tiny: bool = True, levels: int = 5) -> nn.Module:
    torch.manual_seed(SEED)
    model = FPNDetector(8, 16, levels) if tiny else FPNDetector(32, 64, levels)
    return _zoo().settle_batchnorm(model, (2, 3, 2**levels * 2, 2**levels * 2))


# ---------------------------------------------------------------- sequence model


class SequenceClassifier(nn.Module):
    """Token ids -> embedding + learned positions (at most ``max_len``) -> encoder -> mean -> logits."""

    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 2, depth: int = 2, max_len: int = 64,
                 classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, max_len, dim))
        self.blocks = nn.Sequential(*(_zoo().EncoderLayer(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        return self.head(self.norm(self.blocks(x)).mean(1))


def sequence(tiny: bool = True, max_len: int = 64) -> nn.Module:
    torch.manual_seed(SEED)
    model = SequenceClassifier(max_len=max_len) if tiny else SequenceClassifier(1000, 128, 4, 4, max_len * 4)
    return model.eval()


# ---------------------------------------------------------------- exporting


def export_resnet(path: Path, tiny: bool = True) -> Path:
    """The zoo's ResNet-18 with dynamic batch, height and width (dynamo, checked at two sizes)."""
    from onnxopt.export import export

    module = _zoo().resnet18(tiny=True) if tiny else _zoo().resnet18()
    export(lambda: module, path, {"x": (1, 3, 64, 64)}, keep_batchnorm=True, output_names=["logits"],
           dynamic_dims={"x": {0: "batch", 2: "height", 3: "width"}})
    return path


def export_fpn(path: Path, tiny: bool = True, levels: int = 5) -> Path:
    """The FPN detector with TorchScript and dynamic_axes N, H, W; checked in onnxruntime at two sizes."""
    import warnings

    module = fpn(tiny, levels).eval()
    s = 2**levels
    x = torch.randn(1, 3, 2 * s, 3 * s)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["score", "boxes"], dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}})
    _check(module, path, [{"x": np.random.default_rng(seed).standard_normal(shape, np.float32)}
                          for seed, shape in ((1, (1, 3, 2 * s, 3 * s)), (2, (2, 3, 4 * s, s)))])
    return path


def export_sequence(path: Path, tiny: bool = True, max_len: int = 64) -> Path:
    """The sequence classifier with ids[dim_0, dim_1] (dynamo, checked at two sizes)."""
    from onnxopt.export import export

    module = sequence(tiny, max_len)
    export(lambda: module, path, {"ids": (1, min(16, max_len - 1))}, input_dtypes={"ids": np.int64},
           output_names=["logits"],
           dynamic_dims={"ids": {0: "dim_0", 1: "dim_1"}})
    return path


def _check(module: nn.Module, path: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for feed in feeds:
        with torch.no_grad():
            ref = module(*(torch.from_numpy(v) for v in feed.values()))
        for r, o in zip(ref, sess.run(None, feed), strict=True):
            np.testing.assert_allclose(o, r.numpy(), rtol=1e-3, atol=1e-4)


RECIPES: dict[str, Callable[..., Path]] = {
    "resnet": export_resnet,
    "fpn": export_fpn,
    "sequence": export_sequence,
    # stricter variants: 224 (a usual first guess) fails on both
    "fpn-s64": functools.partial(export_fpn, levels=6),  # H, W multiples of 64
    "sequence-short": functools.partial(export_sequence, max_len=20),  # dim_1 <= 20
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=None, help="default: $ONNXOPT_CACHE/zoo")
    parser.add_argument("--only", default=",".join(RECIPES), help="comma-separated names")
    parser.add_argument("--full", action="store_true", help="full widths (default: test size)")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or _zoo().cache_dir()
    for name in args.only.split(","):
        if name not in RECIPES:
            print(f"unknown model '{name}'; known: {', '.join(RECIPES)}", file=sys.stderr)
            return 2
        suffix = "" if args.full else "-tiny"
        print(f"{name}: {RECIPES[name](out_dir / f'{name}-dyn{suffix}.onnx', tiny=not args.full)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
