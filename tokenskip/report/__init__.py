"""The run report: its figures as data (:mod:`~tokenskip.report.figures`), drawn as matplotlib charts
(:mod:`~tokenskip.report.charts`) on ONE self-contained HTML page (:mod:`~tokenskip.report.page`).

    render_html(report, data, resources=..., examples=...)  -> str
    write_html_report(config, store, report)                 -> writes report.html next to the manifest
"""

from tokenskip.report.charts import CHART_CLASS
from tokenskip.report.figures import cost_figures
from tokenskip.report.page import REPORT_HTML_NAME, render_html, write_html_report

__all__ = ["CHART_CLASS", "REPORT_HTML_NAME", "cost_figures", "render_html", "write_html_report"]
