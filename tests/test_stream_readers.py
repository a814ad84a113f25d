"""Streaming readers (iter_batches, read_dataset) and run side files, on a local folder and on S3
(moto on 127.0.0.1): they read exactly the manifest's files, each checked, and nothing else."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tokenskip import storage
from tokenskip.schema import COMPRESSED_SCHEMA, REJECT_SCHEMA, to_table
from tokenskip.storage import IntegrityError, RunStore, StorageConfig

DATASET = "streamed"


@pytest.fixture()
def config(local_or_s3_storage) -> StorageConfig:
    return local_or_s3_storage


def data_table(shard: int, rows: int) -> pa.Table:
    return to_table(
        [
            {"key": f"k{shard}-{i}", "problem_id": f"p{shard}-{i // 2}", "cot": "step " * (i + 1),
             "original_tokens": i + 1, "compressions": [{"target_ratio": 0.5, "text": "s", "tokens": 1,
                                                         "achieved_ratio": 1 / (i + 1)}]}
            for i in range(rows)
        ],
        COMPRESSED_SCHEMA,
    )  # fmt: skip


def commit_run(config: StorageConfig, run_id: str = "r1", shards=(5, 0, 12, 7)) -> RunStore:
    store = RunStore(config, DATASET, run_id)
    for i, rows in enumerate(shards):
        tables = {"data": data_table(i, rows)}
        if i == 1:
            tables["rejects"] = to_table(
                [{"key": "x", "stage": "grade", "reason": "incorrect"}], REJECT_SCHEMA
            )
        store.write_shard(f"s-{i:02d}", tables)
    store.commit({"counts": {}})
    return store


def raw_path(config: StorageConfig, run_id: str, relative: str) -> tuple[object, str]:
    fs, root = storage.open_filesystem(config)
    return fs, f"{root}/{DATASET}/runs/{run_id}/{relative}"


def test_iter_batches_equals_read_table_file_by_file(config):
    commit_run(config)
    table = storage.read_table(config, DATASET)
    batches = list(storage.iter_batches(config, DATASET, batch_size=4))
    assert all(isinstance(b, pa.RecordBatch) and 0 < b.num_rows <= 4 for b in batches)
    assert pa.Table.from_batches(batches).equals(table)
    assert batches[0].schema.equals(COMPRESSED_SCHEMA, check_metadata=True)  # the manifest's schema
    subset = list(storage.iter_batches(config, DATASET, columns=["original_tokens", "key"]))
    assert subset[0].schema.names == ["original_tokens", "key"]
    assert pa.Table.from_batches(subset).column("key").to_pylist() == table.column("key").to_pylist()
    rejects = pa.Table.from_batches(list(storage.iter_batches(config, DATASET, "rejects")))
    assert rejects.column("reason").to_pylist() == ["incorrect"]
    assert list(storage.iter_batches(config, DATASET, "errors")) == []  # a kind no shard wrote
    with pytest.raises(ValueError, match="unknown columns"):
        next(storage.iter_batches(config, DATASET, columns=["nope"]))


def test_iter_batches_reads_only_the_manifest_files(config):
    commit_run(config)
    expected = storage.read_table(config, DATASET).column("key").to_pylist()
    fs, stray = raw_path(config, "r1", "data/part-stray.parquet")
    sink = pa.BufferOutputStream()
    pa.parquet.write_table(data_table(99, 3), sink)
    fs.pipe_file(stray, sink.getvalue().to_pybytes())  # a crashed attempt's part: not in the manifest
    fs.invalidate_cache()
    streamed = [
        k for b in storage.iter_batches(config, DATASET, columns=["key"]) for k in b.column("key").to_pylist()
    ]
    assert streamed == expected


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_iter_batches_refuses_a_damaged_file_before_yielding_its_rows(config, damage):
    commit_run(config)
    manifest = storage.read_manifest(config, DATASET)
    third = manifest.files["data"][2]  # the 12-row part; the two before it are fine
    fs, path = raw_path(config, "r1", third.path)
    data = bytearray(fs.cat_file(path))
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        fs.pipe_file(path, bytes(data))
    elif damage == "truncate":
        fs.pipe_file(path, bytes(data[:-10]))
    else:
        fs.rm_file(path)
    fs.invalidate_cache()
    seen = []
    with pytest.raises(
        IntegrityError, match={"flip": "sha256", "truncate": "bytes", "delete": "missing"}[damage]
    ):
        for batch in storage.iter_batches(config, DATASET, batch_size=100):
            seen.append(batch.num_rows)
    assert seen == [5]  # the good first part was read; nothing of the damaged one was


def test_read_run_file_and_write_file(config):
    store = commit_run(config)
    path = store.write_file("report.json", b'{"a": 1}')
    assert path.endswith(f"{DATASET}/runs/r1/report.json")
    store.write_file("report.json", b'{"a": 2}')  # overwrite (atomic): readers see old or new
    assert storage.read_run_file(config, DATASET, "report.json") == b'{"a": 2}'
    assert storage.read_run_file(config, DATASET, "report.json", run_id="r1") == b'{"a": 2}'
    assert store.read_file("report.json") == b'{"a": 2}'
    for bad in ("_MANIFEST.json", "data", "_shards", "../x", "a/b", ""):
        with pytest.raises(ValueError):
            store.write_file(bad, b"x")
    with pytest.raises(FileNotFoundError):
        storage.read_run_file(config, DATASET, "report.html")
    with pytest.raises(storage.NotCommitted):
        storage.read_run_file(config, DATASET, "report.json", run_id="r-missing")


def test_markers_are_walked_a_chunk_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(storage.runs, "_MARKER_CHUNK", 2)  # RunStore reads it from its module
    config = StorageConfig(root=str(tmp_path))
    store = commit_run(config, shards=(1, 2, 3, 4, 5))
    assert store.committed_shard_ids() == [f"s-{i:02d}" for i in range(5)]
    assert [r.shard_id for r in store.iter_committed_shards()] == store.committed_shard_ids()
    manifest = storage.read_manifest(config, DATASET)
    assert manifest.shards == store.committed_shard_ids() and manifest.rows["data"] == 15


def test_shard_summary_round_trips_through_the_marker(tmp_path):
    from tokenskip.summary import ShardSummary

    store = RunStore(StorageConfig(root=str(tmp_path)), DATASET, "r1")
    tables = {"data": data_table(0, 6)}
    summary = ShardSummary.from_tables(tables)
    record = store.write_shard("s-00", tables, summary=summary)
    (committed,) = store.iter_committed_shards()
    assert committed.shard_id == "s-00"
    assert committed.summary == summary.model_dump(mode="json") == record.summary
    again = store.write_shard("s-00", tables)  # idempotent rewrite keeps the committed summary
    assert again.summary == record.summary
    with pytest.raises(TypeError):
        store.write_shard("s-01", tables, summary="not a dict")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ray_one_cpu():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow  # starts Ray (Ray Data)
def test_read_dataset_equals_read_table(tmp_path, ray_one_cpu):
    config = StorageConfig(root=str(tmp_path / "store"))
    commit_run(config)
    fs, stray = raw_path(config, "r1", "data/part-stray.parquet")
    sink = pa.BufferOutputStream()
    pa.parquet.write_table(data_table(99, 3), sink)
    fs.pipe_file(stray, sink.getvalue().to_pybytes())  # not in the manifest: must not be read

    table = storage.read_table(config, DATASET)
    ds = storage.read_dataset(config, DATASET)
    assert ds.count() == table.num_rows
    assert sorted(r["key"] for r in ds.take_all()) == sorted(table.column("key").to_pylist())
    keys = storage.read_dataset(config, DATASET, columns=["key"]).to_arrow_refs()
    got = pa.concat_tables(ray_one_cpu.get(keys))
    assert got.column_names == ["key"] and sorted(got.column("key").to_pylist()) == sorted(
        table.column("key").to_pylist()
    )
    assert storage.read_dataset(config, DATASET, "errors").count() == 0

    manifest = storage.read_manifest(config, DATASET)
    fs.pipe_file(raw_path(config, "r1", manifest.files["data"][0].path)[1], b"short")
    with pytest.raises(IntegrityError, match="bytes"):
        storage.read_dataset(config, DATASET)
