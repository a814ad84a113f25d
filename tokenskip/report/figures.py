"""The report's figures as plain data, computed from a run's report dict and its summaries (no HTML).

``report`` is the dict :func:`tokenskip.pipeline.run_pipeline` returns (``counts`` from
``run_statistics``, ``attempt`` with timings and ``progress``); the length and ratio distributions come
from the run's merged :class:`~tokenskip.summary.ShardSummary` (what the pipeline passes: no rows are
read), or a data table (only ``original_tokens`` and ``compressions`` are read), summarised the same
way. Histograms use the summaries' fixed log-spaced bins, so every run's charts share bins; medians and
percentiles are read off those bins (within one bin), means and maxima are exact.

Missing sections of a report stay missing (zeros, empty lists, None), never guessed; how they are
drawn is :mod:`tokenskip.report.page`'s business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from tokenskip.run_report import AttemptReport, RunReport
from tokenskip.summary import TOKEN_BIN_EDGES, Distributions, RunCounts, ShardSummary, ValueStats

# At most this many bars per histogram: adjacent fixed bins are grouped (still fixed edges) to fit.
MAX_BARS = 32


def as_float(value: Any, default: float = 0.0) -> float:
    """``value`` as a finite float, ``default`` when it is missing, not a number or not finite."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        return default
    return result if math.isfinite(result) else default


def distributions(data: Any) -> Distributions | None:
    """The length/ratio distributions of ``data`` (a summary, distributions, a data table or None)."""
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


# --------------------------------------------------------------------------------------------------
# Counts per stage


@dataclass(frozen=True)
class Bar:
    """One bar of a count chart; ``kind`` says what it counts (the page colours by kind)."""

    label: str
    value: float
    kind: str


@dataclass(frozen=True)
class Funnel:
    """Rows left after each stage, and the rows each stage lost (by reason)."""

    input_rows: int
    load_errors: int
    duplicate: int
    contaminated: int
    problems: int
    samples: int
    graded: int
    kept: int
    kept_problems: int
    rejects: dict[str, int]
    errors: dict[str, int]
    acceptance: float | None
    filtered_out: int = 0  # input records the sources' `where` did not select

    @property
    def valid_problems(self) -> int:
        return self.input_rows - self.load_errors - self.filtered_out

    @property
    def stages(self) -> list[Bar]:
        return [
            Bar("input rows", self.input_rows, "input"),
            Bar("valid problems", self.valid_problems, "valid"),
            Bar("problems after dedup", self.problems, "problems"),
            Bar("samples generated", self.samples, "samples"),
            Bar("samples graded", self.graded, "graded"),
            Bar("kept samples", self.kept, "kept"),
        ]

    @property
    def losses(self) -> list[Bar]:
        """Rows dropped, by kind and reason; only reasons that dropped something."""
        losses = [Bar(f"dedup: {k}", v, "dedup") for k, v in (("duplicate", self.duplicate),
                                                               ("contaminated", self.contaminated))]  # fmt: skip
        losses += [Bar(f"reject: {k}", v, "reject") for k, v in sorted(self.rejects.items())]
        losses += [Bar(f"error: {k}", v, "error") for k, v in sorted(self.errors.items())]
        return [bar for bar in losses if bar.value > 0]


def funnel(counts: RunCounts) -> Funnel:
    return Funnel(
        input_rows=counts.input_rows,
        load_errors=counts.load_errors,
        duplicate=counts.dedup.get("duplicate", 0),
        contaminated=counts.dedup.get("contaminated", 0),
        problems=counts.problems_to_generate,
        samples=counts.samples,
        graded=counts.graded_samples,
        kept=counts.kept_samples,
        kept_problems=counts.kept_problems,
        rejects=dict(counts.rejects_by_reason),
        errors=dict(counts.errors_by_reason),
        # None: a sparse report (an older run's) that does not say.
        acceptance=counts.acceptance_rate if "acceptance_rate" in counts.model_fields_set else None,
        filtered_out=counts.filtered_out,
    )


# --------------------------------------------------------------------------------------------------
# Token lengths


