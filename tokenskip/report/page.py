"""The run report as ONE self-contained HTML page: the figures (:mod:`tokenskip.report.figures`), their
charts (:mod:`tokenskip.report.charts`, inline SVG), tables and a few examples, no JS/CSS/fonts fetched.

    render_html(report, data, resources=..., examples=...)  -> str
    write_html_report(config, store, report)                 -> writes report.html next to the manifest

Every piece of text is HTML-escaped; numbers are formatted here (:mod:`tokenskip.report.formatting`).

The page carries a Content-Security-Policy that allows nothing but inline style/script and data: images,
so a report that tried to load anything would be blocked and the attempt recorded. A tiny inline script
sets ``document.body.dataset.rendered`` to the number of SVG charts that laid out with content and
``document.body.dataset.errors`` to any script/resource/CSP errors, so a headless browser can check the
page (see tests/test_report.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from tokenskip.examples import Example, Mark, read_examples
from tokenskip.report import figures
from tokenskip.report.charts import CHART_CLASS, GREY, hbar_chart, histogram_chart, line_chart, ratio_chart
from tokenskip.report.formatting import esc, num, pct
from tokenskip.run_report import AttemptReport, RunReport
from tokenskip.summary import Distributions, RunCounts, ShardSummary, run_summary

REPORT_HTML_NAME = "report.html"
# Kept samples the report shows as examples (question, original CoT, every ratio's CoT).
EXAMPLES = 3

# Colour-blind-safe (Okabe-Ito) colours: one per kind of count, one per ratio.
_BLUE, _ORANGE, _GREEN, _RED, _PURPLE = "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7"
_KIND_COLOURS = {
    "input": GREY, "valid": _PURPLE, "problems": _BLUE, "samples": _BLUE, "graded": _ORANGE, "kept": _GREEN,
    "dedup": GREY, "reject": _ORANGE, "error": _RED, "stage": _PURPLE,
}  # fmt: skip
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
.example { margin: 16px 0 28px; } .example h3 { font-size: 15px; margin: 0 0 6px; }
.cots { display: flex; gap: 12px; overflow-x: auto; padding-bottom: 6px; }
.cot { flex: 0 0 300px; border: 1px solid #ddd; border-radius: 6px; padding: 8px 10px; }
.cot .head { font-size: 12px; color: #555; margin-bottom: 6px; }
.cot .text { font-size: 12px; white-space: pre-wrap; overflow-wrap: anywhere; max-height: 420px; overflow-y: auto; }
del.dropped { color: #D55E00; background: #fdebe1; text-decoration: line-through; }
ins.added { color: #0072B2; background: #e1effa; }
.tail { background: #e6f4ef; }
"""


def _figure(caption: str, svg: str) -> str:
    return f"<figure><figcaption>{esc(caption)}</figcaption>{svg}</figure>"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _bars(bars: list[figures.Bar]) -> list[tuple[str, float, str]]:
    return [(bar.label, bar.value, _KIND_COLOURS[bar.kind]) for bar in bars]


def _ratio_colour(rank: int) -> str:
    return _RATIO_COLOURS[rank % len(_RATIO_COLOURS)]


def _edge_label(edge: int) -> str:
    return "inf" if figures.is_overflow_edge(edge) else num(edge)


# --------------------------------------------------------------------------------------------------
# Sections


def _funnel_section(counts: RunCounts) -> str:
    f = figures.funnel(counts)
    table_rows = [
        ("input rows", num(f.input_rows), f"load errors {num(f.load_errors)}"
         + (f", filtered out by sources[].where {num(f.filtered_out)}" if f.filtered_out else "")),
        ("valid problems", num(f.valid_problems), ""),
        ("problems after dedup", num(f.problems), f"duplicates {f.duplicate}, contaminated {f.contaminated}"),
        ("samples generated", num(f.samples), f"sample errors {num(f.samples - f.graded)}"),
        ("samples graded", num(f.graded), f"grade rejects {num(sum(f.rejects.values()))}"),
        ("kept samples", num(f.kept), f"from {num(f.kept_problems)} problems"),
    ]
    out = [
        "<h2>Counts per stage</h2>",
        _figure(
            "Funnel: rows left after each stage", hbar_chart("Rows per stage", _bars(f.stages), centered=True)
        ),
        _table(["stage", "rows", "dropped / note"], table_rows),
        f"<p>Acceptance: <b>{esc(pct(f.acceptance) if f.acceptance is not None else '-')}</b> of graded "
        f"samples kept ({esc(num(f.kept))} of {esc(num(f.graded))}).</p>",
    ]
    losses = f.losses
    if losses:
        out.append(
            _figure("Rejects and errors by reason", hbar_chart("Rejects and errors by reason", _bars(losses)))
        )
        out.append(_table(["kind: reason", "rows"], [(bar.label, num(bar.value)) for bar in losses]))
    else:
        out.append('<p class="note">No rejects, duplicates or errors.</p>')
    return "\n".join(out)


