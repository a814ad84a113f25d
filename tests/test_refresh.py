"""Incremental scheduled refresh on moto S3 with the tiny solver model (real vLLM, real Ray Data).

Engine starts are the cost here (one per pipeline run that has problems to generate), so one test
walks the whole life of a dataset in order with two engine starts: first version, a refused refresh
(lock held), a crashed refresh, a stale lock taken over, the resumed refresh that generates only the
new problems, a refresh that only drops rows (no engine), and an up-to-date refresh.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

import tokenskip.refresh as refresh_module
from ray_jobs.refresh import main as refresh_job
from tests.tiny_pipeline import DATASET, tiny_pipeline_config, tiny_pipeline_data, tiny_source, write_problems
from tokenskip.exit_codes import ExitCode
from tokenskip.pipeline import PlanInputs, load_input, make_plan
from tokenskip.refresh import (
    IncompatibleBase,
    RefreshConfig,
    load_refresh_config,
    plan_refresh,
    read_in_progress,
    refresh,
    version_name,
)
from tokenskip.run_report import AttemptReport, RunReport
from tokenskip.schema import COMPRESSED_SCHEMA, problem_id
from tokenskip.storage import (
    Lock,
    LockHeld,
    NotCommitted,
    RunStore,
    StorageConfig,
    latest_run_id,
    list_committed_runs,
    open_filesystem,
    read_manifest,
    read_table,
)
from tokenskip.summary import RunCounts
from tokenskip.testing.tiny_models import arithmetic_problems

N_FIRST, M_ADDED = 8, 4
REPO_ROOT = Path(__file__).resolve().parents[1]


def _write_problems(path: Path, rows: list[dict]) -> Path:
    return write_problems(path, [{k: r[k] for k in ("id", "question", "answer")} for r in rows])


def _refresh_config(model: Path, problems_path: Path, output: StorageConfig, **fields) -> RefreshConfig:
    pipeline = tiny_pipeline_data(model, problems_path, output)
    pipeline.update(fields.pop("pipeline", {}))
    return RefreshConfig.model_validate({"pipeline": pipeline, **fields})


def _at(hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 1, 2, hour, minute, 0, tzinfo=timezone.utc)


def _version_tables(output: StorageConfig, run_id: str) -> dict:
    return {kind: read_table(output, DATASET, kind, run_id=run_id) for kind in ("data", "rejects", "errors")}


def _generated_problem_ids(tables: dict) -> set[str]:
    """Problem ids with rows past the input stage (kept, graded rejects, generation errors)."""
    ids = set(tables["data"].column("problem_id").to_pylist())
    for kind in ("rejects", "errors"):
        ids |= {r["problem_id"] for r in tables[kind].to_pylist() if r["stage"] not in ("dedup", "sources")}
    return ids


def _sample_keys(tables: dict) -> list[str]:
    return [
        r["key"]
        for kind in ("data", "rejects", "errors")
        for r in tables[kind].to_pylist()
        if r.get("stage") not in ("dedup", "sources")
    ]


def test_version_name_and_config_checks(tmp_path):
    assert version_name(datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone.utc)) == "v-20260304-050607"
    # Another time zone is converted to UTC first.
    from datetime import timedelta

    plus2 = timezone(timedelta(hours=2))
    assert version_name(datetime(2026, 3, 4, 1, 0, 0, tzinfo=plus2)) == "v-20260303-230000"

    output = StorageConfig(root=str(tmp_path / "out"))
    problems = _write_problems(tmp_path / "p.jsonl", arithmetic_problems()[:2])
    with pytest.raises(ValidationError, match="run_id"):
        _refresh_config(tmp_path, problems, output, pipeline={"run_id": "fixed"})
    with pytest.raises(ValidationError, match="heartbeat_s"):
        _refresh_config(tmp_path, problems, output, lock_ttl_s=60, heartbeat_s=60)
    config = _refresh_config(tmp_path, problems, output, lock_ttl_s=60)
    assert config.heartbeat_interval == 20

    # The shipped example is a valid config.
    example = load_refresh_config(str(REPO_ROOT / "tokenskip" / "configs" / "refresh_example.yaml"))
    assert example.pipeline.run_id is None and example.keep_last >= 1


def _commit_demo_run(output: StorageConfig):
    """A committed run of the demo config in ``output``, as `make demo` leaves it (its manifest
    records the config and generation hash the next refresh compares; no engine needed)."""
    from tokenskip.config import load_pipeline_config

    demo = load_pipeline_config(REPO_ROOT / "tokenskip" / "configs" / "demo.yaml")
    demo = demo.model_copy(update={"output": output})
    store = RunStore(output, demo.dataset, demo.resolved_run_id())
    store.write_shard("s-1", {"data": COMPRESSED_SCHEMA.empty_table()})
    store.commit({"config": demo.model_dump(mode="json"), "generation_hash": demo.generation_hash()})
    return demo


def test_shipped_refresh_example_extends_the_demo_run(tmp_path):
    output = StorageConfig(root=str(tmp_path / "out"))
    demo = _commit_demo_run(output)
    example = load_refresh_config(
        str(REPO_ROOT / "tokenskip" / "configs" / "refresh_example.yaml"),
        {"pipeline.output.root": output.root},
    )
    assert example.pipeline.engine.enforce_eager  # a CPU engine starts without a torch.compile
    plan = plan_refresh(example)  # raised IncompatibleBase (exit 4): n 2 vs 4, max_tokens 160 vs 192
    assert plan.base_id == demo.resolved_run_id() and plan.carries


def test_a_refused_refresh_names_each_differing_field_with_both_values(tmp_path, capsys):
    output = StorageConfig(root=str(tmp_path / "out"))
    _commit_demo_run(output)
    overrides = {
        "pipeline.output.root": output.root,
        "pipeline.sampling.n": 4,
        "pipeline.sampling.max_tokens": 192,
    }
    example = REPO_ROOT / "tokenskip" / "configs" / "refresh_example.yaml"
    with pytest.raises(IncompatibleBase) as refused:
        plan_refresh(load_refresh_config(str(example), overrides))
    message = str(refused.value)
    assert "sampling.max_tokens: LATEST 160, this config 192; sampling.n: LATEST 2, this config 4" in message
    assert "sampling.temperature" not in message  # only the fields that differ
    args = ["--config", str(example)] + [f"--set={k}={v}" for k, v in overrides.items()]
    assert refresh_job(args) == ExitCode.INCOMPATIBLE_BASE
    assert "sampling.n: LATEST 2, this config 4" in capsys.readouterr().err
    # a processing field (carried rows would be wrong) is named the same way
    with pytest.raises(
        IncompatibleBase, match=r"compression.ratios: LATEST \[0.9, 0.8, 0.7, 0.6, 0.5\], this config \[0.9\]"
    ):
        plan_refresh(
            load_refresh_config(
                str(example), {"pipeline.output.root": output.root, "pipeline.compression.ratios": [0.9]}
            )
        )


@pytest.mark.slow
def test_refresh_lifecycle_on_s3(tmp_path, tiny_solver, ray_local, s3_bucket, monkeypatch, capsys):
    endpoint, bucket = s3_bucket
    output = StorageConfig(root=f"s3://{bucket}/datasets", storage_options={"endpoint_url": endpoint})
    problems = arithmetic_problems()
    assert len(problems) == N_FIRST + M_ADDED
    ids = [problem_id("tiny", p["question"]) for p in problems]
    path = _write_problems(tmp_path / "problems.jsonl", problems[:N_FIRST])
    config = _refresh_config(tiny_solver, path, output, keep_last=1)

    # 1. First refresh: every problem is new.
    first = refresh(config, now=_at(1))
    v1 = "v-20260102-010000"
    assert first["status"] == "published" and first["version"] == v1 and first["base"] is None
    assert first["new_problems"] == N_FIRST
    assert first["problems_generated"] == N_FIRST  # problems that went through the vLLM stage
    assert latest_run_id(output, DATASET) == v1
    v1_tables = _version_tables(output, v1)
    assert _generated_problem_ids(v1_tables) == set(ids[:N_FIRST])
    assert v1_tables["data"].num_rows > 0
    assert read_manifest(output, DATASET, v1).extra["generation_hash"] == config.pipeline.generation_hash()
    assert Lock(output, DATASET, "refresh", ttl_s=60).holder() is None  # released

    # 2. Another refresh holds the lock: refused (the job exits 3), nothing changes.
    _write_problems(path, problems)  # M new problems arrive
    job_yaml = tmp_path / "refresh.yaml"
    job_yaml.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    other = Lock(output, DATASET, "refresh", ttl_s=600, owner="other-refresh")
    other.acquire()
    with pytest.raises(LockHeld, match="other-refresh"):
        refresh(config, now=_at(2))
    assert refresh_job(["--config", str(job_yaml)]) == ExitCode.LOCKED
    assert "refresh refused" in capsys.readouterr().err
    assert latest_run_id(output, DATASET) == v1
    assert read_in_progress(config.pipeline) is None  # refused before any work
    other.release()

    # Dry run: plans exactly the M new problems, writes nothing.
    assert refresh_job(["--config", str(job_yaml), "--dry-run"]) == 0
    assert f"{N_FIRST} already done in the base, {M_ADDED} new" in capsys.readouterr().out

    # 3. A refresh that crashes before its commit leaves LATEST where it was (and the lock free).
    def crash(*args, **kwargs):
        raise RuntimeError("driver died")

    monkeypatch.setattr(refresh_module, "run_pipeline", crash)
    with pytest.raises(RuntimeError, match="driver died"):
        refresh(config, now=_at(3))
    assert latest_run_id(output, DATASET) == v1
    assert [m.run_id for m in list_committed_runs(output, DATASET)] == [v1]
    assert read_in_progress(config.pipeline)["version"] == "v-20260102-030000"
    assert Lock(output, DATASET, "refresh", ttl_s=60).holder() is None
    monkeypatch.undo()

    # 4. A holder that died without releasing: its lease expires and the next refresh takes over.
    dead = Lock(output, DATASET, "refresh", ttl_s=0.05, owner="dead-refresh")
    dead.acquire()
    time.sleep(0.2)  # let the lease lapse (no timing is asserted)
    assert dead.holder().expired()

    # 5. The next refresh resumes the crashed version and generates only the M new problems.
    second = refresh(config.model_copy(update={"pinned": [v1]}), now=_at(4))
    v2 = "v-20260102-030000"
    assert second["status"] == "published" and second["resumed"] is True
    assert second["version"] == v2 and second["base"] == v1
    assert second["new_problems"] == M_ADDED and second["skipped_done_problems"] == N_FIRST
    assert second["problems_generated"] == M_ADDED
    assert latest_run_id(output, DATASET) == v2
    assert read_in_progress(config.pipeline) is None
    v2_tables = _version_tables(output, v2)
    assert _generated_problem_ids(v2_tables) == set(ids)  # N + M problems
    keys = _sample_keys(v2_tables)
    assert len(keys) == len(set(keys)) == len(ids) * config.pipeline.sampling.n
    # The previous version's rows are carried forward unchanged.
    assert set(_sample_keys(v1_tables)) <= set(keys)
    first_ids = set(ids[:N_FIRST])
    carried_rows = [r for r in v2_tables["data"].to_pylist() if r["problem_id"] in first_ids]
    assert sorted(carried_rows, key=lambda r: r["key"]) == sorted(
        v1_tables["data"].to_pylist(), key=lambda r: r["key"]
    )
    assert second["carried"]["data"] == v1_tables["data"].num_rows
    # keep_last=1, but v1 is pinned: nothing deleted.
    assert second["retention_deleted"] == []
    assert {m.run_id for m in list_committed_runs(output, DATASET)} == {v1, v2}

    # 6. A new eval set contaminates one done problem: its rows leave the dataset, nothing is
    #    generated (no engine start), and retention now deletes both older versions.
    contaminated = problems[0]
    eval_path = _write_problems(tmp_path / "eval.jsonl", [contaminated])
    dedup = {"eval_sets": [tiny_source(eval_path) | {"name": "tiny-eval"}]}
    config3 = _refresh_config(tiny_solver, path, output, keep_last=1, pipeline={"dedup": dedup})
    third = refresh(config3, now=_at(5))
    v3 = "v-20260102-050000"
    assert third["status"] == "published" and third["version"] == v3
    assert third["problems_generated"] == 0 and third["dropped_problems"] == 1
    v3_tables = _version_tables(output, v3)
    assert _generated_problem_ids(v3_tables) == set(ids) - {ids[0]}
    contamination = [r for r in v3_tables["rejects"].to_pylist() if r["reason"] == "contaminated"]
    assert [r["problem_id"] for r in contamination] == [ids[0]]
    assert third["retention_deleted"] == [v1, v2]
    fs, root = open_filesystem(output)
    lineage = json.loads(fs.cat_file(f"{root}/{DATASET}/runs/{v3}/_refresh.json"))
    assert (
        lineage["base"] == v2 and lineage["dropped_problem_ids"] == [ids[0]] and lineage["new_problems"] == 0
    )
    assert [m.run_id for m in list_committed_runs(output, DATASET)] == [v3]

    # 7. Nothing new: no version is published.
    fourth = refresh(config3, now=_at(6))
    assert fourth["status"] == "up-to-date" and fourth["problems_generated"] == 0
    assert latest_run_id(output, DATASET) == v3

    # 8. A changed generation config cannot silently extend LATEST.
    changed = config3.pipeline.model_dump(mode="json")
    changed["sampling"]["temperature"] = 0.5
    job_yaml.write_text(yaml.safe_dump(config3.model_dump(mode="json") | {"pipeline": changed}))
    assert refresh_job(["--config", str(job_yaml)]) == ExitCode.INCOMPATIBLE_BASE
    with pytest.raises(IncompatibleBase, match="generation config"):
        plan_refresh(load_refresh_config(str(job_yaml)))
    assert latest_run_id(output, DATASET) == v3


def _wait_for(condition, what: str, limit_s: float = 60.0) -> None:
    """Poll until ``condition()`` holds; the limit only guards against a hang (nothing is timed)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def _pending_report(plan, pending_shards: int) -> RunReport:
    """The report of an attempt that generated nothing and left ``pending_shards`` to do."""
    return RunReport(
        dataset=plan.config.dataset,
        run_id=plan.run_id,
        counts=RunCounts(),
        attempt=AttemptReport(),
        pending_shards=pending_shards,
    )


