"""The run report as ONE self-contained HTML page (inline SVG charts drawn here, no JS/CSS/fonts fetched).

    render_html(report, data, resources=...)  -> str
    write_html_report(config, store, report)   -> writes report.html next to the manifest (RunStore)

``report`` is the dict :func:`tokenskip.pipeline.run_pipeline` returns (``counts`` from
``run_statistics``, ``attempt`` with timings and ``progress``); ``data`` gives the token-length and ratio
distributions: the run's merged :class:`~tokenskip.summary.ShardSummary` (what the pipeline passes: no
rows are read), or a data table (only ``original_tokens`` and ``compressions`` are read), summarised
the same way. Histograms use the summaries' fixed log-spaced bins, so every run's charts share bins;
medians and percentiles are read off those bins (within one bin), means and maxima are exact. Every
piece of text is HTML-escaped; numbers are formatted here.

The page carries a Content-Security-Policy that allows nothing but inline style/script and data: images,
so a report that tried to load anything would be blocked and the attempt recorded. A tiny inline script
sets ``document.body.dataset.rendered`` to the number of SVG charts that laid out with content and
``document.body.dataset.errors`` to any script/resource/CSP errors, so a headless browser can check the
page (see tests/test_report.py).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from tokenskip.summary import TOKEN_BIN_EDGES, Distributions, ShardSummary, ValueStats, run_summary

REPORT_HTML_NAME = "report.html"
CHART_CLASS = "chart"

# Colour-blind-safe (Okabe-Ito) colours, one per role.
_BLUE, _ORANGE, _GREEN, _RED, _GREY, _PURPLE = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#D55E00",
    "#7f7f7f",
    "#CC79A7",
)
_RATIO_COLOURS = ["#0072B2", "#009E73", "#E69F00", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#000000"]

_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:; "
    "font-src 'none'; connect-src 'none'; form-action 'none'; base-uri 'none'"
)

# Registered first so errors anywhere later on the page are recorded (window.onerror for scripts, a
# capturing listener for resources that failed to load, and CSP violations for blocked fetches).
_HEAD_SCRIPT = """
window.__reportErrors = [];
function __reportError(message) {
  window.__reportErrors.push(String(message));
  if (document.body) { document.body.dataset.errors = window.__reportErrors.join(' | '); }
}
window.onerror = function (message, source, line) { __reportError(message + ' (line ' + line + ')'); };
window.addEventListener('error', function (event) {
  if (event.target && event.target !== window) {
    __reportError('failed to load ' + (event.target.src || event.target.href || event.target.tagName));
  }
}, true);
document.addEventListener('securitypolicyviolation', function (event) {
  __reportError('blocked by CSP: ' + event.violatedDirective + ' ' + event.blockedURI);
});
"""

# Counts the charts that laid out with marks in them; run last, after every chart is in the DOM.
_BODY_SCRIPT = """
(function () {
  var rendered = 0;
  document.querySelectorAll('svg.chart').forEach(function (svg) {
    var box = svg.getBBox();
    if (svg.querySelectorAll('[data-mark]').length > 0 && box.width > 0 && box.height > 0) { rendered += 1; }
  });
  document.body.dataset.rendered = String(rendered);
  document.body.dataset.errors = window.__reportErrors.join(' | ');
})();
"""

_STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 24px auto; max-width: 1040px;
       color: #1d1d1f; background: #fff; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.meta { color: #555; font-size: 13px; } .note { color: #666; font-size: 13px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 10px 14px; min-width: 140px; }
.card .v { font-size: 20px; font-weight: 600; } .card .k { font-size: 12px; color: #666; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border-bottom: 1px solid #e5e5e5; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; } th { background: #f6f6f6; }
figure { margin: 12px 0; } figcaption { font-size: 13px; color: #444; margin-bottom: 4px; }
svg.chart { font-size: 11px; display: block; } svg.chart text { fill: #333; }
.grid { display: flex; flex-wrap: wrap; gap: 8px 24px; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; font-size: 12px; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    """Human-readable number: thousands separators for integers, ``digits`` significant digits else."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == int(value) and abs(value) < 1e15:
            return f"{int(value):,}"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _get(mapping: Any, *keys: str, default: Any = None) -> Any:
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return default
        mapping = mapping[key]
    return default if mapping is None else mapping