@dataclass(frozen=True)
class Description:
    """Mean, quantiles (off the fixed bins) and maximum of one series of values."""

    n: int
    mean: float | None
    median: float | None
    p10: float | None
    p90: float | None
    max: float | None


def describe(stats: ValueStats) -> Description:
    p10, median, p90 = stats.quantiles([0.1, 0.5, 0.9])
    return Description(stats.count, stats.mean, median, p10, p90, stats.max)


@dataclass(frozen=True)
class LengthSeries:
    """Token lengths of the original CoTs or of one ratio's CoTs, on the histograms' shared bins.

    ``ratio_rank`` is the ratio's place among the run's ratios, highest first (None: the original
    CoTs), so a ratio keeps its colour across charts."""

    name: str
    ratio_rank: int | None
    counts: list[int]
    description: Description


@dataclass(frozen=True)
class LengthHistograms:
    edges: list[int]  # len(counts) + 1 token edges shared by every series
    series: list[LengthSeries]


def _shared_bins(series: list[ValueStats]) -> tuple[list[int], list[np.ndarray]]:
    """Display edges shared by every histogram (so lengths before/after pruning compare bar for bar):
    the fixed token bins over the range any series reaches, grouped to at most ``MAX_BARS`` bars;
    and each series' counts on them."""
    dense = [s.dense() for s in series]
    nonzero = np.flatnonzero(np.sum(dense, axis=0))
    lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
    group = max(1, math.ceil((hi - lo) / MAX_BARS))
    starts = list(range(lo, hi, group))
    edges = [TOKEN_BIN_EDGES[i] for i in starts] + [TOKEN_BIN_EDGES[min(starts[-1] + group, hi)]]
    grouped = [np.add.reduceat(d[lo:hi], [i - lo for i in starts]) for d in dense]
    return edges, grouped


def length_histograms(dist: Distributions | None) -> LengthHistograms | None:
    """The original CoTs' lengths and each ratio's (highest ratio first); None without data rows."""
    if dist is None or dist.empty:
        return None
    ranked = sorted(dist.compressed_tokens.items(), key=lambda kv: -float(kv[0]))
    named: list[tuple[str, int | None, ValueStats]] = [("original CoT", None, dist.original_tokens)]
    named += [(f"ratio {float(k):g}", rank, stats) for rank, (k, stats) in enumerate(ranked)]
    named = [s for s in named if s[2].count]
    edges, grouped = _shared_bins([stats for _, _, stats in named])
    series = [
        LengthSeries(name, rank, [int(c) for c in counts], describe(stats))
        for (name, rank, stats), counts in zip(named, grouped, strict=True)
    ]
    return LengthHistograms(edges, series)


def is_overflow_edge(edge: int) -> bool:
    """Whether ``edge`` is the open end of the last (overflow) token bin."""
    return edge >= TOKEN_BIN_EDGES[-1]


# --------------------------------------------------------------------------------------------------
# Achieved vs target ratio


@dataclass(frozen=True)
class RatioRow:
    """One target ratio: achieved ratios (distribution from data, else the report's mean only)."""

    target: float
    mean: float
    median: float | None = None
    p10: float | None = None
    p90: float | None = None
    n: int | None = None
    mean_tokens: float | None = None
    saved: float | None = None  # fraction of the original CoTs' mean tokens pruning removed


def ratio_rows(counts: RunCounts, dist: Distributions | None) -> list[RatioRow]:
    """Highest target first; from the distributions when there are data rows, else from
    ``counts.achieved_ratio`` (means only)."""
    rows: list[RatioRow] = []
    if dist is not None and not dist.empty:
        mean_original = dist.original_tokens.mean
        for key, stats in sorted(dist.achieved_ratio.items(), key=lambda kv: -float(kv[0])):
            if not stats.count:
                continue
            d = describe(stats)
            tokens = dist.compressed_tokens.get(key)
            mean_tokens = tokens.mean if tokens is not None else None
            saved = 1 - mean_tokens / mean_original if mean_tokens is not None and mean_original else None
            rows.append(RatioRow(float(key), d.mean, d.median, d.p10, d.p90, d.n, mean_tokens, saved))
        return rows
    for key, mean in counts.achieved_ratio.items():
        try:
            target = float(key)
        except ValueError:
            continue
        rows.append(RatioRow(target, as_float(mean)))
    rows.sort(key=lambda r: -r.target)
    return rows


