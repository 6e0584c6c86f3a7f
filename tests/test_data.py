from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxopt.data import generate, load, parse_input_shapes
from onnxopt.errors import InputDataError
from onnxopt.testing import make_model, vi


def _model(batch: int | str = "batch") -> object:
    return make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [batch, 3])], [vi("y", [batch, 3])])


def test_npz_with_samples_on_first_axis_and_labels(tmp_path: Path) -> None:
    x = np.arange(40 * 3, dtype=np.float64).reshape(40, 3)  # float64 is cast to the model's float32
    np.savez(tmp_path / "d.npz", x=x, labels=np.arange(40))
    ds = load(tmp_path / "d.npz", _model(), batch_size=16)
    assert [f["x"].shape for f in ds.feeds] == [(16, 3), (16, 3), (8, 3)]
    assert ds.feeds[0]["x"].dtype == np.float32
    np.testing.assert_array_equal(ds.labels, np.arange(40))
    # a static batch of 1 takes one sample per feed
    ds1 = load(tmp_path / "d.npz", _model(batch=1))
    assert len(ds1) == 40 and ds1.feeds[3]["x"].shape == (1, 3)
    cal, ev = ds.split(0.5)
    assert len(cal) + len(ev) == len(ds) and len(ev.labels) == 40 - len(cal.labels)


def test_directory_of_feeds_with_varying_shapes(tmp_path: Path) -> None:
    m = make_model([helper.make_node("Relu", ["ids"], ["y"])], [vi("ids", [1, "seq"], TensorProto.INT64)],
                   [vi("y", [1, "seq"], TensorProto.INT64)])
    for i, n in enumerate((3, 7, 5)):
        np.savez(tmp_path / f"{i}.npz", ids=np.ones((1, n), np.int64))
    ds = load(tmp_path, m)
    assert [f["ids"].shape for f in ds.feeds] == [(1, 3), (1, 7), (1, 5)]


def test_bad_data_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "wrong.npz", z=np.zeros((4, 3), np.float32))
    with pytest.raises(InputDataError, match="no array for model input"):
        load(tmp_path / "wrong.npz", _model())
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(InputDataError, match="not a readable .npz"):
        load(tmp_path / "junk.npz", _model())
    np.savez(tmp_path / "rank.npz", x=np.zeros((4, 3, 2, 2), np.float32))
    with pytest.raises(InputDataError, match="rank 2"):
        load(tmp_path / "rank.npz", _model())


def test_generated_inputs_honour_dtypes_pins_and_vocab() -> None:
    table = np.zeros((50, 4), np.float32)
    m = make_model(
        [helper.make_node("Gather", ["emb", "ids"], ["y"])],
        [vi("ids", ["batch", "sequence"], TensorProto.INT64)], [vi("y", ["batch", "sequence", 4])],
        {"emb": table},
    )
    ds = generate(m, count=3, seed=1)
    assert ds.generated and ds.feeds[0]["ids"].shape == (1, 32)
    assert all(0 <= f["ids"].min() and f["ids"].max() < 50 for f in ds.feeds)
    pinned = generate(m, pins=parse_input_shapes(["ids=2,9"]))
    assert pinned.feeds[0]["ids"].shape == (2, 9)


def test_dynamic_dim_with_no_name_rule_gets_a_usual_size_and_a_note() -> None:
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [1, "channels"])], [vi("y", [1, "channels"])])
    ds = generate(m)
    assert ds.feeds[0]["x"].shape == (1, 32)
    assert ds.notes[0] == "input 'x' dim 1 ('channels') = 32 (a usual size)"
    assert ds.notes[-1] == "pin other sizes by changing the dynamic ones in --input-shape x=1,32 (declared: x[1,channels])"
    with pytest.raises(InputDataError, match="names 'nope'"):
        generate(m, pins={"nope": (1,)})
    with pytest.raises(InputDataError, match="must look like NAME=1,3,224,224"):
        parse_input_shapes(["1,2,3"])
    with pytest.raises(InputDataError, match="dims must be positive sizes"):
        parse_input_shapes(["x=1,3,48,-1"])