def _float(value: Any, default: float = 0.0) -> float:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return default
    return result if math.isfinite(result) else default


# --------------------------------------------------------------------------------------------------
# SVG drawing


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (steps of 1, 2, 2.5 or 5 x 10^k)."""
    if not hi > lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 10) for i in range(first, last + 1)]


class _Plot:
    """A chart area with linear x/y scales, axes and tick labels; marks are appended as SVG strings."""

    def __init__(
        self,
        x_ticks: list[float],
        y_ticks: list[float],
        *,
        width: int = 480,
        height: int = 260,
        x_label: str = "",
        y_label: str = "",
        left: int = 56,
        bottom: int = 40,
        x_tick_labels: Sequence[str] | None = None,
    ):
        self.width, self.height = width, height
        self.left, self.right, self.top, self.bottom = left, 16, 14, bottom
        self.x0, self.x1 = x_ticks[0], x_ticks[-1]
        self.y0, self.y1 = y_ticks[0], y_ticks[-1]
        self.parts: list[str] = []
        pw, ph = self.plot_width, self.plot_height
        for t in y_ticks:
            y = self.sy(t)
            self.parts.append(
                f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eee"/>'
                f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_esc(_num(t))}</text>'
            )
        labels = x_tick_labels if x_tick_labels is not None else [_num(t) for t in x_ticks]
        for t, label in zip(x_ticks, labels, strict=True):
            x = self.sx(t)
            self.parts.append(
                f'<line x1="{x:.1f}" y1="{self.top + ph}" x2="{x:.1f}" y2="{self.top + ph + 4}" stroke="#999"/>'
                f'<text x="{x:.1f}" y="{self.top + ph + 16}" text-anchor="middle">{_esc(label)}</text>'
            )
        self.parts.append(
            f'<line x1="{left}" y1="{self.top + ph}" x2="{left + pw}" y2="{self.top + ph}" stroke="#999"/>'
            f'<line x1="{left}" y1="{self.top}" x2="{left}" y2="{self.top + ph}" stroke="#999"/>'
        )
        if x_label:
            self.parts.append(
                f'<text x="{left + pw / 2:.1f}" y="{height - 6}" text-anchor="middle">{_esc(x_label)}</text>'
            )
        if y_label:
            cy = self.top + ph / 2
            self.parts.append(
                f'<text x="12" y="{cy:.1f}" text-anchor="middle" transform="rotate(-90 12 {cy:.1f})">'
                f"{_esc(y_label)}</text>"
            )

    @property
    def plot_width(self) -> float:
        return self.width - self.left - self.right

    @property
    def plot_height(self) -> float:
        return self.height - self.top - self.bottom

    def sx(self, x: float) -> float:
        return self.left + (x - self.x0) / ((self.x1 - self.x0) or 1.0) * self.plot_width

    def sy(self, y: float) -> float:
        return self.top + self.plot_height - (y - self.y0) / ((self.y1 - self.y0) or 1.0) * self.plot_height

    def svg(self, title: str) -> str:
        return _svg(self.width, self.height, title, "".join(self.parts))


def _svg(width: float, height: float, title: str, body: str) -> str:
    return (
        f'<svg class="{CHART_CLASS}" role="img" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}"><title>{_esc(title)}</title>{body}</svg>'
    )


def _figure(caption: str, svg: str) -> str:
    return f"<figure><figcaption>{_esc(caption)}</figcaption>{svg}</figure>"


def _hbar_chart(
    title: str, items: Sequence[tuple[str, float, str]], *, centered: bool = False, width: int = 640
) -> str:
    """Horizontal bars (label, value, colour). ``centered`` draws a funnel (bars centred on one axis)."""
    label_width, value_width, row = 230, 80, 26
    bar_space = width - label_width - value_width
    peak = max((v for _, v, _ in items), default=0) or 1.0
    parts = []
    for i, (label, value, colour) in enumerate(items):
        y = 8 + i * row
        bar = max(bar_space * value / peak, 1.0 if value > 0 else 0.0)
        x = label_width + (bar_space - bar) / 2 if centered else label_width
        parts.append(
            f'<text x="{label_width - 8}" y="{y + 15}" text-anchor="end">{_esc(label)}</text>'
            f'<rect data-mark="bar" x="{x:.1f}" y="{y}" width="{bar:.1f}" height="{row - 6}" fill="{colour}">'
            f"<title>{_esc(label)}: {_esc(_num(value))}</title></rect>"
            f'<text x="{width - value_width + 8}" y="{y + 15}">{_esc(_num(value))}</text>'
        )
    return _svg(width, 16 + row * len(items), title, "".join(parts))


def _histogram_chart(title: str, counts: list[int], edges: list[int], colour: str) -> str:
    """Bars on log-spaced bins, drawn equally wide (a log x axis); ``edges`` has len(counts) + 1."""
    y_ticks = _nice_ticks(0, max(counts, default=0) or 1, 4)
    n = len(counts)
    tick_at = sorted({round(i * n / 4) for i in range(5)})
    plot = _Plot(
        [float(i) for i in tick_at], y_ticks, width=330, height=200, x_label="tokens (log scale)",
        y_label="CoTs", x_tick_labels=[_edge_label(edges[i]) for i in tick_at],
    )  # fmt: skip
    for i, count in enumerate(counts):
        if count == 0:
            continue
        lo, hi = edges[i], edges[i + 1]
        x0, x1, y = plot.sx(i), plot.sx(i + 1), plot.sy(count)
        plot.parts.append(
            f'<rect data-mark="bin" x="{x0:.1f}" y="{y:.1f}" width="{max(x1 - x0 - 1, 1):.1f}" '
            f'height="{plot.sy(0) - y:.1f}" fill="{colour}"><title>{_esc(_num(lo))}-{_esc(_edge_label(hi))} '
            f"tokens: {count}</title></rect>"
        )
    return plot.svg(title)


def _edge_label(edge: int) -> str:
    return "inf" if edge >= TOKEN_BIN_EDGES[-1] else _num(edge)


def _line_chart(title: str, points: list[tuple[float, float]], x_label: str, y_label: str) -> str:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    plot = _Plot(
        _nice_ticks(0, max(xs) or 1, 6), _nice_ticks(0, max(ys) or 1, 5), x_label=x_label, y_label=y_label,
        width=640, left=70,
    )  # fmt: skip
    path = " ".join(f"{plot.sx(x):.1f},{plot.sy(y):.1f}" for x, y in points)
    plot.parts.append(
        f'<polyline data-mark="line" points="{path}" fill="none" stroke="{_BLUE}" stroke-width="2"/>'
    )
    for x, y in points:
        plot.parts.append(
            f'<circle data-mark="point" cx="{plot.sx(x):.1f}" cy="{plot.sy(y):.1f}" r="3" fill="{_BLUE}">'
            f"<title>{_esc(_num(x))} s: {_esc(_num(y))} tokens</title></circle>"
        )
    return plot.svg(title)


def _ratio_chart(title: str, rows: list[dict[str, Any]]) -> str:
    """Achieved vs target ratio: the y = x line is a perfect compressor; whiskers span p10..p90."""
    top = max([1.0] + [r["p90"] or r["mean"] for r in rows])
    ticks = _nice_ticks(0, top, 5)
    plot = _Plot(ticks, ticks, width=360, height=320, x_label="target ratio", y_label="achieved ratio")
    plot.parts.append(
        f'<line x1="{plot.sx(0):.1f}" y1="{plot.sy(0):.1f}" x2="{plot.sx(ticks[-1]):.1f}" '
        f'y2="{plot.sy(ticks[-1]):.1f}" stroke="{_GREY}" stroke-dasharray="4 3"/>'
    )
    for i, r in enumerate(rows):
        colour = _RATIO_COLOURS[i % len(_RATIO_COLOURS)]
        x = plot.sx(r["target"])
        if r["p10"] is not None and r["p90"] is not None:
            plot.parts.append(
                f'<line data-mark="whisker" x1="{x:.1f}" y1="{plot.sy(r["p10"]):.1f}" x2="{x:.1f}" '
                f'y2="{plot.sy(r["p90"]):.1f}" stroke="{colour}" stroke-width="2"/>'
            )
        plot.parts.append(
            f'<circle data-mark="point" cx="{x:.1f}" cy="{plot.sy(r["mean"]):.1f}" r="5" fill="{colour}">'
            f"<title>target {_esc(_num(r['target']))}: mean achieved {_esc(_num(r['mean'], 4))}</title></circle>"
        )
    return plot.svg(title)


# --------------------------------------------------------------------------------------------------
# Figures from the report and the data table


# At most this many bars per histogram: adjacent fixed bins are grouped (still fixed edges) to fit.
_MAX_BARS = 32


def _describe(stats: ValueStats) -> dict[str, Any]:
    p10, median, p90 = stats.quantiles([0.1, 0.5, 0.9])
    return {"n": stats.count, "mean": stats.mean, "median": median, "p10": p10, "p90": p90, "max": stats.max}


def _shared_bins(series: list[ValueStats]) -> tuple[list[int], list[np.ndarray]]:
    """Display edges shared by every histogram (so lengths before/after pruning compare bar for bar):
    the fixed token bins over the range any series reaches, grouped to at most ``_MAX_BARS`` bars;
    and each series' counts on them."""
    dense = [s.dense() for s in series]
    nonzero = np.flatnonzero(np.sum(dense, axis=0))
    lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
    group = max(1, math.ceil((hi - lo) / _MAX_BARS))
    starts = list(range(lo, hi, group))
    edges = [TOKEN_BIN_EDGES[i] for i in starts] + [TOKEN_BIN_EDGES[min(starts[-1] + group, hi)]]
    grouped = [np.add.reduceat(d[lo:hi], [i - lo for i in starts]) for d in dense]
    return edges, grouped


