"""Write stage: the last Ray Data step, run by Ray workers, so the driver never holds a shard's rows.

Each batch that reaches it holds the sample rows of one or more shards (a shard stays whole through
the pipeline when ``generation_batch_size`` is a multiple of ``shard_size``, see
:func:`shards_stay_whole`). For every shard the batch holds completely, the worker writes its parts
(:func:`tokenskip.pipeline.write_shard_parts`: deterministic names) and emits one small row: the
shard's record, summary and problem ids included. The driver commits the shard by creating its
marker from that record (conditional create): parts first, then the marker, and one committer, so a
driver that stops after a shard has committed exactly the shards it acknowledged. Rows of a shard the batch holds only part of (a block Ray split) go on to the driver
unwritten, and the driver assembles and writes that shard itself: correct either way, cheap in the
usual case.

Output rows (:data:`WRITE_RESULT_SCHEMA`): ``shard_id``, ``record`` (the ShardRecord as JSON, or
null) and ``rows`` (the partial shard's rows as Arrow IPC, or null).

A worker that dies after a shard's parts leaves parts that no marker lists: invisible to readers,
overwritten (same names) when Ray retries the task.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from tokenskip.storage import RunStore

__all__ = ["WRITE_RESULT_SCHEMA", "decode_rows", "shards_stay_whole", "write_complete_shards"]

WRITE_RESULT_SCHEMA = pa.schema(
    [
        pa.field("shard_id", pa.string()),
        pa.field("record", pa.string(), metadata={"doc": "ShardRecord JSON of a shard written here"}),
        pa.field("rows", pa.binary(), metadata={"doc": "Arrow IPC of a partial shard's rows"}),
    ]
)


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


def write_complete_shards(batch: pa.Table, *, store: RunStore, expected_rows: dict[str, int]) -> pa.Table:
    """``map_batches`` function: write the parts of each shard ``batch`` holds completely (the driver
    commits them from the records); pass the rest on.

    ``expected_rows``: shard id -> its sample rows (problems x n), for this attempt's shards.
    """
    from tokenskip.pipeline import write_shard_parts

    results = []
    shard_ids = batch.column("shard_id")
    for shard_id in pc.unique(shard_ids).to_pylist():
        rows = batch.filter(pc.equal(shard_ids, shard_id))
        if rows.num_rows == expected_rows[shard_id]:
            record = write_shard_parts(store, shard_id, rows)
            results.append({"shard_id": shard_id, "record": record.model_dump_json(), "rows": None})
        else:
            results.append({"shard_id": shard_id, "record": None, "rows": _encode(rows)})
    return pa.Table.from_pylist(results, schema=WRITE_RESULT_SCHEMA)
