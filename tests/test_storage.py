"""Commit-based storage on a local folder and on S3 (moto on 127.0.0.1): commits, readers that follow
manifests only, rollback, retention, locks, conditional-create races and retries."""

from __future__ import annotations

import errno
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokenskip import storage
from tokenskip.schema import COMPRESSED_SCHEMA, ERROR_SCHEMA, REJECT_SCHEMA, config_hash, to_table
from tokenskip.storage import (
    AlreadyCommitted,
    CommitConflict,
    IntegrityError,
    Lock,
    LockHeld,
    NotCommitted,
    NotLockOwner,
    RunStore,
    ShardConflict,
    StorageConfig,
)

DATASET = "gsm8k-compressed"


@pytest.fixture()
def config(local_or_s3_storage) -> StorageConfig:
    return local_or_s3_storage


def data_table(keys: list[str]) -> pa.Table:
    return to_table(
        [{"key": k, "problem_id": f"p-{k}", "cot": f"cot of {k}", "sample_index": 0} for k in keys],
        COMPRESSED_SCHEMA,
    )


def reject_table(keys: list[str]) -> pa.Table:
    return to_table([{"key": k, "stage": "verify", "reason": "incorrect"} for k in keys], REJECT_SCHEMA)


def commit_run(config: StorageConfig, run_id: str, keys: list[str]) -> storage.Manifest:
    store = RunStore(config, DATASET, run_id)
    store.write_shard("0000", {"data": data_table(keys)})
    return store.commit({"config": {"run": run_id}})


def raw_write(config: StorageConfig, relative_path: str, data: bytes) -> None:
    fs, root = storage.open_filesystem(config)
    fs.pipe_file(f"{root}/{DATASET}/{relative_path}", data)
    fs.invalidate_cache()


def test_write_commit_read_back_through_manifest(config):
    store = RunStore(config, DATASET, "run-1")
    assert not store.is_committed()
    rec0 = store.write_shard("0000", {"data": data_table(["a", "b"]), "rejects": reject_table(["x"])})
    rec1 = store.write_shard("0001", {"data": data_table(["c"]), "rejects": reject_table([])})
    assert rec0.files["data"].rows == 2 and rec0.files["data"].path == "data/part-0000.parquet"
    assert set(store.committed_shard_ids()) == {"0000", "0001"}

    gen_config = {"model": "tiny", "ratios": [0.9, 0.5]}
    manifest = store.commit({"config": gen_config, "model": "tiny", "counts": {"generate": 4}, "note": "hi"})
    assert store.is_committed()
    assert manifest.config_hash == config_hash(gen_config)
    assert (
        manifest.counts == {"generate": 4} and manifest.extra == {"note": "hi"} and manifest.model == "tiny"
    )
    assert manifest.code_version.package_version == "0.1.0"
    assert manifest.rows == {"data": 3, "rejects": 1, "errors": 0}
    assert [f.path for f in manifest.files["data"]] == ["data/part-0000.parquet", "data/part-0001.parquet"]
    assert manifest.files["data"][1].sha256 == rec1.files["data"].sha256
    assert "problem_id: string not null" in manifest.schemas["data"].text

    assert storage.latest_run_id(config, DATASET) == "run-1"
    assert storage.read_manifest(config, DATASET) == manifest
    data = storage.read_table(config, DATASET)
    assert data.schema.equals(COMPRESSED_SCHEMA, check_metadata=True)
    assert data.column("key").to_pylist() == ["a", "b", "c"]
    assert storage.read_table(config, DATASET, kind="rejects").column("key").to_pylist() == ["x"]
    # No shard wrote errors: an empty table with the shared error schema, not a failure.
    errors = storage.read_table(config, DATASET, kind="errors", run_id="run-1")
    assert errors.num_rows == 0 and errors.schema.equals(ERROR_SCHEMA)

    subset = storage.read_table(config, DATASET, columns=["cot", "key"])
    assert subset.column_names == ["cot", "key"] and subset.column("cot").to_pylist()[2] == "cot of c"
    with pytest.raises(ValueError, match="unknown columns"):
        storage.read_table(config, DATASET, columns=["nope"])
    # Parallel readers get exactly the manifest's files (the stray below is not among them).
    raw_write(config, "runs/run-1/data/part-stray.parquet", b"not parquet")
    fs, paths, schema = storage.committed_files(config, DATASET)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["part-0000.parquet", "part-0001.parquet"]
    via_files = pa.concat_tables([pq.read_table(p, filesystem=fs, schema=schema) for p in paths])
    assert via_files.equals(data)


