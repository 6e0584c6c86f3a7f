"""bench/run.py --quick on one tiny model writes a RESULTS-style table and its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

RUN = Path(__file__).resolve().parent.parent / "bench" / "run.py"


@pytest.mark.slow
def test_quick_bench_on_mlp_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    contenders = "onnxopt-l1,ort-dynamic,no-such-tool"
    bad = subprocess.run([sys.executable, str(RUN), "--quick", "--models", "mlp", "--contenders", contenders],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert "unknown contender(s) no-such-tool" in bad.stderr

    cmd = [sys.executable, str(RUN), "--quick", "--models", "mlp", "--contenders", "onnxopt-l1,ort-dynamic,onnxsim",
           "--repeats", "3", "--out", str(out), "--cache", str(tmp_path / "zoo")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    for needed in ("- date: ", "- machine: ", "cores", "- versions: ", "onnxruntime", "- command: `python bench/run.py --quick",
                   "## Summary", "## mlp-tiny", "| contender | status | 1t median | 1t p90 | 1t ratio | 2t median"):
        assert needed in text
    summary = text[text.index("## Summary"):text.index("## mlp-tiny")]
    assert "| min cosine | set cosine | min agree | below floor |" in summary
    # the lossless level keeps the outputs: it is never below the quantization floor
    assert next(ln for ln in summary.splitlines() if ln.startswith("| onnxopt-l1 |")).endswith("| 0 |")
    section = text[text.index("## mlp-tiny"):].splitlines()
    rows = {cells[1].strip(): [c.strip() for c in cells[1:-1]] for cells in (ln.split("|") for ln in section)
            if len(cells) > 10 and cells[1].strip() not in ("contender", "---")}
    assert set(rows) == {"original", "onnxopt-l1", "ort-dynamic", "onnxsim"}
    assert rows["original"][1] == "ok"
    assert rows["original"][4] == "1.00"
    assert rows["onnxopt-l1"][1] == "ok"
    assert float(rows["onnxopt-l1"][9]) > 0.99999
    assert rows["onnxsim"][1] in ("ok", "failed", "skipped")  # a peer that does not install is a row
    # the digits labels give a task accuracy
    assert rows["original"][-3].endswith("%")

    data = json.loads(out.with_suffix(".json").read_text())
    assert {r["contender"] for r in data["rows"]} == set(rows)
    lat = next(r for r in data["rows"] if r["contender"] == "original")["latency"]
    assert set(lat) == {"1", "2"}
    assert lat["1"]["repeats"] >= 3
    assert (tmp_path / "zoo" / "mlp-tiny.onnx").exists()  # artifacts go to the cache, not the repo


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run_for_tests", RUN)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_summary_counts_models_below_the_floor_as_the_driver_defines_it() -> None:
    """Set cosine < 0.99 or, for classifiers only, agreement < 98%: the per-input minimum does not count."""
    bench = _bench_module()
    workloads = [bench.Workload("cls", Path(), "cnn", "classify", [], []),
                 bench.Workload("emb", Path(), "encoder", "embed", [], [])]
    rows = [
        bench.Row("cls", "original", "ok", cosine=1.0, cosine_all=1.0, agreement=1.0),
        bench.Row("emb", "original", "ok", cosine=1.0, cosine_all=1.0, agreement=1.0),
        # low per-input minimum, set cosine and agreement within the floor: not below
        bench.Row("cls", "a", "ok", cosine=0.9, cosine_all=0.995, agreement=0.99),
        # an embedding's neighbour agreement is reported, not part of the floor
        bench.Row("emb", "a", "ok", cosine=0.99, cosine_all=0.995, agreement=0.9),
        bench.Row("cls", "b", "ok", cosine=0.99, cosine_all=0.999, agreement=0.97),  # agreement
        bench.Row("emb", "b", "ok", cosine=0.98, cosine_all=0.985, agreement=1.0),  # set cosine
    ]
    bench.CONTENDERS = {"original": bench.CONTENDERS["original"], "a": bench.CONTENDERS["original"],
                        "b": bench.CONTENDERS["original"]}
    meta = {"date": "d", "machine": "m", "load_start": "0", "load_end": "0", "versions": {}, "command": "c",
            "seconds": 60, "repeats": 1}
    text = bench.render(rows, workloads, meta, [])
    summary = text[text.index("## Summary"):text.index("## cls")]
    lines = {ln.split("|")[1].strip(): ln for ln in summary.splitlines() if ln.startswith("| ")}
    assert lines["original"].endswith("| 0 |")
    assert lines["a"].endswith("| 0 |")
    assert lines["b"].endswith("| 2 (cls, emb) |")
