"""The dataset-building job: the whole Ray Data flow in one place.

    problems (load, validate) -> dedup + decontaminate            [driver; rejects/errors kept]
    -> shards of problems (deterministic ids)                     [resume unit]
    -> GenerateStage      (vLLM actors, n samples per problem)    [Ray Data map_batches]
    -> GradeSelectStage   (verdict + selection policy)            [Ray Data map_batches]
    -> CompressKeptStage  (score once, prune at every ratio)      [Ray Data map_batches]
    -> driver groups rows by shard; a complete shard is committed (parts + marker)
    -> all shards committed -> manifest (conditional write) -> LATEST -> report

Resume: shard ids are content hashes of their problem ids, and a shard is committed atomically
(marker written after its parts). Re-running the same config recomputes the same shards and skips
the committed ones, so committed work is never generated again and every (problem, sample) key lands
exactly once.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tokenskip.config import PipelineConfig
from tokenskip.dedup import dedup_and_decontaminate
from tokenskip.generation import GenerateStage
from tokenskip.metrics import StageMetrics, log_stage_event
from tokenskip.ray_runtime import init_ray
from tokenskip.schema import (
    COMPRESSED_SCHEMA,
    ERROR_SCHEMA,
    PROBLEM_SCHEMA,
    REJECT_SCHEMA,
    config_hash,
)
from tokenskip.selection import SAMPLE_ROW_SCHEMA, GradeSelectStage
from tokenskip.sources import load_problems
from tokenskip.storage import RunStore, open_filesystem, read_manifest

log = logging.getLogger(__name__)

INPUT_SHARD = "input"


@dataclass
class Shard:
    shard_id: str
    problems: pa.Table

    @property
    def size(self) -> int:
        return self.problems.num_rows


@dataclass
class Plan:
    """What a run will do; printed by ``--dry-run``."""

    config: PipelineConfig
    run_id: str
    input_rows: int
    load_errors: pa.Table
    dedup_rejects: pa.Table
    problems: pa.Table
    shards: list[Shard]
    committed: set[str] = field(default_factory=set)
    already_committed_run: bool = False
    load_seconds: float = 0.0
    dedup_seconds: float = 0.0

    @property
    def pending(self) -> list[Shard]:
        return [s for s in self.shards if s.shard_id not in self.committed]

    def describe(self) -> str:
        c, r = self.config, self.config.resources
        pending = self.pending
        lines = [
            f"dataset {c.dataset}  run {self.run_id}  output {c.output.root}",
            f"input rows {self.input_rows}: {self.problems.num_rows} problems, {self.load_errors.num_rows} load errors, "
            f"{self.dedup_rejects.num_rows} dedup/decontamination rejects",
            f"shards {len(self.shards)} of <= {r.shard_size} problems: {len(self.shards) - len(pending)} committed, "
            f"{len(pending)} to run ({sum(s.size for s in pending)} problems x {c.sampling.n} samples)",
            "stages:",
            f"  generate   model={c.engine.model} device={c.engine.resolved_device()} actors={r.generation_actors} "
            f"cpus/actor={r.generation_cpus} gpus/actor={r.generation_gpus} batch={r.generation_batch_size} "
            f"n={c.sampling.n} T={c.sampling.temperature} max_tokens={c.sampling.max_tokens}",
            f"  grade      policy={c.selection.policy} cpus={r.grading_cpus} timeout={c.grading.timeout_s}s",
            f"  compress   scorer={c.compression.scorer.kind}:{c.compression.scorer.model} ratios={c.compression.ratios} "
            f"actors={r.compression_actors} cpus/actor={r.compression_cpus} gpus/actor={r.compression_gpus}",
            f"  write      {c.output.root}/{c.dataset}/runs/{self.run_id}/{{data,rejects,errors}}/part-<shard>.parquet",
        ]
        if self.already_committed_run:
            lines.append("this run is already committed: nothing to do")
        return "\n".join(lines)


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


def make_plan(config: PipelineConfig) -> Plan:
    """Load, validate, deduplicate and shard the problems; look up what is already committed."""
    run_id = config.resolved_run_id()
    started = time.perf_counter()
    problems, errors = [], []
    for source in config.sources:
        p, e = load_problems(source)
        problems.append(p)
        errors.append(e)
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

    kept = kept.sort_by("id")
    shards = shard_problems(kept, config.resources.shard_size)

    store = RunStore(config.output, config.dataset, run_id)
    committed_run = store.is_committed()
    committed = set(store.committed_shards()) if not committed_run else {s.shard_id for s in shards}
    return Plan(
        config=config,
        run_id=run_id,
        input_rows=all_problems.num_rows + load_errors.num_rows,
        load_errors=load_errors,
        dedup_rejects=rejects,
        problems=kept,
        shards=shards,
        committed=committed,
        already_committed_run=committed_run,
        load_seconds=load_seconds,
        dedup_seconds=dedup_seconds,
    )


class CompressKeptStage:
    """Compress the ``kept`` rows (score once, prune at every ratio); pass the others through."""

    OUT_FIELDS = [
        pa.field("reasoning", pa.string()),
        pa.field("answer_tail", pa.string()),
        pa.field("original_tokens", pa.int64()),
        COMPRESSED_SCHEMA.field("compressions"),
        pa.field("compress_seconds", pa.float64()),
    ]

    def __init__(self, compression, *, cpus: float = 0.5, omp_threads: int | None = None):
        from tokenskip.compress import Compressor
        from tokenskip.models import resolve_model
        from tokenskip.torch_thread import TorchThread

        # The scoring model is loaded and run on one thread of ours (see tokenskip.torch_thread).
        self.torch_thread = TorchThread(omp_threads, cpus, name="scorer")
        scorer = compression.scorer.model_copy(update={"model": resolve_model(compression.scorer.model)})
        compression = compression.model_copy(
            update={"scorer": scorer, "target_tokenizer": resolve_model(compression.target_tokenizer)}
            if compression.target_tokenizer
            else {"scorer": scorer}
        )
        self.compressor = self.torch_thread.run(Compressor, compression)
        self.metrics = StageMetrics()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        kept_idx = [i for i, r in enumerate(rows) if r["status"] == "kept"]
        extra: dict[int, dict[str, Any]] = {}
        started = time.perf_counter()
        if kept_idx:
            sub = {"cot": [rows[i]["cot"] for i in kept_idx]}
            try:
                out = self.torch_thread.run(self.compressor, sub)
                per_row = [{k: out[k][j] for k in out} for j in range(len(kept_idx))]
            except Exception as batch_error:
                log.warning("compression failed on a batch (%s); retrying row by row", batch_error)
                per_row = []
                for i in kept_idx:
                    try:
                        one = self.torch_thread.run(self.compressor, {"cot": [rows[i]["cot"]]})
                        per_row.append({k: one[k][0] for k in one})
                    except Exception as e:
                        per_row.append(
                            {"error": "compression_error", "error_detail": f"{type(e).__name__}: {e}"}
                        )
            for i, values in zip(kept_idx, per_row, strict=True):
                extra[i] = values
        seconds = (time.perf_counter() - started) / max(1, len(kept_idx))
        for i, values in extra.items():
            error = values.get("error") or values.get("compress_error")
            if error:
                rows[i]["status"] = "error"
                rows[i]["reason"] = str(error)
                rows[i]["detail"] = values.get("error_detail") or values.get("detail")
        columns = {
            "reasoning": [extra.get(i, {}).get("reasoning") for i in range(len(rows))],
            "answer_tail": [extra.get(i, {}).get("answer_tail") for i in range(len(rows))],
            "original_tokens": [extra.get(i, {}).get("original_tokens") for i in range(len(rows))],
            "compressions": [
                extra.get(i, {}).get("compressions") if rows[i]["status"] == "kept" else None
                for i in range(len(rows))
            ],
            "compress_seconds": [seconds if i in extra else None for i in range(len(rows))],
        }
        self.metrics.record_rows("compress", len(kept_idx))
        self.metrics.record_stage_seconds("compress", seconds * len(kept_idx))
        for i in extra:
            if rows[i]["status"] == "error":
                self.metrics.record_errors("compress", rows[i]["reason"])
        out = pa.Table.from_pylist(rows, schema=SAMPLE_ROW_SCHEMA)
        for f in self.OUT_FIELDS:
            out = out.append_column(f, pa.array(columns[f.name], type=f.type))
        return out


def split_outcomes(rows: pa.Table) -> dict[str, pa.Table]:
    """Sample rows -> the run's three tables (data, rejects, errors) with their schemas."""
    status = rows.column("status").to_pylist()
    pylist = rows.to_pylist()
    data = [r for r, s in zip(pylist, status, strict=True) if s == "kept"]
    rejects = [r | {"stage": "grade"} for r, s in zip(pylist, status, strict=True) if s == "reject"]
    errors = [
        r
        | {
            "stage": "compress" if r.get("cot") else "generate",
            "raw": json.dumps({"question": r["question"]}),
        }
        for r, s in zip(pylist, status, strict=True)
        if s == "error"
    ]
    return {
        "data": pa.Table.from_pylist(
            [{f.name: r.get(f.name) for f in COMPRESSED_SCHEMA} for r in data], schema=COMPRESSED_SCHEMA
        ),
        "rejects": pa.Table.from_pylist(
            [{f.name: r.get(f.name) for f in REJECT_SCHEMA} for r in rejects], schema=REJECT_SCHEMA
        ),
        "errors": pa.Table.from_pylist(
            [{f.name: r.get(f.name) for f in ERROR_SCHEMA} for r in errors], schema=ERROR_SCHEMA
        ),
    }