def _distributions(data: Any) -> Distributions | None:
    if data is None:
        return None
    if isinstance(data, pa.Table):
        return Distributions.from_table(data)
    if isinstance(data, ShardSummary):
        return data.distributions
    if isinstance(data, Distributions):
        return data
    raise TypeError(
        f"data must be a pyarrow.Table, a tokenskip.summary.ShardSummary/Distributions or None, "
        f"got {type(data).__name__}"
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _funnel_section(counts: dict[str, Any]) -> str:
    input_rows = int(_float(counts.get("input_rows")))
    load_errors = int(_float(counts.get("load_errors")))
    duplicate = int(_float(_get(counts, "dedup", "duplicate", default=0)))
    contaminated = int(_float(_get(counts, "dedup", "contaminated", default=0)))
    problems = int(_float(counts.get("problems_to_generate")))
    samples = int(_float(counts.get("samples")))
    graded = int(_float(counts.get("graded_samples")))
    kept = int(_float(counts.get("kept_samples")))
    kept_problems = int(_float(counts.get("kept_problems")))
    rejects = {str(k): int(_float(v)) for k, v in (counts.get("rejects_by_reason") or {}).items()}
    errors = {str(k): int(_float(v)) for k, v in (counts.get("errors_by_reason") or {}).items()}
    stages = [
        ("input rows", input_rows, _GREY),
        ("valid problems", input_rows - load_errors, _PURPLE),
        ("problems after dedup", problems, _BLUE),
        ("samples generated", samples, _BLUE),
        ("samples graded", graded, _ORANGE),
        ("kept samples", kept, _GREEN),
    ]
    table_rows = [
        ("input rows", _num(input_rows), f"load errors {_num(load_errors)}"),
        ("valid problems", _num(input_rows - load_errors), ""),
        ("problems after dedup", _num(problems), f"duplicates {duplicate}, contaminated {contaminated}"),
        ("samples generated", _num(samples), f"sample errors {_num(samples - graded)}"),
        ("samples graded", _num(graded), f"grade rejects {_num(sum(rejects.values()))}"),
        ("kept samples", _num(kept), f"from {_num(kept_problems)} problems"),
    ]
    acceptance = counts.get("acceptance_rate")
    out = [
        "<h2>Counts per stage</h2>",
        _figure("Funnel: rows left after each stage", _hbar_chart("Rows per stage", stages, centered=True)),
        _table(["stage", "rows", "dropped / note"], table_rows),
        f"<p>Acceptance: <b>{_esc(_pct(_float(acceptance)) if acceptance is not None else '-')}</b> of graded "
        f"samples kept ({_esc(_num(kept))} of {_esc(_num(graded))}).</p>",
    ]
    losses = [
        (f"dedup: {k}", v, _GREY) for k, v in (("duplicate", duplicate), ("contaminated", contaminated))
    ]
    losses += [(f"reject: {k}", v, _ORANGE) for k, v in sorted(rejects.items())]
    losses += [(f"error: {k}", v, _RED) for k, v in sorted(errors.items())]
    losses = [item for item in losses if item[1] > 0]
    if losses:
        out.append(
            _figure("Rejects and errors by reason", _hbar_chart("Rejects and errors by reason", losses))
        )
        out.append(_table(["kind: reason", "rows"], [(label, _num(v)) for label, v, _ in losses]))
    else:
        out.append('<p class="note">No rejects, duplicates or errors.</p>')
    return "\n".join(out)


def _lengths_section(dist: Distributions | None) -> str:
    out = ["<h2>Token lengths before and after pruning</h2>"]
    if dist is None or dist.empty:
        out.append('<p class="note">No data rows: no length distributions to show.</p>')
        return "\n".join(out)
    series = [("original CoT", dist.original_tokens, _GREY)] + [
        (f"ratio {float(k):g}", stats, _RATIO_COLOURS[i % len(_RATIO_COLOURS)])
        for i, (k, stats) in enumerate(sorted(dist.compressed_tokens.items(), key=lambda kv: -float(kv[0])))
    ]
    series = [s for s in series if s[1].count]
    edges, grouped = _shared_bins([stats for _, stats, _ in series])
    figures = [
        _figure(f"{name}: {stats.count} CoTs", _histogram_chart(f"Tokens, {name}", counts.tolist(), edges, c))
        for (name, stats, c), counts in zip(series, grouped, strict=True)
    ]  # fmt: skip
    out.append(
        '<p class="note">Same log-spaced bins on every histogram, so the shift left shows what pruning '
        "saved. Medians and p90 are read off the bins (within one bin, ~4%); means and maxima are exact.</p>"
    )
    out.append('<div class="grid">' + "".join(figures) + "</div>")
    rows = []
    for name, stats, _ in series:
        d = _describe(stats)
        rows.append((name, d["n"], _num(d["mean"]), _num(d["median"]), _num(d["p90"]), _num(d["max"])))
    out.append(_table(["series", "CoTs", "mean tokens", "median", "p90", "max"], rows))
    return "\n".join(out)


def _ratio_section(counts: dict[str, Any], dist: Distributions | None) -> str:
    out = ["<h2>Achieved vs target ratio</h2>"]
    rows: list[dict[str, Any]] = []
    if dist is not None and not dist.empty:
        mean_original = dist.original_tokens.mean
        for key, stats in sorted(dist.achieved_ratio.items(), key=lambda kv: -float(kv[0])):
            if not stats.count:
                continue
            d = _describe(stats)
            tokens = dist.compressed_tokens.get(key)
            mean_tokens = tokens.mean if tokens is not None else None
            rows.append(
                {"target": float(key), "mean": d["mean"], "median": d["median"], "p10": d["p10"], "p90": d["p90"],
                 "n": d["n"], "mean_tokens": mean_tokens,
                 "saved": 1 - mean_tokens / mean_original if mean_tokens is not None and mean_original else None}
            )  # fmt: skip
    else:
        for key, mean in (counts.get("achieved_ratio") or {}).items():
            try:
                target = float(key)
            except ValueError:
                continue
            rows.append(
                {"target": target, "mean": _float(mean), "median": None, "p10": None, "p90": None, "n": None,
                 "mean_tokens": None, "saved": None}
            )  # fmt: skip
        rows.sort(key=lambda r: -r["target"])
    if not rows:
        out.append('<p class="note">No compressions: nothing to compare.</p>')
        return "\n".join(out)
    out.append(
        _figure(
            "Mean achieved ratio per target (dots), p10-p90 (whiskers); dashed line: achieved = target",
            _ratio_chart("Achieved vs target ratio", rows),
        )
    )
    table_rows = [
        (
            f"{r['target']:g}",
            _num(r["mean"], 4),
            f"{r['mean'] - r['target']:+.4f}",
            _num(r["median"], 4),
            _num(r["p10"], 4),
            _num(r["p90"], 4),
            _num(r["n"]),
            _num(r["mean_tokens"]),
            _pct(r["saved"]),
        )
        for r in rows
    ]
    out.append(
        _table(
            ["target", "mean achieved", "achieved - target", "median", "p10", "p90", "CoTs", "mean tokens",
             "tokens saved"],
            table_rows,
        )
    )  # fmt: skip
    return "\n".join(out)


def _throughput_section(attempt: dict[str, Any]) -> str:
    out = ["<h2>Throughput</h2>"]
    progress = [
        (_float(p.get("t")), _float(p.get("tokens")))
        for p in attempt.get("progress") or []
        if isinstance(p, dict)
    ]
    if progress:
        points = [(0.0, 0.0)] + sorted(progress)
        out.append(
            _figure(
                "Tokens generated vs wall time (one point per committed shard)",
                _line_chart("Tokens generated over time", points, "seconds since start", "tokens generated"),
            )
        )
    else:
        out.append('<p class="note">No shard was committed in this attempt: no progress curve.</p>')
    out.append(
        f"<p>{_esc(_num(_float(attempt.get('tokens_generated'))))} tokens generated, "
        f"{_esc(_num(_float(attempt.get('tokens_per_second'))))} tokens/s over the pipeline stages.</p>"
    )
    stage_keys = [
        ("load", "load_seconds"),
        ("dedup", "dedup_seconds"),
        ("generate+grade+compress (wall)", "pipeline_seconds"),
        ("commit + statistics", "commit_seconds"),
        ("generation (summed over actors)", "generation_seconds"),
        ("compression (summed over actors)", "compression_seconds"),
        ("whole attempt", "wall_seconds"),
    ]
    stage_rows = [(name, _num(_float(attempt[key]))) for name, key in stage_keys if key in attempt]
    wall_items = [
        (name, _float(attempt[key]), _PURPLE)
        for name, key in stage_keys[:4]
        if key in attempt
    ]  # fmt: skip
    if any(v > 0 for _, v, _ in wall_items):
        out.append(_figure("Wall time per stage (seconds)", _hbar_chart("Wall time per stage", wall_items)))
    if stage_rows:
        out.append(_table(["stage", "seconds"], stage_rows))
    return "\n".join(out)


def cost_figures(report: dict[str, Any], resources: Any = None) -> dict[str, Any]:
    """GPU-hours (wall time x GPUs reserved), CPU-core-hours when no GPU is used, tokens per kept sample.

    ``resources`` is a :class:`tokenskip.config.ResourcesConfig` or its dict; without it the hardware
    figures are None. Tokens per accepted sample divides this attempt's tokens by the kept samples this
    attempt produced (scaled by samples generated / all samples when earlier attempts were resumed).
    """
    attempt = report.get("attempt") or {}
    counts = report.get("counts") or {}
    wall = _float(attempt.get("wall_seconds"))
    res = resources.model_dump() if hasattr(resources, "model_dump") else (resources or None)
    gpus = cpus = None
    if res is not None:
        gpus = _float(res.get("generation_actors"), 1) * _float(res.get("generation_gpus")) + _float(
            res.get("compression_actors"), 1
        ) * _float(res.get("compression_gpus"))
        cpus = (
            _float(res.get("generation_actors"), 1) * _float(res.get("generation_cpus"), 1)
            + _float(res.get("compression_actors"), 1) * _float(res.get("compression_cpus"), 0.5)
            + _float(res.get("grading_cpus"), 0.25)
        )
    tokens = _float(attempt.get("tokens_generated"))
    samples_all = _float(counts.get("samples"))
    samples_attempt = _float(attempt.get("samples_generated"), samples_all)
    kept_all = _float(counts.get("kept_samples"))
    kept_attempt = kept_all * samples_attempt / samples_all if samples_all else 0.0
    return {
        "wall_hours": wall / 3600,
        "gpus": gpus,
        "gpu_hours": wall / 3600 * gpus if gpus is not None else None,
        "cpus": cpus,
        "cpu_core_hours": wall / 3600 * cpus if cpus is not None else None,
        "tokens_generated": tokens,
        "tokens_per_sample": tokens / samples_attempt if samples_attempt else None,
        "tokens_per_accepted_sample": tokens / kept_attempt if kept_attempt else None,
        "estimated": bool(samples_all and samples_attempt != samples_all),
    }


def _cost_section(report: dict[str, Any], resources: Any) -> str:
    cost = cost_figures(report, resources)
    rows: list[tuple[str, str]] = [("attempt wall time", f"{_num(cost['wall_hours'] * 3600)} s")]
    if cost["gpus"] is None:
        rows.append(("GPU-hours", "- (resources unknown)"))
    elif cost["gpus"] > 0:
        rows.append(("GPUs reserved", _num(cost["gpus"])))
        rows.append(("GPU-hours (wall x GPUs)", f"{cost['gpu_hours']:.4f}"))
    else:
        rows.append(("GPU-hours", "0 (CPU only)"))
        rows.append(("CPU cores reserved", _num(cost["cpus"])))
        rows.append(("CPU-core-hours (wall x cores)", f"{cost['cpu_core_hours']:.4f}"))
    rows.append(("tokens generated", _num(cost["tokens_generated"])))
    rows.append(("tokens per generated sample", _num(cost["tokens_per_sample"], 4)))
    per_kept = _num(cost["tokens_per_accepted_sample"], 4)
    rows.append(
        ("tokens per accepted sample", per_kept + (" (estimated: resumed run)" if cost["estimated"] else ""))
    )
    return "<h2>Cost</h2>\n" + _table(["figure", "value"], rows)


def _cards(report: dict[str, Any], resources: Any) -> str:
    counts, attempt = report.get("counts") or {}, report.get("attempt") or {}
    cost = cost_figures(report, resources)
    hardware = (
        ("GPU-hours", f"{cost['gpu_hours']:.3f}")
        if cost["gpus"]
        else ("CPU-core-hours", f"{cost['cpu_core_hours']:.3f}" if cost["cpus"] is not None else "-")
    )
    ratios = counts.get("achieved_ratio") or {}
    cards = [
        ("input rows", _num(counts.get("input_rows"))),
        ("kept samples", _num(counts.get("kept_samples"))),
        ("acceptance", _pct(_float(counts["acceptance_rate"])) if "acceptance_rate" in counts else "-"),
        ("mean original tokens", _num(counts.get("mean_original_tokens"))),
        ("ratios", ", ".join(f"{k}->{_num(_float(v))}" for k, v in ratios.items()) or "-"),
        ("tokens/s", _num(_float(attempt.get("tokens_per_second")))),
        hardware,
    ]
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{_esc(v)}</div><div class="k">{_esc(k)}</div></div>' for k, v in cards
    ) + "</div>"  # fmt: skip


