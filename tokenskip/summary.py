"""Mergeable per-shard summaries: what end-of-run statistics and the report need, without the rows.

A :class:`ShardSummary` is computed where a shard's rows are (the worker that writes the shard) and
stored in the shard's commit marker (``ShardRecord.summary``). The driver then merges one small
record per shard, so its memory is O(shards), not O(rows):

* counts add up: kept samples, rejects and errors by (stage, reason), and kept problems (a problem
  lives in exactly one shard, so per-shard distinct counts are exact over the run);
* value distributions are count / sum / min / max plus a histogram on FIXED bins (log-spaced token
  lengths, 0.001-wide achieved ratios), so histograms of two shards merge by adding counts and
  quantiles are read off the merged histogram (to within one bin);
* engine totals (tokens generated, generation/compression seconds) add up when the writer had the
  sample rows; a summary computed later from the committed parts has none (``engine`` None).

    ShardSummary.from_tables(split_outcomes(rows), samples=rows)   # one shard, where it is written
    merge(summaries)                                               # any number of shards
    run_summary(store)                                             # a run's markers (files if old)
    run_counts(summary, ...)                                       # the run's RunCounts
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from tokenskip.schema import current_error_columns

if TYPE_CHECKING:
    from tokenskip.storage import RunStore, ShardRecord

SUMMARY_FORMAT = 1
# Rows whose stage or reason is null are counted under this key (JSON object keys are strings).
MISSING_KEY = "(none)"
# Reject reasons of the input stage (counted in the run's rejects, reported separately as dedup).
DEDUP_REASONS = ("duplicate", "contaminated")

# Token lengths: 16 bins per octave from 1 to 65,536 tokens (each ~4.4% wide; integer edges, so a
# bin label is exact), bin 0 = [0, 1), and one overflow bin for anything at or past 65,536.
_TOKEN_BINS_PER_OCTAVE = 16
TOKEN_BIN_EDGES: tuple[int, ...] = tuple(
    [0]
    + sorted({round(2 ** (i / _TOKEN_BINS_PER_OCTAVE)) for i in range(16 * _TOKEN_BINS_PER_OCTAVE + 1)})
    + [2**31]
)
# Achieved ratios: bins 0.001 wide over [0, 2); the last bin takes anything at or past 2.
RATIO_BIN_WIDTH = 0.001
RATIO_BINS = 2001


def ratio_bin_edges() -> np.ndarray:
    edges = np.arange(RATIO_BINS + 1, dtype=np.float64) * RATIO_BIN_WIDTH
    edges[-1] = math.inf
    return edges


def _token_bin_index(values: np.ndarray) -> np.ndarray:
    index = np.searchsorted(np.asarray(TOKEN_BIN_EDGES, np.float64), values, side="right") - 1
    return np.clip(index, 0, len(TOKEN_BIN_EDGES) - 2)


def _ratio_bin_index(values: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(values / RATIO_BIN_WIDTH), 0, RATIO_BINS - 1).astype(np.int64)


_BIN_SETS = {
    "tokens": (len(TOKEN_BIN_EDGES) - 1, _token_bin_index),
    "ratio": (RATIO_BINS, _ratio_bin_index),
}


def bin_edges(bins: str) -> np.ndarray:
    """The edges of a fixed bin set ("tokens" or "ratio"); the last edge is the overflow bin's end."""
    if bins == "tokens":
        return np.asarray(TOKEN_BIN_EDGES, np.float64)
    if bins == "ratio":
        return ratio_bin_edges()
    raise ValueError(f"unknown bin set {bins!r}")


# --------------------------------------------------------------------------------------------------
# Models (what the marker stores)


class Histogram(BaseModel):
    """Counts on a fixed bin set, stored trimmed to the non-empty range: ``counts[i]`` is bin
    ``offset + i`` (markers stay small: a shard's values span a few dozen bins)."""

    model_config = ConfigDict(extra="forbid")

    offset: int = Field(default=0, ge=0)
    counts: list[int] = Field(default_factory=list)