# --------------------------------------------------------------------------------------------------
# Throughput and cost

# (label, AttemptReport field) of the attempt's timings; the first four are wall-clock stages of the driver.
STAGE_TIMINGS = [
    ("load", "load_seconds"),
    ("dedup", "dedup_seconds"),
    ("generate+grade+compress (wall)", "pipeline_seconds"),
    ("commit + statistics", "commit_seconds"),
    ("generation (summed over actors)", "generation_seconds"),
    ("compression (summed over actors)", "compression_seconds"),
    ("whole attempt", "wall_seconds"),
]
_WALL_STAGES = 4


@dataclass(frozen=True)
class Throughput:
    progress: list[tuple[float, float]]  # (seconds, tokens generated) from (0, 0); empty: no shard
    tokens_generated: float
    tokens_per_second: float
    timings: list[tuple[str, float]]  # the STAGE_TIMINGS of the attempt (none without one)
    wall_stages: list[tuple[str, float]]  # the driver's wall-clock stages among them


def throughput(attempt: AttemptReport | None) -> Throughput:
    """The attempt's progress curve and timings (None: the run was committed before, nothing ran)."""
    if attempt is None:
        return Throughput(progress=[], tokens_generated=0.0, tokens_per_second=0.0, timings=[], wall_stages=[])
    committed = [(as_float(p.get("t")), as_float(p.get("tokens"))) for p in attempt.progress]
    present = [(i, name, as_float(getattr(attempt, key))) for i, (name, key) in enumerate(STAGE_TIMINGS)]
    return Throughput(
        progress=[(0.0, 0.0)] + sorted(committed) if committed else [],
        tokens_generated=as_float(attempt.tokens_generated),
        tokens_per_second=as_float(attempt.tokens_per_second),
        timings=[(name, seconds) for _, name, seconds in present],
        wall_stages=[(name, seconds) for i, name, seconds in present if i < _WALL_STAGES],
    )


def _pool_max(size: Any) -> float:
    """Actors of a pool size as a config dumps it: a count, or ``"MIN..MAX"`` (an elastic pool: its
    cost is bounded by MAX actors)."""
    if isinstance(size, str) and ".." in size:
        size = size.partition("..")[2]
    return as_float(size, 1)


def cost_figures(report: RunReport | dict[str, Any], resources: Any = None) -> dict[str, Any]:
    """GPU-hours (wall time x GPUs reserved), CPU-core-hours when no GPU is used, tokens per kept sample.

    ``resources`` is a :class:`tokenskip.config.ResourcesConfig` or its dict; without it the hardware
    figures are None. Tokens per accepted sample divides this attempt's tokens by the kept samples this
    attempt produced (scaled by samples generated / all samples when earlier attempts were resumed).
    """
    report = RunReport.read(report)
    attempt, counts = report.attempt or AttemptReport(), report.counts
    wall = as_float(attempt.wall_seconds)
    res = resources.model_dump() if hasattr(resources, "model_dump") else (resources or None)
    gpus = cpus = None
    if res is not None:
        generation, scorers = _pool_max(res.get("generation_actors")), _pool_max(res.get("compression_actors"))
        gpus = generation * as_float(res.get("generation_gpus")) + scorers * as_float(res.get("compression_gpus"))
        cpus = (
            generation * as_float(res.get("generation_cpus"), 1)
            + scorers * as_float(res.get("compression_cpus"), 0.5)
            + as_float(res.get("grading_cpus"), 0.25)
        )
    tokens = as_float(attempt.tokens_generated)
    samples_all = as_float(counts.samples)
    # A report written before attempts counted their samples: all of the run's.
    known = "samples_generated" in attempt.model_fields_set
    samples_attempt = as_float(attempt.samples_generated) if known else samples_all
    kept_all = as_float(counts.kept_samples)
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