def render_html(
    report: dict[str, Any],
    data: ShardSummary | Distributions | pa.Table | None = None,
    *,
    resources: Any = None,
) -> str:
    """The run report as one self-contained HTML page.

    ``report``: the dict :func:`tokenskip.pipeline.run_pipeline` returns (missing sections are shown as
    missing, not guessed). ``data``: the run's merged shard summary (or its distributions, or a data
    table with ``original_tokens`` and ``compressions``) for the length and ratio distributions, or None
    to show the report's aggregate ratios only. ``resources``: the run's
    :class:`~tokenskip.config.ResourcesConfig` (or dict) for GPU/CPU-hour figures.
    """
    if not isinstance(report, dict):
        raise TypeError(f"report must be the run report dict, got {type(report).__name__}")
    if not isinstance(report.get("counts"), dict):
        raise ValueError("report has no 'counts' dict; pass the dict run_pipeline returns (report.json)")
    dist = _distributions(data)
    counts, attempt = report["counts"], report.get("attempt") or {}
    title = f"tokenskip run {report.get('dataset', '?')} / {report.get('run_id', '?')}"
    meta = (
        f"model {_esc(report.get('model', '-'))} &middot; config {_esc(report.get('config_hash', '-'))} &middot; "
        f"{'committed' if report.get('committed') else 'not committed'}"
    )
    if report.get("pending_shards"):
        meta += f" &middot; {_esc(report['pending_shards'])} shards pending"
    sections = [
        _cards(report, resources),
        _funnel_section(counts),
        _lengths_section(dist),
        _ratio_section(counts, dist),
        _throughput_section(attempt),
        _cost_section(report, resources),
        "<h2>Raw report</h2><details><summary>report.json</summary><pre>"
        + _esc(json.dumps(report, indent=2, default=str, sort_keys=True))
        + "</pre></details>",
    ]
    body = "\n".join(sections)
    charts = body.count(f'<svg class="{CHART_CLASS}"')
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_esc(_CSP)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_STYLE}</style><script>{_HEAD_SCRIPT}</script></head>\n"
        f'<body data-charts="{charts}" data-rendered="0" data-errors="">\n'
        f'<h1>{_esc(title)}</h1><p class="meta">{meta}</p>\n{body}\n'
        f"<script>{_BODY_SCRIPT}</script>\n</body></html>\n"
    )