def test_latest_follows_newest_commit_and_missing_latest_is_a_clear_error(config):
    with pytest.raises(NotCommitted, match="no LATEST"):
        storage.read_table(config, DATASET)
    commit_run(config, "run-1", ["a"])
    commit_run(config, "run-2", ["b", "c"])
    assert storage.read_manifest(config, DATASET).run_id == "run-2"
    assert storage.read_table(config, DATASET).column("key").to_pylist() == ["b", "c"]
    assert storage.read_table(config, DATASET, run_id="run-1").column("key").to_pylist() == ["a"]


def test_shard_rewrite_is_idempotent_and_different_content_is_refused(config):
    store = RunStore(config, DATASET, "run-1")
    first = store.write_shard("0000", {"data": data_table(["a"])})
    again = store.write_shard("0000", {"data": data_table(["a"])})
    assert again == first  # the committed record, not a new one (same created_at)
    with pytest.raises(ShardConflict, match="different 'data' content"):
        store.write_shard("0000", {"data": data_table(["zzz"])})
    with pytest.raises(ShardConflict, match="kinds"):
        store.write_shard("0000", {"data": data_table(["a"]), "rejects": reject_table([])})
    store.commit({})
    # The refused rewrite did not touch the committed part.
    assert storage.read_table(config, DATASET).column("key").to_pylist() == ["a"]


def test_store_pickles_for_ray_workers_and_config_models_are_hashed(config):
    import pickle

    from pydantic import BaseModel

    class GenConfig(BaseModel):
        temperature: float = 0.6

    store = pickle.loads(pickle.dumps(RunStore(config, DATASET, "run-1")))
    store.write_shard("0000", {"data": data_table(["a"])})
    manifest = store.commit({"config": GenConfig()})
    assert manifest.config == {"temperature": 0.6}
    assert manifest.config_hash == config_hash({"temperature": 0.6})


def test_committed_run_is_immutable(config):
    commit_run(config, "run-1", ["a"])
    store = RunStore(config, DATASET, "run-1")
    with pytest.raises(AlreadyCommitted):
        store.commit({})
    with pytest.raises(AlreadyCommitted):
        store.write_shard("0001", {"data": data_table(["b"])})
    assert storage.read_table(config, DATASET).column("key").to_pylist() == ["a"]


def test_readers_ignore_stray_files_and_uncommitted_runs(config):
    commit_run(config, "run-1", ["a"])
    stray = pq.write_table  # a part from a crashed attempt, in the committed run's folder
    sink = pa.BufferOutputStream()
    stray(data_table(["stray"]), sink)
    raw_write(config, "runs/run-1/data/part-crashed.parquet", sink.getvalue().to_pybytes())
    # A run whose shards were written but that never committed (crash before the manifest).
    wip = RunStore(config, DATASET, "run-2")
    wip.write_shard("0000", {"data": data_table(["wip"])})
    assert not wip.is_committed()

    assert storage.read_table(config, DATASET).column("key").to_pylist() == ["a"]
    with pytest.raises(NotCommitted, match="run-2.*no manifest"):
        storage.read_table(config, DATASET, run_id="run-2")
    assert [m.run_id for m in storage.list_committed_runs(config, DATASET)] == ["run-1"]
    with pytest.raises(NotCommitted):
        storage.set_latest(config, DATASET, "run-2")
    # The stray part is not picked up by a later commit either: commits follow shard markers.
    assert [f.path for f in wip.commit({}).files["data"]] == ["data/part-0000.parquet"]


def test_reader_refuses_a_file_that_differs_from_the_manifest(config):
    manifest = commit_run(config, "run-1", ["a", "b"])
    record = manifest.files["data"][0]
    raw_write(config, f"runs/run-1/{record.path}", b"x" * record.size)  # same size, other bytes
    with pytest.raises(IntegrityError, match="sha256"):
        storage.read_table(config, DATASET)
    raw_write(config, f"runs/run-1/{record.path}", b"short")
    with pytest.raises(IntegrityError, match="bytes"):
        storage.read_table(config, DATASET)


def test_commit_refuses_a_part_lost_after_its_shard_committed(config):
    store = RunStore(config, DATASET, "run-1")
    store.write_shard("0000", {"data": data_table(["a"])})
    raw_write(config, "runs/run-1/data/part-0000.parquet", b"clobbered")
    with pytest.raises(IntegrityError, match="part-0000"):
        store.commit({})
    assert not store.is_committed()


def test_rollback_with_set_latest(config):
    commit_run(config, "run-1", ["old"])
    commit_run(config, "run-2", ["new"])
    storage.set_latest(config, DATASET, "run-1")
    assert storage.read_table(config, DATASET).column("key").to_pylist() == ["old"]
    with pytest.raises(NotCommitted):
        storage.set_latest(config, DATASET, "run-404")
    assert storage.latest_run_id(config, DATASET) == "run-1"


