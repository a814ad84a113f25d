"""Incremental scheduled refresh: publish a new dataset version with only the new problems generated.

    refresh(RefreshConfig) under the dataset's refresh lock (storage.Lock; heartbeat thread):
    base = the run LATEST points to (None on the first refresh), checked compatible with the config
    -> load + dedup the current sources (pipeline.load_input)
    -> done = problem ids with generated rows in base; new = current problems - done
    -> version v-YYYYMMDD-HHMMSS: base's shards carried forward (same shard ids, minus rows of problems
       the current input stage now rejects) + the pipeline run over the new problems only, planned
       by pipeline.make_plan from PlanInputs (the base's problems and shards to carry, the minimum
       of kept samples)
    -> commit (manifest, then LATEST) -> retention (keep_last, pins) -> release the lock

A version is a normal run of the dataset (``runs/<version>/``): readers see it only once its manifest
exists, and LATEST moves only after that, so a refresh that dies before its commit leaves LATEST on
the previous version.

Crash and re-run: the refresh records the version it is building in
``<root>/<dataset>/_refresh/in_progress.json`` with a fingerprint of its plan (base version, config
content hash, shard ids, carried and input-stage content). A re-run whose plan has the same
fingerprint **resumes** that version: carried shards are rewritten idempotently and committed
pipeline shards are skipped, so no finished problem is generated twice. A re-run whose plan differs
(new problems arrived, LATEST moved, config changed) starts a **new** version cleanly; the abandoned
folder has no manifest, so it is invisible to readers and to retention (delete it by hand if wanted).

Lineage: ``runs/<version>/_refresh.json`` records the base version, the number of new problems and
the ids of problems dropped from the carried rows (the manifest itself records the pipeline config,
its hash and ``extra.generation_hash``, which the next refresh compares).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tokenskip import dedup as dedup_stage
from tokenskip import sources as sources_stage
from tokenskip.config import PipelineConfig, load_config
from tokenskip.pipeline import INPUT_SHARD, Plan, PlanInputs, RunRefused, load_input, make_plan, run_pipeline
from tokenskip.schema import (
    COMPRESSED_SCHEMA,
    ERROR_SCHEMA,
    REJECT_SCHEMA,
    config_hash,
    current_error_columns,
)
from tokenskip.storage import (
    FileRecord,
    Lock,
    LockHeartbeat,
    LockHeld,
    Manifest,
    NotCommitted,
    NotLockOwner,
    RunStore,
    apply_retention,
    delete_dataset_file,
    holding,
    latest_run_id,
    list_committed_runs,
    part_shard,
    read_dataset_file,
    read_manifest,
    write_dataset_file,
)
from tokenskip.summary import ShardSummary, SummaryAccumulator

log = logging.getLogger(__name__)

VERSION_FORMAT = "v-%Y%m%d-%H%M%S"
# Rows of these stages describe the input (load errors, duplicates, contamination), not generated
# work: every refresh recomputes them from the current sources instead of carrying them forward.
INPUT_STAGES = frozenset({sources_stage.STAGE, dedup_stage.STAGE})
LINEAGE_NAME = "_refresh.json"  # runs/<version>/_refresh.json: base version, new and dropped problems
CANONICAL_SCHEMAS = {"data": COMPRESSED_SCHEMA, "rejects": REJECT_SCHEMA, "errors": ERROR_SCHEMA}

__all__ = [
    "IncompatibleBase",
    "LockHeld",
    "RefreshConfig",
    "RefreshPlan",
    "carried_shards",
    "config_differences",
    "done_problem_ids",
    "load_refresh_config",
    "plan_refresh",
    "read_in_progress",
    "refresh",
    "version_name",
]


class IncompatibleBase(RuntimeError):
    """LATEST was built with another generation/processing config (or schema) than this refresh's."""


