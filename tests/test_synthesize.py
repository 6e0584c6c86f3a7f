"""Inputs generated without data: values that fit each input's role, dims probed on the model.

The oracle is onnxruntime running the *original* model on the generated feeds (it refuses
out-of-range indices, zero integer divisors, mismatched Reshape targets), plus bounds
recomputed here from the feeds themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt.api import optimize_file
from onnxopt.data import generate, synthesize
from onnxopt.errors import ValidationError
from onnxopt.runtime import run_model
from onnxopt.testing import make_model, vi
from onnxopt.validate import Tolerance, compare

I64, I32, F32, F16, BOOL = TensorProto.INT64, TensorProto.INT32, TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BOOL


def _out(name: str, dtype: int = F32) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, None)


def _model(nodes, inputs, outputs, inits=None, opset: int = 17) -> onnx.ModelProto:
    return make_model(nodes, inputs, outputs, inits or {}, opset=opset, check=False)


def _runs(model: onnx.ModelProto, feeds: list[dict]) -> None:
    run_model(model, feeds)  # raises when onnxruntime refuses the feeds


def test_indices_stay_inside_the_dim_they_index_even_through_a_cast() -> None:
    m = _model(
        [helper.make_node("Cast", ["ids32"], ["ids"], to=I64),
         helper.make_node("Gather", ["x", "ids"], ["g"], axis=1),
         helper.make_node("GatherElements", ["x", "ge"], ["e"], axis=0),
         helper.make_node("GatherND", ["x", "nd"], ["n"]),
         helper.make_node("OneHot", ["oh", "depth", "vals"], ["o"], axis=-1)],
        [vi("x", ["batch", "width"]), vi("ids32", [6], I32), vi("ge", [2, 3], I64), vi("nd", [4, 2], I64),
         vi("oh", [5], I64)],
        [_out("g"), _out("e"), _out("n"), _out("o")],
        {"depth": np.array(7, np.int64), "vals": np.array([0, 1], np.float32)},
    )
    ds = synthesize(m, m, count=4, pins={"x": (3, 11)})
    assert ds.unusable is None
    for f in ds.feeds:
        assert 0 <= f["ids32"].min() and f["ids32"].max() < 11  # Gather axis 1 of x [3, 11]
        assert 0 <= f["ge"].min() and f["ge"].max() < 3  # GatherElements axis 0
        assert 0 <= f["nd"].min() and f["nd"].max() < 3  # GatherND: both leading dims, min(3, 11)
        assert 0 <= f["oh"].min() and f["oh"].max() < 7  # OneHot's depth
    assert len({f["ids32"].tobytes() for f in ds.feeds}) > 1  # random, not a constant
    _runs(m, ds.feeds)


def test_topk_k_fits_and_integer_divisors_are_non_zero() -> None:
    m = _model(
        [helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1),
         helper.make_node("Mod", ["a", "b"], ["r"]),
         helper.make_node("Div", ["a", "c"], ["q"])],
        [vi("x", [2, 5]), vi("k", [1], I64), vi("a", [50], I32), vi("b", [50], I32), vi("c", [50], I32)],
        [_out("v"), _out("i", I64), _out("r", I32), _out("q", I32)],
    )
    ds = generate(m, count=3)
    for f in ds.feeds:
        assert 1 <= int(f["k"][0]) <= 5
        assert np.all(f["b"] != 0) and np.all(f["c"] != 0)
    _runs(m, ds.feeds)


def test_shape_like_inputs_keep_the_data_as_it_is() -> None:
    m = _model(
        [helper.make_node("Reshape", ["x", "shape"], ["r"]),
         helper.make_node("Expand", ["x", "eshape"], ["e"]),
         helper.make_node("Tile", ["x", "reps"], ["t"]),
         helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["s"]),
         helper.make_node("Squeeze", ["y", "sq"], ["q"]),
         helper.make_node("Pad", ["x", "pads"], ["p"])],
        [vi("x", [2, 3, 4]), vi("y", [2, 1, 4]), vi("shape", [2], I64), vi("eshape", [3], I64),
         vi("reps", [3], I64), vi("starts", [2], I64), vi("ends", [2], I64), vi("axes", [2], I64),
         vi("sq", [1], I64), vi("pads", [6], I64)],
        [_out("r"), _out("e"), _out("t"), _out("s"), _out("q"), _out("p")],
    )
    ds = generate(m, count=2)
    f = ds.feeds[0]
    assert f["shape"].tolist() == [2, -1]
    assert f["sq"].tolist() == [1]  # the one axis of size 1
    assert f["pads"].tolist() == [0] * 6
    outs = run_model(m, ds.feeds[:1])[0]
    assert outs[0].shape == (2, 12) and outs[3].shape == (2, 3, 4)


def test_masks_and_conditions_are_true_and_sequences_are_lists() -> None:
    then = helper.make_graph([helper.make_node("Neg", ["x"], ["t"])], "then", [], [_out("t")])
    other = helper.make_graph([helper.make_node("Abs", ["x"], ["o"])], "else", [], [_out("o")])
    m = _model(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other),
         helper.make_node("Where", ["attention_mask", "x", "x"], ["w"]),
         helper.make_node("SequenceLength", ["seq"], ["n"])],
        [vi("x", [2, 3]), vi("cond", [], BOOL), vi("attention_mask", [2, 3], BOOL),
         helper.make_value_info("seq", helper.make_sequence_type_proto(
             helper.make_tensor_type_proto(F32, [2, 2])))],
        [_out("y"), _out("w"), _out("n", I64)],
    )
    ds = generate(m, count=2)
    f = ds.feeds[0]
    assert f["attention_mask"].all() and bool(f["cond"])
    assert isinstance(f["seq"], list) and [a.shape for a in f["seq"]] == [(2, 2), (2, 2)]
    assert int(run_model(m, ds.feeds[:1])[0][2]) == 2


def _reshape_to(target: list[int], x_shape: list) -> onnx.ModelProto:
    return _model(
        [helper.make_node("Reshape", ["x", "t"], ["r"]), helper.make_node("Relu", ["r"], ["y"])],
        [vi("x", x_shape)], [_out("y")], {"t": np.array(target, np.int64)},
    )


def test_dims_are_probed_on_the_original_model_until_it_runs() -> None:
    # only H = W = 64 fits the constant Reshape: the first candidates (224, 256, ...) are refused
    m = _reshape_to([1, 3, 64, 64], [1, 3, "height", "width"])
    ds = synthesize(m, m, count=2)
    assert ds.unusable is None
    assert ds.feeds[0]["x"].shape == (1, 3, 64, 64) and ds.feeds[1]["x"].shape == (1, 3, 64, 64)
    assert ds.notes[0] == "input 'x' dim 2 ('height') = 64 (the first size the original model runs on)"
    assert ds.notes[-1] == "pin other sizes by changing the dynamic ones in --input-shape x=1,3,64,64 (declared: x[1,3,height,width])"
    # generate (no model run) keeps the first candidate
    assert generate(m).feeds[0]["x"].shape == (1, 3, 224, 224)


def test_an_audio_frame_length_is_probed_too() -> None:
    """A reflect Pad of 200 samples needs more than 200 (Silero VAD's STFT pads 64 and runs on 512)."""
    m = make_model([helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect")],
                   [vi("x", ["batch", "sequence"])], [vi("y", ["batch", "padded"])],
                   {"pads": np.array([0, 200, 0, 200], np.int64)})
    ds = synthesize(m, m, count=2)
    assert ds.unusable is None
    assert ds.feeds[0]["x"].shape == (1, 256)


def test_dims_the_graph_implies_come_first() -> None:
    # a static sibling spatial dim ([N, 3, 48, W]) and the input channels of the first Conv
    m = _reshape_to([1, 3, 48, 48], [1, 3, 48, "W"])
    ds = synthesize(m, m, count=1)
    assert ds.feeds[0]["x"].shape == (1, 3, 48, 48)
    assert ds.notes[0] == "input 'x' dim 3 ('W') = 48 (implied by the graph; the original model runs on it)"
    conv = _model([helper.make_node("Conv", ["x", "w"], ["y"])], [vi("x", [1, "C", 8, 8])], [_out("y")],
                  {"w": np.ones((4, 3, 3, 3), np.float32)})
    assert generate(conv).feeds[0]["x"].shape == (1, 3, 8, 8)


def test_static_zero_dims_stay_zero() -> None:
    m = _model([helper.make_node("CastLike", ["x", "like"], ["y"])], [vi("x", [3, 4]), vi("like", [0], F16)],
               [_out("y", F16)])
    ds = synthesize(m, m, count=1)
    assert ds.unusable is None and ds.feeds[0]["like"].shape == (0,)


def _unrunnable(tmp_path: Path) -> Path:
    # Reshape to 343 elements: no candidate size of 'k' gives 343, so the original never runs
    m = _model([helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Reshape", ["i", "t"], ["r"]),
                helper.make_node("Relu", ["r"], ["y"])],
               [vi("x", [1, "k"])], [vi("y", [7, 7, 7])], {"t": np.array([7, 7, 7], np.int64)})
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    return src


def test_when_no_generated_input_runs_the_model_validation_is_skipped_and_said(tmp_path: Path) -> None:
    src, out, report = _unrunnable(tmp_path), tmp_path / "o.onnx", tmp_path / "r.json"
    result = optimize_file(src, out, report_path=report)
    assert out.exists()
    assert result.validation is None and result.latency == {}
    assert result.validation_skipped.startswith("the original model fails on generated inputs (x=1x32)")
    assert "cannot be reshaped" in result.validation_skipped
    assert result.warnings[0].startswith("validation skipped: the original model fails on generated inputs")
    assert result.warnings[0].endswith("pass --data FILE.npz (arrays named after the model inputs) to validate")
    assert result.checks == ["onnx.checker: ok", "strict shape inference: ok", "onnxruntime load: ok"]
    saved = json.loads(report.read_text())
    assert saved["validation"] is None and saved["validation_skipped"] == result.validation_skipped
    assert saved["bench_skipped"] == "the original model does not run on the generated inputs"
    assert [op.op_type for op in onnx.load(out).graph.node] == ["Reshape", "Relu"]  # the pipeline ran


def test_require_validation_turns_the_skip_into_an_error_and_writes_nothing(tmp_path: Path) -> None:
    src, out = _unrunnable(tmp_path), tmp_path / "o.onnx"
    with pytest.raises(ValidationError, match=r"^--require-validation: the original model fails on generated"):
        optimize_file(src, out, require_validation=True)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_the_skipped_path_still_refuses_a_model_that_fails_the_checker(tmp_path: Path, monkeypatch) -> None:
    from onnxopt import api

    src, out = _unrunnable(tmp_path), tmp_path / "o.onnx"
    real = api._checker
    calls = []

    def checker(model: onnx.ModelProto) -> str | None:
        calls.append(model)
        return real(model) if len(calls) == 1 else "Nodes in a graph must be topologically sorted"

    monkeypatch.setattr(api, "_checker", checker)
    with pytest.raises(ValidationError, match="fails onnx.checker, which the original passes"):
        optimize_file(src, out)
    assert not out.exists()


def _cast_model(dtype: int, scale: float) -> onnx.ModelProto:
    return _model([helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Cast", ["m"], ["y"], to=dtype)],
                  [vi("x", [64, 64])], [_out("y", dtype)], {"s": np.array(scale, np.float32)})


@pytest.mark.parametrize(("dtype", "passes", "rule"), [
    (F16, True, "float16: atol 0.0039, rtol 0.0039 (4 ulp)"),
    (F32, False, "float32: atol 0.0001, rtol 0.001"),
])
def test_exact_tolerance_follows_the_output_dtype(dtype: int, passes: bool, rule: str) -> None:
    # the same 0.2% change: a couple of float16 ulps, but two float32 tolerances
    ref, cand = _cast_model(dtype, 1.0), _cast_model(dtype, 1.002)
    data = generate(ref, count=2)
    report = compare(ref, cand, data, Tolerance(exact=True))
    assert bool(report) is passes
    assert report.outputs[0].tolerance == rule
    assert not compare(ref, _cast_model(dtype, 1.02), data, Tolerance(exact=True))  # 2%: fails both


def test_integer_outputs_are_compared_exactly() -> None:
    ref, cand = _cast_model(I32, 10.0), _cast_model(I32, 10.2)
    data = generate(ref, count=1)
    report = compare(ref, cand, data, Tolerance(exact=True, atol=10.0, rtol=1.0))
    assert not report and report.outputs[0].tolerance == "int32: exact"


def test_lossy_explicit_passes_are_validated_as_onnxruntime_runs_them(tmp_path: Path, monkeypatch) -> None:
    from onnxopt import api

    seen = []
    real = api.compare

    def spy(*args, **kwargs):
        seen.append(kwargs.get("optimize_candidate"))
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "compare", spy)
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [4, 64])], [vi("y", [4, 64])],
               {"w": np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)}, opset=13)
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    optimize_file(src, tmp_path / "l.onnx", bench=False)
    optimize_file(src, tmp_path / "q.onnx", passes=["quantize-dynamic"], bench=False,
                  tolerance=Tolerance(exact=False, min_cosine=0.9))
    assert seen == [False, True]