@dataclass
class AttemptStats:
    """What this attempt did (a resumed run's earlier attempts are counted from committed files)."""

    shards_committed: int = 0
    problems_generated: int = 0
    samples_generated: int = 0
    tokens_generated: int = 0
    generation_seconds: float = 0.0
    compression_seconds: float = 0.0
    wall_seconds: float = 0.0
    progress: list[dict[str, float]] = field(default_factory=list)


def _build_dataset(config: PipelineConfig, shards: list[Shard]):
    import ray

    r = config.resources
    tables = [
        s.problems.append_column("shard_id", pa.array([s.shard_id] * s.size, pa.string())) for s in shards
    ]
    ds = ray.data.from_arrow(tables)
    ds = ds.map_batches(
        GenerateStage,
        fn_constructor_kwargs={
            "engine": config.engine,
            "sampling": config.sampling,
            "prompt": config.prompt.model_dump(),
            "cpus": r.generation_cpus,
            "omp_threads": r.omp_threads,
            "max_concurrent_batches": r.generation_max_concurrent_batches,
        },
        batch_size=r.generation_batch_size,
        # Batches in flight per actor; actors restart after a dead engine and retry their batches.
        **GenerateStage.map_batches_options(
            actors=r.generation_actors,
            cpus=r.generation_cpus,
            gpus=r.generation_gpus,
            max_concurrent_batches=r.generation_max_concurrent_batches,
        ),
    )
    ds = ds.map_batches(
        GradeSelectStage,
        fn_constructor_kwargs={
            "grading": config.grading,
            "policy": config.selection.policy,
            "model": config.engine.model,
            "generation_hash": config.generation_hash(),
            "n_samples": config.sampling.n,
        },
        batch_format="pyarrow",
        concurrency=1,
        num_cpus=r.grading_cpus,
        max_restarts=-1,
        max_task_retries=-1,
    )
    ds = ds.map_batches(
        CompressKeptStage,
        fn_constructor_kwargs={
            "compression": config.compression,
            "cpus": r.compression_cpus,
            "omp_threads": r.omp_threads,
        },
        batch_size=r.compression_batch_size,
        batch_format="pyarrow",
        concurrency=r.compression_actors,
        num_cpus=r.compression_cpus,
        num_gpus=r.compression_gpus,
        max_restarts=-1,
        max_task_retries=-1,
    )
    return ds