class RefreshConfig(BaseModel):
    """A scheduled refresh of one dataset: the pipeline to run plus lock, retention and budget."""

    model_config = ConfigDict(extra="forbid")

    pipeline: PipelineConfig = Field(
        description="The dataset-building pipeline. Its run_id must be unset: the refresh names each "
        "version v-YYYYMMDD-HHMMSS (UTC start time)."
    )
    lock_name: str = Field(
        default="refresh",
        description="Lock file below <dataset>/_locks/. Share it with anything else that must not run "
        "at the same time as a refresh of this dataset (e.g. a manual retention job).",
    )
    lock_ttl_s: float = Field(
        default=900.0,
        gt=0,
        description="Lease length. A holder that dies unannounced (OOM, lost node) blocks refreshes for "
        "up to this long before its lock is taken over; a short lease needs a reliable heartbeat. Must "
        "dwarf clock skew between machines.",
    )
    heartbeat_s: float | None = Field(
        default=None,
        gt=0,
        description="Seconds between lease renewals while the refresh works; None = lock_ttl_s / 3 "
        "(two renewals may fail before the lease lapses).",
    )
    keep_last: int = Field(
        default=7,
        ge=1,
        description="Committed versions kept after a successful refresh (LATEST and pinned runs are "
        "always kept on top). More allows longer rollbacks; each costs a full copy of the dataset.",
    )
    pinned: list[str] = Field(
        default_factory=list,
        description="Run ids retention must keep, besides runs pinned in storage (storage.pin).",
    )
    max_shards: int | None = Field(
        default=None,
        ge=1,
        description="Commit at most this many new pipeline shards, then stop without publishing (a "
        "budgeted attempt); the next refresh resumes the same version. None = run to completion.",
    )
    rebuild_on_config_change: bool = Field(
        default=False,
        description="When LATEST was built with another generation/grading/selection/compression config "
        "(or row schema): False refuses with IncompatibleBase (the safe default: a full rebuild can be "
        "expensive); True publishes a full rebuild that carries nothing forward.",
    )
    min_kept_fraction: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="A version is published only if it keeps at least this fraction of the base "
        "version's kept samples (rows leave a version only when the input stage now rejects their "
        "problems). A version that lost more is held back with the reason, LATEST unchanged: a broken "
        "source or a new eval set that matches half the data needs a person. 0 turns the check off; "
        "an empty version is never published unless pipeline.output.allow_empty.",
    )
    progress: bool = Field(
        default=True,
        description="Show the run's progress: a live line on a TTY, else one line per committed shard (what "
        "`ray job logs` shows). False: nothing but the final result.",
    )

    @field_validator("pipeline")
    @classmethod
    def _no_fixed_run_id(cls, pipeline: PipelineConfig) -> PipelineConfig:
        if pipeline.run_id is not None:
            raise ValueError(
                f"pipeline.run_id is {pipeline.run_id!r}; leave it unset: refresh names versions itself"
            )
        return pipeline

    @model_validator(mode="after")
    def _heartbeat_within_ttl(self) -> RefreshConfig:
        if self.heartbeat_s is not None and self.heartbeat_s >= self.lock_ttl_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be below lock_ttl_s ({self.lock_ttl_s})")
        return self

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_s if self.heartbeat_s is not None else self.lock_ttl_s / 3


def load_refresh_config(path: str, overrides: dict[str, Any] | None = None) -> RefreshConfig:
    """Read a refresh YAML (``${VAR}`` expanded); ``overrides`` maps dotted keys to values."""
    return load_config(RefreshConfig, path, overrides)


def version_name(now: datetime | None = None) -> str:
    """``v-YYYYMMDD-HHMMSS`` of ``now`` in UTC (naive datetimes are taken as UTC)."""
    now = now or datetime.now(timezone.utc)
    if now.tzinfo is not None:
        now = now.astimezone(timezone.utc)
    return now.strftime(VERSION_FORMAT)


# --------------------------------------------------------------------------------------------------
# Compatibility of the previous version


def processing_fingerprint(pipeline: PipelineConfig | dict[str, Any]) -> dict[str, Any]:
    """The config parts that shape a row besides the problem: carried rows are only valid in a new
    version when these are unchanged (generation alone is keyed by ``generation_hash``)."""
    data = pipeline.model_dump(mode="json") if isinstance(pipeline, PipelineConfig) else pipeline
    return {k: data.get(k) for k in ("grading", "selection", "compression")}


def _incompatibility(manifest: Manifest, pipeline: PipelineConfig) -> str | None:
    """Why ``manifest``'s rows cannot be carried into a version built with ``pipeline`` (None: they
    can), naming every differing config field with LATEST's value and this config's."""
    old = manifest.config if isinstance(manifest.config, dict) else None
    new = pipeline.model_dump(mode="json")
    previous = manifest.extra.get("generation_hash")
    if previous != pipeline.generation_hash():
        changed = config_differences(old, new, PipelineConfig.GENERATION_FIELDS) if old is not None else []
        if changed:
            return f"its generation config differs from this config's: {'; '.join(changed)}"
        return (
            f"generation config hash {previous!r} differs from this config's {pipeline.generation_hash()!r}"
        )
    if old is None:
        return "its manifest records no pipeline config"
    changed = config_differences(old, new, list(processing_fingerprint(pipeline)))
    if changed:
        return f"its processing config differs from this config's: {'; '.join(changed)}"
    for kind, schema in CANONICAL_SCHEMAS.items():
        record = manifest.schemas.get(kind)
        if record is not None and not record.to_arrow().equals(schema):
            return f"its {kind!r} schema differs from this code's"
    return None


