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