def test_heartbeat_renews_lease_and_detects_loss(tmp_path, monkeypatch):
    """No engine: run_pipeline is replaced by a stand-in that watches the lock while it 'works'."""
    output = StorageConfig(root=str(tmp_path / "out"))
    path = _write_problems(tmp_path / "problems.jsonl", arithmetic_problems()[:4])
    config = _refresh_config(tmp_path, path, output, lock_ttl_s=30, heartbeat_s=0.1)
    watcher = Lock(output, DATASET, "refresh", ttl_s=30, owner="watcher")
    seen = {}

    def renewing_pipeline(pipeline, *, max_shards=None, progress=True, plan=None):
        first = watcher.holder()
        _wait_for(lambda: watcher.holder().expires_at > first.expires_at, "a lease renewal")
        seen["owner"] = first.owner
        seen["problems"] = plan.problems.num_rows
        return _pending_report(plan, len(plan.pending))

    monkeypatch.setattr(refresh_module, "run_pipeline", renewing_pipeline)
    result = refresh(config, now=_at(1))
    assert result["status"] == "pending" and result["pending_shards"] == 1
    assert seen["problems"] == 4 and seen["owner"] == result["lock"]["owner"]
    assert result["lock"]["heartbeats"] >= 1 and "lost" not in result["lock"]
    assert watcher.holder() is None  # released after the work
    assert read_in_progress(config.pipeline)["version"] == "v-20260102-010000"  # resumable
    lineage = json.loads(
        (tmp_path / "out" / DATASET / "runs" / "v-20260102-010000" / "_refresh.json").read_text()
    )
    assert lineage["base"] is None and lineage["new_problems"] == 4 and lineage["dropped_problem_ids"] == []

    # Someone else takes the lock while we work (our lease was judged dead): the heartbeat notices,
    # and the refresh neither releases their lock nor applies retention.
    def stolen_pipeline(pipeline, *, max_shards=None, progress=True, plan=None):
        lock_path = tmp_path / "out" / DATASET / "_locks" / "refresh.json"
        info = json.loads(lock_path.read_text())
        lock_path.write_text(json.dumps(info | {"owner": "thief", "nonce": "stolen"}))
        beating = lambda: any(t.name == "refresh-heartbeat-refresh" for t in threading.enumerate())  # noqa: E731
        _wait_for(lambda: not beating(), "the heartbeat to notice and stop")
        return _pending_report(plan, 1)

    monkeypatch.setattr(refresh_module, "run_pipeline", stolen_pipeline)
    result = refresh(config, now=_at(2))
    assert "thief" not in result["lock"]["owner"] and result["lock"]["lost"]
    assert watcher.holder().owner == "thief"  # left alone


