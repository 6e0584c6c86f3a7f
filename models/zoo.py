"""Reference model zoo: factories for ``onnxopt export`` and build-and-export recipes.

    python models/zoo.py [--out-dir DIR] [--only resnet18,mlp] [--tiny]
    onnxopt export models/zoo.py:resnet18 -o r18.onnx --input-shape x=1,3,112,112 --keep-batchnorm

Architectures are written here (no torchvision CPU wheel exists on this machine):

| name        | what                                             | input (batch 1)   |
|-------------|--------------------------------------------------|-------------------|
| resnet18    | ResNet-18 (BasicBlock 2-2-2-2)                   | x[1,3,112,112]    |
| resnet50    | ResNet-50 (Bottleneck 3-4-6-3)                   | x[1,3,112,112]    |
| mobilenetv2 | MobileNetV2 1.0 (depthwise convs, ReLU6)         | x[1,3,112,112]    |
| vit         | ViT: patch 8, dim 192, depth 6, 3 heads          | x[1,3,64,64]      |
| mlp         | MLP 64-256-128-10                                | x[1,64]           |

Images are 112x112 instead of 224x224 (a quarter of the MACs) so that the whole zoo
builds and benchmarks in minutes on 2 cores; the layers are the real ones.

Weights: every full-size model is trained here on scikit-learn's digits (shipped
with the package, so nothing is downloaded), 10 classes. The image models see the
8x8 digits upsampled (bilinear) to their input size and repeated over 3 channels:
real inputs with real labels, so a quantized model can be judged on task accuracy
and on top-1 agreement over logits with real margins. (Random weights on random
inputs give logits whose top-1 margins are a few hundredths: there no int8 model
keeps 98% top-1 agreement, which says nothing about real tasks.) Training takes
about 1 to 4 minutes per CNN on 2 cores (Adam, a few epochs, seeded) and reaches
97% to 99% held-out accuracy (ViT, trained from scratch: about 94%). The *tiny* test variants stay untrained: random
weights with realistic batch-norm statistics (gamma, beta drawn around 1 and 0,
running statistics measured on random batches), so that every BN layer does real
work. The CNNs are exported with BatchNormalization kept (``keep_batchnorm``), as
many real exports are, so that the optimizers have BN to fold.

Each factory takes no arguments (that is what ``onnxopt export`` calls); ``tiny=True``
variants of the same code build in well under a second for the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

SEED = 0


def cache_dir() -> Path:
    """``$ONNXOPT_CACHE/zoo``, default ``~/.cache/onnxopt/zoo``: artifacts never go into git."""
    return Path(os.environ.get("ONNXOPT_CACHE", "~/.cache/onnxopt")).expanduser() / "zoo"


# ---------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = _downsample(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)  # stride on the 3x3 (v1.5)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.down = _downsample(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(self.bn3(self.conv3(y)) + self.down(x))


def _downsample(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], base: int = 64,
                 num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], base
        for i, n in enumerate(layers):
            width = base * 2**i
            for j in range(n):
                stages.append(block(cin, width, 2 if j == 0 and i > 0 else 1))
                cin = width * block.expansion
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stages(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


# ---------------------------------------------------------------- MobileNetV2


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),  # depthwise
            nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),  # linear bottleneck
        ]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    # (expansion, channels, repeats, first stride), as in the paper's Table 2
    CONFIG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
              (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, width: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        c = _make_divisible(32 * width)
        last = _make_divisible(1280 * max(1.0, width))
        layers: list[nn.Module] = [nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6(inplace=True)]
        for t, ch, n, s in self.CONFIG:
            out = _make_divisible(ch * width)
            for i in range(n):
                layers.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        layers += [nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(y, 1))


def _make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


# ---------------------------------------------------------------- ViT


class Attention(nn.Module):
    """Multi-head self-attention written out (q k^T / sqrt(d), softmax, v), as BERT/ViT exports look."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, image: int = 64, patch: int = 8, dim: int = 192, depth: int = 6, heads: int = 3,
                 num_classes: int = 100) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*(EncoderLayer(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        for p in (self.cls, self.pos):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.blocks(tokens))[:, 0])


# ---------------------------------------------------------------- weights


def settle_batchnorm(model: nn.Module, shape: tuple[int, ...], batches: int = 4, seed: int = SEED) -> nn.Module:
    """Random BN affine parameters, then running statistics measured in train mode.

    ``momentum=None`` makes the running statistics a cumulative average over the
    batches, so they are the real mean and variance of each layer's input.
    """
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(1.0 + 0.2 * torch.randn(bn.num_features, generator=gen))
            bn.bias.copy_(0.1 * torch.randn(bn.num_features, generator=gen))
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        for _ in range(batches):
            model(torch.randn(max(shape[0], 8), *shape[1:], generator=gen))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def _seeded(seed: int = SEED) -> None:
    torch.manual_seed(seed)


def resnet18(tiny: bool = False) -> nn.Module:
    _seeded()
    model = ResNet(BasicBlock, [2, 2, 2, 2], base=8 if tiny else 64, num_classes=10)
    if tiny:
        return settle_batchnorm(model, ZOO["resnet18"].shape(tiny))
    return train_on_digits(model, ZOO["resnet18"].shape(), epochs=3)


def resnet50(tiny: bool = False) -> nn.Module:
    _seeded()
    model = ResNet(Bottleneck, [3, 4, 6, 3], base=8 if tiny else 64, num_classes=10)
    if tiny:
        return settle_batchnorm(model, ZOO["resnet50"].shape(tiny))
    return train_on_digits(model, ZOO["resnet50"].shape(), epochs=3)