def test_retention_keeps_last_n_latest_and_pinned(config):
    for i in range(5):
        commit_run(config, f"r{i}", [f"k{i}"])
    RunStore(config, DATASET, "r-wip").write_shard("0000", {"data": data_table(["wip"])})
    storage.pin(config, DATASET, "r0", reason="paper results")
    storage.set_latest(config, DATASET, "r2")
    with pytest.raises(NotCommitted):
        storage.pin(config, DATASET, "r-wip")

    deleted = storage.apply_retention(config, DATASET, keep_last=1, pinned={"r1"})
    assert deleted == ["r3"]
    assert [m.run_id for m in storage.list_committed_runs(config, DATASET)] == ["r0", "r1", "r2", "r4"]
    with pytest.raises(NotCommitted):
        storage.read_table(config, DATASET, run_id="r3")
    fs, root = storage.open_filesystem(config)
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/{DATASET}/runs/r3/data/part-0000.parquet")
    # Uncommitted runs are never retention's business (they may still be in progress).
    assert {r.shard_id for r in RunStore(config, DATASET, "r-wip").iter_committed_shards()} == {"0000"}

    storage.unpin(config, DATASET, "r0")
    assert storage.pinned_runs(config, DATASET) == set()
    assert storage.apply_retention(config, DATASET, keep_last=0) == ["r0", "r1", "r4"]
    assert [m.run_id for m in storage.list_committed_runs(config, DATASET)] == ["r2"]
    assert storage.read_table(config, DATASET).column("key").to_pylist() == ["k2"]


def test_lock_acquire_held_release(config):
    a = Lock(config, DATASET, "build", ttl_s=600, owner="worker-a")
    b = Lock(config, DATASET, "build", ttl_s=600, owner="worker-b")
    info = a.acquire()
    assert info.owner == "worker-a" and info.expires_at > info.acquired_at
    with pytest.raises(LockHeld, match="worker-a") as held:
        b.acquire()
    assert held.value.holder.owner == "worker-a"
    with pytest.raises(NotLockOwner):
        b.release()
    with pytest.raises(NotLockOwner):
        b.refresh()
    assert a.holder().owner == "worker-a"
    refreshed = a.refresh()
    assert refreshed.expires_at >= info.expires_at and refreshed.acquired_at == info.acquired_at
    a.release()
    assert a.holder() is None
    with pytest.raises(NotLockOwner):
        a.release()
    with b:
        assert b.holder().owner == "worker-b"
    assert b.holder() is None


def test_expired_lock_is_taken_over_and_the_old_owner_cannot_touch_it(config):
    a = Lock(config, DATASET, "build", ttl_s=0.001, owner="worker-a")
    a.acquire()
    time.sleep(0.01)  # let the lease expire (no timing is asserted)
    b = Lock(config, DATASET, "build", ttl_s=600, owner="worker-b")
    b.acquire()
    assert b.holder().owner == "worker-b"
    with pytest.raises(NotLockOwner, match="lost"):
        a.refresh()
    with pytest.raises(NotLockOwner):
        a.release()
    assert b.holder().owner == "worker-b"
    b.release()


