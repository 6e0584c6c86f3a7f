"""What a new user meets on the console: progress hooks, help, quiet and dry runs, messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

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
    measure_latency({"a": path, "b": path}, feeds, repeats=5, tick=lambda d, t: ticks.append((d, t)))
    assert ticks == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    ticks.clear()
    # a time budget that ends the rounds early still ends the bar at its total
    measure_latency({"a": path}, feeds, repeats=1000, max_seconds=0.0,
                    tick=lambda d, t: ticks.append((d, t)))
    assert ticks[-1] == (5, 5) and ticks[0] == (1, 1000)


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
        with pytest.raises(ModelLoadError, match="this is a PyTorch file; convert it with "
                           "`onnxopt export MODULE:FACTORY -o model.onnx --input-shape ...`"):
            load_model(path)