class ValueStats(BaseModel):
    """Count, sum, min, max and a fixed-bin histogram of one series of finite values."""

    model_config = ConfigDict(extra="forbid")

    bins: str = Field(description='"tokens" (log-spaced, see TOKEN_BIN_EDGES) or "ratio" (0.001 wide).')
    count: int = 0
    total: float = 0.0
    min: float | None = None
    max: float | None = None
    histogram: Histogram = Field(default_factory=Histogram)

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def dense(self) -> np.ndarray:
        """The histogram as one count per bin of the whole bin set."""
        n, _ = _BIN_SETS[self.bins]
        out = np.zeros(n, np.int64)
        counts = self.histogram.counts
        out[self.histogram.offset : self.histogram.offset + len(counts)] = counts
        return out

    def quantiles(self, qs: Iterable[float]) -> list[float | None]:
        """Quantiles read off the histogram (linear within a bin, clamped to the exact min/max): exact
        to within one bin's width."""
        qs = list(qs)
        if not self.count:
            return [None] * len(qs)
        counts = self.dense()
        edges = bin_edges(self.bins)
        cumulative = np.cumsum(counts)
        out: list[float | None] = []
        for q in qs:
            rank = q * self.count
            i = int(np.searchsorted(cumulative, max(rank, 1e-12), side="left"))
            before = cumulative[i - 1] if i else 0
            lo, hi = edges[i], min(edges[i + 1], self.max)
            lo = max(lo, self.min)
            value = lo + (hi - lo) * (rank - before) / counts[i] if counts[i] else lo
            out.append(float(min(max(value, self.min), self.max)))
        return out


class Distributions(BaseModel):
    """Length and ratio distributions of kept rows; ratio keys are ``str(float(target_ratio))``."""

    model_config = ConfigDict(extra="forbid")

    original_tokens: ValueStats = Field(default_factory=lambda: ValueStats(bins="tokens"))
    compressed_tokens: dict[str, ValueStats] = Field(default_factory=dict)
    achieved_ratio: dict[str, ValueStats] = Field(default_factory=dict)

    @classmethod
    def from_table(cls, data: pa.Table | pa.RecordBatch) -> Distributions:
        """Distributions of a data table (``original_tokens`` and ``compressions`` are read)."""
        acc = _DistributionsAcc()
        acc.add_data(data)
        return acc.to_model()

    @property
    def empty(self) -> bool:
        return not self.original_tokens.count and not any(s.count for s in self.compressed_tokens.values())


class EngineTotals(BaseModel):
    """Work the engines did for a shard's rows (known only where the sample rows were at hand)."""

    model_config = ConfigDict(extra="forbid")

    samples_generated: int = 0
    problems_generated: int = 0
    tokens_generated: int = 0
    generation_seconds: float = 0.0
    compression_seconds: float = 0.0
    # Engine occupancy terms (tokenskip.stages.generate): steps and running sequences are the rows' shares
    # of their batches' scheduler stats, so they add up; occupancy = running / (steps x max_num_seqs).
    engine_steps: float = 0.0
    engine_running_seqs: float = 0.0
    engine_max_num_seqs: int = 0

    @classmethod
    def from_sample_rows(cls, rows: pa.Table) -> EngineTotals:
        """From the pipeline's sample rows (``problem_id``; ``gen_tokens`` and ``compress_seconds`` per
        sample; ``gen_seconds`` and the ``gen_engine_*`` shares per problem, repeated on each of its
        samples, so each problem counts once)."""
        per_problem = [
            c
            for c in ("gen_seconds", "gen_engine_steps", "gen_engine_running_seqs")
            if c in rows.column_names
        ]
        problems: dict[Any, dict[str, float]] = {}  # bounded by one shard's problems
        columns = {c: rows.column(c).to_pylist() for c in per_problem}
        for i, pid in enumerate(rows.column("problem_id").to_pylist()):
            problems.setdefault(pid, {c: columns[c][i] or 0.0 for c in per_problem})
        total = lambda c: float(sum(v.get(c, 0.0) for v in problems.values()))  # noqa: E731
        max_seqs = (
            pc.max(rows.column("gen_engine_max_num_seqs")).as_py()
            if "gen_engine_max_num_seqs" in rows.column_names
            else None
        )
        return cls(
            samples_generated=rows.num_rows,
            problems_generated=len(problems),
            tokens_generated=int(pc.sum(rows.column("gen_tokens")).as_py() or 0),
            generation_seconds=total("gen_seconds"),
            compression_seconds=float(pc.sum(rows.column("compress_seconds")).as_py() or 0.0),
            engine_steps=total("gen_engine_steps"),
            engine_running_seqs=total("gen_engine_running_seqs"),
            engine_max_num_seqs=int(max_seqs or 0),
        )

    def merged(self, other: EngineTotals) -> EngineTotals:
        """Sums, except ``engine_max_num_seqs`` (the largest engine's)."""
        values = {k: getattr(self, k) + getattr(other, k) for k in EngineTotals.model_fields}
        values["engine_max_num_seqs"] = max(self.engine_max_num_seqs, other.engine_max_num_seqs)
        return EngineTotals(**values)

    @property
    def occupancy(self) -> float | None:
        """Mean running sequences / max_num_seqs over engine steps (None: no steps recorded)."""
        if not self.engine_steps or not self.engine_max_num_seqs:
            return None
        return self.engine_running_seqs / (self.engine_steps * self.engine_max_num_seqs)