def mobilenetv2(tiny: bool = False) -> nn.Module:
    _seeded()
    model = MobileNetV2(width=0.25 if tiny else 1.0, num_classes=10)
    if tiny:
        return settle_batchnorm(model, ZOO["mobilenetv2"].shape(tiny))
    return train_on_digits(model, ZOO["mobilenetv2"].shape(), epochs=4)


def vit(tiny: bool = False) -> nn.Module:
    _seeded()
    if tiny:
        return ViT(image=16, patch=8, dim=32, depth=2, heads=2, num_classes=10).eval()
    return train_on_digits(ViT(num_classes=10), ZOO["vit"].shape(), epochs=15, lr=5e-4)


def digits_images(x: np.ndarray, size: int) -> np.ndarray:
    """Digits rows [N,64] in [0,1] as images [N,3,size,size]: bilinear upsampling, centred on 0."""
    t = torch.from_numpy(np.ascontiguousarray(x, np.float32)).reshape(-1, 1, 8, 8)
    up = nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return ((up - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous().numpy()


def train_on_digits(model: nn.Module, shape: tuple[int, ...], epochs: int, lr: float = 1e-3,
                    batch: int = 32) -> nn.Module:
    """Train on the digits training split at the model's input size (seeded Adam, cross-entropy)."""
    x_tr, y_tr, _, _ = digits_split()
    y = torch.from_numpy(y_tr)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(x_tr) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(len(x_tr), generator=gen).split(batch):
                images = torch.from_numpy(digits_images(x_tr[idx.numpy()], shape[-1]))
                opt.zero_grad()
                nn.functional.cross_entropy(model(images), y[idx]).backward()
                opt.step()
                sched.step()
    return model.eval()


def digits_accuracy(model: nn.Module, size: int) -> float:
    """Held-out digits accuracy of an image model at input ``size``."""
    _, _, x_val, y_val = digits_split()
    with torch.no_grad():
        logits = model(torch.from_numpy(digits_images(x_val, size)))
    return float((logits.argmax(1).numpy() == y_val).mean())


def digits_split(seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn digits as (x_train, y_train, x_val, y_val); x float32 [N,64] in [0,1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_tr, x_val, y_tr, y_val = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    return x_tr, y_tr, x_val, y_val


def mlp(tiny: bool = False) -> nn.Module:
    """64-256-128-10 ReLU MLP trained on digits with Adam (about a second on one core)."""
    _seeded()
    hidden = (16, 16) if tiny else (256, 128)
    model = nn.Sequential(nn.Linear(64, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]), nn.ReLU(),
                          nn.Linear(hidden[1], 10))
    x_tr, y_tr, _, _ = digits_split()
    x, y = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(SEED)
    with torch.enable_grad():  # callers may build it under no_grad
        for _ in range(10 if tiny else 40):
            for idx in torch.randperm(len(x), generator=gen).split(64):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
    return model.eval()


# ---------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class ZooModel:
    name: str
    factory: Callable[..., nn.Module]
    input: str
    full_shape: tuple[int, ...]
    tiny_shape: tuple[int, ...]
    kind: str  # "cnn", "encoder" or "mlp": decides which peers apply
    keep_batchnorm: bool = False
    heads: int = 0  # for onnxruntime's transformer optimizer
    hidden: int = 0

    def shape(self, tiny: bool = False) -> tuple[int, ...]:
        return self.tiny_shape if tiny else self.full_shape


ZOO: dict[str, ZooModel] = {
    m.name: m for m in (
        ZooModel("resnet18", resnet18, "x", (1, 3, 112, 112), (1, 3, 32, 32), "cnn", keep_batchnorm=True),
        ZooModel("resnet50", resnet50, "x", (1, 3, 112, 112), (1, 3, 32, 32), "cnn", keep_batchnorm=True),
        ZooModel("mobilenetv2", mobilenetv2, "x", (1, 3, 112, 112), (1, 3, 32, 32), "cnn", keep_batchnorm=True),
        ZooModel("vit", vit, "x", (1, 3, 64, 64), (1, 3, 16, 16), "encoder", heads=3, hidden=192),
        ZooModel("mlp", mlp, "x", (1, 64), (1, 64), "mlp"),
    )
}


def artifact(name: str, out_dir: Path, tiny: bool = False) -> Path:
    """Where ``export_model`` writes ``name`` (full image models: ``-digits``, trained on digits)."""
    suffix = "-tiny" if tiny else "-digits" if ZOO[name].kind != "mlp" else ""
    return out_dir / f"{name}{suffix}.onnx"


def export_model(name: str, out_dir: Path, tiny: bool = False) -> Path:
    """Build ``name`` and export it with ``onnxopt.export`` (checked against torch)."""
    from onnxopt.export import export

    spec = ZOO[name]
    path = artifact(name, out_dir, tiny)
    module = spec.factory(tiny=tiny)
    export(lambda: module, path, {spec.input: spec.shape(tiny)}, keep_batchnorm=spec.keep_batchnorm,
           dynamic_batch=True, output_names=["logits"])
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=None, help="default: $ONNXOPT_CACHE/zoo")
    parser.add_argument("--only", default=",".join(ZOO), help="comma-separated names")
    parser.add_argument("--tiny", action="store_true", help="the small test-size variants")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.only.split(","):
        if name not in ZOO:
            print(f"unknown model '{name}'; known: {', '.join(ZOO)}", file=sys.stderr)
            return 2
        print(f"{name}: {export_model(name, out_dir, args.tiny)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
