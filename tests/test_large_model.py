"""A model over 2 GB (external data) goes through ``onnxopt optimize`` with bounded memory.

The model is written straight to disk, weight by weight, so the test itself never
holds it in memory: nine 8192x8192 float32 MatMul weights (2.25 GiB) in one
external-data file, plus an Identity and a Conv+BatchNormalization branch so the
passes have something to do. The CLI runs in a subprocess, with validation on
generated inputs; the peak RSS of that process is read from ``getrusage``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt.manager import PRESETS
from onnxopt.registry import registry
from onnxopt.testing import op_histogram, run_model, vi

pytestmark = pytest.mark.slow

DIM = 8192
LAYERS = 9  # 9 x 256 MiB = 2.25 GiB: past protobuf's 2 GiB limit
GiB = 2**30


def _external(name: str, dims: list[int], location: str, offset: int, length: int) -> onnx.TensorProto:
    t = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=key, value=value)
    return t


def build_large_model(path: Path, layers: int = LAYERS, dim: int = DIM) -> None:
    """Write ``path`` and ``path.data``, streaming each weight in 32 MiB blocks."""
    data = path.with_name(path.name + ".data")
    rng = np.random.default_rng(0)
    rows = (32 * 2**20) // (dim * 4)
    inits, nodes = [], []
    offset = 0
    with open(data, "wb") as f:
        for i in range(layers):
            # one random block per weight, tiled: enough to make every output depend on it
            block = (rng.standard_normal((rows, dim)) / np.sqrt(dim)).astype(np.float32)
            for _ in range(dim // rows):
                f.write(block.tobytes())
            length = dim * dim * 4
            inits.append(_external(f"W{i}", [dim, dim], data.name, offset, length))
            offset += length
    h = "x"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [h, f"W{i}"], [f"h{i}"]))
        h = f"h{i}"
        if i == 0:
            nodes.append(helper.make_node("Identity", [h], ["id0"]))
            h = "id0"
    nodes.append(helper.make_node("Relu", [h], ["y"]))
    # the BN-foldable branch
    c = 4
    small = {
        "cw": rng.standard_normal((c, c, 3, 3)).astype(np.float32),
        "g": rng.uniform(0.5, 1.5, c).astype(np.float32),
        "b": rng.standard_normal(c).astype(np.float32),
        "m": rng.standard_normal(c).astype(np.float32),
        "v": rng.uniform(0.5, 2.0, c).astype(np.float32),
    }
    inits += [onnx.numpy_helper.from_array(v, k) for k, v in small.items()]
    nodes += [
        helper.make_node("Conv", ["img", "cw"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv", "g", "b", "m", "v"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes, "large", [vi("x", [1, dim]), vi("img", [1, c, 8, 8])],
        [vi("y", [1, dim]), vi("z", [1, c, 8, 8])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path))  # data_location is already EXTERNAL: writes the graph only


def _pipeline_args() -> list[str]:
    """The level-1 preset, or the part of it that is registered while passes are being written."""
    names = registry()
    if all(n in names for n in PRESETS[1]):
        return ["--level", "1"]
    args = []
    for n in PRESETS[1]:
        if n in names:
            args += ["--pass", n]
    return args


_MEASURE = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
seconds = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr,
                  "seconds": seconds, "peak_rss": rss}))
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    # pytest keeps the last runs' tmp_path: remove the 4.5 GB of model files now
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_optimizes_a_model_over_2gb(workdir: Path) -> None:
    tmp_path = workdir
    if shutil.disk_usage(tmp_path).free < 8 * GiB:
        pytest.skip("needs 8 GiB of free disk")
    src = tmp_path / "large.onnx"
    t0 = time.perf_counter()
    build_large_model(src)
    build_seconds = time.perf_counter() - t0
    data = src.with_name("large.onnx.data")
    model_bytes = src.stat().st_size + data.stat().st_size
    assert model_bytes > 2 * GiB
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "large.opt.onnx"
    report = out_dir / "report.json"
    cmd = [sys.executable, "-m", "onnxopt", "optimize", str(src), "-o", str(out), "--no-bench",
           "--report", str(report), *_pipeline_args()]
    measured = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True,
                              text=True, check=True)
    run = json.loads(measured.stdout)
    assert run["rc"] == 0, run["stderr"][-3000:]
    assert "Traceback" not in run["stderr"]
    print(f"\nlarge model: {model_bytes / GiB:.2f} GiB built in {build_seconds:.1f}s; "
          f"optimize {run['seconds']:.1f}s, peak RSS {run['peak_rss'] / GiB:.2f} GiB "
          f"({run['peak_rss'] / model_bytes:.2f}x the model)")

    # external data beside the output, named after it; nothing left in the source directory
    assert sorted(p.name for p in out_dir.iterdir()) == ["large.opt.onnx", "large.opt.onnx.data",
                                                        "report.json"]
    assert (out_dir / "large.opt.onnx.data").stat().st_size >= LAYERS * DIM * DIM * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["large.onnx", "large.onnx.data", "out"]
    onnx.checker.check_model(str(out))
    structure = onnx.load(str(out), load_external_data=False)
    assert op_histogram(structure) == {"Conv": 1, "MatMul": LAYERS, "Relu": 1}
    validation = json.loads(report.read_text())["validation"]
    assert validation["passed"] and validation["samples"] > 0

    # outputs match, checked here too on one input (sessions on the files, one at a time)
    rng = np.random.default_rng(1)
    feed = {"x": rng.standard_normal((1, DIM)).astype(np.float32),
            "img": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)}
    (want,) = run_model(str(src), [feed])
    (got,) = run_model(str(out), [feed])
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-3)

    # bounded memory: the process may hold the weights a few times, not unboundedly
    assert run["peak_rss"] < 3 * model_bytes, run["peak_rss"]
