"""The write stage without Ray: whole shards are written where the rows are, partial ones go on."""

from __future__ import annotations

import pyarrow as pa

from tokenskip.schema import COMPRESSED_SCHEMA, sample_key
from tokenskip.stages.grade import SAMPLE_ROW_SCHEMA
from tokenskip.stages.write import decode_rows, shards_stay_whole, write_complete_shards
from tokenskip.storage import RunStore, ShardRecord, StorageConfig


def _rows(shard_id: str, problems: list[str], n: int = 2) -> list[dict]:
    return [
        {
            "key": sample_key(p, "g", i),
            "problem_id": p,
            "shard_id": shard_id,
            "question": f"q {p}",
            "answer": "1",
            "sample_index": i,
            "cot": "so 1. The answer is 1.",
            "gen_tokens": 7,
            "gen_seconds": 0.5,
            "status": "reject",
            "stage": "grade",
            "reason": "incorrect",
            "verdict": "incorrect",
        }
        for p in problems
        for i in range(n)
    ]


def _batch(rows: list[dict]) -> pa.Table:
    table = pa.Table.from_pylist(rows, schema=SAMPLE_ROW_SCHEMA)
    extra = {"reasoning": pa.string(), "answer_tail": pa.string(), "original_tokens": pa.int64()}
    for name, kind in extra.items():
        table = table.append_column(name, pa.nulls(table.num_rows, kind))

    table = table.append_column(
        "compressions", pa.nulls(table.num_rows, COMPRESSED_SCHEMA.field("compressions").type)
    )
    return table.append_column("compress_seconds", pa.nulls(table.num_rows, pa.float64()))


def test_whole_shards_are_written_and_partial_ones_passed_on(tmp_path):
    store = RunStore(StorageConfig(root=str(tmp_path)), "d", "r")
    whole, split = _rows("s-whole", ["p1", "p2"]), _rows("s-split", ["p3", "p4"])
    batch = _batch(whole + split[:3])  # s-split: 3 of its 4 rows
    out = write_complete_shards(batch, store=store, expected_rows={"s-whole": 4, "s-split": 4})

    results = {r["shard_id"]: r for r in out.to_pylist()}
    record = ShardRecord.model_validate_json(results["s-whole"]["record"])
    assert results["s-whole"]["rows"] is None
    assert record.problem_ids == ["p1", "p2"] and record.files["rejects"].rows == 4
    assert record.summary["engine"]["tokens_generated"] == 28
    assert store.committed_shard_ids() == []  # parts only: the driver commits from the record
    assert store.commit_shard(record) == record and store.committed_shard_ids() == ["s-whole"]
    assert store.commit_shard(record).shard_id == "s-whole"  # idempotent: same parts

    passed = decode_rows(results["s-split"]["rows"])
    assert results["s-split"]["record"] is None
    assert passed.num_rows == 3 and passed.column("key").to_pylist() == [r["key"] for r in split[:3]]


def test_shards_stay_whole_when_generation_batches_are_multiples_of_shards():
    assert shards_stay_whole(16, 64) and shards_stay_whole(4, 8) and shards_stay_whole(64, 64)
    assert not shards_stay_whole(64, 16) and not shards_stay_whole(48, 64)