def test_an_input_without_even_a_rank_gets_probed_candidate_shapes() -> None:
    # Reshape to [1, 3, 32, 32] accepts only 3072 elements: the third candidate shape
    x = helper.make_tensor_value_info("x", F32, None)
    m = _model([helper.make_node("Reshape", ["x", "t"], ["y"])], [x], [vi("y", [1, 3, 32, 32])],
               {"t": np.array([1, 3, 32, 32], np.int64)})
    assert generate(m).feeds[0]["x"].shape == (2, 3)
    ds = synthesize(m, m, count=1)
    assert ds.unusable is None and ds.feeds[0]["x"].shape == (1, 3, 32, 32)
    assert ds.notes == ["input 'x' declares no shape: 1x3x32x32 (the original model runs on it); "
                        "pin its real shape with --input-shape x=..."]


def test_single_letter_batch_names_count_only_as_the_first_dim() -> None:
    conv = _model([helper.make_node("Conv", ["x", "w"], ["y"])], [vi("x", ["a", 3, "b", "c"])], [_out("y")],
                  {"w": np.ones((4, 3, 3, 3), np.float32)})
    assert generate(conv).feeds[0]["x"].shape == (1, 3, 224, 224)
    lead = _model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", ["N", "n"])], [_out("y")])
    assert generate(lead).feeds[0]["x"].shape == (1, 32)


def test_negative_dims_are_dynamic_and_batch_stays_one_while_other_dims_are_probed() -> None:
    m = _reshape_to([1, 3, 64, 64], ["N", 3, "height", "width"])
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1  # as Paddle2ONNX writes it
    ds = synthesize(m, m, count=1)
    assert ds.unusable is None and ds.feeds[0]["x"].shape == (1, 3, 64, 64)


def test_a_recurrent_state_carries_the_batch_on_a_later_axis() -> None:
    # Concat along axis 0 needs the state's dim 1 to equal x's batch: both start at 1
    m = _model([helper.make_node("Unsqueeze", ["x", "zero"], ["x3"]),
                helper.make_node("Concat", ["x3", "state"], ["y"], axis=0)],
               [vi("x", [None, 16]), vi("state", [2, None, 16])], [_out("y")],
               {"zero": np.array([0], np.int64)}, opset=13)
    ds = synthesize(m, m, count=1)
    assert ds.unusable is None
    assert ds.feeds[0]["state"].shape == (2, 1, 16)
    assert "input 'state' dim 1 = 1 (a batch dim; the original model runs on it)" in ds.notes