_UNSET = object()


def config_differences(old: dict[str, Any], new: dict[str, Any], fields: Sequence[str]) -> list[str]:
    """``"<path>: LATEST <old>, this config <new>"`` for every leaf field under ``fields`` (dotted
    paths into the configs' JSON form) whose values differ, in path order."""

    def at(config: Any, path: str) -> Any:
        for part in path.split("."):
            config = config.get(part, _UNSET) if isinstance(config, dict) else _UNSET
        return config

    def leaves(value: Any, path: str, out: dict[str, Any]) -> dict[str, Any]:
        if isinstance(value, dict):
            for key, item in value.items():
                leaves(item, f"{path}.{key}", out)
        else:
            out[path] = value
        return out

    def shown(value: Any) -> str:
        return "unset" if value is _UNSET else json.dumps(value)

    lines = []
    for name in fields:
        before, after = leaves(at(old, name), name, {}), leaves(at(new, name), name, {})
        for path in sorted(before.keys() | after.keys()):
            a, b = before.get(path, _UNSET), after.get(path, _UNSET)
            if a != b:
                lines.append(f"{path}: LATEST {shown(a)}, this config {shown(b)}")
    return lines


# --------------------------------------------------------------------------------------------------
# Reading the previous version


def _generated_mask(table: pa.Table) -> pa.Array:
    """True for rows of generated work (data rows; rejects/errors of a stage past the input stage)."""
    if "stage" not in table.column_names:
        return pa.array([True] * table.num_rows, pa.bool_())
    stage = table.column("stage")
    is_input = pc.fill_null(pc.is_in(stage, value_set=pa.array(sorted(INPUT_STAGES))), False)
    return pc.invert(is_input)


def done_problem_ids(pipeline: PipelineConfig, manifest: Manifest) -> set[str]:
    """Problem ids with generated rows (kept, graded reject, generation/compression error) in a run,
    from its parts (each checked against the manifest), reading only ``problem_id``/``stage``."""
    store = RunStore(pipeline.output, pipeline.dataset, manifest.run_id)
    done: set[str] = set()
    for kind, records in manifest.files.items():
        schema = manifest.schemas[kind].to_arrow()
        columns = [c for c in ("problem_id", "stage") if c in schema.names]
        for record in records:
            if record.rows == 0:
                continue
            table = store.read_part(record, schema, columns)
            table = table.filter(_generated_mask(table))
            done.update(p for p in table.column("problem_id").to_pylist() if p is not None)
    return done


def carried_shards(
    pipeline: PipelineConfig, manifest: Manifest, drop_problem_ids: set[str]
) -> Iterator[tuple[str, dict[str, pa.Table]]]:
    """The previous version's shards as they go into the new one, one shard at a time (memory stays
    at one shard): same shard ids, input-stage rows left out (each version recomputes them from its
    sources) and rows of ``drop_problem_ids`` (problems the current input stage rejects, e.g. newly
    contaminated) left out. Shards left empty are skipped."""
    store = RunStore(pipeline.output, pipeline.dataset, manifest.run_id)
    by_shard: dict[str, dict[str, FileRecord]] = {}
    for kind, records in manifest.files.items():
        for record in records:
            by_shard.setdefault(part_shard(kind, record.path), {})[kind] = record
    drop = pa.array(sorted(drop_problem_ids), pa.string())
    for shard_id in sorted(by_shard):
        if shard_id == INPUT_SHARD:
            continue  # input-stage rows only; the new run writes its own input shard
        tables = {}
        for kind, record in sorted(by_shard[shard_id].items()):
            # Checked against the manifest: a damaged previous version stops the refresh.
            table = store.read_part(record, manifest.schemas[kind].to_arrow())
            if kind == "errors":
                table = current_error_columns(table)
            table = table.cast(CANONICAL_SCHEMAS[kind])
            mask = _generated_mask(table)
            if len(drop):
                mask = pc.and_(
                    mask, pc.invert(pc.fill_null(pc.is_in(table["problem_id"], value_set=drop), False))
                )
            tables[kind] = table.filter(mask)
        if any(t.num_rows for t in tables.values()):
            yield shard_id, tables


