"""The HTML report: rendered from real runs, its numbers read back against the JSON report,
the JSON checked against the shipped schema, and the page loaded in headless Chromium."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import pytest
from onnx import helper
from typer.testing import CliRunner

from onnxopt.bench import Latency
from onnxopt.cli import app
from onnxopt.lossy import driver
from onnxopt.report_html import SCHEMA_FILE
from onnxopt.runtime import session
from onnxopt.testing import make_model, mlp_model, vi

ROOT = Path(__file__).resolve().parents[1]
DIGITS, DIGITS_DATA = ROOT / "models" / "digits_cnn.onnx", ROOT / "models" / "digits_val.npz"
runner = CliRunner()
jsonschema = pytest.importorskip("jsonschema", reason="the test extra's jsonschema validates the reports")


# ---- a small DOM of the page (the standard library's parser; void tags are leaves)


class _Node:
    def __init__(self, tag: str, attrs: Mapping[str, str | None]) -> None:
        self.tag, self.attrs = tag, {k: v or "" for k, v in attrs.items()}
        self.children: list[_Node | str] = []

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def find(self, pred: Callable[[_Node], bool]) -> Iterator[_Node]:
        for c in self.children:
            if isinstance(c, _Node):
                if pred(c):
                    yield c
                yield from c.find(pred)

    def by_id(self, ident: str) -> _Node:
        (node,) = self.find(lambda n: n.attrs.get("id") == ident)
        return node

    def cells(self) -> list[str]:
        return [c.text.strip() for c in self.find(lambda n: n.tag in ("td", "th"))]


class _Parser(HTMLParser):
    VOID: ClassVar[set[str]] = {"meta", "br", "img", "input", "link", "hr"}

    def __init__(self) -> None:
        super().__init__()
        self.root = _Node("root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = _Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(_Node(tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(page: str) -> _Node:
    p = _Parser()
    p.feed(page)
    p.close()
    assert p.stack == [p.root], "unclosed elements"
    return p.root


def number(text: str) -> float:
    """The first number in a cell: '0.1653 ms' -> 0.1653, '24,394' -> 24394, '99.17%' -> 99.17."""
    m = re.search(r"[-+]?\d[\d,]*\.?\d*(?:e[-+]?\d+)?", text)
    assert m, text
    return float(m.group().replace(",", ""))


# ---- three real runs, each rendered once through the CLI


def _run(args: Sequence[str]) -> tuple[dict[str, Any], str, str, Path]:
    res = runner.invoke(app, list(args))
    assert res.exit_code == 0, res.output
    report = Path(args[args.index("--report") + 1])
    html = Path(args[args.index("--report-html") + 1])
    return json.loads(report.read_text()), html.read_text(encoding="utf-8"), res.output, html


@pytest.fixture(scope="module")
def lossless(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, str, Path]:
    if not DIGITS.exists():
        pytest.skip("demo model not built")
    d = tmp_path_factory.mktemp("lossless")
    return _run(["optimize", str(DIGITS), "--data", str(DIGITS_DATA), "-o", str(d / "o.onnx"), "--repeats", "20",
                 "--report", str(d / "r.json"), "--report-html", str(d / "r.html")])


def _fake_measure(*_: Any) -> Callable[..., dict[str, Latency]]:
    """int8 twice as fast as float, with spread samples: the quantized path is the one under test."""
    def measure(models: Mapping[str, onnx.ModelProto], feeds: Sequence[Any]) -> dict[str, Latency]:
        out = {}
        for name in models:
            base = 1.0 if name == "float" else 0.5
            samples = tuple(base * (1 + 0.01 * ((i * 7) % 11)) for i in range(30))
            s = np.asarray(samples)
            out[name] = Latency(float(np.median(s)), float(np.percentile(s, 90)), float(s.min()), 30, 1, "fake",
                                samples)
        return out

    return measure


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, str, Path]:
    """int8 on an MLP whose layer fc1 has an outlier weight: it must stay float."""
    d = tmp_path_factory.mktemp("quantized")
    model = d / "outlier.onnx"
    onnx.save(mlp_model(sizes=(32, 64, 64, 10), batch="N", outlier_layer=1), model)
    rng = np.random.default_rng(0)
    np.savez(d / "calib.npz", x=rng.uniform(0, 1, (128, 32)).astype(np.float32))
    x = rng.uniform(0, 1, (48, 32)).astype(np.float32)  # under 64 samples: the driver warns
    np.savez(d / "eval.npz", x=x, labels=session(model).run(None, {"x": x})[0].argmax(-1))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(driver, "default_measure", _fake_measure)
        # random logits have near ties: 3 points of budget keep the decision on the outlier layer
        return _run(["optimize", str(model), "--quantize", "int8", "--calibration-data", str(d / "calib.npz"),
                     "--data", str(d / "eval.npz"), "--max-accuracy-drop", "3", "-o", str(d / "o.onnx"),
                     "--report", str(d / "r.json"), "--report-html", str(d / "r.html")])


@pytest.fixture(scope="module")
def skipped(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, str, Path]:
    """A model no generated input runs (Reshape to 343 elements): validation is skipped."""
    d = tmp_path_factory.mktemp("skipped")
    m = make_model([helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Reshape", ["i", "t"], ["r"]),
                    helper.make_node("Relu", ["r"], ["y"])],
                   [vi("x", [1, "k"])], [vi("y", [7, 7, 7])], {"t": np.array([7, 7, 7], np.int64)})
    onnx.save(m, d / "m.onnx")
    return _run(["optimize", str(d / "m.onnx"), "-o", str(d / "o.onnx"),
                 "--report", str(d / "r.json"), "--report-html", str(d / "r.html")])


def _composed_measure(*_: Any) -> Callable[..., dict[str, Latency]]:
    """Each applied step faster than the last (float 1 ms, pruned 0.8 ms, pruned + int8 0.5 ms)."""
    def measure(models: Mapping[str, onnx.ModelProto], feeds: Sequence[Any]) -> dict[str, Latency]:
        ms = {name: 1.0 if name == "float" else 0.5 if " + " in name else 0.8 for name in models}
        return {k: Latency(v, v, v, 1, 1, "fake", (v,)) for k, v in ms.items()}

    return measure


@pytest.fixture(scope="module")
def composed(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, str, Path]:
    """--prune 0.5 --quantize int8 on the demo model: two steps, each with its sensitivity."""
    if not DIGITS.exists():
        pytest.skip("demo model not built")
    d = tmp_path_factory.mktemp("composed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(driver, "default_measure", _composed_measure)
        return _run(["optimize", str(DIGITS), "--prune", "0.5", "--quantize", "int8", "--data", str(DIGITS_DATA),
                     "-o", str(d / "o.onnx"), "--report", str(d / "r.json"), "--report-html", str(d / "r.html")])


RUNS = ["lossless", "quantized", "skipped", "composed"]


# ---- the schema


def _validator() -> Any:
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("run", RUNS)
def test_every_report_fits_the_shipped_schema(run: str, request: pytest.FixtureRequest) -> None:
    payload = request.getfixturevalue(run)[0]
    _validator().validate(payload)
    assert payload["schema"] == "onnxopt-report/1"
    assert payload["machine"]["cpu"]
    assert payload["machine"]["onnxruntime"]


def test_the_schema_rejects_what_does_not_fit(quantized: tuple[dict[str, Any], str, str, Path]) -> None:
    v = _validator()
    for path, value in ((("schema",), "onnxopt-report/2"), (("latency", "float", "samples_ms"), "many"),
                        (("candidates", 0, "within_budget"), "yes"), (("before", "nodes"), 1.5)):
        bad = copy.deepcopy(quantized[0])
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        assert not v.is_valid(bad), path
    missing = copy.deepcopy(quantized[0])
    del missing["steps"]
    assert not v.is_valid(missing)


def test_schema_is_installed_as_package_data() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert '"onnxopt.schemas" = ["*.json"]' in text
    assert SCHEMA_FILE.parent.name == "schemas"
    assert SCHEMA_FILE.exists()


# ---- what the pages show


def test_lossless_page_shows_the_numbers_of_the_json(lossless: tuple[dict[str, Any], str, str, Path]) -> None:
    payload, page, _, _ = lossless
    dom = parse(page)
    b, a = payload["before"], payload["after"]
    assert dom.by_id("ba-nodes").cells()[1:3] == [str(b["nodes"]), str(a["nodes"])]
    assert dom.by_id("ba-parameters").cells()[1:3] == [f"{b['parameters']:,}", f"{a['parameters']:,}"]
    assert a["nodes"] < b["nodes"]  # BatchNormalization folded: the page shows a real change
    for key in ("median", "p90"):
        shown = dom.by_id(f"ba-latency-{key}").cells()[1:3]
        for text, side in zip(shown, ("before", "after"), strict=True):
            assert number(text) == pytest.approx(payload["latency"][side][f"{key}_ms"], rel=5e-4)
    v = payload["validation"]
    acc = dom.by_id("ba-accuracy").cells()
    assert number(acc[1]) == pytest.approx(v["accuracy_before"] * 100, abs=5e-3)
    (logits,) = v["outputs"]
    row = next(r for r in dom.by_id("validation").find(lambda n: n.tag == "tr") if r.cells()[0] == logits["name"])
    assert number(row.cells()[3]) == pytest.approx(logits["cosine"], abs=5e-7)
    assert row.cells()[-1] == "ok"
    # every pass of the summary has its row, its time as in the JSON
    rows = {r.cells()[0]: r.cells() for r in dom.by_id("passes-table").find(lambda n: n.tag == "tr")}
    for s in payload["pipeline"]["summary"]:
        assert number(rows[s["name"]][-1]) == pytest.approx(s["seconds"], abs=5e-4)
    assert "folded=3" in rows["fold-batchnorm"][2]
    ops = {r.cells()[0]: r.cells()[1:] for r in dom.by_id("ops-table").find(lambda n: n.tag == "tr")}
    assert ops["BatchNormalization"] == [str(b["ops"]["BatchNormalization"]), "0", f"-{b['ops']['BatchNormalization']}"]


def test_latency_plot_draws_every_timing(lossless: tuple[dict[str, Any], str, str, Path]) -> None:
    payload, page, _, _ = lossless
    dom = parse(page)
    groups = {g.attrs["data-name"]: g for g in dom.find(lambda n: "dist" in n.classes)}
    assert set(groups) == {"before", "after"}
    for name, g in groups.items():
        samples = payload["latency"][name]["samples_ms"]
        assert len(samples) == payload["latency"][name]["repeats"] == 20
        # the samples are the ones the summary came from: numpy's median of them is the median
        assert float(np.median(samples)) == pytest.approx(payload["latency"][name]["median_ms"], rel=1e-5)
        assert float(g.attrs["data-median"]) == pytest.approx(np.median(samples), rel=1e-5)
        assert len(list(g.find(lambda n: n.tag == "circle"))) == 20


def test_machine_is_named(lossless: tuple[dict[str, Any], str, str, Path]) -> None:
    payload, page, _, _ = lossless
    dom = parse(page)
    assert dom.by_id("machine-cpu").cells()[1] == payload["machine"]["cpu"]
    flags = dom.by_id("machine-int8").cells()[1]
    for flag in ("avx2", "avx512_vnni", "amx_int8"):
        assert f"{flag} {'yes' if flag in payload['machine']['flags'] else 'no'}" in flags
    assert dom.by_id("machine-onnxruntime").cells()[1] == payload["machine"]["onnxruntime"]
    assert dom.by_id("machine-execution").cells()[1] == "CPUExecutionProvider"


def test_console_stays_short_and_names_the_page(lossless: tuple[dict[str, Any], str, str, Path]) -> None:
    _, _, output, html = lossless
    lines = output.strip().splitlines()
    assert lines[-1] == f"report: {html}"
    assert sum(1 for ln in lines if "report:" in ln) == 1
    assert "<" not in output  # no markup on the console


def _float_gemms(path: Path) -> set[str]:
    """Gemm/MatMul nodes of a written model whose weight is not dequantized: kept in float."""
    m = onnx.load(path)
    producers = {o: n.op_type for n in m.graph.node for o in n.output}
    return {n.name for n in m.graph.node
            if n.op_type in ("Gemm", "MatMul") and producers.get(n.input[1]) != "DequantizeLinear"}


def test_quantized_page_plots_every_candidate_and_the_chosen_one(
        quantized: tuple[dict[str, Any], str, str, Path]) -> None:
    payload, page, _, html = quantized
    dom = parse(page)
    cands = payload["candidates"]
    points = list(dom.find(lambda n: "point" in n.classes))
    assert [p.attrs["data-label"] for p in points] == [c["label"] for c in cands]
    (chosen,) = [p for p in points if "chosen" in p.classes]
    written = [c for c in cands if c["verdict"] == "written"]
    assert payload["written"] == "compressed"
    assert len(written) == 1
    assert chosen.attrs["data-label"] == written[0]["label"]
    assert float(chosen.attrs["data-x"]) == pytest.approx(written[0]["latency_ms"], rel=1e-5)
    # over-budget candidates are drawn as such; timed ones at their latency, the others in the lane
    for p, c in zip(points, cands, strict=True):
        assert ("ok" in p.classes) == c["within_budget"]
        assert (p.attrs["data-x"] == "") == (c["latency_ms"] is None)
        assert float(p.attrs["data-y"]) == pytest.approx(c["accuracy_drop_pp"], abs=1e-5)
    assert any(not c["within_budget"] for c in cands)  # the uniform int8 breaks the budget
    (budget,) = dom.find(lambda n: "budget" in n.classes)
    assert float(budget.attrs["data-value"]) == 3.0
    # the Pareto front holds the chosen point: nothing timed is faster and at least as accurate
    assert "front" in chosen.classes
    assert html.with_name("o.onnx").exists()


def test_quantized_page_sorts_sensitivity_and_shows_the_layers_kept_float(
        quantized: tuple[dict[str, Any], str, str, Path]) -> None:
    payload, page, _, html = quantized
    dom = parse(page)
    (step,) = payload["steps"]
    bars = list(dom.find(lambda n: "bar" in n.classes))
    errors = [float(b.attrs["data-error"]) for b in bars]
    assert errors == sorted(errors, reverse=True)
    assert {b.attrs["data-layer"] for b in bars} == set(step["sensitivity"])
    kept = {b.attrs["data-layer"] for b in bars if "kept" in b.classes}
    # independent oracle: the layers the written ONNX file leaves in float
    assert kept == _float_gemms(html.with_name("o.onnx")) == set(payload["float_layers"]) == {"fc1_gemm"}
    assert bars[0].attrs["data-layer"] == "fc1_gemm"
    assert bars[0].attrs["data-decision"] == "float"
    assert {b.attrs["data-decision"] for b in bars[1:]} == {"int8"}
    steps = dom.by_id("steps-table").cells()
    assert "quantize (int8)" in steps
    assert cands_label(payload, step) in steps


def cands_label(payload: Mapping[str, Any], step: Mapping[str, Any]) -> str:
    return payload["candidates"][step["candidate"]]["label"]


def test_composed_page_shows_what_each_step_contributed(composed: tuple[dict[str, Any], str, str, Path]) -> None:
    payload, page, _, _ = composed
    dom = parse(page)
    cands, steps = payload["candidates"], payload["steps"]
    assert [s["step"] for s in steps] == ["prune", "quantize"]
    rows = [r.cells() for r in dom.by_id("steps-table").find(lambda n: n.tag == "tr")][1:]
    assert len(rows) == 2
    previous = cands[0]  # the float model
    for row, step in zip(rows, steps, strict=True):
        assert step["applied"]
        c = cands[step["candidate"]]
        assert row[1] == c["label"]
        change = (c["macs"] - previous["macs"]) / previous["macs"] * 100
        assert number(row[2].split("(")[1]) == pytest.approx(change, abs=0.05)
        assert number(row[4].split("(")[0]) == pytest.approx(c["latency_ms"], rel=5e-4)
        previous = c
    assert cands[steps[0]["candidate"]]["macs"] < cands[0]["macs"]  # pruning removed MACs
    # one sensitivity chart per step; a changed layer's decision is its level as the test spells it
    for step in steps:
        chart = dom.by_id(f"sensitivity-{step['step']}")
        assert step["sensitivity"], step["step"]
        assert f"{len(step['sensitivity'])} layers" in chart.text
    bars = {b.attrs["data-layer"] + "@" + b.attrs["data-decision"] for b in dom.find(lambda n: "changed" in n.classes)}
    expected = {f"{layer}@keep {info['level']:.0%}" for layer, info in steps[0]["layers"].items()}
    expected |= {f"{layer}@int8" for layer in steps[1]["layers"]}
    assert bars == expected
    (chosen,) = [p for p in dom.find(lambda n: "chosen" in n.classes)]
    assert chosen.attrs["data-label"] == cands[steps[1]["candidate"]]["label"]
    assert float(chosen.attrs["data-x"]) == 0.5


def test_quantized_page_states_the_decision_and_warnings_first(
        quantized: tuple[dict[str, Any], str, str, Path]) -> None:
    payload, page, _, _ = quantized
    dom = parse(page)
    assert payload["reason"] in " ".join(dom.by_id("decision").text.split())
    assert any("48 evaluation samples" in w for w in payload["warnings"])
    for w in payload["warnings"]:
        assert w in dom.by_id("warnings").text
    assert page.index('id="warnings"') < page.index('id="before-after"') < page.index('id="candidates"')


def test_skipped_validation_is_a_warning_at_the_top(skipped: tuple[dict[str, Any], str, str, Path]) -> None:
    payload, page, _, _ = skipped
    dom = parse(page)
    assert payload["validation"] is None
    assert payload["validation_skipped"]
    first = next(dom.find(lambda n: n.tag == "section"))
    assert first.attrs["id"] == "warnings"
    assert "validation skipped: the original model fails on generated inputs" in first.text
    fidelity = dom.by_id("fidelity").text
    assert payload["validation_skipped"] in fidelity
    for check in payload["checks"]:
        assert check in fidelity
    assert "Not measured" in dom.by_id("latency").text
    assert not list(dom.find(lambda n: "dist" in n.classes))


def test_flags_that_skip_checks_are_warnings_at_the_top(tmp_path: Path) -> None:
    if not DIGITS.exists():
        pytest.skip("demo model not built")
    payload, page, _, _ = _run(["optimize", str(DIGITS), "--no-validate", "--no-bench", "-o", str(tmp_path / "o.onnx"),
                                "--report", str(tmp_path / "r.json"), "--report-html", str(tmp_path / "r.html")])
    _validator().validate(payload)
    assert payload["validation_skipped"] == "--no-validate"
    assert payload["bench_skipped"] == "--no-bench"
    warnings = parse(page).by_id("warnings").text
    assert "not validated (--no-validate)" in warnings
    assert "latency not measured (--no-bench)" in warnings
    assert page.index('id="warnings"') < page.index('id="before-after"')


@pytest.mark.parametrize("run", RUNS)
def test_pages_are_self_contained_and_small(run: str, request: pytest.FixtureRequest) -> None:
    page = request.getfixturevalue(run)[1]
    assert len(page.encode()) < 100_000
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|@import|url\(", page)
    assert re.findall(r"https?://[^\"' )]+", page) == ["http://www.w3.org/2000/svg"] * page.count("<svg")


# ---- onnxopt report: a saved JSON to the same page


def test_report_command_renders_the_saved_json_to_the_same_page(
        quantized: tuple[dict[str, Any], str, str, Path], tmp_path: Path) -> None:
    _, page, _, html = quantized
    out = tmp_path / "again.html"
    res = runner.invoke(app, ["report", str(html.with_name("r.json")), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == f"wrote {out}"
    assert out.read_text(encoding="utf-8") == page


def test_report_command_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    cases = {"missing.json": None, "text.json": "not json", "old.json": json.dumps({"output": "x"}),
             "future.json": json.dumps({"schema": "onnxopt-report/9", "kind": "optimize"}),
             "broken.json": json.dumps({"schema": "onnxopt-report/1", "kind": "compress", "candidates": 3})}
    expected = {"missing.json": "no such file", "text.json": "not JSON", "old.json": "no 'schema' field",
                "future.json": "this onnxopt renders onnxopt-report/1", "broken.json": "malformed report"}
    for name, content in cases.items():
        src = tmp_path / name
        if content is not None:
            src.write_text(content)
        dst = tmp_path / (name + ".html")
        res = runner.invoke(app, ["report", str(src), "-o", str(dst)])
        assert res.exit_code == 1, name
        assert res.output.startswith("onnxopt: error: ")
        assert expected[name] in res.output
        assert len(res.output.strip().splitlines()) == 1
        assert "Traceback" not in res.output
        assert not dst.exists()


def test_optimize_refuses_an_unwritable_html_path_before_running(tmp_path: Path) -> None:
    if not DIGITS.exists():
        pytest.skip("demo model not built")
    out = tmp_path / "o.onnx"
    res = runner.invoke(app, ["optimize", str(DIGITS), "-o", str(out),
                              "--report-html", str(tmp_path / "no" / "r.html")])
    assert res.exit_code == 1
    assert "does not exist" in res.output
    assert not out.exists()


# ---- the page in a browser


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (apt-get install chromium)")
@pytest.mark.parametrize("run", ["lossless", "quantized"])
def test_page_renders_in_headless_chromium_without_script_errors(
        run: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    html: Path = request.getfixturevalue(run)[3]
    dom_text, log = _load_in_chromium(html, tmp_path)
    dom = parse(dom_text[dom_text.index("<html"):] if "<html" in dom_text else dom_text)
    body = next(dom.find(lambda n: n.tag == "body"))
    assert body.attrs.get("data-script") == "ok", log[-2000:]  # the script ran to its last line
    assert not re.search(r"CONSOLE.*(Uncaught|Error)|Uncaught", log), log[-2000:]
    assert len(list(dom.find(lambda n: n.tag == "svg"))) >= (3 if run == "quantized" else 1)


def test_chromium_check_catches_a_script_error(tmp_path: Path) -> None:
    """The check above can fail: a page whose script throws is caught by both of its signals."""
    if _chromium() is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    page = tmp_path / "broken.html"
    page.write_text('<!doctype html><html><body><script>undefinedFunction();'
                    'document.body.dataset.script = "ok";</script></body></html>')
    dom_text, log = _load_in_chromium(page, tmp_path)
    assert 'data-script="ok"' not in dom_text
    assert "Uncaught" in log


def _load_in_chromium(html: Path, tmp_path: Path) -> tuple[str, str]:
    """The DOM after load (scripts run) and Chromium's log, console messages included."""
    cmd = [str(_chromium()), "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=2000", "--dump-dom", html.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


def test_a_pass_the_guard_dropped_has_its_row(lossless: tuple[dict[str, Any], str, str, Path]) -> None:
    # the written pipeline ran without the dropped pass, so its summary has no row for it:
    # the page still lists it, with the guard's reason
    from onnxopt.report_html import render

    payload = json.loads(json.dumps(lossless[0]))
    pipeline = payload["pipeline"]
    pipeline["summary"] = [s for s in pipeline["summary"] if s["name"] != "fold-batchnorm"]
    pipeline["dropped"] = {"fold-batchnorm": "the model measured 1.12x slower with it"}
    rows = {r.cells()[0]: r.cells() for r in parse(render(payload)).by_id("passes-table").find(
        lambda n: n.tag == "tr")}
    assert rows["fold-batchnorm"][2] == "DROPPED: the model measured 1.12x slower with it"
