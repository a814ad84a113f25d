"""The dataset-building job: the whole Ray Data flow in one place.

    problems (load, validate) -> dedup + decontaminate            [driver; rejects/errors kept]
    -> shards of problems (deterministic ids)                     [resume unit]
    -> GenerateStage      (vLLM actors, n samples per problem)    [tokenskip.stages.generate]
    -> GradeSelectStage   (verdict + selection policy)            [tokenskip.stages.grade]
    -> CompressKeptStage  (score once, prune at every ratio)      [tokenskip.stages.compress]
       (compression: null -> keep_cots_whole: no scorer, no compressions)
    -> write_complete_shards (workers write a whole shard's parts) [tokenskip.stages.write]
    -> the driver commits each shard from its record (marker); it assembles split shards itself
    -> all shards committed -> manifest (conditional write) -> LATEST -> report

Resume: shard ids are content hashes of their problem ids, and a shard is committed atomically
(marker written after its parts, with the ids of the problems it holds). Re-running the same config
skips every problem a committed shard holds and shards the rest, also when the resources (e.g.
``shard_size``) changed between attempts, so committed work is never generated again and every
(problem, sample) key lands exactly once; the commit refuses two shards sharing a problem.

A run holds a lease on its folder while it works (a second writer of the same run is refused before
it starts an engine), and only a run with problems and kept samples becomes LATEST (``RunRefused``
otherwise, unless ``output.allow_empty``): a bad input or a broken grader never replaces a good
dataset with an empty one.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from tokenskip.capacity import (
    DroppedBlocks,
    lost_with_an_actor,
    pool_demands,
    tolerate_dropped_blocks,
    wait_for_capacity,
)
from tokenskip.config import PipelineConfig, cluster_demand
from tokenskip.console import RunDisplay
from tokenskip.dataset_card import dataset_card
from tokenskip.dedup import dedup_and_decontaminate
from tokenskip.failpoints import failpoint
from tokenskip.metrics import StageMetrics, log_stage_event
from tokenskip.models import model_name
from tokenskip.progress import ProgressBoard
from tokenskip.ray_runtime import init_ray
from tokenskip.run_report import AttemptReport, RunReport
from tokenskip.schema import ERROR_SCHEMA, PROBLEM_SCHEMA, REJECT_SCHEMA, config_hash
from tokenskip.shutdown import GracefulStop, StopRequested
from tokenskip.sources import load_source
from tokenskip.stages import compress, generate, grade, write
from tokenskip.stages.contract import ChainLink, StageContract, check_chain
from tokenskip.stages.write import decode_rows, shards_stay_whole, write_shard_rows
from tokenskip.storage import LockHeartbeat, NotLockOwner, RunStore, ShardRecord, holding, read_manifest
from tokenskip.summary import EngineTotals, RunCounts, ShardSummary, run_counts, run_summary

log = logging.getLogger(__name__)

INPUT_SHARD = "input"
# What the run feeds its first stage: the shards' problem rows, each with its shard's id.
SHARD_ROWS_SCHEMA = pa.schema([*PROBLEM_SCHEMA, pa.field("shard_id", pa.string())])
# Passes in a row that may commit nothing because actors died under every task (a node lost as the
# pass began, an engine killed twice) before the run fails with the actor's error.
PASSES_WITHOUT_PROGRESS = 3


class RunStopped(RuntimeError):
    """A stop signal (SIGTERM, SIGINT) ended the attempt: the shards committed so far stay, the
    lease is released, the report of what is committed is written; re-running the same config
    resumes. ``report`` is that report."""

    def __init__(self, signal_name: str, report: RunReport):
        super().__init__(f"stopped by {signal_name}")
        self.signal_name = signal_name
        self.report = report


class RunRefused(RuntimeError):
    """The run finished but is not fit to publish (no problems, no kept samples, or fewer than the
    caller's minimum): nothing was committed and LATEST did not move. ``report`` is the run report
    (also written next to the run's files)."""

    def __init__(self, reason: str, report: RunReport):
        super().__init__(reason)
        self.reason = reason
        self.report = report


@dataclass
class Shard:
    shard_id: str
    problems: pa.Table

    @property
    def size(self) -> int:
        return self.problems.num_rows


@dataclass(frozen=True)
class Plan:
    """What a run will do; printed by ``--dry-run``. Made by :func:`make_plan` only (from the config
    and :class:`PlanInputs`); nothing changes a plan once made: a run that finds more shards
    committed as it starts keeps that set beside the plan."""

    config: PipelineConfig
    run_id: str
    input_rows: int
    load_errors: pa.Table
    dedup_rejects: pa.Table
    problems: pa.Table
    shards: list[Shard]
    # The run's stages in order, each with what it receives (checked by make_plan).
    chain: list[ChainLink] = field(default_factory=list)
    committed: frozenset[str] = frozenset()
    already_committed_run: bool = False
    load_seconds: float = 0.0
    dedup_seconds: float = 0.0
    # Input records the sources' `where` did not select (counted, not errors).
    filtered_out: int = 0
    # Fewer kept samples than this and the finished run is not published (a refresh asks for a
    # fraction of the previous version's through PlanInputs.min_kept_samples).
    min_kept_samples: int = 1

    @property
    def pending(self) -> list[Shard]:
        return [s for s in self.shards if s.shard_id not in self.committed]

    def describe(self) -> str:
        c, r = self.config, self.config.resources
        pending = self.pending
        demand = cluster_demand(c)
        lines = [
            f"dataset {c.dataset}  run {self.run_id}  output {c.output.root}",
            f"input rows {self.input_rows}: {self.problems.num_rows} problems, {self.load_errors.num_rows} load errors, "
            f"{self.dedup_rejects.num_rows} dedup/decontamination rejects"
            + (f", {self.filtered_out} filtered out by sources[].where" if self.filtered_out else ""),
            f"shards {len(self.shards)} of <= {r.shard_size} problems: {len(self.shards) - len(pending)} committed, "
            f"{len(pending)} to run ({sum(s.size for s in pending)} problems x {c.sampling.n} samples)",
            "stages:",
            f"  generate   model={model_name(c.engine.model)} device={c.engine.planned_device(r.generation_gpus)} actors={r.generation_actors} "
            f"cpus/actor={r.generation_cpus} gpus/actor={r.generation_gpus} batch={r.generation_batch_size} "
            f"n={c.sampling.n} T={c.sampling.temperature} max_tokens={c.sampling.max_tokens}",
            generate.admission_plan(c),
            f"  grade      policy={c.selection.policy} cpus={r.grading_cpus} timeout={c.grading.timeout_s}s",
            _compress_line(c),
            f"  write      {RunStore(c.output, c.dataset, self.run_id).parts_url_pattern} cpus/task={r.write_cpus}",
            f"cluster: the stages hold {demand.cpus:g} CPUs and {demand.gpus:g} GPUs at once",
            "stage chain (declared fields, checked before any engine starts):",
            *(f"  {link.contract.name:<10} {link.describe()}" for link in self.chain),
        ]
        if not shards_stay_whole(r.shard_size, r.generation_batch_size):
            lines.append(
                f"  note: generation_batch_size {r.generation_batch_size} is not a multiple of shard_size "
                f"{r.shard_size}: split shards are assembled and written by the driver"
            )
        if self.load_errors.num_rows:
            reasons = Counter(self.load_errors.column("error").to_pylist())
            lines.append("load errors: " + ", ".join(f"{reason} {n}" for reason, n in reasons.most_common()))
            first = self.load_errors.column("error_detail")[0].as_py() or ""
            lines.append(f"  first: {first[:200]}")
        if not c.dedup.enabled or not c.dedup.eval_sets:
            lines.append(
                "decontamination: off (no dedup.eval_sets): problems are not checked against test sets"
            )
        if self.already_committed_run:
            lines.append("this run is already committed: nothing to do")
        return "\n".join(lines)


def _compress_line(c: PipelineConfig) -> str:
    r = c.resources
    if c.compression is None:
        return "  compress   none (compression: null): kept CoTs are written whole, no scorer is loaded"
    scorer = c.compression.scorer
    forced = ", ".join([*scorer.force_tokens, *(["digits"] if scorer.force_digits else [])]) or "nothing"
    return (
        f"  compress   scorer={scorer.kind}:{scorer.model} ratios={c.compression.ratios} forced={forced} "
        f"actors={r.compression_actors} cpus/actor={r.compression_cpus} gpus/actor={r.compression_gpus}"
    )


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    tables = [t.select(schema.names).cast(schema) for t in tables if t.num_rows]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def shard_problems(problems: pa.Table, shard_size: int) -> list[Shard]:
    """Id-sorted chunks named by the hash of their ids: the same problems always give the same
    shard ids, which is what makes resume (and a re-planned refresh) skip committed work."""
    problems = problems.sort_by("id")
    shards = []
    for start in range(0, problems.num_rows, shard_size):
        chunk = problems.slice(start, shard_size)
        shards.append(Shard("s-" + config_hash(chunk.column("id").to_pylist())[:16], chunk))
    return shards


def _is_in(ids: pa.ChunkedArray, values: set[str]) -> pa.Array:
    return pc.is_in(ids, value_set=pa.array(sorted(values), pa.string()))


def resume_shards(store: RunStore, problems: pa.Table, shard_size: int, committed: set[str]) -> list[Shard]:
    """The run's shards given the ids of the shards earlier attempts committed. When every committed
    shard is one this plan makes too, that is the plan (no marker is read). Otherwise an attempt
    planned differently (another ``shard_size``): its committed shards stay as they are, and only the
    problems none of them holds are sharded anew, so no problem is generated (or committed) twice."""
    planned = shard_problems(problems, shard_size)
    by_id = {s.shard_id: s for s in planned}
    foreign = committed - set(by_id)
    if not foreign:
        return planned
    held = {
        shard_id: set(by_id[shard_id].problems.column("id").to_pylist())
        for shard_id in committed & set(by_id)
    }
    for record in store.iter_committed_shards():
        if record.shard_id in foreign:
            held[record.shard_id] = store.shard_problem_ids(record)
    done = set().union(*held.values())
    log.info("%d committed shards were planned with another shard size: resuming by problem", len(foreign))
    ids = problems.column("id")
    kept_shards = [
        Shard(shard_id, problems.filter(_is_in(ids, pids))) for shard_id, pids in sorted(held.items())
    ]
    rest = problems.filter(pc.invert(_is_in(ids, done)))
    return kept_shards + shard_problems(rest, shard_size)


def stage_chain() -> list[StageContract]:
    """The declared contracts of the stages :func:`add_stages` wires, in the same order (without
    compression, :func:`~tokenskip.stages.compress.keep_cots_whole` keeps the compress contract)."""
    return [generate.CONTRACT, grade.CONTRACT, compress.CONTRACT, write.CONTRACT]


@dataclass(frozen=True)
class LoadedInput:
    """The input stage's result: the sources loaded, validated and deduplicated (before sharding)."""

    input_rows: int
    load_errors: pa.Table
    dedup_rejects: pa.Table
    problems: pa.Table  # kept problems, sorted by id
    load_seconds: float = 0.0
    dedup_seconds: float = 0.0
    # Input records the sources' `where` did not select (counted, not errors).
    filtered_out: int = 0


def load_input(config: PipelineConfig) -> LoadedInput:
    """Load, validate and deduplicate the sources of ``config`` (the input stage of every plan)."""
    started = time.perf_counter()
    problems, errors, filtered_out = [], [], 0
    for source in config.sources:
        loaded = load_source(source)
        problems.append(loaded.problems)
        errors.append(loaded.errors)
        filtered_out += loaded.filtered_out
    all_problems = _concat(problems, PROBLEM_SCHEMA)
    load_errors = _concat(errors, ERROR_SCHEMA)
    load_seconds = time.perf_counter() - started

    started = time.perf_counter()
    log_stage_event(
        "load", rows=all_problems.num_rows, errors=load_errors.num_rows, seconds=round(load_seconds, 3)
    )
    kept, rejects = dedup_and_decontaminate(all_problems, config.dedup)
    dedup_seconds = time.perf_counter() - started
    log_stage_event("dedup", kept=kept.num_rows, rejects=rejects.num_rows, seconds=round(dedup_seconds, 3))
    return LoadedInput(
        input_rows=all_problems.num_rows + load_errors.num_rows + filtered_out,
        load_errors=load_errors,
        dedup_rejects=rejects,
        problems=kept.sort_by("id"),
        load_seconds=load_seconds,
        dedup_seconds=dedup_seconds,
        filtered_out=filtered_out,
    )


@dataclass(frozen=True)
class PlanInputs:
    """What a plan is made from besides its config. The defaults plan a plain run; a refresh passes
    what it knows about the version it builds on (tokenskip.refresh)."""

    # The input stage already run for this config (None: the planner loads the sources itself).
    loaded: LoadedInput | None = None
    # Problems a base version already generated: carried into the run as they are, not generated again.
    carried_problem_ids: frozenset[str] = frozenset()
    # Shards the run's folder holds that were carried from the base version: not work of this plan
    # (without this they would look like shards of an attempt planned with another shard size).
    carried_shard_ids: frozenset[str] = frozenset()
    # Fewer kept samples than this and the finished run is not published.
    min_kept_samples: int = 1


def make_plan(config: PipelineConfig, inputs: PlanInputs | None = None) -> Plan:
    """The one planner: check the stage chain; load, validate, deduplicate and shard the problems
    (less ``inputs.carried_problem_ids``); look up what is already committed. A stage that needs a
    field no earlier stage hands on is a :class:`~tokenskip.stages.contract.StageChainError` here,
    before any input is read or engine started."""
    inputs = inputs or PlanInputs()
    if inputs.min_kept_samples < 1:
        raise ValueError(f"make_plan: min_kept_samples must be >= 1, got {inputs.min_kept_samples}")
    chain = check_chain("the input shards", SHARD_ROWS_SCHEMA, stage_chain())
    run_id = config.resolved_run_id()
    loaded = inputs.loaded or load_input(config)
    kept = loaded.problems
    if inputs.carried_problem_ids:
        kept = kept.filter(pc.invert(_is_in(kept.column("id"), set(inputs.carried_problem_ids))))
    kept = kept.sort_by("id")
    store = RunStore(config.output, config.dataset, run_id)
    committed_run = store.is_committed()
    if committed_run:
        shards = shard_problems(kept, config.resources.shard_size)
        committed = {s.shard_id for s in shards}
    else:
        committed = set(store.committed_shard_ids()) - {INPUT_SHARD} - inputs.carried_shard_ids
        shards = resume_shards(store, kept, config.resources.shard_size, committed)
    return Plan(
        config=config,
        run_id=run_id,
        input_rows=loaded.input_rows,
        load_errors=loaded.load_errors,
        dedup_rejects=loaded.dedup_rejects,
        problems=kept,
        shards=shards,
        chain=chain,
        committed=frozenset(committed),
        already_committed_run=committed_run,
        load_seconds=loaded.load_seconds,
        dedup_seconds=loaded.dedup_seconds,
        filtered_out=loaded.filtered_out,
        min_kept_samples=inputs.min_kept_samples,
    )


@dataclass
class AttemptStats:
    """What this attempt did (a resumed run's earlier attempts are counted from committed files)."""

    shards_committed: int = 0
    wall_seconds: float = 0.0
    progress: list[dict[str, float]] = field(default_factory=list)
    # Engine work of this attempt's shards (problems, samples, tokens, seconds, occupancy terms).
    engine: EngineTotals = field(default_factory=EngineTotals)


def _build_dataset(
    config: PipelineConfig,
    shards: list[Shard],
    store: RunStore,
    expected_rows: dict[str, int],
    progress: ProgressBoard | None = None,
):
    """The attempt's Ray Data flow: problems of the pending shards through the four stages."""
    import ray

    tables = [
        s.problems.append_column("shard_id", pa.array([s.shard_id] * s.size, pa.string())) for s in shards
    ]
    return add_stages(ray.data.from_arrow(tables), config, store, expected_rows, progress)


def add_stages(
    ds,
    config: PipelineConfig,
    store: RunStore,
    expected_rows: dict[str, int],
    progress: ProgressBoard | None = None,
):
    """``ds`` (problem rows with their ``shard_id``) through the four stages: the one place the run's
    ``map_batches`` calls are made, for the run and for :func:`build_dry_run_graph` alike. Ray Data
    checks each call's arguments here (e.g. GPUs without a ``batch_size``), before anything runs."""
    ds = ds.map_batches(**generate.map_batches_args(config, progress))
    ds = ds.map_batches(**grade.map_batches_args(config))
    ds = ds.map_batches(**compress.map_batches_args(config))
    # Workers write each whole shard's parts and pass on only its record (the driver commits).
    return ds.map_batches(**write.map_batches_args(config, store, expected_rows))


def _no_rows_dataset():
    """An empty Ray Data dataset built without starting or joining Ray: what ``ray.data.from_arrow``
    makes of no tables. Ray Data's public constructors all need a cluster (they put or read blocks);
    the dry run wants only the graph's checks, on a laptop as on the cluster."""
    from ray.data._internal.logical.interfaces import LogicalPlan
    from ray.data._internal.logical.operators.from_operators import FromArrow
    from ray.data._internal.stats import DatasetStats
    from ray.data.context import DataContext
    from ray.data.dataset import MaterializedDataset

    context = DataContext.get_current().copy()
    stats = DatasetStats(metadata={"FromArrow": []}, parent=None)
    return MaterializedDataset(LogicalPlan(FromArrow([], []), context), context, stats)


def build_dry_run_graph(plan: Plan):
    """The run's Ray Data graph for ``plan`` (same stages, same ``map_batches`` arguments), built over
    no rows and never executed, so ``--dry-run`` fails where the run would while it builds its graph.
    Returns the (lazy) dataset."""
    config = plan.config
    store = RunStore(config.output, config.dataset, plan.run_id)
    expected = {s.shard_id: s.size * config.sampling.n for s in plan.pending}
    return add_stages(_no_rows_dataset(), config, store, expected)


def run_statistics(plan: Plan, store: RunStore, summary: ShardSummary | None = None) -> RunCounts:
    """Counts per stage over every committed shard of the run (earlier attempts included), from the
    merged shard summaries (``summary``, or :func:`tokenskip.summary.run_summary` of ``store``: the
    markers' summaries, computed from the parts for markers without one). Driver memory is O(shards)."""
    if summary is None:
        summary = run_summary(store)
    dedup = (
        Counter(plan.dedup_rejects.column("reason").to_pylist()) if plan.dedup_rejects.num_rows else Counter()
    )
    return run_counts(
        summary,
        input_rows=plan.input_rows,
        load_errors=plan.load_errors.num_rows,
        dedup_reasons=dedup,
        problems_to_generate=plan.problems.num_rows,
        filtered_out=plan.filtered_out,
    )


def write_report(
    config: PipelineConfig, store: RunStore, report: RunReport, summary: ShardSummary | None = None
) -> None:
    """report.json, report.txt and report.html next to the manifest, through the store, and for a
    committed run its dataset card (README.md). ``summary``: the run's merged shard summary when the
    caller has it (else the report reads the markers)."""
    from tokenskip.report import write_html_report

    store.write_file("report.json", report.to_json().encode())
    store.write_file("report.txt", (report.summary_text() + "\n").encode())
    write_html_report(config, store, report, summary)
    if report.committed:
        store.write_file("README.md", dataset_card(config, report).encode())


def run_pipeline(
    config: PipelineConfig,
    *,
    max_shards: int | None = None,
    progress: bool = True,
    plan: Plan | None = None,
) -> RunReport:
    """Run (or resume) the job. Returns the run report.

    ``max_shards`` commits at most that many new shards in this attempt and returns without a
    manifest (a budgeted attempt); the next call with the same config goes on from there.

    Raises :class:`~tokenskip.storage.LockHeld` when another writer holds this run's lease (before any
    work starts), :class:`RunStopped` after SIGTERM/SIGINT (in the main thread: shards that finish
    within ``resources.stop_grace_s`` still commit, the lease is released and the report written),
    :class:`~tokenskip.capacity.CapacityUnavailable` when the cluster cannot place the pools' minimum
    within ``resources.capacity_wait_s``, and :class:`RunRefused` when the finished run has no problems, no kept samples or
    fewer than ``plan.min_kept_samples`` (unless ``config.output.allow_empty``): then nothing is committed,
    LATEST stays where it was, and the report says why.
    """
    wall_start = time.perf_counter()
    if plan is not None and plan.config != config:
        raise ValueError(f"run_pipeline: the plan of run {plan.run_id!r} was made from another config")
    plan = plan or make_plan(config)
    store = RunStore(config.output, config.dataset, plan.run_id)
    if plan.already_committed_run:
        return _already_committed(config, plan)
    lease = store.lease()
    # LockHeld propagates: another writer of this run is at work.
    with (
        GracefulStop(config.resources.stop_grace_s) as stop,
        holding(lease, lease.ttl_s / 3, what="run lease") as heartbeat,
    ):
        if store.is_committed():  # committed by another writer after this plan was made
            return _already_committed(config, plan)
        # Shards another writer committed since planning are not generated again (the plan stays
        # as made: what is committed now is this attempt's own record).
        planned = {s.shard_id for s in plan.shards}
        committed = plan.committed | (set(store.committed_shard_ids()) & planned)
        return _run_leased(config, plan, committed, store, heartbeat, wall_start, max_shards, progress, stop)


def _already_committed(config: PipelineConfig, plan: Plan) -> RunReport:
    manifest = read_manifest(config.output, config.dataset, plan.run_id)
    log.info("run %s is already committed; nothing to do", plan.run_id)
    return RunReport(
        dataset=config.dataset,
        run_id=plan.run_id,
        committed=True,
        counts=RunCounts.model_validate(manifest.counts or {}),
    )


def publish_refusal(config: PipelineConfig, counts: RunCounts, min_kept_samples: int = 1) -> str | None:
    """Why a finished run must not be committed as a dataset (None: it may). A run that loaded no
    problem or kept no sample is almost always a mistake (wrong file, wrong columns, a grader or
    gold answers that reject everything); committing it would move LATEST to an empty dataset."""
    kept = counts.kept_samples
    if kept == 0 and config.output.allow_empty:
        return None
    if counts.samples == 0 and counts.problems_to_generate == 0:
        errors = ", ".join(f"{k} {v}" for k, v in counts.errors_by_reason.items()) or "none"
        return (
            f"0 problems loaded from {counts.input_rows} input rows (load errors: {errors}; "
            f"duplicates {counts.dedup.get('duplicate', 0)}, contaminated {counts.dedup.get('contaminated', 0)})"
        )
    if kept == 0:
        rejects = ", ".join(f"{k} {v}" for k, v in counts.rejects_by_reason.items()) or "none"
        return f"0 kept samples of {counts.samples} generated (rejects: {rejects})"
    if kept < min_kept_samples:
        return f"{kept} kept samples, fewer than the {min_kept_samples} required"
    return None


def _run_leased(
    config: PipelineConfig,
    plan: Plan,
    committed: frozenset[str],
    store: RunStore,
    heartbeat: LockHeartbeat,
    wall_start: float,
    max_shards: int | None,
    progress: bool,
    stop: GracefulStop,
) -> RunReport:
    # Input-stage outcomes are a shard of their own: idempotent, so re-running writes nothing new.
    input_tables = {
        "rejects": plan.dedup_rejects.cast(REJECT_SCHEMA),
        "errors": plan.load_errors.cast(ERROR_SCHEMA),
    }
    store.write_shard(INPUT_SHARD, input_tables, summary=ShardSummary.from_tables(input_tables))
    failpoint("input-shard-committed")  # fault tests stop the driver at this exact boundary

    stats = AttemptStats()
    all_pending = [s for s in plan.shards if s.shard_id not in committed]
    pending = all_pending
    if max_shards is not None:
        pending = pending[:max_shards]
    pipeline_start = time.perf_counter()
    stopped: str | None = None
    if pending:
        init_ray()
        expected = {s.shard_id: s.size * config.sampling.n for s in pending}
        display = _start_display(config, pending, expected) if progress else None
        try:
            with stop.stoppable():
                _generate_and_commit(config, store, pending, expected, stats, wall_start, display, stop)
        except StopRequested as stopped_by:
            stopped = stopped_by.signal_name
        finally:
            if display is not None:
                display.close()
                if display.board is not None:
                    display.board.close()
    pipeline_seconds = time.perf_counter() - pipeline_start

    remaining = [s for s in all_pending if s not in pending]
    commit_start = time.perf_counter()
    counts_all = run_statistics(plan, store)
    StageMetrics().record_run_counts(counts_all)
    log_stage_event("run", run_id=plan.run_id, **counts_all.model_dump(mode="json"))
    stats.wall_seconds = time.perf_counter() - wall_start
    attempt = AttemptReport(
        shards_committed=stats.shards_committed,
        shards_resumed=len(committed & {s.shard_id for s in plan.shards}),
        problems_generated=stats.engine.problems_generated,
        samples_generated=stats.engine.samples_generated,
        tokens_generated=stats.engine.tokens_generated,
        tokens_per_second=stats.engine.tokens_generated / pipeline_seconds if pipeline_seconds > 0 else 0.0,
        load_seconds=plan.load_seconds,
        dedup_seconds=plan.dedup_seconds,
        pipeline_seconds=pipeline_seconds,
        generation_seconds=stats.engine.generation_seconds,
        compression_seconds=stats.engine.compression_seconds,
        engine_occupancy=None if stats.engine.occupancy is None else round(stats.engine.occupancy, 4),
        engine_max_num_seqs=stats.engine.engine_max_num_seqs or None,
        generation_max_concurrent_batches=config.resources.generation_max_concurrent_batches,
        generation_admission=config.resources.generation_admission.policy,
        wall_seconds=stats.wall_seconds,
        progress=stats.progress,
    )
    report = RunReport(
        dataset=config.dataset,
        run_id=plan.run_id,
        model=model_name(config.engine.model),
        config_hash=config.content_hash(),
        counts=counts_all,
        attempt=attempt,
    )
    if stopped:
        # Only what is committed is reported; the lease is released as run_pipeline returns.
        report.stopped = stopped
        report.pending_shards = len({s.shard_id for s in plan.shards} - set(store.committed_shard_ids()))
        log_stage_event("stopped", run_id=plan.run_id, signal=stopped, shards_committed=stats.shards_committed)
        write_report(config, store, report)
        raise RunStopped(stopped, report)
    if remaining:
        report.pending_shards = len(remaining)
        return report
    refusal = publish_refusal(config, counts_all, plan.min_kept_samples)
    if refusal:
        report.refused = refusal
        log_stage_event("refused", run_id=plan.run_id, reason=refusal)
        write_report(config, store, report)
        raise RunRefused(refusal, report)
    if heartbeat.lost:
        raise NotLockOwner(
            f"run {plan.run_id!r}: the run's lease was lost before the commit: {heartbeat.lost}"
        )
    manifest_config = config.model_dump(mode="json")
    store.commit(
        {
            "config": manifest_config,
            "config_hash": config.content_hash(),
            "model": model_name(config.engine.model),
            "counts": counts_all.model_dump(mode="json"),
            "generation_hash": config.generation_hash(),
        }
    )
    attempt.commit_seconds = time.perf_counter() - commit_start
    report.committed = True
    write_report(config, store, report)
    return report


def _account(stats: AttemptStats, record: ShardRecord) -> None:
    """This attempt's engine work, from the shard's summary (the rows stayed with the worker)."""
    engine = ShardSummary.model_validate(record.summary).engine if record.summary else None
    if engine is None:
        return
    stats.engine = stats.engine.merged(engine)


def _generate_and_commit(
    config: PipelineConfig,
    store: RunStore,
    pending: list[Shard],
    expected: dict[str, int],
    stats: AttemptStats,
    wall_start: float,
    display: RunDisplay | None,
    stop: GracefulStop,
) -> None:
    """Run the stages over the pending shards and commit each shard as its record arrives.

    In passes: a pass whose lost actors dropped some shards (:mod:`tokenskip.capacity`) is followed
    by one over just those, on whatever capacity is left. A pass that commits nothing is run again
    only while every task it dropped died with its actor (a kill, an OOM, a lost node), at most
    ``PASSES_WITHOUT_PROGRESS`` times in a row; any other error is raised. Each pass first waits
    (``resources.capacity_wait_s``) until the pools' minimum can be placed."""
    remaining = pending
    without_progress = 0
    for pass_number in itertools.count(1):
        if not stop.admit():
            raise StopRequested(stop.signal_name or "a signal")
        wait_for_capacity(pool_demands(config), config.resources.capacity_wait_s)
        with DroppedBlocks() as dropped:
            done = _commit_pass(config, store, remaining, expected, stats, wall_start, display, stop, len(pending))
        missing = [s for s in remaining if s.shard_id not in done]
        if not missing:
            return
        without_progress = 0 if done else without_progress + 1
        if without_progress and not lost_with_an_actor(dropped.errors):
            if dropped.errors:
                raise dropped.errors[0]
            break
        if without_progress >= PASSES_WITHOUT_PROGRESS:
            raise dropped.errors[0]
        log.warning(
            "pass %d: %d shards did not arrive (%d failed tasks, e.g. actors lost with a node): "
            "running them again",
            pass_number,
            len(missing),
            len(dropped.errors),
        )
        remaining = missing
    missing_ids = sorted(s.shard_id for s in remaining)
    raise RuntimeError(
        f"{len(missing_ids)} shards finished with missing rows: {missing_ids[:5]}; re-run to resume"
    )


def _commit_pass(
    config: PipelineConfig,
    store: RunStore,
    shards: list[Shard],
    expected: dict[str, int],
    stats: AttemptStats,
    wall_start: float,
    display: RunDisplay | None,
    stop: GracefulStop,
    total_shards: int,
) -> set[str]:
    """One Ray Data execution over ``shards``; returns the ids of those it committed."""
    ds = _build_dataset(config, shards, store, expected, display.board if display else None)
    tolerate_dropped_blocks(ds)
    # Shards a worker could not write whole (a split block): their rows, until complete.
    partial: dict[str, list[pa.Table]] = defaultdict(list)
    done: set[str] = set()
    batches = ds.iter_batches(batch_format="pyarrow", batch_size=None)
    try:
        for batch in batches:
            for result in batch.to_pylist():
                with stop.committing():
                    record = _commit_result(store, result, partial, expected)
                if record is None:
                    continue
                done.add(record.shard_id)
                _note_commit(stats, record, wall_start, display, total_shards)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # ends the execution (its actors) now, also when a stop ended the loop
    return done


def _commit_result(
    store: RunStore, result: dict[str, Any], partial: dict[str, list[pa.Table]], expected: dict[str, int]
) -> ShardRecord | None:
    """Commit the shard ``result`` (a write-stage output row) completes, if any."""
    shard_id = result["shard_id"]
    if result["record"] is not None:
        # A worker wrote the parts; the driver alone commits shards (the marker).
        return store.commit_shard(ShardRecord.model_validate_json(result["record"]))
    partial[shard_id].append(decode_rows(result["rows"]))
    if sum(t.num_rows for t in partial[shard_id]) < expected[shard_id]:
        return None
    return write_shard_rows(store, shard_id, pa.concat_tables(partial.pop(shard_id)))


def _note_commit(
    stats: AttemptStats, record: ShardRecord, wall_start: float, display: RunDisplay | None, total_shards: int
) -> None:
    """Account, show and log one committed shard."""
    shard_id = record.shard_id
    _account(stats, record)
    stats.shards_committed += 1
    stats.progress.append({"t": round(time.perf_counter() - wall_start, 3), "tokens": stats.engine.tokens_generated})
    if display is not None:
        display.shard_committed(ShardSummary.model_validate(record.summary) if record.summary else None)
    log_stage_event(
        "commit_shard",
        shard_id=shard_id,
        rows=sum(f.rows for f in record.files.values()),
        shards_committed=stats.shards_committed,
        shards_pending=total_shards,
        tokens=stats.engine.tokens_generated,
        t=round(time.perf_counter() - wall_start, 3),
    )
    failpoint("shard-committed")  # fault tests stop the driver at this exact boundary


def _start_display(config: PipelineConfig, pending: list[Shard], expected: dict[str, int]) -> RunDisplay:
    """The live console of this attempt, fed by a progress board the generation stage posts to. It
    replaces Ray Data's own progress bars (Ray Data's setting, for this driver)."""
    import ray


    ray.data.DataContext.get_current().enable_progress_bars = False
    display = RunDisplay(
        total_shards=len(pending), total_samples=sum(expected.values()), board=ProgressBoard.start()
    )
    display.start()
    display.engine_starting(
        model=model_name(config.engine.model),
        device=config.engine.planned_device(config.resources.generation_gpus),
        eager=config.engine.enforce_eager,
    )
    return display
