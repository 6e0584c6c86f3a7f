from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import onnxopt.capture as capture_mod
from onnxopt.capture import Reservoir, capture, feeds_fingerprint, model_fingerprint
from onnxopt.testing import make_model, vi

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((4, 6)).astype(np.float32)
W2 = RNG.standard_normal((6, 3)).astype(np.float32)
W_CONV = RNG.standard_normal((5, 3, 3, 3)).astype(np.float32)


def _mlp(w1: np.ndarray = W1, w2: np.ndarray = W2, outputs: tuple[str, ...] = ("y",)):
    """x [B, S, 4] -> MatMul -> h -> Relu -> r -> MatMul -> y; ``outputs`` declared."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    dims = {"h": w1.shape[1], "r": w1.shape[1], "y": w2.shape[1]}
    return make_model(nodes, [vi("x", ["B", "S", w1.shape[0]])],
                      [vi(o, ["B", "S", dims[o]]) for o in outputs], {"w1": w1, "w2": w2})


def _conv(outputs: tuple[str, ...] = ("y",)) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c"], ["y"]),
    ]
    return make_model(nodes, [vi("x", ["N", 3, 6, 6])],
                      [vi(o, ["N", 5, 6, 6]) for o in outputs], {"w": W_CONV})


def _feeds(shapes: list[tuple[int, ...]], seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(s).astype(np.float32)} for s in shapes]


def _reference(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[list]:
    """The tensors as real graph outputs, run by onnxruntime directly (as written, like capture)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [sess.run(None, f) for f in feeds]


def test_rows_equal_the_tensors_as_real_graph_outputs() -> None:
    feeds = _feeds([(2, 3, 4), (1, 5, 4), (3, 1, 4)])
    model = _mlp()
    before = model.SerializeToString()
    got = capture(model, feeds, ["h", "r", "x", "y"])
    assert model.SerializeToString() == before  # the extra outputs are gone again
    ref = _reference(_mlp(outputs=("h", "r", "y")), feeds)
    for i, name in enumerate(("h", "r", "y")):
        want = np.concatenate([r[i].reshape(-1, r[i].shape[-1]) for r in ref])
        np.testing.assert_array_equal(got[name], want)
    np.testing.assert_array_equal(got["x"], np.concatenate([f["x"].reshape(-1, 4) for f in feeds]))
    assert got["h"].shape == (6 + 5 + 3, 6)


def test_nchw_layout_keeps_whole_samples() -> None:
    feeds = _feeds([(2, 3, 6, 6), (3, 3, 6, 6)])
    got = capture(_conv(), feeds, {"c": "nchw", "y": "rows"})
    ref = _reference(_conv(outputs=("c", "y")), feeds)
    np.testing.assert_array_equal(got["c"], np.concatenate([r[0] for r in ref]))
    assert got["c"].shape == (5, 5, 6, 6)
    np.testing.assert_array_equal(got["y"], np.concatenate([r[1].reshape(-1, 6) for r in ref]))


def test_reservoir_cap_holds_and_rows_are_real_rows() -> None:
    feeds = _feeds([(4, 5, 4)] * 6)  # 120 rows
    got = capture(_mlp(), feeds, {"h": "rows"}, max_rows=16)["h"]
    assert got.shape == (16, 6)
    ref = np.concatenate([r[0].reshape(-1, 6) for r in _reference(_mlp(outputs=("h",)), feeds)])
    matches = [np.flatnonzero((ref == row).all(axis=1)) for row in got]
    assert all(len(m) == 1 for m in matches)  # each kept row is one real row
    assert len({int(m[0]) for m in matches}) == 16  # without replacement
    assert max(int(m[0]) for m in matches) >= 16  # and not just the first 16
    nchw = capture(_conv(), _feeds([(3, 3, 6, 6)] * 4), {"c": "nchw"}, max_rows=5)["c"]
    assert nchw.shape == (5, 5, 6, 6)


def test_rows_pair_up_across_tensors_calls_and_chunking() -> None:
    """A layer's input and output, captured in separate calls, keep the same rows."""
    feeds = _feeds([(2, 7, 4)] * 5)
    x = capture(_mlp(), feeds, ["x"], max_rows=20)["x"]
    h = capture(_mlp(), feeds, ["h"], max_rows=20)["h"]
    np.testing.assert_allclose(h, x @ W1, rtol=1e-5, atol=1e-5)
    # the same 70 rows as one batch of 70 samples (split into runs of 32 by the dynamic
    # batch axis) keep the same rows
    whole = [{"x": np.concatenate([f["x"] for f in feeds]).reshape(70, 1, 4)}]
    np.testing.assert_array_equal(capture(_mlp(), whole, ["x"], max_rows=20)["x"], x)
    other = capture(_mlp(), feeds, ["x"], max_rows=20, seed=1)["x"]
    assert not np.array_equal(other, x)


