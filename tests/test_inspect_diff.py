"""``onnxopt inspect --diff A B``: two models side by side, checked against counts taken from onnx here."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import helper
from typer.testing import CliRunner

from onnxopt.cli import app
from onnxopt.testing import make_model, vi

rng = np.random.default_rng(0)


def _cnn(channels: int, batchnorm: bool, batch: int | str = 1) -> onnx.ModelProto:
    """Conv 3x3 (pads 1) on 3x8x8 -> [BN] -> Relu -> Flatten -> MatMul to 10 -> Add."""
    feat = channels * 64
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1])]
    inits = {"w": rng.standard_normal((channels, 3, 3, 3)).astype(np.float32),
             "b": rng.standard_normal(channels).astype(np.float32),
             "w2": rng.standard_normal((feat, 10)).astype(np.float32),
             "b2": rng.standard_normal(10).astype(np.float32)}
    if batchnorm:
        nodes.append(helper.make_node("BatchNormalization", ["c", "s", "o", "m", "v"], ["n"]))
        inits |= {k: np.ones(channels, np.float32) for k in ("s", "o", "m", "v")}
    nodes += [helper.make_node("Relu", ["n" if batchnorm else "c"], ["r"]),
              helper.make_node("Flatten", ["r"], ["f"]),
              helper.make_node("MatMul", ["f", "w2"], ["mm"]), helper.make_node("Add", ["mm", "b2"], ["y"])]
    return make_model(nodes, [vi("x", [batch, 3, 8, 8])], [vi("y", [batch, 10])], inits)


def _macs(model: onnx.ModelProto, batch: int) -> int:
    """By hand: Conv out (batch x C x 8 x 8) x 27 per output, MatMul batch x 10 x features."""
    channels = next(t.dims[0] for t in model.graph.initializer if t.name == "w")
    return batch * channels * 64 * 27 + batch * 10 * channels * 64


def _saved(tmp_path: Path, name: str, model: onnx.ModelProto) -> Path:
    path = tmp_path / name
    onnx.save(model, path)
    return path


def test_diff_numbers_match_onnx_counts(tmp_path: Path) -> None:
    a, b = _cnn(4, batchnorm=True), _cnn(2, batchnorm=False)
    pa, pb = _saved(tmp_path, "a.onnx", a), _saved(tmp_path, "b.onnx", b)
    result = CliRunner().invoke(app, ["inspect", "--diff", str(pa), str(pb), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    assert got["nodes"] == [len(a.graph.node), len(b.graph.node)] == [6, 5]
    assert got["parameters"] == [sum(int(np.prod(t.dims)) for t in m.graph.initializer) for m in (a, b)]
    assert got["size_bytes"] == [pa.stat().st_size, pb.stat().st_size]
    assert got["macs"] == [_macs(a, 1), _macs(b, 1)] == [4 * 64 * 37, 2 * 64 * 37]
    ca, cb = Counter(n.op_type for n in a.graph.node), Counter(n.op_type for n in b.graph.node)
    assert got["ops"] == {op: [ca[op], cb[op]] for op in sorted(ca | cb)}


def test_diff_table_lists_differing_ops_first(tmp_path: Path) -> None:
    pa = _saved(tmp_path, "a.onnx", _cnn(4, batchnorm=True))
    pb = _saved(tmp_path, "b.onnx", _cnn(4, batchnorm=False))
    result = CliRunner().invoke(app, ["inspect", str(pa), "--diff", str(pb)])
    assert result.exit_code == 0, result.output
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in result.output.splitlines()
             if line.startswith("│")]
    ops = [c for c in cells if len(c) == 4 and c[0] in ("BatchNormalization", "Conv", "Relu", "nodes")]
    assert ops[0] == ["nodes", "6", "5", "-16.7%"]
    assert ops[1] == ["BatchNormalization", "1", "0", "-1"]  # the difference before the equal rows
    assert ["Conv", "1", "1", "="] in ops
    assert re.search(r"opsets\s*│\s*ai\.onnx 17\s*│\s*ai\.onnx 17", result.output)


def test_diff_counts_macs_at_pinned_shapes(tmp_path: Path) -> None:
    a, b = _cnn(4, batchnorm=True, batch="N"), _cnn(2, batchnorm=False, batch="N")
    pa, pb = _saved(tmp_path, "a.onnx", a), _saved(tmp_path, "b.onnx", b)
    result = CliRunner().invoke(app, ["inspect", "--diff", str(pa), str(pb), "--json",
                                      "--input-shape", "x=3,3,8,8"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["macs"] == [_macs(a, 3), _macs(b, 3)]


def test_diff_needs_two_models(tmp_path: Path) -> None:
    pa = _saved(tmp_path, "a.onnx", _cnn(2, batchnorm=False))
    runner = CliRunner()
    for args in (["inspect", "--diff", str(pa)], ["inspect", str(pa), str(pa)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1
        assert "onnxopt: error: compare two models with: onnxopt inspect --diff MODEL OTHER" in result.output
        assert "Traceback" not in result.output


def _renamed_input(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """``model`` with its input 'x' called ``name``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.input[0].name = name
    for node in out.graph.node:
        node.input[:] = [name if i == "x" else i for i in node.input]
    return out


def test_diff_pins_each_model_by_its_own_input_names(tmp_path: Path) -> None:
    a, b = _cnn(4, batchnorm=True, batch="N"), _renamed_input(_cnn(2, batchnorm=False, batch="N"), "img")
    pa, pb = _saved(tmp_path, "a.onnx", a), _saved(tmp_path, "b.onnx", b)
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", "--diff", str(pa), str(pb), "--json",
                                 "--input-shape", "x=3,3,8,8", "--input-shape", "img=2,3,8,8"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    assert got["macs"] == [_macs(a, 3), _macs(b, 2)]
    assert got["macs_input_shapes"] == [{"x": [3, 3, 8, 8]}, {"img": [2, 3, 8, 8]}]
    wrong = runner.invoke(app, ["inspect", "--diff", str(pa), str(pb), "--input-shape", "y=1,3,8,8"])
    assert wrong.exit_code == 1
    assert wrong.output.strip() == ("onnxopt: error: --input-shape names 'y', an input of neither model; "
                                    "inputs: a.onnx: x; b.onnx: img")
