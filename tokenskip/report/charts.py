"""The report's charts, drawn with matplotlib and returned as SVG to inline in the HTML page.

matplotlib (Agg canvas, SVG output) lays out axes, ticks and text; :func:`_inline_svg` then makes its
SVG fit a self-contained page that forbids every fetch and runs many charts side by side: it drops
the XML prologue, namespaces and metadata (their ``http://`` URIs), the clip paths (``url(#...)``
references) and the page-global ``<style>``, copies each ``<use>``d marker shape in place (no
``href``), and removes ids (charts share one document). Each mark a chart registers (a bar, a point,
a line) becomes an element with ``data-mark`` and a ``<title>`` tooltip: the page's script counts
charts with marks, and readers hover for exact values. Every text is escaped by the XML serialiser.
"""

from __future__ import annotations

import copy
import io
import xml.etree.ElementTree as ET
from collections.abc import Sequence

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator

from tokenskip.report.formatting import num

CHART_CLASS = "chart"
GREY = "#7f7f7f"
# Line and marker colour of single-series charts (Okabe-Ito blue, as the page's palette).
_BLUE = "#0072B2"

# matplotlib writes SVG in points (72 per inch); the page shows one point as one CSS pixel.
_PX = 1 / 72
_RC = {
    "svg.fonttype": "none",  # text stays <text> in the page's font, not glyph paths
    "text.parse_math": False,  # a "$" in a label (a reason, a model name) is text, not mathtext
    "font.family": "sans-serif",
    "font.size": 11,
    "axes.edgecolor": "#999999",
    "axes.labelcolor": "#333333",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "xtick.color": "#333333",
    "ytick.color": "#333333",
}
_SVG = "{http://www.w3.org/2000/svg}"
_XLINK_HREF = "{http://www.w3.org/1999/xlink}href"
# The longest axis label drawn in full; the tooltip keeps the whole text.
_MAX_LABEL = 36


class _Chart:
    """One matplotlib figure of ``width`` x ``height`` px and the marks registered on it."""

    def __init__(self, title: str, width: int, height: int):
        self.title = title
        self.figure = Figure(figsize=(width * _PX, height * _PX))
        FigureCanvasAgg(self.figure)
        self.marks: dict[str, tuple[str, str]] = {}

    def mark(self, artist, kind: str, tooltip: str) -> None:
        """``artist`` becomes a ``data-mark="kind"`` element with ``tooltip`` as its title."""
        gid = f"tokenskip-mark-{len(self.marks)}"
        artist.set_gid(gid)
        self.marks[gid] = (kind, tooltip)

    def svg(self) -> str:
        buffer = io.StringIO()
        self.figure.savefig(buffer, format="svg", transparent=True, metadata={"Date": None})
        return _inline_svg(buffer.getvalue(), self.title, self.marks)


def _inline_svg(source: str, title: str, marks: dict[str, tuple[str, str]]) -> str:
    root = ET.fromstring(source)
    for element in root.iter():
        element.tag = element.tag.removeprefix(_SVG)
    shapes = {el.get("id"): el for defs in root.iter("defs") for el in defs if el.get("id")}

    def clean(element: ET.Element) -> list[ET.Element]:
        if element.tag in ("metadata", "defs", "clipPath", "style"):
            return []
        if element.tag == "use":
            shape = shapes[element.get(_XLINK_HREF, "").removeprefix("#")]
            placed = ET.Element("g", transform=f"translate({element.get('x', '0')} {element.get('y', '0')})")
            if element.get("style"):
                placed.set("style", element.get("style"))
            placed.extend(clean(copy.deepcopy(shape)))
            return [placed]
        attributes = {k: v for k, v in element.attrib.items() if k not in ("id", "clip-path")}
        out = ET.Element(element.tag, attributes)
        out.text = element.text if element.text and element.text.strip() else None
        mark = marks.get(element.get("id", ""))
        if mark is not None:
            out.set("data-mark", mark[0])
            ET.SubElement(out, "title").text = mark[1]
        for child in element:
            out.extend(clean(child))
        return [out]

    body = [part for child in root for part in clean(child)]
    width, height = (float(root.get(k, "0").removesuffix("pt")) for k in ("width", "height"))
    heading = ET.Element("title")
    heading.text = title
    return (
        f'<svg class="{CHART_CLASS}" role="img" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" style="stroke-linejoin: round; stroke-linecap: butt">'
        + "".join(ET.tostring(part, encoding="unicode") for part in [heading, *body])
        + "</svg>"
    )


def _short(label: str) -> str:
    return label if len(label) <= _MAX_LABEL else label[: _MAX_LABEL - 1] + "\u2026"


def _number_axis(axis) -> None:
    axis.set_major_formatter(FuncFormatter(lambda value, _: num(float(value))))