def test_reservoir_is_uniform_whatever_the_chunks() -> None:
    total, cap, trials = 50, 10, 3000
    counts = np.zeros(total)
    chunks = [7, 1, 13, 4, 25]
    for seed in range(trials):
        r = Reservoir(cap, seed)
        start = 0
        for c in chunks:
            r.add(np.arange(start, start + c))
            start += c
        kept = r.rows
        assert len(set(kept.tolist())) == cap
        np.testing.assert_array_equal(kept, r.index)
        counts[kept] += 1
    freq = counts / trials
    # each row is kept with probability cap / total = 0.2 (binomial sd 0.0073)
    assert np.abs(freq - cap / total).max() < 0.035
    one = Reservoir(cap, 5)
    one.add(np.arange(total))
    split = Reservoir(cap, 5)
    for part in np.split(np.arange(total), np.cumsum(chunks)[:-1]):
        split.add(part)
    np.testing.assert_array_equal(one.rows, split.rows)


def test_cache_hit_does_not_run_and_new_weights_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[tuple[str, ...]] = []
    real = capture_mod.run_exposed

    def counting(model, feeds, names, *args, **kwargs):
        runs.append(tuple(names))
        return real(model, feeds, names, *args, **kwargs)

    monkeypatch.setattr(capture_mod, "run_exposed", counting)
    feeds = _feeds([(2, 3, 4)] * 3)
    cache: dict = {}
    first = capture(_mlp(), feeds, ["h", "y"], cache=cache)
    assert runs == [("h", "y")]
    again = capture(_mlp(), feeds, ["y", "h"], cache=cache)
    assert runs == [("h", "y")]  # no run
    np.testing.assert_array_equal(again["h"], first["h"])
    assert not again["h"].flags.writeable
    capture(_mlp(), feeds, {"h": "rows", "r": "rows"}, cache=cache)
    assert runs[-1] == ("r",)  # only the missing tensor
    # same names, other weights (pruning keeps names): a miss, and the new values
    w1 = W1.copy()
    w1[0, 0] += 1.0
    pruned = capture(_mlp(w1=w1), feeds, ["h"], cache=cache)
    assert runs[-1] == ("h",)
    assert not np.array_equal(pruned["h"], first["h"])
    # other feeds, other max_rows, other seed: misses
    n = len(runs)
    capture(_mlp(), _feeds([(2, 3, 4)] * 3, seed=9), ["h"], cache=cache)
    capture(_mlp(), feeds, ["h"], cache=cache, max_rows=5)
    capture(_mlp(), feeds, ["h"], cache=cache, seed=3)
    assert len(runs) == n + 3


def test_fingerprints() -> None:
    base = model_fingerprint(_mlp())
    assert model_fingerprint(_mlp()) == base
    renamed = _mlp()
    renamed.graph.node[0].name = "other"
    assert model_fingerprint(renamed) == base  # node names do not change values
    w1 = W1.copy()
    w1[3, 5] = np.nextafter(w1[3, 5], np.float32(np.inf))
    assert model_fingerprint(_mlp(w1=w1)) != base  # one ulp of one weight
    assert model_fingerprint(_mlp(w1=W1[:, :5].copy(), w2=W2[:5].copy())) != base  # dims
    attr = _conv()
    other = onnx.ModelProto()
    other.CopyFrom(attr)
    other.graph.node[0].attribute[0].ints[0] = 0
    assert model_fingerprint(other) != model_fingerprint(attr)
    feeds = _feeds([(1, 2, 4)])
    fp = feeds_fingerprint(feeds)
    changed = [{"x": feeds[0]["x"].copy()}]
    changed[0]["x"][0, 1, 3] += 1
    assert feeds_fingerprint(changed) != fp
    assert feeds_fingerprint([{"x": feeds[0]["x"].reshape(2, 1, 4)}]) != fp  # shape
    assert feeds_fingerprint(feeds + feeds) != fp