def _lengths_section(dist: Distributions | None) -> str:
    out = ["<h2>Token lengths before and after pruning</h2>"]
    histograms = figures.length_histograms(dist)
    if histograms is None:
        out.append('<p class="note">No data rows: no length distributions to show.</p>')
        return "\n".join(out)
    edges = [_edge_label(edge) for edge in histograms.edges]
    charts = []
    for s in histograms.series:
        colour = GREY if s.ratio_rank is None else _ratio_colour(s.ratio_rank)
        chart = histogram_chart(f"Tokens, {s.name}", s.counts, edges, colour)
        charts.append(_figure(f"{s.name}: {s.description.n} CoTs", chart))
    out.append(
        '<p class="note">Same log-spaced bins on every histogram, so the shift left shows what pruning '
        "saved. Medians and p90 are read off the bins (within one bin, ~4%); means and maxima are exact.</p>"
    )
    out.append('<div class="grid">' + "".join(charts) + "</div>")
    rows = [
        (s.name, s.description.n, num(s.description.mean), num(s.description.median), num(s.description.p90),
         num(s.description.max))
        for s in histograms.series
    ]  # fmt: skip
    out.append(_table(["series", "CoTs", "mean tokens", "median", "p90", "max"], rows))
    return "\n".join(out)


def _ratio_section(counts: RunCounts, dist: Distributions | None) -> str:
    out = ["<h2>Achieved vs target ratio</h2>"]
    rows = figures.ratio_rows(counts, dist)
    if not rows:
        out.append('<p class="note">No compressions: nothing to compare.</p>')
        return "\n".join(out)
    colours = [_ratio_colour(i) for i in range(len(rows))]
    out.append(
        _figure(
            "Mean achieved ratio per target (dots), p10-p90 (whiskers); dashed line: achieved = target",
            ratio_chart("Achieved vs target ratio", rows, colours),
        )
    )
    table_rows = [
        (f"{r.target:g}", num(r.mean, 4), f"{r.mean - r.target:+.4f}", num(r.median, 4), num(r.p10, 4),
         num(r.p90, 4), num(r.n), num(r.mean_tokens), pct(r.saved))
        for r in rows
    ]  # fmt: skip
    out.append(
        _table(
            ["target", "mean achieved", "achieved - target", "median", "p10", "p90", "CoTs", "mean tokens",
             "tokens saved"],
            table_rows,
        )
    )  # fmt: skip
    return "\n".join(out)


def _throughput_section(attempt: AttemptReport | None) -> str:
    out = ["<h2>Throughput</h2>"]
    t = figures.throughput(attempt)
    if t.progress:
        out.append(
            _figure(
                "Tokens generated vs wall time (one point per committed shard)",
                line_chart(
                    "Tokens generated over time", t.progress, "seconds since start", "tokens generated"
                ),
            )
        )
    else:
        out.append('<p class="note">No shard was committed in this attempt: no progress curve.</p>')
    out.append(
        f"<p>{esc(num(t.tokens_generated))} tokens generated, "
        f"{esc(num(t.tokens_per_second))} tokens/s over the pipeline stages.</p>"
    )
    if any(seconds > 0 for _, seconds in t.wall_stages):
        stages = [(name, seconds, _KIND_COLOURS["stage"]) for name, seconds in t.wall_stages]
        out.append(_figure("Wall time per stage (seconds)", hbar_chart("Wall time per stage", stages)))
    if t.timings:
        out.append(_table(["stage", "seconds"], [(name, num(seconds)) for name, seconds in t.timings]))
    return "\n".join(out)