def _read_committed(store: RunStore, kind: str, columns: list[str]) -> pa.Table:
    """The committed parts of one kind (for run statistics); reads only ``columns``."""
    fs, _ = open_filesystem(store.config)
    tables = []
    for record in store.committed_shards().values():
        file = record.files.get(kind)
        if file is None or file.rows == 0:
            continue
        with fs.open(f"{store.run_dir}/{file.path}", "rb") as f:
            table = pq.read_table(f)
        tables.append(table.select([c for c in columns if c in table.column_names]))
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})


def run_statistics(plan: Plan, store: RunStore) -> dict[str, Any]:
    """Counts per stage over every committed shard of the run (earlier attempts included)."""
    data = _read_committed(store, "data", ["problem_id", "original_tokens", "compressions", "cot"])
    rejects = _read_committed(store, "rejects", ["problem_id", "reason", "stage"])
    errors = _read_committed(store, "errors", ["problem_id", "reason", "stage"])
    reasons = Counter(rejects.column("reason").to_pylist()) if rejects.num_rows else Counter()
    error_reasons = Counter(errors.column("reason").to_pylist()) if errors.num_rows else Counter()
    input_errors = plan.load_errors.num_rows
    sample_errors = sum(error_reasons.values()) - input_errors
    dedup = (
        Counter(plan.dedup_rejects.column("reason").to_pylist()) if plan.dedup_rejects.num_rows else Counter()
    )
    grade_rejects = sum(v for k, v in reasons.items() if k not in ("duplicate", "contaminated"))
    samples = data.num_rows + grade_rejects + sample_errors
    graded = data.num_rows + grade_rejects
    ratio_sums: dict[float, list[float]] = defaultdict(list)
    if data.num_rows:
        for comps in data.column("compressions").to_pylist():
            for c in comps or []:
                ratio_sums[c["target_ratio"]].append(c["achieved_ratio"])
    kept_problems = len(set(data.column("problem_id").to_pylist())) if data.num_rows else 0
    return {
        "input_rows": plan.input_rows,
        "load_errors": input_errors,
        "dedup": {"duplicate": dedup.get("duplicate", 0), "contaminated": dedup.get("contaminated", 0)},
        "problems_to_generate": plan.problems.num_rows,
        "samples": samples,
        "graded_samples": graded,
        "kept_samples": data.num_rows,
        "kept_problems": kept_problems,
        "rejects_by_reason": dict(
            sorted((k, v) for k, v in reasons.items() if k not in ("duplicate", "contaminated"))
        ),
        "errors_by_reason": dict(sorted(error_reasons.items())),
        "acceptance_rate": round(data.num_rows / graded, 4) if graded else 0.0,
        "mean_original_tokens": round(sum(data.column("original_tokens").to_pylist()) / data.num_rows, 2)
        if data.num_rows
        else None,
        "achieved_ratio": {
            f"{k:g}": round(sum(v) / len(v), 4) for k, v in sorted(ratio_sums.items(), reverse=True)
        },
    }