def write_html_report(
    config: Any,
    store_or_run_dir: Any,
    report: dict[str, Any],
    data: ShardSummary | Distributions | pa.Table | None = None,
    *,
    read_data: bool = True,
) -> str:
    """Render ``report`` and write ``report.html`` next to the run's manifest; returns its path.

    ``config``: the :class:`~tokenskip.config.PipelineConfig` (its ``output`` storage and ``resources``).
    ``store_or_run_dir``: the run's :class:`~tokenskip.storage.RunStore`, or its run folder (the path
    ``RunStore.run_dir`` gives for the report's dataset and run id). ``data`` None with ``read_data``
    merges the run's shard summaries (the markers; parts only for markers without a summary) for a
    committed run: the data rows themselves are never loaded.
    """
    store = _run_store(config, store_or_run_dir, report)
    if data is None and read_data and report.get("committed"):
        data = run_summary(store)
    page = render_html(report, data, resources=getattr(config, "resources", None))
    return store.write_file(REPORT_HTML_NAME, page.encode("utf-8"))


def _run_store(config: Any, store_or_run_dir: Any, report: dict[str, Any]):
    from tokenskip.storage import RunStore

    if isinstance(store_or_run_dir, RunStore):
        return store_or_run_dir
    if not isinstance(store_or_run_dir, str) or not store_or_run_dir:
        raise TypeError("store_or_run_dir must be a RunStore or a run folder path")
    run_id = report.get("run_id")
    if not run_id:
        raise ValueError("report has no 'run_id': pass the run's RunStore instead of a folder")
    store = RunStore(config.output, report.get("dataset") or config.dataset, run_id)
    if store.run_dir.rstrip("/") != store_or_run_dir.rstrip("/"):
        raise ValueError(
            f"run folder {store_or_run_dir!r} is not where {config.output.root!r} keeps run {run_id!r} "
            f"({store.run_dir!r}); pass the run's RunStore"
        )
    return store