class ShardSummary(BaseModel):
    """Everything end-of-run statistics and the report need from one shard (or, merged, a run)."""

    model_config = ConfigDict(extra="forbid")

    format: int = SUMMARY_FORMAT
    shards: int = Field(default=1, description="Shards merged into this summary.")
    kept_samples: int = 0
    kept_problems: int = Field(default=0, description="Distinct problem ids among kept rows.")
    rejects: dict[str, dict[str, int]] = Field(default_factory=dict, description="Stage -> reason -> rows.")
    errors: dict[str, dict[str, int]] = Field(default_factory=dict, description="Stage -> reason -> rows.")
    distributions: Distributions = Field(default_factory=Distributions)
    engine: EngineTotals | None = Field(
        default=None, description="Summed engine work; None when some merged shard did not record it."
    )

    @classmethod
    def from_tables(cls, tables: Mapping[str, pa.Table], samples: pa.Table | None = None) -> ShardSummary:
        """Summary of ONE shard's tables as :func:`tokenskip.stages.write.split_outcomes` makes them
        (``data``/``rejects``/``errors``, any may be absent); ``samples``: the shard's sample rows
        before the split, for the engine totals."""
        acc = SummaryAccumulator()
        for kind, table in tables.items():
            acc.add_batch(kind, table)
        summary = acc.finish_shard()
        if samples is not None:
            summary.engine = EngineTotals.from_sample_rows(samples)
        return summary

    def reasons(self, kind: str) -> dict[str, int]:
        """Rows per reason over all stages of ``rejects`` or ``errors``."""
        out: dict[str, int] = {}
        for by_reason in getattr(self, kind).values():
            for reason, n in by_reason.items():
                out[reason] = out.get(reason, 0) + n
        return out


# --------------------------------------------------------------------------------------------------
# Accumulators (numpy arrays while adding; models when done)