def _summary_text(report: dict[str, Any]) -> str:
    s, a = report["counts"], report["attempt"]
    lines = [
        f"tokenskip run report: dataset {report['dataset']}, run {report['run_id']}",
        f"  input rows        {s['input_rows']}  (load errors {s['load_errors']}, duplicates {s['dedup']['duplicate']}, "
        f"contaminated {s['dedup']['contaminated']})",
        f"  problems          {s['problems_to_generate']} generated x n -> {s['samples']} samples",
        f"  kept              {s['kept_samples']} samples from {s['kept_problems']} problems "
        f"(acceptance {s['acceptance_rate']:.1%} of graded samples)",
        f"  rejects           {s['rejects_by_reason']}",
        f"  errors            {s['errors_by_reason']}",
        f"  achieved ratio    {s['achieved_ratio']}",
        f"  this attempt      {a['shards_committed']} shards, {a['problems_generated']} problems, "
        f"{a['tokens_generated']} tokens in {a['wall_seconds']:.1f}s ({a['tokens_per_second']:.1f} tok/s overall)",
        f"  stage wall time   load {a['load_seconds']:.1f}s, dedup {a['dedup_seconds']:.1f}s, "
        f"generate+grade+compress {a['pipeline_seconds']:.1f}s, commit {a['commit_seconds']:.1f}s",
    ]
    return "\n".join(lines)


def _write_report(config: PipelineConfig, store: RunStore, report: dict[str, Any]) -> None:
    fs, _ = open_filesystem(config.output)
    fs.pipe(f"{store.run_dir}/report.json", json.dumps(report, indent=2, default=str).encode())
    fs.pipe(f"{store.run_dir}/report.txt", (_summary_text(report) + "\n").encode())
    from tokenskip.report import write_html_report

    write_html_report(config, store, report)


