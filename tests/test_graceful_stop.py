"""A graceful stop on SIGTERM/SIGINT: the grace period, commits never cut in half, a second signal,
and a real driver SIGTERMed mid-run (committed shards kept, lease released, report written, exit 6,
one line, and a re-run that completes with every key exactly once)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.tiny_pipeline import (
    DATASET,
    expected_keys,
    tiny_pipeline_data,
    tiny_problems,
    tiny_resources,
    write_problems,
)
from tokenskip.config import PipelineConfig
from tokenskip.failpoints import ENV as FAILPOINTS_ENV
from tokenskip.shutdown import GracefulStop, StopRequested
from tokenskip.storage import StorageConfig, read_table


def _wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_work_goes_on_through_the_grace_period_then_stops():
    before = signal.getsignal(signal.SIGTERM)  # pytest or an earlier test may have set its own
    with GracefulStop(grace_s=0.5) as stop:
        with pytest.raises(StopRequested) as info, stop.stoppable():
            assert stop.admit()
            os.kill(os.getpid(), signal.SIGTERM)
            _wait_for(lambda: stop.requested)
            assert not stop.admit() and stop.signal_name == "SIGTERM"
            committed_in_grace = 0
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the loop keeps committing until the deadline
                with stop.committing():
                    committed_in_grace += 1
                time.sleep(0.01)
        assert info.value.signal_name == "SIGTERM"
        assert committed_in_grace > 5
        elapsed = time.monotonic() - stop.requested_at
        assert 0.5 <= elapsed < 5, elapsed
    # Handlers are restored: SIGTERM is back to what it was.
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_stop_falling_due_during_a_commit_waits_for_its_end():
    finished = []
    with GracefulStop(grace_s=0) as stop:
        with pytest.raises(StopRequested), stop.stoppable():
            with stop.committing():
                os.kill(os.getpid(), signal.SIGINT)  # handled here, in the middle of the commit
                time.sleep(0.05)
                finished.append("commit")
            finished.append("after")  # never reached: the stop is raised as the commit ends
    assert finished == ["commit"]


def test_a_second_signal_stops_at_once_and_a_stop_outside_the_loop_waits_for_it():
    with GracefulStop(grace_s=60) as stop:
        os.kill(os.getpid(), signal.SIGINT)  # before the loop: recorded, not raised
        _wait_for(lambda: stop.requested)
        with pytest.raises(StopRequested), stop.stoppable():
            os.kill(os.getpid(), signal.SIGINT)  # again: now
            time.sleep(5)
            pytest.fail("the second signal did not stop the loop")


_CLI_DRIVER = "import sys; from tokenskip import cli; sys.exit(cli.main(sys.argv[1:]))"


def _driver(argv: list[str], failpoint: str | None = None, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """``tokenskip`` as a driver process, with ``failpoint`` (tokenskip.failpoints) set for it."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", FAILPOINTS_ENV)} | {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0"
    }
    if failpoint:
        env[FAILPOINTS_ENV] = failpoint
    return subprocess.run(
        [sys.executable, "-c", _CLI_DRIVER, *argv], env=env, capture_output=True, text=True, timeout=timeout_s
    )


@pytest.mark.slow
def test_sigterm_mid_run_keeps_commits_releases_the_lease_and_a_rerun_completes(tmp_path, tiny_solver):
    import yaml

    problems = tiny_problems(12)
    path = write_problems(tmp_path / "problems.jsonl", problems)
    output = StorageConfig(root=str(tmp_path / "out"))
    data = tiny_pipeline_data(
        tiny_solver,
        path,
        output,
        sampling={"n": 1, "temperature": 0.0, "max_tokens": 48},
        resources=tiny_resources(shard_size=2, generation_batch_size=2, stop_grace_s=0),
    )
    config = PipelineConfig.model_validate(data)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "out" / DATASET / "runs" / config.resolved_run_id()
    argv = ["run", "--config", str(config_path), "--no-progress"]

    # The driver SIGTERMs itself right after its first generated shard's commit: an exact boundary.
    stopped = _driver(argv, failpoint=f"shard-committed:SIGTERM={tmp_path / 'sigterm.token'}")
    output_text = stopped.stdout + stopped.stderr
    assert stopped.returncode == 6, output_text[-3000:]
    assert "Traceback" not in output_text
    last = stopped.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("tokenskip run: stopped by SIGTERM: run ")
        and "re-run the same command to resume" in last
    )
    committed = {p.stem for p in (run_dir / "_shards").glob("*.json")} - {"input"}
    assert 1 <= len(committed) < 6  # the shard whose commit signalled, maybe one more in flight
    assert not (run_dir / "_MANIFEST.json").exists()
    assert not list((tmp_path / "out" / DATASET / "_locks").glob("*.json")), "the lease was not released"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["stopped"] == "SIGTERM" and report["committed"] is False
    assert report["pending_shards"] == 6 - len(committed)
    assert report["counts"]["samples"] == 2 * len(committed)  # what is committed, nothing else
    assert (run_dir / "report.txt").exists() and (run_dir / "report.html").exists()

    rerun = _driver(argv)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["committed"] is True and report["attempt"]["shards_resumed"] == len(committed)
    keys = [
        k
        for kind in ("data", "rejects", "errors")
        for k in read_table(output, DATASET, kind).column("key").to_pylist()
    ]
    assert len(keys) == len(set(keys)), "a (problem, sample) key landed twice"
    assert set(keys) == expected_keys(config, problems)


def test_the_handlers_are_put_back_when_the_loop_starts_after_something_replaced_them():
    # ray.init installs Ray's own SIGTERM handler (it aborts the driver); the loop starts after it.
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop(grace_s=0) as stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stands in for Ray's handler
        with pytest.raises(StopRequested), stop.stoppable():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            pytest.fail("SIGTERM did not reach the graceful stop")
    assert signal.getsignal(signal.SIGTERM) is before