def hbar_chart(
    title: str, items: Sequence[tuple[str, float, str]], *, centered: bool = False, width: int = 640
) -> str:
    """Horizontal bars (label, value, colour), values written at the right; ``centered`` draws a
    funnel (bars centred on one axis)."""
    label_width, value_width, row = 230, 80, 26
    height = 16 + row * len(items)
    with matplotlib.rc_context(_RC):
        chart = _Chart(title, width, height)
        chart.figure.subplots_adjust(
            left=label_width / width, right=1 - value_width / width, top=1 - 8 / height, bottom=8 / height
        )
        ax = chart.figure.add_subplot()
        peak = max((v for _, v, _ in items), default=0) or 1.0
        widths = [max(v, peak / 500 if v > 0 else 0.0) for _, v, _ in items]  # a count above zero shows
        lefts = [(peak - w) / 2 if centered else 0.0 for w in widths]
        bars = ax.barh(range(len(items)), widths, left=lefts, height=0.77, color=[c for _, _, c in items])
        for i, ((label, value, _), patch) in enumerate(zip(items, bars, strict=True)):
            chart.mark(patch, "bar", f"{label}: {num(value)}")
            ax.text(1.0, i, "  " + num(value), transform=ax.get_yaxis_transform(), va="center")
        ax.set_xlim(0, peak)
        ax.set_ylim(len(items) - 0.5, -0.5)
        ax.yaxis.set_major_locator(FixedLocator(range(len(items))))
        ax.set_yticklabels([_short(label) for label, _, _ in items])
        ax.tick_params(axis="y", length=0)
        ax.xaxis.set_visible(False)
        for side in ("left", "bottom"):
            ax.spines[side].set_visible(False)
        return chart.svg()


def histogram_chart(title: str, counts: list[int], edges: list[str], colour: str) -> str:
    """Bars on log-spaced bins, drawn equally wide (a log x axis). ``edges`` are the bin edges as
    labels, len(counts) + 1 of them."""
    n = len(counts)
    with matplotlib.rc_context(_RC):
        chart = _Chart(title, 330, 200)
        chart.figure.subplots_adjust(left=56 / 330, right=1 - 16 / 330, top=1 - 14 / 200, bottom=40 / 200)
        ax = chart.figure.add_subplot()
        shown = [i for i, count in enumerate(counts) if count]
        bars = ax.bar(shown, [counts[i] for i in shown], width=0.92, align="edge", color=colour)
        for i, patch in zip(shown, bars, strict=True):
            chart.mark(patch, "bin", f"{edges[i]}-{edges[i + 1]} tokens: {counts[i]}")
        ticks = sorted({round(i * n / 4) for i in range(5)})
        ax.set_xlim(0, n)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.set_xticklabels([edges[i] for i in ticks])
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
        _number_axis(ax.yaxis)
        ax.set_ylim(0, (max(counts, default=0) or 1) * 1.05)
        ax.set_xlabel("tokens (log scale)")
        ax.set_ylabel("CoTs")
        return chart.svg()


def line_chart(title: str, points: list[tuple[float, float]], x_label: str, y_label: str) -> str:
    """A line through ``points`` (x, y) from the origin's corner, each point marked with its values."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    with matplotlib.rc_context(_RC):
        chart = _Chart(title, 640, 260)
        chart.figure.subplots_adjust(left=70 / 640, right=1 - 16 / 640, top=1 - 14 / 260, bottom=40 / 260)
        ax = chart.figure.add_subplot()
        ax.grid(axis="y", color="#eeeeee")
        ax.set_axisbelow(True)
        (line,) = ax.plot(xs, ys, color=_BLUE, linewidth=2)
        chart.mark(line, "line", f"{y_label} over {x_label}")
        for x, y in points:
            (point,) = ax.plot([x], [y], "o", color=_BLUE, markersize=5)
            chart.mark(point, "point", f"{num(x)} s: {num(y)} tokens")
        ax.set_xlim(0, max(xs) or 1)
        ax.set_ylim(0, (max(ys) or 1) * 1.05)
        _number_axis(ax.xaxis)
        _number_axis(ax.yaxis)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        return chart.svg()


def ratio_chart(title: str, rows: Sequence, colours: Sequence[str]) -> str:
    """Achieved vs target ratio (:class:`~tokenskip.report.figures.RatioRow` s, one colour each): the
    dashed y = x line is a perfect compressor; whiskers span p10..p90."""
    top = max([1.0] + [r.p90 or r.mean for r in rows])
    with matplotlib.rc_context(_RC):
        chart = _Chart(title, 360, 320)
        chart.figure.subplots_adjust(left=56 / 360, right=1 - 16 / 360, top=1 - 14 / 320, bottom=40 / 320)
        ax = chart.figure.add_subplot()
        ax.grid(color="#eeeeee")
        ax.set_axisbelow(True)
        ax.plot([0, top], [0, top], color=GREY, linestyle=(0, (4, 3)), linewidth=1)
        for r, colour in zip(rows, colours, strict=True):
            if r.p10 is not None and r.p90 is not None:
                (whisker,) = ax.plot([r.target, r.target], [r.p10, r.p90], color=colour, linewidth=2)
                chart.mark(
                    whisker, "whisker", f"target {num(r.target)}: p10 {num(r.p10, 4)}, p90 {num(r.p90, 4)}"
                )
            (point,) = ax.plot([r.target], [r.mean], "o", color=colour, markersize=8)
            chart.mark(point, "point", f"target {num(r.target)}: mean achieved {num(r.mean, 4)}")
        ax.set_xlim(0, top * 1.02)
        ax.set_ylim(0, top * 1.02)
        ax.set_xlabel("target ratio")
        ax.set_ylabel("achieved ratio")
        return chart.svg()
