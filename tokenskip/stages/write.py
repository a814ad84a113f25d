"""Write stage: the last Ray Data step, run by Ray workers, so the driver never holds a shard's rows.

Each batch that reaches it holds the sample rows of one or more shards (a shard stays whole through
the pipeline when ``generation_batch_size`` is a multiple of ``shard_size``, see
:func:`shards_stay_whole`). For every shard the batch holds completely, the worker writes its parts
(:func:`write_shard_parts`: deterministic names) and emits one small row: the shard's record,
summary and problem ids included. The driver commits the shard by creating its marker from that
record (conditional create): parts first, then the marker, and one committer, so a driver that
stops after a shard has committed exactly the shards it acknowledged. Rows of a shard the batch
holds only part of (a block Ray split) go on to the driver unwritten, and the driver assembles and
writes that shard itself (:func:`write_shard_rows`): correct either way, cheap in the usual case.

Input: the compress stage's rows (:data:`INPUT_SCHEMA`). Output rows (:data:`OUTPUT_SCHEMA`):
``shard_id``, ``record`` (the ShardRecord as JSON, or null) and ``rows`` (the partial shard's rows
as Arrow IPC, or null). :func:`split_outcomes` is where sample rows become the run's three tables
(data, rejects, errors).

A worker that dies after a shard's parts leaves parts that no marker lists: invisible to readers,
overwritten (same names) when Ray retries the task.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from tokenskip.schema import (
    COMPRESSED_SCHEMA,
    ERROR_SCHEMA,
    ERROR_STAGES,
    REJECT_SCHEMA,
    REJECT_STAGES,
    WRITE_STAGE,
)
from tokenskip.stages import compress
from tokenskip.stages.contract import StageContract, check_fields
from tokenskip.storage import RunStore, ShardRecord
from tokenskip.summary import ShardSummary

if TYPE_CHECKING:
    from tokenskip.config import PipelineConfig

__all__ = [
    "CONTRACT",
    "INPUT_SCHEMA",
    "STAGE",
    "OUTPUT_SCHEMA",
    "WRITE_RESULT_SCHEMA",
    "decode_rows",
    "map_batches_args",
    "shards_stay_whole",
    "split_outcomes",
    "write_complete_shards",
    "write_shard_parts",
    "write_shard_rows",
]

STAGE = WRITE_STAGE

INPUT_SCHEMA = compress.OUTPUT_SCHEMA

OUTPUT_SCHEMA = WRITE_RESULT_SCHEMA = pa.schema(
    [
        pa.field("shard_id", pa.string()),
        pa.field("record", pa.string(), metadata={"doc": "ShardRecord JSON of a shard written here"}),
        pa.field("rows", pa.binary(), metadata={"doc": "Arrow IPC of a partial shard's rows"}),
    ]
)

CONTRACT = StageContract("write", INPUT_SCHEMA, OUTPUT_SCHEMA)


def shards_stay_whole(shard_size: int, generation_batch_size: int) -> bool:
    """Whether generation batches keep shards whole: the batcher cuts consecutive shard blocks into
    batches of ``generation_batch_size`` problems, which falls on shard boundaries when it is a
    multiple of ``shard_size`` (every shard but the last is full). Later stages take whole blocks."""
    return generation_batch_size % shard_size == 0


def _encode(rows: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rows.schema) as writer:
        writer.write_table(rows)
    return sink.getvalue().to_pybytes()


def decode_rows(data: bytes) -> pa.Table:
    """The rows a write result carried to the driver."""
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def split_outcomes(rows: pa.Table) -> dict[str, pa.Table]:
    """Sample rows -> the run's three tables with their schemas: ``data`` (kept, compressed),
    ``rejects`` and ``errors``, each row with the ``stage`` the stage that made it wrote. A reject or
    error row whose stage is not one the schema declares for it is a stage's bug: it raises."""
    data, rejects, errors = [], [], []
    for r in rows.to_pylist():
        if r["status"] == "kept":
            data.append(r)
        elif r["status"] == "reject":
            _check_stage(r, REJECT_STAGES)
            rejects.append(r)
        elif r["status"] == "error":
            _check_stage(r, ERROR_STAGES)
            errors.append(r | {"raw": json.dumps({"question": r["question"]})})
        else:
            raise ValueError(f"sample row {r['key']!r} has unknown status {r['status']!r}")
    return {
        "data": _table(data, COMPRESSED_SCHEMA),
        "rejects": _table(rejects, REJECT_SCHEMA),
        "errors": _table(errors, ERROR_SCHEMA),
    }


def _check_stage(row: dict[str, Any], stages: tuple[str, ...]) -> None:
    if row["stage"] not in stages:
        raise ValueError(
            f"sample row {row['key']!r} ({row['status']}) has stage {row['stage']!r}, "
            f"expected one of {', '.join(stages)}"
        )


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


def _shard_outcomes(rows: pa.Table, problem_ids: list[str] | None):
    tables = split_outcomes(rows)
    if problem_ids is None:
        problem_ids = sorted(set(rows.column("problem_id").to_pylist()))
    return tables, ShardSummary.from_tables(tables, samples=rows), problem_ids


def write_shard_parts(store: RunStore, shard_id: str, rows: pa.Table) -> ShardRecord:
    """One complete shard's sample rows -> its three parts, written; the record (with the shard's
    summary and problem ids) for the driver to commit. Runs in the write stage's workers."""
    tables, summary, problem_ids = _shard_outcomes(rows, None)
    return store.write_parts(shard_id, tables, summary=summary, problem_ids=problem_ids)


def write_shard_rows(
    store: RunStore, shard_id: str, rows: pa.Table, problem_ids: list[str] | None = None
) -> ShardRecord:
    """Split one complete shard's sample rows into its three tables and commit them with their
    summary (so end-of-run statistics read the marker, not the parts) and the problems they hold.
    The driver's way for a shard no worker held whole."""
    tables, summary, problem_ids = _shard_outcomes(rows, problem_ids)
    return store.write_shard(shard_id, tables, summary=summary, problem_ids=problem_ids)


def write_complete_shards(batch: pa.Table, *, store: RunStore, expected_rows: dict[str, int]) -> pa.Table:
    """``map_batches`` function: write the parts of each shard ``batch`` holds completely (the driver
    commits them from the records); pass the rest on.

    ``expected_rows``: shard id -> its sample rows (problems x n), for this attempt's shards.
    """
    check_fields(batch.schema, INPUT_SCHEMA, STAGE)
    results = []
    shard_ids = batch.column("shard_id")
    for shard_id in pc.unique(shard_ids).to_pylist():
        rows = batch.filter(pc.equal(shard_ids, shard_id))
        if rows.num_rows == expected_rows[shard_id]:
            record = write_shard_parts(store, shard_id, rows)
            results.append({"shard_id": shard_id, "record": record.model_dump_json(), "rows": None})
        else:
            results.append({"shard_id": shard_id, "record": None, "rows": _encode(rows)})
    return pa.Table.from_pylist(results, schema=OUTPUT_SCHEMA)


def map_batches_args(
    config: PipelineConfig, store: RunStore, expected_rows: dict[str, int]
) -> dict[str, Any]:
    """``Dataset.map_batches`` arguments that run this stage for ``store``'s run."""
    return {
        "fn": write_complete_shards,
        "fn_kwargs": {"store": store, "expected_rows": expected_rows},
        "batch_size": None,
        "batch_format": "pyarrow",
        "num_cpus": config.resources.write_cpus,
        "max_retries": -1,  # a worker that died mid-write: the task runs again (same part names)
    }
