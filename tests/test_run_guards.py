"""A committed dataset is never wrong and never empty by accident.

Resume across a changed ``shard_size`` (no sample twice), no LATEST for a run with no problems or no
kept samples, refresh that refuses a shrunken version, storage commands that need what they act on,
a run lease that refuses a second writer before any engine starts, and one clear line (exit 2) for
user errors. Only the resume and zero-kept tests start engines; the rest never reach one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from ray_jobs.refresh import main as refresh_job
from tests.tiny_pipeline import expected_keys, tiny_pipeline_config, tiny_problems, write_problems
from tokenskip import cli
from tokenskip.config import PipelineConfig
from tokenskip.exit_codes import ExitCode
from tokenskip.pipeline import make_plan, run_pipeline
from tokenskip.refresh import RefreshConfig, refresh
from tokenskip.schema import COMPRESSED_SCHEMA, problem_id, sample_key, to_table
from tokenskip.storage import (
    DuplicateKeys,
    Lock,
    LockHeld,
    NotCommitted,
    RunStore,
    StorageConfig,
    latest_run_id,
    read_manifest,
    read_table,
)

DATASET = "tiny-arith"


def _config_file(tmp_path: Path, config: PipelineConfig, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def _run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def _report(output: StorageConfig, run_id: str) -> dict:
    return json.loads((Path(output.root) / DATASET / "runs" / run_id / "report.json").read_text())


# --------------------------------------------------------------------------------------------------
# Resume by problem, and nothing published without kept samples (engines)


@pytest.mark.slow
def test_resume_after_shard_size_change_then_an_all_wrong_run_is_not_published(
    tmp_path, tiny_solver, ray_local, capsys
):
    path = write_problems(tmp_path / "problems.jsonl", tiny_problems())
    output = StorageConfig(root=str(tmp_path / "out"))
    small = tiny_pipeline_config(tiny_solver, path, output)  # shard_size 4: shards of 4, 4, 4
    first = run_pipeline(small, max_shards=1, progress=False)
    assert first.committed is False and first.attempt.problems_generated == 4

    # Resources are not in the run id: the re-run with shards of 8 resumes the same run.
    resources = small.resources.model_copy(update={"shard_size": 8, "generation_batch_size": 4})
    large = small.model_copy(update={"resources": resources})
    assert large.resolved_run_id() == small.resolved_run_id()
    plan = make_plan(large)
    assert sum(s.size for s in plan.pending) == 8  # the 4 committed problems are not planned again
    second = run_pipeline(large, plan=plan, progress=False)
    assert second.committed is True
    assert second.attempt.problems_generated == 8
    assert second.counts.samples == 12 * 2

    tables = {k: read_table(output, DATASET, k) for k in ("data", "rejects", "errors")}
    keys = [k for t in tables.values() for k in t.column("key").to_pylist()]
    assert len(keys) == len(set(keys)) and set(keys) == expected_keys(large)
    good_run = latest_run_id(output, DATASET)

    # Every gold answer wrong: nothing is kept, so the run is refused and LATEST stays on the good run.
    wrong = [p | {"answer": "-424242"} for p in tiny_problems()]
    wrong_config = tiny_pipeline_config(
        tiny_solver,
        write_problems(tmp_path / "wrong.jsonl", wrong),
        output,
        sampling={"n": 1, "temperature": 0.0, "max_tokens": 64},
    )
    code, err = _run_cli(
        ["run", "--no-progress", "--config", str(_config_file(tmp_path, wrong_config))], capsys
    )
    assert code == ExitCode.REFUSED
    refusal = [line for line in err.splitlines() if line.startswith("tokenskip run:")]
    assert len(refusal) == 1 and "0 kept samples of 12" in refusal[0] and "incorrect 12" in refusal[0]
    run_id = wrong_config.resolved_run_id()
    assert latest_run_id(output, DATASET) == good_run
    with pytest.raises(NotCommitted):
        read_manifest(output, DATASET, run_id)
    report = _report(output, run_id)
    assert report["committed"] is False and report["refused"].startswith("0 kept samples")
    assert report["counts"]["rejects_by_reason"] == {"incorrect": 12}
    assert (Path(output.root) / DATASET / "runs" / run_id / "report.html").exists()


# --------------------------------------------------------------------------------------------------
# No engine from here on


def test_commit_refuses_two_shards_holding_one_problem(tmp_path):
    output = StorageConfig(root=str(tmp_path / "out"))
    store = RunStore(output, DATASET, "run-x")
    rows = lambda pids: to_table(  # noqa: E731
        [{"key": sample_key(p, "g", 0), "problem_id": p} for p in pids], COMPRESSED_SCHEMA
    )
    store.write_shard("s-a", {"data": rows(["p1", "p2"])}, problem_ids=["p1", "p2"])
    store.write_shard("s-b", {"data": rows(["p2", "p3"])}, problem_ids=["p2", "p3"])
    with pytest.raises(DuplicateKeys, match="'p2'"):
        store.commit({"counts": {}})
    assert not store.is_committed()
    with pytest.raises(NotCommitted):
        latest_run_id(output, DATASET)


@pytest.fixture()
def empty_inputs(tmp_path) -> dict[str, dict]:
    """Sources that load 0 problems, each as a source config block."""
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(bytes(range(256)) * 8)
    wrong_columns = tmp_path / "wrong.jsonl"
    wrong_columns.write_text(
        "".join(json.dumps({"q": p["question"], "a": p["answer"]}) + "\n" for p in tiny_problems())
    )
    limited = write_problems(tmp_path / "limited.jsonl", tiny_problems())
    fields = {"question": "question", "answer": "answer", "id": "id", "metadata": []}

    def block(path, **kw):
        return {
            "path": str(path),
            "kind": "custom",
            "name": "tiny",
            "field_map": fields,
            **kw,
        }

    return {
        "empty": block(empty),
        "binary": block(binary),
        "wrong columns": block(wrong_columns),
        "limit 0": block(limited, limit=0),
    }


def test_a_run_with_no_problems_is_refused_and_leaves_latest(tmp_path, tiny_causal_lm, empty_inputs, capsys):
    output = StorageConfig(root=str(tmp_path / "out"))
    # A good-looking LATEST to protect: an earlier run committed with allow_empty.
    base = tiny_pipeline_config(tiny_causal_lm, Path(empty_inputs["empty"]["path"]), output)
    allowed = base.model_copy(
        update={"output": output.model_copy(update={"allow_empty": True}), "run_id": "kept"}
    )
    assert run_pipeline(allowed, progress=False).committed is True
    assert latest_run_id(output, DATASET) == "kept"
    assert (Path(output.root) / DATASET / "runs" / "kept" / "report.html").exists()

    for name, source in empty_inputs.items():
        config = base.model_copy(update={"sources": [base.sources[0].model_validate(source)]})
        path = _config_file(tmp_path, config, f"{name.replace(' ', '-')}.yaml")
        for attempt in range(2):  # the re-run refuses again: it is not "already committed"
            code, err = _run_cli(["run", "--no-progress", "--config", str(path)], capsys)
            assert code == ExitCode.REFUSED, (name, attempt, err)
            lines = [line for line in err.splitlines() if line.startswith("tokenskip run:")]
            assert len(lines) == 1 and "0 problems loaded" in lines[0], (name, err)
        assert latest_run_id(output, DATASET) == "kept", name
        run_id = config.resolved_run_id()
        with pytest.raises(NotCommitted):
            read_manifest(output, DATASET, run_id)
        assert _report(output, run_id)["refused"].startswith("0 problems loaded"), name
        assert (Path(output.root) / DATASET / "runs" / run_id / "report.html").exists(), name


def test_refresh_never_publishes_a_shrunken_version(tmp_path, tiny_causal_lm):
    """A base version of 8 kept problems; a new eval set contaminates 6 of them. Publishing would
    replace 8 kept samples by 2: refused (exit 5), LATEST unchanged; with the check off it publishes."""
    problems = tiny_problems()[:8]
    path = write_problems(tmp_path / "problems.jsonl", problems)
    output = StorageConfig(root=str(tmp_path / "out"))
    pipeline = tiny_pipeline_config(tiny_causal_lm, path, output)
    ids = [problem_id("tiny", p["question"]) for p in problems]
    data = to_table(
        [
            {"key": sample_key(pid, pipeline.generation_hash(), 0), "problem_id": pid, "original_tokens": 10}
            for pid in ids
        ],
        COMPRESSED_SCHEMA,
    )
    base = RunStore(output, DATASET, "v-20260101-000000")
    base.write_shard("s-base", {"data": data}, problem_ids=ids)
    base.commit({"config": pipeline.model_dump(mode="json"), "generation_hash": pipeline.generation_hash()})

    eval_path = write_problems(tmp_path / "eval.jsonl", problems[:6])
    contaminating = pipeline.model_dump(mode="json")
    contaminating["dedup"]["eval_sets"] = [
        {
            "path": str(eval_path),
            "kind": "custom",
            "name": "eval",
            "field_map": {"question": "question", "answer": "answer"},
        }
    ]
    config_path = tmp_path / "refresh.yaml"
    config_path.write_text(yaml.safe_dump({"pipeline": contaminating}))

    assert refresh_job(["--config", str(config_path)]) == ExitCode.REFUSED
    assert latest_run_id(output, DATASET) == "v-20260101-000000"

    published = refresh(RefreshConfig.model_validate({"pipeline": contaminating, "min_kept_fraction": 0.0}))
    assert published["status"] == "published" and published["dropped_problems"] == 6
    assert read_table(output, DATASET, "data").num_rows == 2


def test_storage_commands_need_a_run_id_and_an_existing_dataset(tmp_path, tiny_causal_lm, capsys):
    output = StorageConfig(root=str(tmp_path / "out"), allow_empty=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    config = tiny_pipeline_config(tiny_causal_lm, empty, output).model_copy(update={"run_id": "r1"})
    run_pipeline(config, progress=False)
    root = ["--root", output.root]

    code, err = _run_cli(["storage", "set-latest", *root, "--dataset", DATASET], capsys)
    assert code == ExitCode.USER_ERROR and "--run-id is required" in err
    assert latest_run_id(output, DATASET) == "r1"  # untouched, not {"run_id": null}
    for command in (["pin"], ["unpin"]):
        assert _run_cli(["storage", *command, *root, "--dataset", DATASET], capsys)[0] == ExitCode.USER_ERROR

    code, err = _run_cli(
        ["storage", "runs", "--root", str(tmp_path / "nowhere"), "--dataset", DATASET], capsys
    )
    assert code == ExitCode.USER_ERROR and "does not exist" in err
    for command in (["runs"], ["set-latest", "--run-id", "r1"], ["pin", "--run-id", "r1"]):
        code, err = _run_cli(["storage", *command, *root, "--dataset", "typo"], capsys)
        assert code == ExitCode.USER_ERROR and "dataset 'typo' not found" in err, command
    assert _run_cli(["storage", "set-latest", *root, "--dataset", DATASET, "--run-id", "r1"], capsys)[0] == 0


def test_a_second_writer_is_refused_before_any_engine_and_a_stale_lease_is_taken_over(
    tmp_path, tiny_causal_lm, capsys, monkeypatch
):
    from tokenskip import pipeline

    ray_starts = []  # the pipeline joins or starts Ray only to run its stages
    init_ray = pipeline.init_ray
    monkeypatch.setattr(pipeline, "init_ray", lambda *a, **kw: ray_starts.append(1) or init_ray(*a, **kw))
    problems = write_problems(tmp_path / "problems.jsonl", tiny_problems())
    output = StorageConfig(root=str(tmp_path / "out"))
    config = tiny_pipeline_config(tiny_causal_lm, problems, output)
    store = RunStore(output, DATASET, config.resolved_run_id())
    holder = store.lease()
    holder.owner = "another-host:1234"
    holder.acquire()

    started = time.perf_counter()
    with pytest.raises(LockHeld, match="another-host:1234"):
        run_pipeline(config, progress=False)
    assert time.perf_counter() - started < 10 and ray_starts == []  # no engine, no Ray
    code, err = _run_cli(["run", "--no-progress", "--config", str(_config_file(tmp_path, config))], capsys)
    assert code == ExitCode.LOCKED and "another-host:1234" in err
    assert not store.committed_shard_ids() and ray_starts == []
    holder.release()

    # A writer that died: its lease expired, the next run takes it over (and releases it at the end).
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    allowed = tiny_pipeline_config(tiny_causal_lm, empty, output.model_copy(update={"allow_empty": True}))
    dead = Lock(output, DATASET, f"run-{allowed.resolved_run_id()}", ttl_s=0.01, owner="dead-host:1")
    dead.acquire()
    time.sleep(0.05)
    assert run_pipeline(allowed, progress=False).committed is True
    assert RunStore(output, DATASET, allowed.resolved_run_id()).lease().holder() is None


def test_user_errors_are_one_line_and_exit_2(tmp_path, tiny_causal_lm, capsys):
    problems = write_problems(tmp_path / "problems.jsonl", tiny_problems())
    output = StorageConfig(root=str(tmp_path / "out"))
    good = tiny_pipeline_config(tiny_causal_lm, problems, output)
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    (read_only / "file").write_text("x")
    cases = {
        "bad config": {"sampling": {"n": "many"}},
        "missing input": {
            "sources": [good.sources[0].model_dump() | {"path": str(tmp_path / "missing.jsonl")}]
        },
        "unwritable output": {"output": {"root": str(read_only / "file" / "out")}},
        "unknown model": {"engine": good.engine.model_dump() | {"model": str(tmp_path / "no-such-model")}},
    }
    expected = {
        "bad config": "sampling.n",
        "missing input": "missing.jsonl",
        "unwritable output": "is a file, not a folder",
        "unknown model": "engine.model",
    }
    for name, update in cases.items():
        data = good.model_dump(mode="json") | update
        path = tmp_path / f"{name.replace(' ', '-')}.yaml"
        path.write_text(yaml.safe_dump(data))
        for dry in ([], ["--dry-run"]):
            code, err = _run_cli(["run", "--config", str(path), *dry], capsys)
            lines = err.strip().splitlines()
            assert code == ExitCode.USER_ERROR, (name, err)
            assert len(lines) == 1 and lines[0].startswith("tokenskip run: error:"), (name, err)
            assert expected[name] in lines[0], (name, err)
    code, err = _run_cli(["run", "--verbose", "--config", str(tmp_path / "bad-config.yaml")], capsys)
    assert code == ExitCode.USER_ERROR and "Traceback (most recent call last)" in err
    assert not (tmp_path / "out").exists()  # nothing was written for any of them


def test_dry_run_checks_the_output_bucket(tmp_path, tiny_causal_lm, s3_bucket, capsys):
    endpoint, bucket = s3_bucket
    problems = write_problems(tmp_path / "problems.jsonl", tiny_problems())
    for root, code_expected in ((f"s3://{bucket}/datasets", 0), (f"s3://{bucket}-missing/datasets", 2)):
        output = StorageConfig(root=root, storage_options={"endpoint_url": endpoint})
        path = _config_file(tmp_path, tiny_pipeline_config(tiny_causal_lm, problems, output))
        code, err = _run_cli(["run", "--dry-run", "--config", str(path)], capsys)
        assert code == code_expected, err
        if code:
            assert "bucket" in err and "does not exist" in err


def test_shard_markers_record_their_problems(tmp_path):
    store = RunStore(StorageConfig(root=str(tmp_path)), DATASET, "r")
    record = store.write_shard("s-1", {"data": COMPRESSED_SCHEMA.empty_table()}, problem_ids=["b", "a", "a"])
    assert record.problem_ids == ["a", "b"] and store.shard_problem_ids(record) == {"a", "b"}
    # A marker from before problem ids were recorded: read from the parts.
    table = to_table([{"key": "k1", "problem_id": "p"}, {"key": "k2", "problem_id": "q"}], COMPRESSED_SCHEMA)
    old = store.write_shard("s-2", {"data": table})
    assert old.problem_ids is None and store.shard_problem_ids(old) == {"p", "q"}


def test_a_lease_whose_holder_died_on_this_machine_is_taken_over_at_once(tmp_path):
    """A driver SIGKILLed on this machine leaves its lease behind; a re-run need not wait for the TTL.
    A live holder (this process) keeps it."""
    import signal
    import subprocess
    import sys

    output = StorageConfig(root=str(tmp_path / "out"))
    script = (
        "import sys, time; from tokenskip.storage import Lock, StorageConfig; "
        f"Lock(StorageConfig(root={output.root!r}), {DATASET!r}, 'run-r', ttl_s=3600).acquire(); "
        "print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld):
            Lock(output, DATASET, "run-r", ttl_s=60).acquire()  # alive: refused
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    finally:
        if holder.poll() is None:
            holder.kill()
    taken = Lock(output, DATASET, "run-r", ttl_s=60)
    taken.acquire()  # dead, long before its hour-long lease runs out
    assert taken.holder().owner == taken.owner