def _shard_ids(manifest: Manifest) -> set[str]:
    """The ids of the shards whose files ``manifest`` lists."""
    return {part_shard(kind, record.path) for kind, records in manifest.files.items() for record in records}


# --------------------------------------------------------------------------------------------------
# Planning


@dataclass
class RefreshPlan:
    """What a refresh will do (read-only to compute; ``describe()`` is the dry run)."""

    config: RefreshConfig
    pipeline: PipelineConfig  # with run_id = version
    version: str
    base: Manifest | None
    plan: Plan  # the pipeline plan restricted to the new problems
    done_ids: set[str]
    drop_ids: set[str]
    fingerprint: str
    resumed: bool = False
    rebuild_reason: str | None = None
    skipped_done: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def base_id(self) -> str | None:
        return self.base.run_id if self.base is not None else None

    @property
    def carries(self) -> bool:
        return self.base is not None and self.rebuild_reason is None

    @property
    def up_to_date(self) -> bool:
        """Nothing new to generate and nothing to drop: publishing would copy the base unchanged."""
        return self.carries and self.plan.problems.num_rows == 0 and not self.drop_ids

    def describe(self) -> str:
        p = self.plan
        lines = [
            f"dataset {self.pipeline.dataset}: base {self.base_id or '(none: first version)'} -> version "
            f"{self.version}{' (resumed)' if self.resumed else ''}",
            f"problems in sources {self.skipped_done + p.problems.num_rows}: {self.skipped_done} already done "
            f"in the base, {p.problems.num_rows} new in {len(p.shards)} shards "
            f"({len(p.pending)} to run, {len(p.shards) - len(p.pending)} committed)",
        ]
        if self.rebuild_reason:
            lines.append(f"full rebuild, nothing carried: {self.rebuild_reason}")
        elif self.base is not None:
            lines.append(
                f"carried from {self.base_id}: its generated rows minus {len(self.drop_ids)} problems the "
                "current input stage rejects"
            )
        if self.up_to_date:
            lines.append("up to date: no new version will be published")
        return "\n".join(lines + self.notes)


IN_PROGRESS = "_refresh/in_progress.json"  # below the dataset folder: the unfinished refresh


def read_in_progress(pipeline: PipelineConfig) -> dict[str, Any] | None:
    """The record of an unfinished refresh, or None (also when unreadable: then nothing resumes)."""
    try:
        data = read_dataset_file(pipeline.output, pipeline.dataset, IN_PROGRESS)
        return None if data is None else json.loads(data)
    except (ValueError, OSError) as exc:
        log.warning("ignoring unreadable refresh record %s: %s", IN_PROGRESS, exc)
        return None


def _write_in_progress(pipeline: PipelineConfig, record: dict[str, Any]) -> None:
    write_dataset_file(pipeline.output, pipeline.dataset, IN_PROGRESS, json.dumps(record, indent=1).encode())


def _clear_in_progress(pipeline: PipelineConfig) -> None:
    delete_dataset_file(pipeline.output, pipeline.dataset, IN_PROGRESS)


def _free_version(pipeline: PipelineConfig, now: datetime, committed: set[str]) -> str:
    """The version name for ``now``, moved on by seconds while that name is taken (committed, or a
    folder left by an abandoned attempt within the same second), so a new version never inherits
    another attempt's shards and names stay unique and in time order."""
    moment = now
    while (name := version_name(moment)) in committed or RunStore(
        pipeline.output, pipeline.dataset, name
    ).folder_exists():
        moment += timedelta(seconds=1)
    return name