def test_model_by_path_and_large_model_path(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    feeds = _feeds([(2, 3, 4)])
    want = capture(_mlp(), feeds, ["r"])["r"]
    path = tmp_path / "m.onnx"
    onnx.save_model(_mlp(), str(path))
    np.testing.assert_array_equal(capture(path, feeds, ["r"])["r"], want)
    # over the protobuf limit: written with external data, the weights read back after
    monkeypatch.setattr(capture_mod, "over_protobuf_limit", lambda m: True)
    big_w1 = np.random.default_rng(3).standard_normal((4, 600)).astype(np.float32)
    model = _mlp(w1=big_w1, w2=np.ones((600, 3), np.float32))
    before = model.SerializeToString()
    got = capture(model, feeds, ["r"])["r"]
    assert model.SerializeToString() == before
    ref = _reference(_mlp(w1=big_w1, w2=np.ones((600, 3), np.float32), outputs=("r",)), feeds)
    np.testing.assert_array_equal(got, ref[0][0].reshape(-1, 600))


def test_bad_requests() -> None:
    with pytest.raises(ValueError, match="no node"):
        capture(_mlp(), _feeds([(1, 1, 4)]), ["nope"])
    with pytest.raises(ValueError, match="layout"):
        capture(_mlp(), _feeds([(1, 1, 4)]), {"h": "nhwc"})
    with pytest.raises(ValueError, match="max_rows"):
        capture(_mlp(), _feeds([(1, 1, 4)]), ["h"], max_rows=0)


def test_capture_pairs_a_pruned_input_with_the_original_output_for_a_refit() -> None:
    """The pruning use: r from the pruned model, y from the original, rows paired."""
    from onnxopt.reconstruct import refit_linear, relative_error

    feeds = _feeds([(3, 20, 4)] * 4)  # 240 rows
    kept = [0, 2, 3, 5]
    pruned = _mlp(w1=W1[:, kept].copy(), w2=W2[kept].copy())
    cache: dict = {}
    got = capture(pruned, feeds, ["r", "x"], max_rows=64, cache=cache)
    r, x = got["r"], got["x"]
    y = capture(_mlp(), feeds, ["y"], max_rows=64, cache=cache)["y"]
    assert r.shape == (64, 4)
    assert y.shape == (64, 3)
    w, b = refit_linear(r, y, ridge=0.0)
    # judged on every row, from the tensors as real outputs of both models
    r_all = np.concatenate([o[0].reshape(-1, 4)
                            for o in _reference(_mlp(W1[:, kept].copy(), W2[kept].copy(),
                                                     outputs=("r",)), feeds)])
    y_all = np.concatenate([o[0].reshape(-1, 3) for o in _reference(_mlp(), feeds)])
    dropped = relative_error(r_all @ W2[kept], y_all)
    refit = relative_error(r_all @ w + b, y_all)
    assert refit < 0.5 * dropped
    # the 64 rows are pairs (found by their inputs, which are unique: Relu rows may not
    # be): the refit equals lstsq on the rows the reservoir kept
    x_all = np.concatenate([f["x"].reshape(-1, 4) for f in feeds])
    idx = [int(np.flatnonzero((x_all == row).all(axis=1))[0]) for row in x]
    assert len(set(idx)) == 64
    np.testing.assert_array_equal(r, r_all[idx])
    np.testing.assert_array_equal(y, y_all[idx])
    sol = np.linalg.lstsq(np.c_[r_all[idx], np.ones(64)].astype(np.float64),
                          y_all[idx].astype(np.float64), rcond=None)[0]
    np.testing.assert_allclose(w, sol[:4], rtol=1e-4, atol=1e-5)


# ---- Stepwise: a graph run a stretch at a time between weight changes ----

W3 = RNG.standard_normal((6, 2)).astype(np.float32)
W2_SQUARE = RNG.standard_normal((6, 6)).astype(np.float32)


def _branchy(w2: np.ndarray, outputs: tuple[str, ...] = ("y",)) -> onnx.ModelProto:
    """x -> mm1 -> h -> Relu -> r -> mm2 -> a; s = a + r (a residual); s -> mm3 -> y."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["a"], name="mm2"),
        helper.make_node("Add", ["a", "r"], ["s"], name="res"),
        helper.make_node("MatMul", ["s", "w3"], ["y"], name="mm3"),
    ]
    width = {"h": 6, "r": 6, "a": 6, "s": 6, "y": 2}
    outs = [vi(o, ["B", "S", width[o]]) for o in outputs]
    return make_model(nodes, [vi("x", ["B", "S", 4])], outs, {"w1": W1, "w2": w2, "w3": W3})


@pytest.mark.parametrize("max_bytes", [1 << 29, 0])
def test_stepwise_values_follow_weight_changes_and_rerun_only_what_changed(max_bytes: int) -> None:
    from onnxopt.capture import Stepwise
    from onnxopt.io import to_graph

    feeds = _feeds([(2, 3, 4), (1, 5, 4), (3, 2, 4)])
    graph = to_graph(_branchy(W2_SQUARE))
    step = Stepwise(graph, feeds, max_bytes=max_bytes)
    ref = _reference(_branchy(W2_SQUARE, outputs=("r", "a")), feeds)
    got = list(step.stream(["r", "a"]))  # mm2's input and output
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_array_equal(g["r"], r[0])
        np.testing.assert_array_equal(g["a"], r[1])
    # a refit changes mm2's weight: what comes after it follows, what comes before is kept
    w2_new = (W2_SQUARE * 0.5 + 1).astype(np.float32)
    mm2 = next(n for n in graph.nodes if n.name == "mm2")
    mm2.inputs[1].values = w2_new
    step.changed(mm2)
    ref = _reference(_branchy(w2_new, outputs=("s", "y")), feeds)
    got = list(step.stream(["s", "y"]))
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g["s"], r[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(g["y"], r[1], rtol=1e-6, atol=1e-6)
    # nodes run: mm1, relu, mm2, then mm2 again, res and mm3 from the kept r; with nothing
    # kept (max_bytes 0) the second stretch starts over from x
    assert step.stretches == ([3, 3] if max_bytes else [3, 5])


def test_stepwise_rejects_unknown_tensors_and_empty_data() -> None:
    from onnxopt.capture import Stepwise
    from onnxopt.errors import InputDataError
    from onnxopt.io import to_graph

    graph = to_graph(_branchy(W2_SQUARE))
    with pytest.raises(ValueError, match="'nope'"):
        next(Stepwise(graph, _feeds([(1, 2, 4)])).stream(["nope"]))
    with pytest.raises(InputDataError, match="empty"):
        Stepwise(graph, [])
