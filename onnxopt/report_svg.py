"""The report's plots as inline SVG text: axes, a strip plot, a scatter plane, a bar chart.

A plotting library would bring its whole bundle into every page (Plotly's is 3.5 MB, Vega's
with its runtime about 800 KB) or need a server; these three plots are a few hundred lines of
string building, open offline in any browser, print, and keep the page a few tens of KB.
Every mark carries ``data-*`` attributes with the number it stands for, so tests (and other
tools) can read a plot back without parsing geometry, and a ``<title>`` the browser shows on
hover.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from html import escape

import numpy as np

FONT = 'font-family="system-ui,sans-serif" font-size="11"'
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 16, 12, 40
CLIP = 4.0  # a linear error axis ends at this many budgets; points beyond sit at the edge with their value


@dataclasses.dataclass(frozen=True)
class Scale:
    """Maps a data interval onto pixels, linearly or in log10."""

    lo: float
    hi: float
    start: float  # pixel of ``lo``
    end: float  # pixel of ``hi``
    log: bool = False

    def __call__(self, v: float) -> float:
        f = self._t
        span = (f(self.hi) - f(self.lo)) or 1.0
        return self.start + (f(v) - f(self.lo)) / span * (self.end - self.start)

    def _t(self, v: float) -> float:
        return math.log10(max(v, self.lo)) if self.log else v

    def ticks(self, count: int = 5) -> list[float]:
        """Round values inside the interval: powers of ten (log), else steps of 1, 2 or 5 x 10^k."""
        if self.log:
            return [10.0**e for e in range(math.ceil(math.log10(self.lo)), math.floor(math.log10(self.hi)) + 1)]
        raw = (self.hi - self.lo) / max(count, 1) or 1.0
        mag = 10 ** math.floor(math.log10(raw))
        step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
        first = math.ceil(self.lo / step) * step
        return [first + i * step for i in range(int((self.hi - first) / step + 1e-9) + 1)]


def padded(values: Sequence[float], log: bool = False, floor: float = 1e-7) -> tuple[float, float]:
    """An interval holding ``values`` with some room (log: whole decades)."""
    if log:
        vals = [max(v, floor) for v in values] or [floor, 1.0]
        return 10 ** math.floor(math.log10(min(vals))), 10 ** math.ceil(math.log10(max(vals)) + 1e-9)
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    pad = (hi - lo) * 0.08 or abs(hi) * 0.1 or 1.0
    return lo - pad, hi + pad


def fmt(v: float) -> str:
    """Tick labels: short, no trailing zeros (1e-05, 0.25, 120)."""
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.0e}"
    return f"{v:.4g}"


def _svg(width: int, height: int, body: list[str], label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" role="img" aria-label="{escape(label)}" {FONT}>' + "".join(body) + "</svg>")


def _axes(x: Scale, y: Scale | None, width: int, height: int, x_label: str, y_label: str) -> list[str]:
    """Grid lines and tick labels of ``x`` (and ``y``), and the axis titles."""
    out = []
    bottom = height - MARGIN_BOTTOM
    for t in x.ticks():
        px = x(t)
        out.append(f'<line x1="{px:.1f}" y1="{MARGIN_TOP}" x2="{px:.1f}" y2="{bottom}" stroke="#e3e3e3"/>'
                   f'<text x="{px:.1f}" y="{bottom + 14}" text-anchor="middle">{fmt(t)}</text>')
    if y is not None:
        for t in y.ticks():
            py = y(t)
            out.append(f'<line x1="{MARGIN_LEFT}" y1="{py:.1f}" x2="{width - MARGIN_RIGHT}" y2="{py:.1f}" '
                       f'stroke="#e3e3e3"/><text x="{MARGIN_LEFT - 4}" y="{py + 4:.1f}" '
                       f'text-anchor="end">{fmt(t)}</text>')
        out.append(f'<text transform="translate(12 {(MARGIN_TOP + bottom) / 2:.0f}) rotate(-90)" '
                   f'text-anchor="middle">{escape(y_label)}</text>')
    out.append(f'<line x1="{MARGIN_LEFT}" y1="{bottom}" x2="{width - MARGIN_RIGHT}" y2="{bottom}" stroke="#888"/>'
               f'<text x="{(MARGIN_LEFT + width - MARGIN_RIGHT) / 2:.0f}" y="{height - 6}" '
               f'text-anchor="middle">{escape(x_label)}</text>')
    return out


def strip_plot(groups: dict[str, Sequence[float]], x_label: str, width: int = 720) -> str:
    """One row per group: every sample as a dot, a box from the 25th to the 75th percentile,
    the median as a bar and whiskers to the 10th and 90th percentiles."""
    row = 34
    left = max(MARGIN_LEFT, 8 + 6 * max((len(k) for k in groups), default=0))
    height = MARGIN_TOP + row * len(groups) + MARGIN_BOTTOM
    values = [v for s in groups.values() for v in s]
    lo, hi = padded(values)
    x = Scale(max(lo, 0.0), hi, left, width - MARGIN_RIGHT)
    body = _axes(x, None, width, height, x_label, "")
    for i, (name, samples) in enumerate(groups.items()):
        cy = MARGIN_TOP + row * i + row / 2
        q10, q25, q50, q75, q90 = (float(v) for v in np.quantile(samples, (0.1, 0.25, 0.5, 0.75, 0.9)))
        body.append(f'<g class="dist" data-name="{escape(name)}" data-median="{q50:.10g}" data-n="{len(samples)}">'
                    f'<title>{escape(name)}: median {q50:.4g}, p25 {q25:.4g}, p75 {q75:.4g}, p90 {q90:.4g}, '
                    f'{len(samples)} samples</title>'
                    f'<text x="{left - 6}" y="{cy + 4:.1f}" text-anchor="end">{escape(name)}</text>'
                    f'<line x1="{x(q10):.1f}" y1="{cy:.1f}" x2="{x(q90):.1f}" y2="{cy:.1f}" stroke="#555"/>'
                    f'<rect x="{x(q25):.1f}" y="{cy - 9:.1f}" width="{max(x(q75) - x(q25), 1):.1f}" height="18" '
                    f'fill="#cfe0f3" stroke="#3b73b9"/>')
        for j, v in enumerate(samples):  # a fixed jitter: the same report draws the same page
            jitter = ((j * 7919) % 13 - 6) * 1.1
            body.append(f'<circle cx="{x(v):.1f}" cy="{cy + jitter:.1f}" r="1.8" fill="#1f4e8c" opacity="0.45"/>')
        body.append(f'<line x1="{x(q50):.1f}" y1="{cy - 11:.1f}" x2="{x(q50):.1f}" y2="{cy + 11:.1f}" '
                    f'stroke="#c0392b" stroke-width="2.5"/></g>')
    return _svg(width, height, body, "latency distribution")


@dataclasses.dataclass(frozen=True)
class Point:
    """A candidate on the plane; ``x`` None puts it in the lane of points without one."""

    label: str
    x: float | None
    y: float
    ok: bool  # within budget
    chosen: bool = False


def plane(points: Sequence[Point], x_label: str, y_label: str, budget: float | None, log_y: bool,
          lane: str = "not timed", width: int = 720, height: int = 340) -> str:
    """A scatter of cost (x) against error (y, lower is better) with the Pareto front of the
    points that have an x, the budget as a horizontal line and the chosen point ringed."""
    placed = [p for p in points if p.x is not None]
    lane_w = 70 if len(placed) < len(points) else 0
    ys = [p.y for p in points] + ([budget] if budget is not None else [])
    if budget is not None and budget > 0 and not log_y:  # far over budget: clipped, so the budget's region reads
        ys = [min(v, CLIP * budget) for v in ys]
    lo, hi = padded(ys, log=log_y)
    y = Scale(lo, hi, height - MARGIN_BOTTOM, MARGIN_TOP, log=log_y)
    xs = [p.x for p in placed if p.x is not None]
    xlo, xhi = padded(xs)
    x = Scale(max(xlo, 0.0), xhi, MARGIN_LEFT, width - MARGIN_RIGHT - lane_w)
    body = _axes(x, y, width - lane_w, height, x_label, y_label)
    if lane_w:
        lx = width - MARGIN_RIGHT - lane_w / 2
        body.append(f'<rect x="{width - MARGIN_RIGHT - lane_w + 8}" y="{MARGIN_TOP}" width="{lane_w - 8}" '
                    f'height="{height - MARGIN_TOP - MARGIN_BOTTOM}" fill="#f4f4f4"/>'
                    f'<text x="{lx:.0f}" y="{height - MARGIN_BOTTOM + 14}" text-anchor="middle">{escape(lane)}</text>')
    if budget is not None:
        by = y(budget)
        body.append(f'<line class="budget" data-value="{budget:.10g}" x1="{MARGIN_LEFT}" y1="{by:.1f}" '
                    f'x2="{width - MARGIN_RIGHT}" y2="{by:.1f}" stroke="#c0392b" stroke-dasharray="6 4"/>'
                    f'<text x="{width - MARGIN_RIGHT - 4}" y="{by - 4:.1f}" text-anchor="end" fill="#c0392b">'
                    f'budget {fmt(budget)}</text>')
    front = pareto(placed)
    if len(front) > 1:
        path = " ".join(f"{x(p.x or 0):.1f},{y(min(p.y, hi)):.1f}" for p in front)
        body.append(f'<polyline class="front" points="{path}" fill="none" stroke="#27ae60" stroke-width="1.5"/>')
    front_ids = {id(p) for p in front}
    for i, p in enumerate(points):
        px = x(p.x) if p.x is not None else width - MARGIN_RIGHT - lane_w / 2 + ((i * 7) % 9 - 4) * 3
        cls = " ".join(c for c in ("point", "ok" if p.ok else "over", "chosen" if p.chosen else "",
                                   "front" if id(p) in front_ids else "") if c)
        fill = "#27ae60" if p.ok else "#e67e22"
        ring = (f'<circle cx="{px:.1f}" cy="{y(min(p.y, hi)):.1f}" r="10" fill="none" stroke="#111" '
                f'stroke-width="2"/>' if p.chosen else "")
        xs_ = "" if p.x is None else f"{p.x:.10g}"
        py = y(min(p.y, hi))
        if p.y > hi:
            cls += " clipped"
            ring += f'<text x="{px - 8:.1f}" y="{py + 4:.1f}" text-anchor="end">↑ {fmt(p.y)}</text>'
        body.append(f'<g class="{cls}" data-label="{escape(p.label)}" data-x="{xs_}" data-y="{p.y:.10g}">'
                    f'<title>{escape(p.label)}: {escape(y_label)} {p.y:.4g}'
                    + ("" if p.x is None else f", {escape(x_label)} {p.x:.4g}")
                    + f'{"" if p.ok else " (over budget)"}{" (chosen)" if p.chosen else ""}</title>'
                    f'<circle cx="{px:.1f}" cy="{py:.1f}" r="5" fill="{fill}" stroke="#333"/>{ring}</g>')
    return _svg(width, height, body, "candidates: cost against error")


def pareto(points: Sequence[Point]) -> list[Point]:
    """The points no other beats on both x and y (both lower is better), by increasing x."""
    front: list[Point] = []
    for p in sorted(points, key=lambda p: (p.x, p.y)):
        if not front or p.y < front[-1].y:
            front.append(p)
    return front


@dataclasses.dataclass(frozen=True)
class Bar:
    label: str
    value: float
    decision: str
    kind: str  # a CSS class: "kept" (left as it is) or "changed"


def bar_chart(bars: Sequence[Bar], x_label: str, width: int = 720, floor: float = 1e-7) -> str:
    """Horizontal bars on a log axis, in the order given, each labelled with its decision."""
    row = 16
    left = min(260, max(MARGIN_LEFT, 8 + 6 * max((len(b.label) for b in bars), default=0)))
    right = 120
    height = MARGIN_TOP + row * len(bars) + MARGIN_BOTTOM
    x = Scale(*padded([b.value for b in bars], log=True, floor=floor), left, width - right, log=True)
    body = _axes(x, None, width - right + MARGIN_RIGHT, height, x_label, "")
    for i, b in enumerate(bars):
        top = MARGIN_TOP + row * i
        w = max(x(max(b.value, floor)) - left, 1.0)
        color = "#3b73b9" if b.kind == "changed" else "#e67e22"
        short = b.label if len(b.label) <= 42 else "…" + b.label[-41:]
        body.append(f'<g class="bar {b.kind}" data-layer="{escape(b.label)}" data-error="{b.value:.10g}" '
                    f'data-decision="{escape(b.decision)}"><title>{escape(b.label)}: {b.value:.4g}, '
                    f'{escape(b.decision)}</title>'
                    f'<text x="{left - 4}" y="{top + 12}" text-anchor="end">{escape(short)}</text>'
                    f'<rect x="{left}" y="{top + 2}" width="{w:.1f}" height="{row - 4}" fill="{color}"/>'
                    f'<text x="{width - right + 6}" y="{top + 12}">{escape(b.decision)}</text></g>')
    return _svg(width, height, body, "per-layer sensitivity")