def run_pipeline(
    config: PipelineConfig,
    *,
    max_shards: int | None = None,
    progress: bool = True,
    plan: Plan | None = None,
) -> dict[str, Any]:
    """Run (or resume) the job. Returns the run report.

    ``max_shards`` commits at most that many new shards in this attempt and returns without a
    manifest (a budgeted attempt); the next call with the same config goes on from there.
    """
    wall_start = time.perf_counter()
    plan = plan or make_plan(config)
    store = RunStore(config.output, config.dataset, plan.run_id)
    if plan.already_committed_run:
        manifest = read_manifest(config.output, config.dataset, plan.run_id)
        log.info("run %s is already committed; nothing to do", plan.run_id)
        return {
            "dataset": config.dataset,
            "run_id": plan.run_id,
            "committed": True,
            "counts": manifest.counts,
            "resumed": False,
        }

    # Input-stage outcomes are a shard of their own: idempotent, so re-running writes nothing new.
    input_tables = {
        "rejects": plan.dedup_rejects.cast(REJECT_SCHEMA),
        "errors": plan.load_errors.cast(ERROR_SCHEMA),
    }
    store.write_shard(INPUT_SHARD, input_tables)

    stats = AttemptStats()
    pending = plan.pending
    if max_shards is not None:
        pending = pending[:max_shards]
    pipeline_start = time.perf_counter()
    if pending:
        init_ray()
        ds = _build_dataset(config, pending)
        expected = {s.shard_id: s.size * config.sampling.n for s in pending}
        buffers: dict[str, list[pa.Table]] = defaultdict(list)
        counts: Counter = Counter()
        bar = _progress_bar(len(pending), progress)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for shard_id in set(batch.column("shard_id").to_pylist()):
                part = batch.filter(pa.compute.equal(batch.column("shard_id"), shard_id))
                buffers[shard_id].append(part)
                counts[shard_id] += part.num_rows
                if counts[shard_id] == expected[shard_id]:
                    rows = pa.concat_tables(buffers.pop(shard_id))
                    store.write_shard(shard_id, split_outcomes(rows))
                    _account(stats, rows)
                    stats.shards_committed += 1
                    stats.progress.append(
                        {"t": round(time.perf_counter() - wall_start, 3), "tokens": stats.tokens_generated}
                    )
                    bar.update(1)
                    log_stage_event(
                        "commit_shard",
                        shard_id=shard_id,
                        rows=rows.num_rows,
                        shards_committed=stats.shards_committed,
                        shards_pending=len(pending),
                        tokens=stats.tokens_generated,
                        t=round(time.perf_counter() - wall_start, 3),
                    )
        bar.close()
        missing = [s for s in expected if s in buffers or counts[s] != expected[s]]
        if missing:
            raise RuntimeError(
                f"{len(missing)} shards finished with missing rows: {missing[:5]}; re-run to resume"
            )
    pipeline_seconds = time.perf_counter() - pipeline_start

    remaining = [s for s in plan.pending if s not in pending]
    commit_start = time.perf_counter()
    counts_all = run_statistics(plan, store)
    StageMetrics().record_run_counts(counts_all)
    log_stage_event("run", run_id=plan.run_id, **counts_all)
    stats.wall_seconds = time.perf_counter() - wall_start
    attempt = {
        "shards_committed": stats.shards_committed,
        "shards_resumed": len(plan.committed & {s.shard_id for s in plan.shards}),
        "problems_generated": stats.problems_generated,
        "samples_generated": stats.samples_generated,
        "tokens_generated": stats.tokens_generated,
        "tokens_per_second": stats.tokens_generated / pipeline_seconds if pipeline_seconds > 0 else 0.0,
        "load_seconds": plan.load_seconds,
        "dedup_seconds": plan.dedup_seconds,
        "pipeline_seconds": pipeline_seconds,
        "generation_seconds": stats.generation_seconds,
        "compression_seconds": stats.compression_seconds,
        "wall_seconds": stats.wall_seconds,
        "progress": stats.progress,
    }
    report: dict[str, Any] = {
        "dataset": config.dataset,
        "run_id": plan.run_id,
        "model": config.engine.model,
        "config_hash": config.content_hash(),
        "counts": counts_all,
        "attempt": attempt,
        "committed": False,
    }
    if remaining:
        attempt["commit_seconds"] = 0.0
        report["pending_shards"] = len(remaining)
        return report
    manifest_config = config.model_dump(mode="json")
    store.commit(
        {
            "config": manifest_config,
            "config_hash": config.content_hash(),
            "model": config.engine.model,
            "counts": counts_all,
            "generation_hash": config.generation_hash(),
        }
    )
    attempt["commit_seconds"] = time.perf_counter() - commit_start
    report["committed"] = True
    _write_report(config, store, report)
    return report


def _account(stats: AttemptStats, rows: pa.Table) -> None:
    pylist = rows.select(["problem_id", "gen_tokens", "gen_seconds", "compress_seconds"]).to_pylist()
    stats.problems_generated += len({r["problem_id"] for r in pylist})
    stats.samples_generated += len(pylist)
    stats.tokens_generated += sum(r["gen_tokens"] or 0 for r in pylist)
    stats.compression_seconds += sum(r["compress_seconds"] or 0.0 for r in pylist)
    seen = set()
    for r in pylist:  # gen_seconds is per problem, repeated on each of its samples
        if r["problem_id"] not in seen:
            seen.add(r["problem_id"])
            stats.generation_seconds += r["gen_seconds"] or 0.0


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="shards committed", unit="shard")
