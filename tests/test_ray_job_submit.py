"""`ray job submit` against a local `ray start --head` (127.0.0.1, RAY_AUTH_MODE=disabled).

The head runs in its own process group, which the test ends by PID at the end: `ray stop` would
end every Ray process on the machine, not just ours.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.tiny_pipeline import ANSWER_FIELD_MAP, tiny_compression, tiny_pipeline_data, tiny_source
from tokenskip.storage import StorageConfig, read_manifest, read_table
from tokenskip.testing.tiny_models import arithmetic_problems

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ray_head():
    # The job's `python` is whatever the head's PATH finds first: make it this interpreter, as an
    # activated virtualenv would (CI runs pytest as .venv/bin/python without activating).
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=path)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    gcs_port, dash_port = _port(), _port()
    temp_dir = tempfile.mkdtemp(prefix="rayh")  # short: Ray's socket paths have a length limit
    proc = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            # Own agent ports: the defaults may be taken by another Ray on the same machine, and then
            # the job agent never comes up ("No available agent to submit job").
            f"--dashboard-agent-listen-port={_port()}",
            f"--dashboard-agent-grpc-port={_port()}",
            f"--metrics-export-port={_port()}",
            f"--runtime-env-agent-port={_port()}",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("local Ray head did not come up") from None
                time.sleep(1)
        yield address, env
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_build_dataset_job_through_ray_job_submit(tmp_path, tiny_solver, ray_head):
    address, env = ray_head
    problems = tmp_path / "problems.jsonl"
    problems.write_text(
        "".join(
            json.dumps({k: p[k] for k in ("id", "question", "answer")}) + "\n" for p in arithmetic_problems(4)
        )
    )
    out = tmp_path / "out"
    config = tiny_pipeline_data(
        tiny_solver,
        problems,
        {"root": str(out)},
        dataset="submitted",
        sources=[tiny_source(problems, field_map=ANSWER_FIELD_MAP)],
        sampling={"n": 1, "temperature": 0.0, "max_tokens": 64},
        compression=tiny_compression(tiny_solver, ratios=[0.7], batch_size=None),
        # The job's own defaults for shards and batches: only the CPU shares fit the 2-CPU head.
        resources={"generation_cpus": 0.5, "compression_cpus": 0.25, "grading_cpus": 0.25, "omp_threads": 1},
    )
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(config))

    ray_bin = str(Path(sys.executable).with_name("ray"))
    deadline = time.time() + 180
    # A relative output root first: inside the job it would land in Ray's copy of the working
    # directory, where the submitter never looks, so the job refuses it in one line before any work.
    relative = ["--set", "output.root=outputs-relative"]
    while True:  # the head's job agent comes up some seconds after the dashboard answers
        refused = _submit(ray_bin, address, env, config_path, relative)
        if "No available agent" not in refused.stderr or time.time() > deadline:
            break
        time.sleep(3)
    job_output = refused.stdout + refused.stderr
    assert refused.returncode != 0, job_output[-3000:]
    assert "tokenskip run: error: output root 'outputs-relative' is relative" in job_output, job_output[
        -3000:
    ]
    assert "Traceback" not in job_output, job_output[-3000:]
    assert not (REPO / "outputs-relative").exists()

    result = _submit(ray_bin, address, env, config_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()

    storage = StorageConfig(root=str(out))
    manifest = read_manifest(storage, "submitted")
    data = read_table(storage, "submitted", "data")
    assert manifest.counts["samples"] == 4
    assert data.num_rows == 4  # greedy: the tiny solver answers its own problems


def _submit(
    ray_bin: str, address: str, env: dict, config_path: Path, extra: list[str] = ()
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            ray_bin,
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(REPO),
            "--",
            "python",
            "-m",
            "ray_jobs.build_dataset",
            "--config",
            str(config_path),
            "--no-progress",
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