def run_in_threads(n: int, fn) -> list[object]:
    """Run fn(i) in n threads released together; returns each result or raised exception."""
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def target(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:  # collected and asserted on by the caller
            results[i] = exc

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_conditional_create_race_has_exactly_one_winner(config):
    backend, root = storage.backends.open_backend(config)
    path = f"{root}/{DATASET}/race/object.json"
    results = run_in_threads(6, lambda i: backend.create_exclusive(path, f"writer {i}".encode()))
    winners = [i for i, r in enumerate(results) if not isinstance(r, Exception)]
    assert len(winners) == 1, results
    assert all(isinstance(r, CommitConflict) for i, r in enumerate(results) if i != winners[0])
    assert backend.read(path) == f"writer {winners[0]}".encode()


def test_concurrent_commits_of_one_run_have_exactly_one_winner(config):
    RunStore(config, DATASET, "run-1").write_shard("0000", {"data": data_table(["a"])})
    results = run_in_threads(4, lambda i: RunStore(config, DATASET, "run-1").commit({"writer": i}))
    winners = [r for r in results if isinstance(r, storage.Manifest)]
    assert len(winners) == 1, results
    assert all(isinstance(r, AlreadyCommitted) for r in results if r is not winners[0])
    assert storage.read_manifest(config, DATASET, "run-1").extra == winners[0].extra


def test_concurrent_acquire_and_takeover_have_exactly_one_winner(config):
    results = run_in_threads(4, lambda i: Lock(config, DATASET, "fresh", ttl_s=600, owner=f"w{i}").acquire())
    assert sum(isinstance(r, storage.LockInfo) for r in results) == 1, results
    assert sum(isinstance(r, LockHeld) for r in results) == 3

    Lock(config, DATASET, "stale", ttl_s=0.001, owner="dead").acquire()
    time.sleep(0.01)
    results = run_in_threads(4, lambda i: Lock(config, DATASET, "stale", ttl_s=600, owner=f"w{i}").acquire())
    won = [r for r in results if isinstance(r, storage.LockInfo)]
    assert len(won) == 1, results
    assert sum(isinstance(r, LockHeld) for r in results) == 3
    assert Lock(config, DATASET, "stale", ttl_s=1).holder().owner == won[0].owner


def test_transient_errors_are_retried_and_conflicts_are_not(config, monkeypatch):
    backend, root = storage.backends.open_backend(config)
    real_create = backend._create
    calls = []
    # Planned failures, in order: throttled before anything was written; written but the reply lost.
    failures = [(False, OSError(errno.EBUSY, "SlowDown")), (True, TimeoutError("reply lost"))]

    def flaky_create(path, data):
        calls.append(path)
        if failures:
            write_first, exc = failures.pop(0)
            if write_first:
                real_create(path, data)
            raise exc
        return real_create(path, data)

    monkeypatch.setattr(backend, "_create", flaky_create)
    path = f"{root}/{DATASET}/retry/object.json"
    backend.create_exclusive(path, b"payload")
    # Third attempt found our own bytes from the second: success, not a conflict.
    assert len(calls) == 3 and backend.read(path) == b"payload"

    calls.clear()
    with pytest.raises(CommitConflict):
        backend.create_exclusive(path, b"other payload")
    assert len(calls) == 1  # a lost conditional create (412 on S3) is a conflict, never retried

    def always_down(path, data):
        calls.append(path)
        raise OSError(errno.EREMOTEIO, "InternalError")

    calls.clear()
    monkeypatch.setattr(backend, "_create", always_down)
    with pytest.raises(OSError, match="InternalError"):
        backend.create_exclusive(f"{root}/{DATASET}/retry/down.json", b"x")
    assert len(calls) == config.retries + 1


def test_s3_conditional_write_retries_on_5xx_but_not_on_412(tmp_path, s3_server, monkeypatch):
    import boto3
    import s3fs

    bucket = f"tokenskip-storage-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    config = StorageConfig(
        root=f"s3://{bucket}/ds", storage_options={"endpoint_url": s3_server}, backoff_s=0.001
    )
    store = RunStore(config, DATASET, "run-1")
    store.write_shard("0000", {"data": data_table(["a"])})

    real_call = s3fs.S3FileSystem.call_s3
    puts = []
    internal_errors = [OSError(errno.EREMOTEIO, "We encountered an internal error")]  # s3fs's view of a 500

    def call_s3(self, method, *args, **kwargs):
        if method == "put_object" and kwargs.get("IfNoneMatch") == "*":
            puts.append(kwargs["Key"])
            if internal_errors:
                raise internal_errors.pop()
        return real_call(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", call_s3)
    store.commit({})
    assert puts == ["ds/gsm8k-compressed/runs/run-1/_MANIFEST.json"] * 2
    puts.clear()
    with pytest.raises(CommitConflict):
        store._backend.create_exclusive(store._manifest_path, b"{}")
    assert len(puts) == 1  # the 412 was not retried


def test_generic_fsspec_filesystem_round_trip():
    config = StorageConfig(root=f"memory://tokenskip-{uuid.uuid4().hex}")
    commit_run(config, "run-1", ["a", "b"])
    assert storage.read_table(config, DATASET).column("key").to_pylist() == ["a", "b"]
    with pytest.raises(AlreadyCommitted):
        RunStore(config, DATASET, "run-1").commit({})


def test_bad_input_is_refused_clearly(tmp_path):
    config = StorageConfig(root=str(tmp_path))
    with pytest.raises(ValueError, match="run id"):
        RunStore(config, DATASET, "../escape")
    store = RunStore(config, DATASET, "run-1")
    with pytest.raises(ValueError, match="shard id"):
        store.write_shard("a/b", {"data": data_table(["a"])})
    with pytest.raises(ValueError, match="unknown kind"):
        store.write_shard("0000", {"rows": data_table(["a"])})
    with pytest.raises(TypeError, match="pyarrow.Table"):
        store.write_shard("0000", {"data": [{"key": "a"}]})
    with pytest.raises(ValueError, match="unknown kind"):
        storage.read_table(config, DATASET, kind="rows")
    with pytest.raises(ValueError):
        StorageConfig(root=str(tmp_path), retry=3)
    with pytest.raises(ValueError):
        storage.apply_retention(config, DATASET, keep_last=-1)
    assert list(store.iter_committed_shards()) == []