def _cost_section(report: RunReport, resources: Any) -> str:
    cost = figures.cost_figures(report, resources)
    rows: list[tuple[str, str]] = [("attempt wall time", f"{num(cost['wall_hours'] * 3600)} s")]
    if cost["gpus"] is None:
        rows.append(("GPU-hours", "- (resources unknown)"))
    elif cost["gpus"] > 0:
        rows.append(("GPUs reserved", num(cost["gpus"])))
        rows.append(("GPU-hours (wall x GPUs)", f"{cost['gpu_hours']:.4f}"))
    else:
        rows.append(("GPU-hours", "0 (CPU only)"))
        rows.append(("CPU cores reserved", num(cost["cpus"])))
        rows.append(("CPU-core-hours (wall x cores)", f"{cost['cpu_core_hours']:.4f}"))
    rows.append(("tokens generated", num(cost["tokens_generated"])))
    rows.append(("tokens per generated sample", num(cost["tokens_per_sample"], 4)))
    per_kept = num(cost["tokens_per_accepted_sample"], 4)
    rows.append(
        ("tokens per accepted sample", per_kept + (" (estimated: resumed run)" if cost["estimated"] else ""))
    )
    return "<h2>Cost</h2>\n" + _table(["figure", "value"], rows)


def _examples_section(examples: Sequence[Example]) -> str:
    """Each example's question, then its original CoT and every ratio's CoT side by side, the words
    pruning dropped struck through and the (never pruned) answer tail highlighted."""
    out = ["<h2>Examples</h2>"]
    if not examples:
        out.append('<p class="note">No kept samples to show.</p>')
        return "\n".join(out)
    out.append(
        f'<p class="note">The first {len(examples)} kept samples. In each ratio\'s CoT the words pruning '
        'dropped are <del class="dropped">struck through</del>; the <span class="tail">answer tail</span> '
        "is never pruned.</p>"
    )
    for n, example in enumerate(examples, 1):
        columns = [_cot_column(f"original CoT, {num(example.original_tokens)} tokens", esc(example.cot))]
        for c in example.compressions:
            words = "".join(esc(p.space) + _PIECE_HTML[p.mark].format(esc(p.text)) for p in c.reasoning)
            tail = f' <span class="tail">{esc(c.answer_tail)}</span>' if c.answer_tail else ""
            head = f"ratio {c.target_ratio:g}, achieved {num(c.achieved_ratio, 2)}, {num(c.tokens)} tokens"
            columns.append(_cot_column(head, words + tail))
        out.append(
            f'<div class="example"><h3>Example {n} of {len(examples)} &middot; problem '
            f"{esc(example.problem_id)}</h3><p><b>Question</b> (gold answer {esc(example.answer)}): "
            f'{esc(example.question)}</p><div class="cots">{"".join(columns)}</div></div>'
        )
    return "\n".join(out)


_PIECE_HTML = {
    Mark.KEPT: "{}",
    Mark.DROPPED: '<del class="dropped">{}</del>',
    Mark.ADDED: '<ins class="added">{}</ins>',  # never from tokenskip's scorers (they only delete)
}


def _cot_column(head: str, text_html: str) -> str:
    return f'<div class="cot"><div class="head">{esc(head)}</div><div class="text">{text_html}</div></div>'


def _cards(report: RunReport, resources: Any) -> str:
    counts = report.counts
    cost = figures.cost_figures(report, resources)
    hardware = (
        ("GPU-hours", f"{cost['gpu_hours']:.3f}")
        if cost["gpus"]
        else ("CPU-core-hours", f"{cost['cpu_core_hours']:.3f}" if cost["cpus"] is not None else "-")
    )
    ratios = counts.achieved_ratio
    cards = [
        ("input rows", num(counts.input_rows)),
        ("kept samples", num(counts.kept_samples)),
        # A sparse report (an older run's) may not have graded anything it says.
        ("acceptance", pct(counts.acceptance_rate) if "acceptance_rate" in counts.model_fields_set else "-"),
        ("mean original tokens", num(counts.mean_original_tokens)),
        ("ratios", ", ".join(f"{k}->{num(v)}" for k, v in ratios.items()) or "-"),
        ("tokens/s", num(report.attempt.tokens_per_second if report.attempt else 0.0)),
        hardware,
    ]
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{esc(v)}</div><div class="k">{esc(k)}</div></div>' for k, v in cards
    ) + "</div>"  # fmt: skip


# --------------------------------------------------------------------------------------------------
# The page