class _SeriesAcc:
    def __init__(self, bins: str):
        self.bins = bins
        self.n_bins, self._index = _BIN_SETS[bins]
        self.counts = np.zeros(self.n_bins, np.int64)
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add_values(self, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        if not len(values):
            return
        self.counts += np.bincount(self._index(values), minlength=self.n_bins)
        self.count += len(values)
        self.total += float(values.sum())
        self.min = min(self.min, float(values.min()))
        self.max = max(self.max, float(values.max()))

    def add_model(self, stats: ValueStats) -> None:
        if stats.bins != self.bins:
            raise ValueError(f"cannot merge {stats.bins!r} bins into {self.bins!r} bins")
        if not stats.count:
            return
        self.counts += stats.dense()
        self.count += stats.count
        self.total += stats.total
        self.min = min(self.min, stats.min)
        self.max = max(self.max, stats.max)

    def to_model(self) -> ValueStats:
        nonzero = np.flatnonzero(self.counts)
        histogram = (
            Histogram(offset=int(nonzero[0]), counts=self.counts[nonzero[0] : nonzero[-1] + 1].tolist())
            if len(nonzero)
            else Histogram()
        )
        return ValueStats(
            bins=self.bins,
            count=self.count,
            total=self.total,
            min=self.min if self.count else None,
            max=self.max if self.count else None,
            histogram=histogram,
        )


def _numbers(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(array.to_numpy(zero_copy_only=False), dtype=np.float64)  # nulls -> NaN


def _ratio_key(target: float) -> str:
    return str(float(target))


class _DistributionsAcc:
    def __init__(self) -> None:
        self.original = _SeriesAcc("tokens")
        self.tokens: dict[str, _SeriesAcc] = {}
        self.achieved: dict[str, _SeriesAcc] = {}

    def add_data(self, data: pa.Table | pa.RecordBatch) -> None:
        """Columnar (Arrow compute + numpy): the compressed texts never become Python objects."""
        missing = {"original_tokens", "compressions"} - set(data.schema.names)
        if missing:
            raise ValueError(
                f"the data table lacks columns {sorted(missing)}; pass the run's data table "
                "(tokenskip.storage.read_table(config.output, dataset, 'data', run_id))"
            )
        self.original.add_values(_numbers(data.column("original_tokens")))
        flat = pc.list_flatten(data.column("compressions"))  # null and empty lists contribute nothing
        if isinstance(flat, pa.ChunkedArray):
            flat = flat.combine_chunks()
        if flat.null_count:
            flat = flat.filter(flat.is_valid())
        if not len(flat):
            return
        targets = _numbers(pc.struct_field(flat, "target_ratio"))
        token_values = _numbers(pc.struct_field(flat, "tokens"))
        ratio_values = _numbers(pc.struct_field(flat, "achieved_ratio"))
        for target in np.unique(targets[np.isfinite(targets)]):
            rows = targets == target
            key = _ratio_key(target)
            t, r = token_values[rows], ratio_values[rows]
            if np.isfinite(t).any():
                self.tokens.setdefault(key, _SeriesAcc("tokens")).add_values(t)
            if np.isfinite(r).any():
                self.achieved.setdefault(key, _SeriesAcc("ratio")).add_values(r)

    def add_model(self, dist: Distributions) -> None:
        self.original.add_model(dist.original_tokens)
        for key, stats in dist.compressed_tokens.items():
            self.tokens.setdefault(key, _SeriesAcc("tokens")).add_model(stats)
        for key, stats in dist.achieved_ratio.items():
            self.achieved.setdefault(key, _SeriesAcc("ratio")).add_model(stats)

    def to_model(self) -> Distributions:
        order = lambda d: dict(sorted(d.items(), key=lambda kv: -float(kv[0])))  # noqa: E731
        return Distributions(
            original_tokens=self.original.to_model(),
            compressed_tokens=order({k: a.to_model() for k, a in self.tokens.items()}),
            achieved_ratio=order({k: a.to_model() for k, a in self.achieved.items()}),
        )


def _add_counts(into: dict[str, dict[str, int]], more: Mapping[str, Mapping[str, int]]) -> None:
    for stage, by_reason in more.items():
        target = into.setdefault(stage, {})
        for reason, n in by_reason.items():
            target[reason] = target.get(reason, 0) + n


# The column that says why a row of each kind is there: a reject's reason, an error's error.
_REASON_COLUMN = {"rejects": "reason", "errors": "error"}


def _stage_reason_counts(table: pa.Table | pa.RecordBatch, kind: str) -> dict[str, dict[str, int]]:
    n = table.num_rows
    names = table.schema.names
    columns = {
        name: (table.column(c) if c in names else pa.nulls(n, pa.string())).cast(pa.string())
        for name, c in (("stage", "stage"), ("reason", _REASON_COLUMN[kind]))
    }
    grouped = pa.table(columns).group_by(["stage", "reason"]).aggregate([([], "count_all")])
    out: dict[str, dict[str, int]] = {}
    for stage, reason, count in zip(
        grouped.column("stage").to_pylist(),
        grouped.column("reason").to_pylist(),
        grouped.column("count_all").to_pylist(),
        strict=True,
    ):
        by_reason = out.setdefault(MISSING_KEY if stage is None else stage, {})
        key = MISSING_KEY if reason is None else reason
        by_reason[key] = by_reason.get(key, 0) + count
    return out


class SummaryAccumulator:
    """Adds raw batches of one shard (:meth:`add_batch`) and/or finished summaries (:meth:`add`).

    Distinct kept problems are counted exactly among the raw batches added (an id set, bounded by
    one shard) and summed over the summaries added (each shard's problems are its own)."""

    def __init__(self) -> None:
        self.shards = 0
        self.kept_samples = 0
        self.kept_problems = 0
        self._problem_ids: set[str] = set()
        self.rejects: dict[str, dict[str, int]] = {}
        self.errors: dict[str, dict[str, int]] = {}
        self.dist = _DistributionsAcc()
        self.engine: EngineTotals | None = None
        self._engine_known = True

    def add_batch(self, kind: str, batch: pa.Table | pa.RecordBatch) -> None:
        if kind == "data":
            if batch.num_rows:
                if "problem_id" not in batch.schema.names:
                    raise ValueError("the data table lacks column 'problem_id' (kept problems are counted)")
                self._problem_ids.update(
                    p for p in pc.unique(batch.column("problem_id")).to_pylist() if p is not None
                )
            self.kept_samples += batch.num_rows
            self.dist.add_data(batch)
        elif kind in ("rejects", "errors"):
            if batch.num_rows:
                _add_counts(getattr(self, kind), _stage_reason_counts(batch, kind))
        else:
            raise ValueError(f"unknown kind {kind!r}; expected data, rejects or errors")

    def add(self, summary: ShardSummary) -> None:
        if summary.format != SUMMARY_FORMAT:
            raise ValueError(f"summary format {summary.format} is not {SUMMARY_FORMAT}")
        self.shards += summary.shards
        self.kept_samples += summary.kept_samples
        self.kept_problems += summary.kept_problems
        _add_counts(self.rejects, summary.rejects)
        _add_counts(self.errors, summary.errors)
        self.dist.add_model(summary.distributions)
        if summary.engine is None:
            self._engine_known = False
        elif self._engine_known:
            self.engine = (self.engine or EngineTotals()).merged(summary.engine)

    def finish_shard(self) -> ShardSummary:
        """The summary of the raw batches added as ONE shard."""
        summary = self.finish()
        summary.shards = max(1, summary.shards)
        return summary

    def finish(self) -> ShardSummary:
        order = lambda d: {s: dict(sorted(r.items())) for s, r in sorted(d.items())}  # noqa: E731
        return ShardSummary(
            shards=self.shards,
            kept_samples=self.kept_samples,
            kept_problems=self.kept_problems + len(self._problem_ids),
            rejects=order(self.rejects),
            errors=order(self.errors),
            distributions=self.dist.to_model(),
            engine=self.engine if self._engine_known else None,
        )


def merge(summaries: Iterable[ShardSummary]) -> ShardSummary:
    """One summary of many shards (consumed one at a time: an iterator keeps memory flat)."""
    acc = SummaryAccumulator()
    for summary in summaries:
        acc.add(summary)
    return acc.finish()


# --------------------------------------------------------------------------------------------------
# From storage

_COLUMNS = {"data": ["problem_id", "original_tokens", "compressions"], "rejects": ["stage", "reason"],
            "errors": ["stage", "error", "reason"]}  # fmt: skip  (reason: errors written before "error")


def summary_from_files(store: RunStore, record: ShardRecord) -> ShardSummary:
    """A shard's summary computed from its committed parts, batch by batch (for markers written
    without one). Engine totals are not in the parts: ``engine`` is None."""
    acc = SummaryAccumulator()
    for kind in ("data", "rejects", "errors"):
        if kind not in record.files:
            continue
        names = record.schemas[kind].to_arrow().names
        columns = [c for c in _COLUMNS[kind] if c in names]
        for batch in store.iter_part_batches(record, kind, columns=columns):
            acc.add_batch(kind, current_error_columns(batch) if kind == "errors" else batch)
    summary = acc.finish_shard()
    summary.engine = None
    return summary


def shard_summary(store: RunStore, record: ShardRecord) -> ShardSummary:
    """The marker's summary, or one computed from the shard's files when it has none (or an older
    format)."""
    if record.summary is not None and record.summary.get("format") == SUMMARY_FORMAT:
        return ShardSummary.model_validate(record.summary)
    return summary_from_files(store, record)


def run_summary(store: RunStore) -> ShardSummary:
    """Merged summary of every committed shard of a run, one marker at a time."""
    return merge(shard_summary(store, record) for record in store.iter_committed_shards())


# --------------------------------------------------------------------------------------------------
# Run counts


class RunCounts(BaseModel):
    """The run's per-stage counts: the report's ``counts`` and the manifest's. Every field has a
    default so that the counts of older runs (manifests, report.json) still read."""

    input_rows: int = 0
    load_errors: int = 0
    # Input records the sources' `where` did not select; written only when some were (the counts of
    # other runs stay as they were).
    filtered_out: int = 0
    # Dedup/decontamination rejects per reason (duplicate, contaminated).
    dedup: dict[str, int] = Field(default_factory=dict)
    problems_to_generate: int = 0
    samples: int = 0
    graded_samples: int = 0
    kept_samples: int = 0
    kept_problems: int = 0
    # Grading's rejects only (dedup's are under `dedup`); reject_rows_by_reason has every row of the
    # rejects table, so it sums to the manifest's rejects rows.
    rejects_by_reason: dict[str, int] = Field(default_factory=dict)
    reject_rows_by_reason: dict[str, int] = Field(default_factory=dict)
    errors_by_reason: dict[str, int] = Field(default_factory=dict)
    acceptance_rate: float = 0.0
    mean_original_tokens: float | None = None
    # Mean achieved ratio per target ratio ("0.5" -> 0.52), highest target first.
    achieved_ratio: dict[str, float] = Field(default_factory=dict)

    @model_serializer(mode="wrap")
    def _omit_unfiltered(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if not self.filtered_out:
            data.pop("filtered_out", None)
        return data

    @property
    def reject_rows(self) -> dict[str, int]:
        """Every rejects-table row per reason (counts written before that field: grading's)."""
        return self.reject_rows_by_reason or self.rejects_by_reason


def run_counts(
    summary: ShardSummary,
    *,
    input_rows: int,
    load_errors: int,
    dedup_reasons: Mapping[str, int],
    problems_to_generate: int,
    filtered_out: int = 0,
) -> RunCounts:
    """The run's per-stage counts (what :func:`tokenskip.pipeline.run_statistics` returns) from
    the merged summary of every committed shard, input shard included, and the plan's input figures.

    ``load_errors``: rows the loaders refused (they are among the summary's errors, so sample errors
    are the rest); ``dedup_reasons``: the plan's dedup/decontamination rejects per reason;
    ``filtered_out``: input records the sources' ``where`` did not select."""
    reasons = summary.reasons("rejects")
    error_reasons = summary.reasons("errors")
    kept = summary.kept_samples
    sample_errors = sum(error_reasons.values()) - load_errors
    grade_rejects = sum(v for k, v in reasons.items() if k not in DEDUP_REASONS)
    samples = kept + grade_rejects + sample_errors
    graded = kept + grade_rejects
    original = summary.distributions.original_tokens
    achieved = summary.distributions.achieved_ratio
    return RunCounts(
        input_rows=input_rows,
        load_errors=load_errors,
        filtered_out=filtered_out,
        dedup={k: dedup_reasons.get(k, 0) for k in DEDUP_REASONS},
        problems_to_generate=problems_to_generate,
        samples=samples,
        graded_samples=graded,
        kept_samples=kept,
        kept_problems=summary.kept_problems,
        rejects_by_reason=dict(sorted((k, v) for k, v in reasons.items() if k not in DEDUP_REASONS)),
        reject_rows_by_reason=dict(sorted(reasons.items())),
        errors_by_reason=dict(sorted(error_reasons.items())),
        acceptance_rate=round(kept / graded, 4) if graded else 0.0,
        mean_original_tokens=round(original.total / original.count, 2) if kept and original.count else None,
        achieved_ratio={
            f"{float(k):g}": round(s.total / s.count, 4)
            for k, s in sorted(achieved.items(), key=lambda kv: -float(kv[0]))
            if s.count
        },
    )
