"""The lossy sections of the HTML report: candidates on a plane, what each step contributed,
per-layer sensitivity with each layer's decision (``onnxopt.report_html`` renders the page)."""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from typing import Any

from onnxopt.cli import _fmt_bytes, _fmt_int, _pct
from onnxopt.report_html import html_table, ms, section, td
from onnxopt.report_svg import Bar, Point, bar_chart, plane

COSINE_FLOOR = 1e-7  # 1 - cosine below this is drawn at it (a log axis has no zero)


def _error_axis(r: Mapping[str, Any]) -> tuple[str, str, float | None, bool]:
    """(candidate key, axis title, budget on that axis, log scale): accuracy drop with labels, else 1 - cosine."""
    limits = r.get("budget_limits") or {}
    if limits.get("max_accuracy_drop_pp") is not None and any(
            c.get("accuracy_drop_pp") is not None for c in r.get("candidates", [])):
        return "accuracy_drop_pp", "accuracy drop (pt)", limits["max_accuracy_drop_pp"], False
    floor = limits.get("min_cosine")
    return "min_cosine", "1 - min cosine", None if floor is None else 1 - floor, True


def _error_of(c: Mapping[str, Any], key: str) -> float:
    v = c.get(key)
    if key == "min_cosine":
        return max(1.0 - (v if v is not None else 1.0), COSINE_FLOOR)
    return float(v) if v is not None else 0.0


def candidates(r: Mapping[str, Any]) -> str:
    cands = r.get("candidates") or []
    key, axis, budget, log = _error_axis(r)
    points = [Point(c["label"], c.get("latency_ms"), _error_of(c, key), bool(c["within_budget"]),
                    str(c.get("verdict", "")).startswith("written")) for c in cands]
    svg = plane(points, "median latency (ms)", axis, budget, log)
    rows = []
    for i, c in enumerate(cands):
        rows.append(f"<td>{i}</td><td>{escape(c['label'])}</td><td>{escape(c['step'])}</td>"
                    + td("-" if c.get("accuracy") is None else f"{c['accuracy']:.2%}", c.get("accuracy"))
                    + td("-" if c.get("accuracy_drop_pp") is None else f"{c['accuracy_drop_pp']:+.2f}",
                          c.get("accuracy_drop_pp"))
                    + td("-" if c.get("min_cosine") is None else f"{c['min_cosine']:.6f}", c.get("min_cosine"))
                    + td(ms(c.get("latency_ms")), c.get("latency_ms")) + td(_fmt_int(c.get("macs")), c.get("macs"))
                    + td(_fmt_bytes(c.get("size_bytes")), c.get("size_bytes"))
                    + td(c.get("verdict", ""), cls="") + td(c.get("budget_detail", ""), cls="note"))
    note = ('<p class="note">Every candidate the driver evaluated. Green: within the budget (judged on lower/upper '
            "confidence bounds, so a point near the line can fall either side); orange: over. Ringed: written. "
            "Green line: the Pareto front of the timed candidates. The latency verdict times the float model and "
            "each step's result together; the other candidates were judged on accuracy only and sit in the "
            "'not timed' lane.</p>")
    return section("candidates", "Candidates: latency against accuracy", svg, note,
                   html_table(["#", "candidate", "step", "accuracy", "drop (pt)", "min cosine", "latency", "MACs",
                               "size", "verdict", "budget"], rows, "candidates-table"))


def steps(r: Mapping[str, Any]) -> str:
    """Per composed step: what it changed, and the change it brought against the step before."""
    cands = r.get("candidates") or []
    key, axis, _, _ = _error_axis(r)
    prev = cands[0] if cands else {}
    rows = []
    for s in r.get("steps") or []:
        c = cands[s["candidate"]] if s.get("candidate") is not None else None
        name = s["step"] if s["method"] == s["step"] else f"{s['step']} ({s['method']})"
        if c is None:
            rows.append(f"<td>{escape(name)}</td><td>not applied</td>" + "<td></td>" * 4
                        + td(s.get("reason", ""), cls=""))
            continue
        cells = [f"<td>{escape(name)}</td><td>{escape(c['label'])}</td>"]
        for field, f in (("macs", _fmt_int), ("size_bytes", _fmt_bytes), ("latency_ms", ms)):
            x, y = prev.get(field), c.get(field)
            cells.append(td(f"{f(y)} ({_pct(x, y)})" if y is not None else "-", y))
        e0, e1 = _error_of(prev, key), _error_of(c, key)
        cells.append(td(f"{e1:.3g} ({e1 - e0:+.3g})", e1))
        cells.append(td(f"{len(s.get('layers', {}))} layer(s) changed, {len(s.get('skipped', {}))} left alone; "
                         f"{s.get('reason', '')}", cls=""))
        rows.append("".join(cells))
        prev = c
    return section("steps", "What each step contributed", html_table(
        ["step", "result", "MACs (change)", "size (change)", "latency (change)", f"{axis} (change)", "what it did"],
        rows, "steps-table"),
        '<p class="note">Each step runs on the model the previous one left; changes are against that model '
        "(the first against the float model after the lossless passes).</p>")


def sensitivity(r: Mapping[str, Any]) -> str:
    blocks = []
    for s in r.get("steps") or []:
        sens = s.get("sensitivity") or {}
        layers = s.get("layers") or {}
        if not sens:
            if layers:
                rows = [f"<td>{escape(k)}</td>" + td(str(v.get("label", v.get("level"))), cls="")
                        for k, v in layers.items()]
                blocks.append(f"<h3>{escape(s['step'])}: uniform, no per-layer sensitivity measured</h3>"
                              + html_table(["layer", "decision"], rows))
            continue
        identity = "float" if s["step"] == "quantize" else "unchanged"
        worst = {k: (list(v.values())[-1] if v else 0.0) for k, v in sens.items()}
        bars = [Bar(k, worst[k], layers[k].get("label", str(layers[k].get("level"))) if k in layers else identity,
                    "changed" if k in layers else "kept")
                for k in sorted(worst, key=lambda k: (-worst[k], k))]
        levels = list(next(iter(sens.values())).keys()) if sens else []
        status = "" if s.get("applied") else f" (step not applied: {s.get('reason', '')})"
        blocks.append(f'<h3 id="sensitivity-{escape(s["step"])}">{escape(s["step"])}: {len(bars)} layers, error with '
                      f"only that layer changed to {escape(levels[-1] if levels else '?')}{escape(status)}</h3>"
                      + bar_chart(bars, "1 - cosine against the model before this step (log)")
                      + f'<p class="note">Sorted, most sensitive first. Blue: changed in the step\'s result; orange: '
                        f"{identity}. Levels probed: {escape(', '.join(levels))}.</p>")
    if not blocks:
        return ""
    return section("sensitivity", "Per-layer sensitivity and decisions", *blocks)