def render_html(
    report: RunReport | dict[str, Any],
    data: ShardSummary | Distributions | pa.Table | None = None,
    *,
    resources: Any = None,
    examples: Sequence[Example] | None = None,
) -> str:
    """The run report as one self-contained HTML page.

    ``report``: the :class:`~tokenskip.run_report.RunReport` :func:`tokenskip.pipeline.run_pipeline`
    returns, or a ``report.json``'s parsed content (validated into one; a sparse report renders what
    it has). ``data``: the run's merged shard summary (or its distributions, or a data
    table with ``original_tokens`` and ``compressions``) for the length and ratio distributions, or None
    to show the report's aggregate ratios only. ``resources``: the run's
    :class:`~tokenskip.config.ResourcesConfig` (or dict) for GPU/CPU-hour figures. ``examples``: kept
    samples to show (:func:`tokenskip.examples.read_examples`); None leaves the section out.
    """
    report = RunReport.read(report)
    dist = figures.distributions(data)
    title = f"tokenskip run {report.dataset} / {report.run_id}"
    meta = (
        f"model {esc(report.model or '-')} &middot; config {esc(report.config_hash or '-')} &middot; "
        f"{'committed' if report.committed else 'not committed'}"
    )
    if report.pending_shards:
        meta += f" &middot; {esc(report.pending_shards)} shards pending"
    sections = [
        _cards(report, resources),
        _funnel_section(report.counts),
        _lengths_section(dist),
        _ratio_section(report.counts, dist),
        _throughput_section(report.attempt),
        _cost_section(report, resources),
    ]
    if examples is not None:
        sections.append(_examples_section(examples))
    sections.append(
        "<h2>Raw report</h2><details><summary>report.json</summary><pre>"
        + esc(json.dumps(report.model_dump(mode="json"), indent=2, sort_keys=True))
        + "</pre></details>"
    )
    body = "\n".join(sections)
    charts = body.count(f'<svg class="{CHART_CLASS}"')
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(_CSP)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_STYLE}</style><script>{_HEAD_SCRIPT}</script></head>\n"
        f'<body data-charts="{charts}" data-rendered="0" data-errors="">\n'
        f'<h1>{esc(title)}</h1><p class="meta">{meta}</p>\n{body}\n'
        f"<script>{_BODY_SCRIPT}</script>\n</body></html>\n"
    )


def write_html_report(
    config: Any,
    store_or_run_dir: Any,
    report: RunReport | dict[str, Any],
    data: ShardSummary | Distributions | pa.Table | None = None,
    *,
    read_data: bool = True,
    examples: int = EXAMPLES,
) -> str:
    """Render ``report`` and write ``report.html`` next to the run's manifest; returns its path.

    ``config``: the :class:`~tokenskip.config.PipelineConfig` (its ``output`` storage and ``resources``).
    ``store_or_run_dir``: the run's :class:`~tokenskip.storage.RunStore`, or its run folder (the path
    ``RunStore.run_dir`` gives for the report's dataset and run id). With ``read_data``, a committed
    run's page shows its first ``examples`` kept samples (read from its first data part), and ``data``
    None merges the run's shard summaries (the markers; parts only for markers without a summary): the
    data rows themselves are never all loaded.
    """
    report = RunReport.read(report)
    store = _run_store(config, store_or_run_dir, report)
    shown = None
    if read_data and report.committed:
        if data is None:
            data = run_summary(store)
        shown = read_examples(store.config, store.dataset, store.run_id, examples)
    page = render_html(report, data, resources=getattr(config, "resources", None), examples=shown)
    return store.write_file(REPORT_HTML_NAME, page.encode("utf-8"))


def _run_store(config: Any, store_or_run_dir: Any, report: RunReport):
    from tokenskip.storage import RunStore

    if isinstance(store_or_run_dir, RunStore):
        return store_or_run_dir
    if not isinstance(store_or_run_dir, str) or not store_or_run_dir:
        raise TypeError("store_or_run_dir must be a RunStore or a run folder path")
    run_id = report.run_id
    if not run_id:
        raise ValueError("report has no 'run_id': pass the run's RunStore instead of a folder")
    store = RunStore(config.output, report.dataset or config.dataset, run_id)
    if store.run_dir.rstrip("/") != store_or_run_dir.rstrip("/"):
        raise ValueError(
            f"run folder {store_or_run_dir!r} is not where {config.output.root!r} keeps run {run_id!r} "
            f"({store.run_dir!r}); pass the run's RunStore"
        )
    return store