def test_planner_builds_a_refresh_plan_from_its_inputs(tmp_path):
    """No engine: what a refresh knows (problems and shards carried from the base, the minimum of
    kept samples) goes into the one planner, and the Plan it makes says so; nothing edits it after."""
    output = StorageConfig(root=str(tmp_path / "out"))
    path = _write_problems(tmp_path / "problems.jsonl", arithmetic_problems()[:8])
    config = tiny_pipeline_config(tmp_path, path, output).model_copy(update={"run_id": "v-new"})
    loaded = load_input(config)
    ids = sorted(loaded.problems.column("id").to_pylist())
    assert len(ids) == 8
    # A shard carried from the base is already in the version's folder: not this plan's work.
    RunStore(output, DATASET, "v-new").write_shard("s-carried", {"data": COMPRESSED_SCHEMA.empty_table()})

    plan = make_plan(
        config,
        PlanInputs(
            loaded=loaded,
            carried_problem_ids=frozenset(ids[:3]),
            carried_shard_ids=frozenset({"s-carried"}),
            min_kept_samples=7,
        ),
    )
    assert plan.run_id == "v-new" and plan.config is config
    assert plan.problems.column("id").to_pylist() == ids[3:]
    assert [s.size for s in plan.shards] == [4, 1]  # shard_size 4 over the 5 new problems
    assert plan.pending == plan.shards and plan.committed == frozenset()
    assert "s-carried" not in {s.shard_id for s in plan.shards}
    assert plan.min_kept_samples == 7
    assert plan.input_rows == loaded.input_rows and plan.dedup_rejects is loaded.dedup_rejects
    # Without the carried inputs the same folder and sources plan every problem.
    plain = make_plan(config.model_copy(update={"run_id": "v-other"}), PlanInputs(loaded=loaded))
    assert plain.problems.num_rows == 8 and plain.min_kept_samples == 1
    with pytest.raises(ValueError, match="min_kept_samples must be >= 1"):
        make_plan(config, PlanInputs(loaded=loaded, min_kept_samples=0))


