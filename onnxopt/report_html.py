"""One self-contained HTML page per run, rendered from the JSON report.

``onnxopt optimize ... --report-html run.html`` renders the run it just did;
``onnxopt report run.json -o run.html`` renders a report saved with ``--report``. The page is
rendered from the JSON payload only (the one described by ``onnxopt/schemas/report-1.json``),
so both routes give the same page and any tool that reads the schema can do the same.

Order: warnings first, then the model before and after, the latency distribution, fidelity
per output, the passes; for lossy runs the candidates on a cost-against-error plane, what each
composed step contributed and per-layer sensitivity with each layer's decision; the machine
last. Plots are inline SVG (``onnxopt.report_svg``): nothing is fetched, the page opens from a
file with no server. The one script only sorts tables by a click on their header.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from onnxopt import __version__
from onnxopt.cli import _fmt_bytes, _fmt_int, _pct
from onnxopt.errors import OnnxoptError
from onnxopt.report_svg import strip_plot

SCHEMA = "onnxopt-report/1"
SCHEMA_FILE = Path(__file__).with_name("schemas") / "report-1.json"
EXECUTION_PROVIDER = "CPUExecutionProvider"  # onnxopt.runtime.session runs every model on it


def header(kind: str) -> dict[str, Any]:
    """The keys every JSON report starts with: schema version, kind, onnxopt version, machine."""
    from onnxopt import machine

    return {"schema": SCHEMA, "kind": kind, "onnxopt": __version__, "machine": machine.describe(),
            "execution_provider": EXECUTION_PROVIDER}


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A saved JSON report, refused in one line when it is not one this version renders."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OnnxoptError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise OnnxoptError(f"{p}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    except ValueError as e:
        raise OnnxoptError(f"{p}: not JSON ({e})") from None
    if not isinstance(data, dict) or "schema" not in data:
        raise OnnxoptError(f"{p}: not an onnxopt report (no 'schema' field; reports written with --report "
                           f"since {SCHEMA} have one)")
    if data["schema"] != SCHEMA:
        raise OnnxoptError(f"{p}: report schema '{data['schema']}'; this onnxopt renders {SCHEMA}")
    if data.get("kind") not in ("optimize", "compress"):
        raise OnnxoptError(f"{p}: unknown report kind {data.get('kind')!r}; expected 'optimize' or 'compress'")
    return data


def check_destination(path: str | os.PathLike[str]) -> None:
    """Refuse an HTML path that cannot be written, before the run rather than after it."""
    p = Path(path)
    if p.is_dir():
        raise OnnxoptError(f"{p}: is a directory")
    if not p.parent.exists():
        raise OnnxoptError(f"{p}: directory '{p.parent}' does not exist")


def write_html(path: str | os.PathLike[str], report: Mapping[str, Any]) -> None:
    """Render ``report`` (a result's ``to_dict()`` or a loaded JSON report) to ``path`` atomically."""
    from onnxopt.api import _json_default, _write_text

    # through JSON: the page shows exactly the numbers a --report file holds
    data = json.loads(json.dumps(report, default=_json_default))
    _write_text(Path(path), render(data))


def render_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """``onnxopt report``: a saved JSON report to HTML; a report that does not fit the schema is refused."""
    check_destination(dst)
    data = load_report(src)
    try:
        page = render(data)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise OnnxoptError(f"{src}: malformed report ({type(e).__name__}: {e}); check it against "
                           f"{SCHEMA_FILE.name} shipped in onnxopt/schemas") from None
    from onnxopt.api import _write_text

    _write_text(Path(dst), page)


def render(r: Mapping[str, Any]) -> str:
    """The whole page for one report."""
    compress = r.get("kind") == "compress"
    title = f"onnxopt: {Path(r.get('source') or '?').name} → {Path(r.get('output') or '?').name}"
    parts = [_head(title), f"<h1>{escape(title)}</h1>", _intro(r), _warnings(r), _before_after(r),
             _latency(r)]
    if compress:
        from onnxopt import report_lossy  # imports this module's page primitives

        parts += [report_lossy.candidates(r), report_lossy.steps(r), report_lossy.sensitivity(r)]
    parts += [_validation(r), _passes(r.get("pipeline"), r.get("guard") or []), _ops(r), _machine(r), _foot(r)]
    return "\n".join(p for p in parts if p)


# ---- page furniture

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;max-width:980px;margin:24px auto;padding:0 16px;color:#222}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:14px;margin:14px 0 4px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px} th,td{padding:3px 8px;border-bottom:1px solid #eee}
th{background:#f6f6f6;text-align:left;cursor:pointer} td.n{text-align:right;font-variant-numeric:tabular-nums}
.warn{background:#fff4d6;border-left:4px solid #e0a800;padding:6px 10px;margin:4px 0}
.decision{background:#eef5ee;border-left:4px solid #27ae60;padding:6px 10px;margin:8px 0}
.note{color:#666;font-size:12px} .bad{color:#c0392b;font-weight:600} .ok{color:#1e7e34}
svg{max-width:100%;height:auto;display:block;margin:6px 0} code{font-size:12px}
"""

_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0], i = th.cellIndex, up = th.dataset.dir !== "up";
    var key = function (row) { var c = row.cells[i]; return c.dataset.v !== undefined ? c.dataset.v : c.textContent; };
    Array.from(body.rows).sort(function (a, b) {
      var x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y);
      var c = isNaN(nx) || isNaN(ny) ? x.localeCompare(y) : nx - ny;
      return up ? c : -c;
    }).forEach(function (row) { body.appendChild(row); });
    th.dataset.dir = up ? "up" : "down";
  });
});
document.body.dataset.script = "ok";
"""


def _head(title: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_CSS}</style></head><body>')


def _foot(r: Mapping[str, Any]) -> str:
    return (f'<p class="note">Report schema <code>{escape(str(r.get("schema")))}</code>, written by onnxopt '
            f'{escape(str(r.get("onnxopt", "?")))}; rendered by onnxopt {escape(__version__)}.</p>'
            f"<script>{_SCRIPT}</script></body></html>\n")


def td(text: str, value: Any = None, cls: str = "n") -> str:
    v = "" if value is None else f' data-v="{escape(str(value))}"'
    return f'<td class="{cls}"{v}>{escape(text)}</td>'


def html_table(header: Sequence[str], rows: Iterable[str], ident: str = "", sortable: bool = True) -> str:
    """``rows`` are ``<tr>`` bodies (cells already rendered)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(row if row.startswith("<tr") else f"<tr>{row}</tr>" for row in rows)
    attrs = (f' id="{ident}"' if ident else "") + (' class="sortable"' if sortable else "")
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def section(ident: str, title: str, *body: str) -> str:
    return f'<section id="{ident}"><h2>{escape(title)}</h2>' + "".join(body) + "</section>"


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g} ms"


# ---- sections


def _intro(r: Mapping[str, Any]) -> str:
    lines = [f"Model <code>{escape(str(r.get('source') or '?'))}</code>, written to "
             f"<code>{escape(str(r.get('output') or '?'))}</code>."]
    if r.get("kind") == "compress":
        lines.append(f'</p><div class="decision" id="decision"><b>Decision</b> ({escape(r.get("method", ""))}, '
                     f'wrote the {escape(r.get("written", "?"))} model): {escape(r.get("reason", ""))}</div><p>')
        lines.append(f"Budget: {escape(r.get('budget', ''))}. Evaluated on {r.get('evaluation_samples', '?')} "
                     f"feeds from {escape(str(r.get('evaluation_source', '')))}; calibration: "
                     f"{escape(str(r.get('calibration_source', '')))}.")
    elif r.get("data_source"):
        lines.append(f"Inputs: {escape(r['data_source'])}.")
    return "<p>" + " ".join(lines) + "</p>"


def _warnings(r: Mapping[str, Any]) -> str:
    """Everything that weakens the run's conclusions, at the top."""
    items = list(r.get("warnings") or [])
    if r.get("validation_skipped") == "--no-validate":
        items.append("not validated (--no-validate): the written model was not compared with the original")
    if r.get("bench_skipped") and not any(w.startswith("latency not measured") for w in items):
        items.append(f"latency not measured ({r['bench_skipped']})")
    if r.get("validation_passed") is False:
        items.append(f"the written model is over budget against the source: {r.get('validation_detail', '')}")
    if not items:
        return ""
    return '<section id="warnings">' + "".join(
        f'<div class="warn"><b>Warning:</b> {escape(w)}</div>' for w in dict.fromkeys(items)) + "</section>"


def _timing_pair(r: Mapping[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str, str]:
    """(before, after) latency entries and their names: optimize's pair, or float and the written model."""
    lat = r.get("latency") or {}
    if r.get("kind") != "compress":
        return lat.get("before"), lat.get("after"), "before", "after"
    written = next((c for c in r.get("candidates", []) if str(c.get("verdict", "")).startswith("written")), None)
    name = next((k for k, v in lat.items() if k != "float" and written is not None
                 and v.get("median_ms") == written.get("latency_ms")), "float")
    return lat.get("float"), lat.get(name), "float", name


def _before_after(r: Mapping[str, Any]) -> str:
    b, a = r.get("before") or {}, r.get("after") or {}
    rows = [("nodes", b.get("nodes"), a.get("nodes"), str), ("parameters", b.get("parameters"),
            a.get("parameters"), lambda n: f"{n:,}"), ("size", b.get("size_bytes"), a.get("size_bytes"), _fmt_bytes),
            ("macs", b.get("macs"), a.get("macs"), _fmt_int)]
    names = {"nodes": "nodes", "parameters": "parameters", "size": "file size", "macs": "MACs (estimated)"}
    out = []
    for key, x, y, f in rows:
        if x is None and y is None:
            continue
        out.append(f'<tr id="ba-{key}"><td>{names[key]}</td>' + td("-" if x is None else f(x), x)
                   + td("-" if y is None else f(y), y) + td(_pct(x, y)) + "</tr>")
    lb, la, nb, na = _timing_pair(r)
    if lb and la:
        for key, label in (("median_ms", "latency median"), ("p90_ms", "latency p90")):
            out.append(f'<tr id="ba-latency-{key[:-3]}"><td>{label}</td>' + td(ms(lb[key]), lb[key])
                       + td(ms(la[key]), la[key]) + td(_pct(lb[key], la[key])) + "</tr>")
    v = r.get("validation") or {}
    if v.get("accuracy_before") is not None:
        ab, aa = v["accuracy_before"], v["accuracy_after"]
        out.append('<tr id="ba-accuracy"><td>accuracy (labels)</td>' + td(f"{ab:.2%}", ab) + td(f"{aa:.2%}", aa)
                   + td(f"{(aa - ab) * 100:+.2f} pt") + "</tr>")
    first, second = ("source", "written") if r.get("kind") == "compress" else ("before", "after")
    note = ""
    if lb and la:
        clock = "CPU time of the calling thread" if lb.get("clock") == "thread_time" else "wall clock"
        note = (f'<p class="note">Latency: {nb} against {na}, {lb.get("repeats")} interleaved runs, '
                f'{lb.get("threads")} thread(s), {clock}.</p>')
    return section("before-after", "Before and after", html_table(["", first, second, "change"], out, sortable=False),
                    note)


def _latency(r: Mapping[str, Any]) -> str:
    lat = {k: v for k, v in (r.get("latency") or {}).items() if v}
    if not lat:
        why = r.get("bench_skipped") or "no model was timed"
        return section("latency", "Latency", f"<p>Not measured: {escape(str(why))}.</p>")
    rows = [f"<td>{escape(k)}</td>" + td(ms(v["median_ms"]), v["median_ms"]) + td(ms(v["p90_ms"]), v["p90_ms"])
            + td(ms(v["min_ms"]), v["min_ms"]) + td(str(v["repeats"]), v["repeats"]) for k, v in lat.items()]
    table = html_table(["model", "median", "p90", "min", "runs"], rows, "latency-table")
    samples = {k: v["samples_ms"] for k, v in lat.items() if v.get("samples_ms")}
    plot = (strip_plot(samples, "milliseconds per run (dots: every run; box: 25th-75th percentile; red: median; "
                                "whiskers: 10th-90th)") if samples else
            '<p class="note">This report holds no individual timings (written before they were kept).</p>')
    return section("latency", "Latency distribution", plot, table)


def _validation(r: Mapping[str, Any]) -> str:
    blocks = []
    written = "Written model against the source" if r.get("kind") == "compress" else "Optimized against original"
    for key, title in (("validation", written), ("lossless_validation", "Lossless passes against the source")):
        v = r.get(key)
        if not v:
            continue
        rows = []
        # with labels and an accuracy budget, the scored output is judged by its accuracy, not the floor
        scored = v.get("accuracy_output") if (r.get("budget_limits") or {}).get("max_accuracy_drop_pp") else None
        for o in v["outputs"]:
            top1 = "-" if o.get("top1_agreement") is None else f"{o['top1_agreement']:.2%}"
            result = (td("by accuracy", cls="") if o["name"] == scored and key == "validation" else
                      td("ok", cls="ok") if o["passed"] else td("FAIL", cls="bad"))
            rows.append(f"<td>{escape(o['name'])}</td>" + td(f"{o['max_abs']:.3g}", o["max_abs"])
                        + td(f"{o['max_rel']:.3g}", o["max_rel"]) + td(f"{o['cosine']:.6f}", o["cosine"])
                        + td("-" if o.get("cosine_low") is None else f"{o['cosine_low']:.6f}", o.get("cosine_low"))
                        + td(top1, o.get("top1_agreement")) + td(o.get("tolerance") or "", cls="") + result)
        blocks.append(f"<h3>{escape(title)}: {v['samples']} feeds from {escape(str(v['source']))}</h3>"
                      + html_table(["output", "max |diff|", "max rel", "cosine", "cosine (lower bound)", "top-1 agree",
                                "tolerance", "result"], rows, key))
        if key == "validation" and r.get("validation_detail"):
            blocks.append(f'<p class="note">Verdict against the source: {escape(r["validation_detail"])}.</p>')
    if not blocks:
        why = r.get("validation_skipped") or "not run"
        checks = r.get("checks") or []
        extra = ("<p>Checked instead: " + escape("; ".join(checks)) + "</p>") if checks else ""
        return section("fidelity", "Fidelity per output", f"<p>Validation skipped: {escape(str(why))}.</p>", extra)
    return section("fidelity", "Fidelity per output", *blocks)


def _passes(p: Mapping[str, Any] | None, decisions: Sequence[Mapping[str, Any]] = ()) -> str:
    if not p:
        return ""
    trials = "".join(f'<p class="note">{escape(str(g["message"]))}</p>' for g in decisions if "trial" in g)
    rows = []
    dropped = p.get("dropped") or {}  # passes the never-slower guard took out, and why
    for s in p.get("summary", []):
        stats = s.get("stats", {})
        did = ", ".join(f"{k}={v}" for k, v in sorted(stats.items()) if not k.startswith("skipped:"))
        if s["name"] in dropped:
            did = f"DROPPED: {dropped[s['name']]}" + (f" (it did: {did})" if did else "")
        declined = ", ".join(f"{k[8:]}={v}" for k, v in sorted(stats.items()) if k.startswith("skipped:"))
        rows.append(f"<td>{escape(s['name'])}</td>" + td(str(s["runs"]), s["runs"])
                    + td(did or ("-" if not s["changed"] else "changed"), cls="") + td(declined or "-", cls="")
                    + td(f"{-s['nodes_removed']:+d}" if s["nodes_removed"] else "", -s["nodes_removed"])
                    + td(f"{-s['params_removed']:+,}" if s["params_removed"] else "", -s["params_removed"])
                    + td(f"{s['seconds']:.3f}", s["seconds"]))
    shown = {s["name"] for s in p.get("summary", [])}
    for name, why in dropped.items():  # the written pipeline ran without them: a row each all the same
        if name not in shown:
            rows.append(f"<td>{escape(name)}</td>" + td("0", 0) + td(f"DROPPED: {why}", cls="") + td("-", cls="")
                        + td("", 0) + td("", 0) + td("", 0))
    total = sum(s["seconds"] for s in p.get("summary", []))
    return section("passes", "Passes", html_table(["pass", "runs", "what it did", "declined (why=count)", "nodes",
                                                 "parameters", "seconds"], rows, "passes-table"),
                    f'<p class="note">Pipeline: {escape(", ".join(p.get("pipeline", [])))}; '
                    f"{total:.3f} s in passes.</p>", trials)


def _ops(r: Mapping[str, Any]) -> str:
    b, a = (r.get("before") or {}).get("ops") or {}, (r.get("after") or {}).get("ops") or {}
    if not b and not a:
        return ""
    ops = sorted(set(b) | set(a), key=lambda k: (-abs(a.get(k, 0) - b.get(k, 0)), k))
    rows = [f"<td>{escape(k)}</td>" + td(str(b.get(k, 0)), b.get(k, 0)) + td(str(a.get(k, 0)), a.get(k, 0))
            + td(f"{a.get(k, 0) - b.get(k, 0):+d}" if a.get(k, 0) != b.get(k, 0) else "", a.get(k, 0) - b.get(k, 0))
            for k in ops]
    return section("ops", "Op histogram change", html_table(["op", "before", "after", "change"], rows, "ops-table"))


def _machine(r: Mapping[str, Any]) -> str:
    m = r.get("machine") or {}
    flags = set(m.get("flags") or [])
    lat = next(iter((r.get("latency") or {}).values()), None)
    int8 = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512_vnni", "avx_vnni", "amx_int8"))
    rows = [("CPU", m.get("cpu")), ("int8 instructions", int8), ("all flags seen", " ".join(m.get("flags") or [])),
            ("cores", m.get("cores")), ("memory", f"{m['memory_gib']} GiB" if m.get("memory_gib") else None),
            ("OS", m.get("os")), ("Python", m.get("python")), ("onnxruntime", m.get("onnxruntime")),
            ("execution provider", r.get("execution_provider")),
            ("providers available", ", ".join(m.get("providers") or [])),
            ("threads (latency)", lat.get("threads") if lat else None),
            # a Ray run times the verdict on another node: the figures are that machine's, not this one's
            ("latency measured on", r.get("measured_on"))]
    body = "".join(f'<tr id="machine-{escape(k.split()[0].lower())}"><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>'
                   for k, v in rows if v not in (None, ""))
    return section("machine", "Machine", f"<table>{body}</table>")