def plan_refresh(config: RefreshConfig, now: datetime | None = None) -> RefreshPlan:
    """Decide the next version: base, new problems, carried shards, resume or not. Writes nothing."""
    pipeline = config.pipeline
    try:
        base: Manifest | None = read_manifest(
            pipeline.output, pipeline.dataset, latest_run_id(pipeline.output, pipeline.dataset)
        )
    except NotCommitted:
        base = None
    rebuild_reason = _incompatibility(base, pipeline) if base is not None else None
    if rebuild_reason and not config.rebuild_on_config_change:
        raise IncompatibleBase(
            f"LATEST of {pipeline.dataset!r} ({base.run_id}) cannot be extended: {rebuild_reason}. Set "
            "rebuild_on_config_change: true to publish a full rebuild, or restore the old config."
        )
    carries = base is not None and rebuild_reason is None

    # Load + dedup the current sources once; the planner shards what the base has not generated.
    loaded = load_input(pipeline)
    done = done_problem_ids(pipeline, base) if carries else set()
    ids = set(loaded.problems.column("id").to_pylist())
    # Carried problems the input stage now rejects (a new eval set, a new earlier duplicate) leave
    # the dataset; an id that is both kept and rejected (a repeated row of a kept problem) stays.
    rejected = (
        set(loaded.dedup_rejects.column("problem_id").to_pylist()) if loaded.dedup_rejects.num_rows else set()
    )
    drop = (rejected - ids) & done if carries else set()
    base_kept = base.rows.get("data", 0) if carries else 0
    inputs = PlanInputs(
        loaded=loaded,
        carried_problem_ids=frozenset(done),
        carried_shard_ids=frozenset(_shard_ids(base)) if carries else frozenset(),
        # Fewer kept samples than this fraction of the base's and the version is not published.
        min_kept_samples=max(1, math.ceil(config.min_kept_fraction * base_kept)),
    )
    committed_versions = {m.run_id for m in list_committed_runs(pipeline.output, pipeline.dataset)}
    # Planned for a version name no folder holds yet: the shards of the new problems, nothing committed.
    fresh_version = _free_version(pipeline, now or datetime.now(timezone.utc), committed_versions)
    plan = make_plan(pipeline.model_copy(update={"run_id": fresh_version}), inputs)
    input_rows = loaded.dedup_rejects.to_pylist() + loaded.load_errors.to_pylist()
    fingerprint = config_hash(
        {
            "base": base.run_id if base else None,
            "carries": carries,
            "content_hash": pipeline.content_hash(),
            "shards": [s.shard_id for s in plan.shards],
            "drop": sorted(drop),
            "input": config_hash(input_rows),
        }
    )

    record = read_in_progress(pipeline)
    resumed = bool(
        record
        and record.get("fingerprint") == fingerprint
        and record.get("version") not in committed_versions
    )
    version = record["version"] if resumed else fresh_version
    notes = []
    if record and not resumed and record.get("version") not in committed_versions:
        notes.append(
            f"an unfinished refresh ({record.get('version')}) planned other work; starting {version} instead "
            "(the unfinished folder stays invisible to readers)"
        )
    versioned = pipeline.model_copy(update={"run_id": version})
    if resumed:
        # The same work, planned against the unfinished version's folder: its committed shards are skipped.
        plan = make_plan(versioned, inputs)
    return RefreshPlan(
        config=config,
        pipeline=versioned,
        version=version,
        base=base,
        plan=plan,
        done_ids=done,
        drop_ids=drop,
        fingerprint=fingerprint,
        resumed=resumed,
        rebuild_reason=rebuild_reason,
        skipped_done=loaded.problems.num_rows - plan.problems.num_rows,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------------
# The refresh


def refresh(
    config: RefreshConfig,
    now: datetime | None = None,
    on_plan: Callable[[RefreshPlan], None] | None = None,
) -> dict[str, Any]:
    """Publish the next version of ``config.pipeline.dataset`` (or report that it is up to date).

    Raises :class:`tokenskip.storage.LockHeld` when another refresh holds the dataset's lock (an
    expired lock of a dead holder is taken over), :class:`IncompatibleBase` when LATEST was built with
    another config and ``rebuild_on_config_change`` is off. Any error before the commit leaves LATEST
    where it was; a re-run with the same inputs resumes the unfinished version.

    Returns ``status`` (``published`` | ``pending`` (budget reached, resume next time) |
    ``up-to-date`` | ``refused`` (empty, or fewer kept samples than ``min_kept_fraction`` of the base:
    not published, ``reason`` says why)), ``version``, ``base``, ``resumed``, ``new_problems``, ``problems_generated``,
    ``carried`` (rows per kind), ``dropped_problems``, ``rows`` (the published version's rows per kind),
    ``retention_deleted``, ``lock`` and ``pipeline`` (the pipeline's run report).

    ``on_plan`` is called with the plan before any work (the CLI moves its log into the version's
    folder there).
    """
    pipeline = config.pipeline
    started = time.perf_counter()
    lock = Lock(pipeline.output, pipeline.dataset, config.lock_name, ttl_s=config.lock_ttl_s)
    result: dict[str, Any] = {"dataset": pipeline.dataset, "lock": {"owner": lock.owner}}
    # LockHeld propagates: another refresh is running.
    with holding(
        lock, config.heartbeat_interval, what="refresh lock", thread_name="refresh-heartbeat"
    ) as heartbeat:
        result.update(_refresh_locked(config, now, heartbeat, on_plan))
    result["lock"]["heartbeats"] = heartbeat.beats
    if heartbeat.lost:
        result["lock"]["lost"] = heartbeat.lost
    result["wall_seconds"] = time.perf_counter() - started
    return result


def _refresh_locked(
    config: RefreshConfig,
    now: datetime | None,
    heartbeat: LockHeartbeat,
    on_plan: Callable[[RefreshPlan], None] | None = None,
) -> dict[str, Any]:
    rplan = plan_refresh(config, now)
    if on_plan is not None:
        on_plan(rplan)
    log.info("refresh plan:\n%s", rplan.describe())
    out: dict[str, Any] = {
        "version": rplan.version,
        "base": rplan.base_id,
        "resumed": rplan.resumed,
        "new_problems": rplan.plan.problems.num_rows,
        "skipped_done_problems": rplan.skipped_done,
        "dropped_problems": len(rplan.drop_ids),
        "rebuild_reason": rplan.rebuild_reason,
        "problems_generated": 0,
        "carried": {k: 0 for k in CANONICAL_SCHEMAS},
        "retention_deleted": [],
    }
    if rplan.up_to_date:
        out.update(status="up-to-date", version=None)
        return out

    pipeline = rplan.pipeline
    record = {
        "version": rplan.version,
        "base": rplan.base_id,
        "fingerprint": rplan.fingerprint,
        "started_at": datetime.now(timezone.utc).isoformat(),
    }
    _write_in_progress(pipeline, record)
    store = RunStore(pipeline.output, pipeline.dataset, rplan.version)
    # Lineage beside the run's files (the manifest has no field for it): where the version came from.
    lineage = record | {
        "new_problems": rplan.plan.problems.num_rows,
        "done_problems_in_base": len(rplan.done_ids),
        "dropped_problem_ids": sorted(rplan.drop_ids),
        "rebuild_reason": rplan.rebuild_reason,
    }
    store.write_file(LINEAGE_NAME, json.dumps(lineage, indent=1).encode())
    if rplan.carries:
        carried = SummaryAccumulator()
        for shard_id, tables in carried_shards(pipeline, rplan.base, rplan.drop_ids):
            # The carried rows are a subset of the base's shard: summarise what is written, so the
            # run's statistics merge markers only. No engine work was done for them in this version.
            # Idempotent on resume (same content); the problem ids let the commit refuse duplicates.
            summary = ShardSummary.from_tables(tables)
            problem_ids = {p for t in tables.values() for p in t.column("problem_id").to_pylist() if p}
            store.write_shard(shard_id, tables, summary=summary, problem_ids=problem_ids)
            carried.add(summary)
        merged = carried.finish()
        out["carried"] = {
            "data": merged.kept_samples,
            "rejects": sum(merged.reasons("rejects").values()),
            "errors": sum(merged.reasons("errors").values()),
        }
    if heartbeat.lost:
        raise NotLockOwner(f"refresh lock lost before the pipeline started: {heartbeat.lost}")

    try:
        report = run_pipeline(
            pipeline, max_shards=config.max_shards, progress=config.progress, plan=rplan.plan
        )
    except RunRefused as refused:
        # Held back: the version's shards stay (a re-run with the same plan resumes and decides again).
        log.error("version %s not published: %s", rplan.version, refused.reason)
        out.update(status="refused", reason=refused.reason, pipeline=refused.report)
        return out
    out["pipeline"] = report
    out["problems_generated"] = report.attempt.problems_generated if report.attempt else 0
    if not report.committed:
        out["status"] = "pending"
        out["pending_shards"] = report.pending_shards
        return out

    out["status"] = "published"
    manifest = read_manifest(pipeline.output, pipeline.dataset, rplan.version)
    out["rows"] = manifest.rows
    _clear_in_progress(pipeline)
    if heartbeat.lost:
        # Published, but someone else now holds the lock: leave retention to them.
        log.error("version %s is published but the refresh lock was lost; retention skipped", rplan.version)
        return out
    out["retention_deleted"] = apply_retention(
        pipeline.output, pipeline.dataset, config.keep_last, pinned=config.pinned
    )
    return out
