"""Workers write the data: a worker that dies between a shard's parts and its commit marker.

The write stage runs in Ray workers. A failpoint (tokenskip.failpoints, set for the workers only)
SIGKILLs the first worker that has written a shard's parts, before its marker: Ray runs the task
again, the parts are rewritten under the same names, the marker lands once, and every (problem,
sample) key is in the run exactly once. The driver never wrote a shard itself.
"""

from __future__ import annotations

import pytest

from tests.tiny_pipeline import expected_keys, tiny_pipeline_config, tiny_problems, write_problems
from tokenskip import pipeline
from tokenskip.failpoints import ENV
from tokenskip.storage import StorageConfig, read_manifest, read_table

pytestmark = pytest.mark.slow


@pytest.fixture()
def ray_with_failpoint(tmp_path):
    import ray

    token = tmp_path / "write-died.token"
    assert not ray.is_initialized()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {ENV: f"shard-parts-written={token}"}},
    )
    yield token
    ray.shutdown()


def test_a_worker_dying_after_a_shards_parts_redoes_that_shard(
    tmp_path, tiny_solver, ray_with_failpoint, monkeypatch
):
    token = ray_with_failpoint
    problems = tiny_problems()
    path = write_problems(tmp_path / "problems.jsonl", problems)
    output = StorageConfig(root=str(tmp_path / "out"))
    config = tiny_pipeline_config(tiny_solver, path, output)

    driver_writes = []
    write_shard_rows = pipeline.write_shard_rows
    monkeypatch.setattr(
        pipeline,
        "write_shard_rows",
        lambda *a, **kw: driver_writes.append(a[1]) or write_shard_rows(*a, **kw),
    )
    report = pipeline.run_pipeline(config, progress=False)

    assert token.exists(), "the failpoint never fired: no worker died mid-write"
    assert report.committed is True and report.attempt.shards_committed == 3
    assert driver_writes == []  # every shard was written by a worker
    tables = {k: read_table(output, "tiny-arith", k) for k in ("data", "rejects", "errors")}
    keys = [key for t in tables.values() for key in t.column("key").to_pylist()]
    assert len(keys) == len(set(keys)), "a (problem, sample) key landed twice"
    assert set(keys) == expected_keys(config), "a (problem, sample) key is missing"
    manifest = read_manifest(output, "tiny-arith")
    assert manifest.counts["samples"] == 12 * 2 and len(manifest.shards) == 4  # 3 + the input shard