def test_plan_resumes_only_the_same_work(tmp_path, monkeypatch):
    """No engine: an unfinished version is resumed (its committed shards skipped) only while the
    planned work is unchanged; otherwise a new version starts and the old folder stays unpublished."""
    output = StorageConfig(root=str(tmp_path / "out"))
    problems = arithmetic_problems()
    path = _write_problems(tmp_path / "problems.jsonl", problems[:8])
    config = _refresh_config(tmp_path, path, output)

    def budget_spent(pipeline, *, max_shards=None, progress=True, plan=None):
        # As if the pipeline committed its first shard and then the driver died.
        RunStore(pipeline.output, pipeline.dataset, plan.run_id).write_shard(
            plan.shards[0].shard_id, {"data": COMPRESSED_SCHEMA.empty_table()}
        )
        raise RuntimeError("driver died")

    monkeypatch.setattr(refresh_module, "run_pipeline", budget_spent)
    with pytest.raises(RuntimeError, match="driver died"):
        refresh(config, now=_at(1))
    with pytest.raises(NotCommitted):
        latest_run_id(output, DATASET)

    again = plan_refresh(config, now=_at(2))
    assert again.resumed and again.version == "v-20260102-010000"
    assert [s.size for s in again.plan.shards] == [4, 4]
    assert [s.shard_id for s in again.plan.pending] == [again.plan.shards[1].shard_id]

    # New problems arrived: the planned shards differ, so a new version starts from scratch.
    _write_problems(path, problems)
    changed = plan_refresh(config, now=_at(3))
    assert not changed.resumed and changed.version == "v-20260102-030000"
    assert len(changed.plan.pending) == len(changed.plan.shards) == 3
    assert "unfinished refresh (v-20260102-010000)" in changed.describe()
    # Within the same second as the abandoned attempt, the new version gets the next free name.
    same_second = plan_refresh(config, now=_at(1))
    assert not same_second.resumed and same_second.version == "v-20260102-010001"
