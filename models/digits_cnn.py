"""Recipe for the bundled demo model: a small CNN on scikit-learn's handwritten digits.

    python models/digits_cnn.py [--out-dir models]

writes ``digits_cnn.onnx`` and ``digits_val.npz`` (arrays ``image`` float32
[N,1,8,8] and ``labels`` int64 [N]: the held-out split). ``build(seed)`` returns the
ONNX model without writing anything.

The data ships with scikit-learn (``load_digits``: 1,797 8x8 images, 10 classes),
so nothing is downloaded. Pixels are scaled to [0, 1] (``/ 16``); the split (80/20,
stratified) and the training are fixed by the seed, on CPU, single-threaded.

    image[N,1,8,8] -> Conv(16)+BN+ReLU -> Conv(32)+BN+ReLU -> MaxPool(2)
                   -> Conv(64)+BN+ReLU -> GlobalAveragePool -> Flatten -> Dropout
                   -> Gemm(10) -> logits[N,10]

The graph is exported unfolded, the way many real exports look, so the optimizer
has work to do:
- the TorchScript exporter (``dynamo=False``) with ``do_constant_folding=False``
  keeps each BatchNormalization node (with trained, non-trivial statistics);
- in eval mode the exporter drops Dropout, so one inference-mode Dropout (ratio
  0.25 as an initializer, no training_mode input) is inserted before the Gemm with
  ``onnx.helper`` after export;
- an Identity is inserted after the Flatten, as exporters emit for aliased values.
"""

from __future__ import annotations

import argparse
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

OPSET = 17
DROPOUT_RATIO = 0.25


def load_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_val, y_val): images float32 [N,1,8,8] in [0,1], labels int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_val, y_tr, y_val = train_test_split(
        x, y, test_size=0.2, random_state=seed, stratify=y
    )
    return x_tr, y_tr, x_val, y_val


def _network():  # torch is imported lazily: the package itself does not need it
    import torch
    from torch import nn

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return torch.nn.Sequential(
        *block(1, 16), *block(16, 32), nn.MaxPool2d(2),
        *block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Dropout(DROPOUT_RATIO), nn.Linear(64, 10),
    )


def train(seed: int = 0, epochs: int = 30) -> tuple[object, float]:
    """Train on the fixed split; returns (torch module in eval mode, validation accuracy)."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    x_tr, y_tr, x_val, y_val = load_split(seed)
    net = _network()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        pred = net(torch.from_numpy(x_val)).argmax(1).numpy()
    return net, float((pred == y_val).mean())


def export(net: object) -> onnx.ModelProto:
    """TorchScript export without constant folding, then Dropout and Identity inserted."""
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (torch.zeros(2, 1, 8, 8),), buf, dynamo=False, opset_version=OPSET,
            input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=False,
        )
    model = onnx.load_from_string(buf.getvalue())
    _insert_dropout_and_identity(model.graph)
    model.producer_name = "onnxopt models/digits_cnn.py"
    model.doc_string = "8x8 digits CNN (scikit-learn load_digits), unfolded export, onnxopt demo"
    onnx.checker.check_model(model, full_check=True)
    return model


def _insert_dropout_and_identity(graph: onnx.GraphProto) -> None:
    """Flatten -> Identity -> Dropout -> Gemm: rewire the Gemm to read the new chain."""
    nodes = list(graph.node)
    gemm = next(i for i, n in enumerate(nodes) if n.op_type == "Gemm")
    flat = nodes[gemm].input[0]
    ratio = numpy_helper.from_array(np.array(DROPOUT_RATIO, np.float32), "dropout_ratio")
    graph.initializer.append(ratio)
    extra = [
        helper.make_node("Identity", [flat], ["features"], name="features_identity"),
        helper.make_node("Dropout", ["features", "dropout_ratio"], ["features_dropped"],
                         name="dropout"),
    ]
    nodes[gemm].input[0] = "features_dropped"
    del graph.node[:]
    graph.node.extend(nodes[:gemm] + extra + nodes[gemm:])


def build(seed: int = 0) -> onnx.ModelProto:
    """Train (seconds) and export the demo model."""
    net, _ = train(seed)
    return export(net)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    net, acc = train(args.seed)
    if acc < 0.95:
        raise SystemExit(f"validation accuracy {acc:.4f} < 0.95; not writing")
    model = export(net)
    _, _, x_val, y_val = load_split(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(args.out_dir / "digits_cnn.onnx"))
    np.savez_compressed(args.out_dir / "digits_val.npz", image=x_val, labels=y_val)
    ops = sorted({n.op_type for n in model.graph.node})
    print(f"validation accuracy {acc:.4f} on {len(y_val)} images; ops: {', '.join(ops)}")
    print(f"wrote {args.out_dir / 'digits_cnn.onnx'} and {args.out_dir / 'digits_val.npz'}")


if __name__ == "__main__":
    main()
