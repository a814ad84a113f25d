"""Shared fixtures: reference data (tests/data), tiny local models, a local S3 server.

Nothing here reaches the network: models are built locally (tokenskip.testing.tiny_models) and S3
is moto's ThreadedMotoServer bound to 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

# vLLM on CPU: keep the engine in-process (tests and Ray actors alike).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def fixture_data() -> Path:
    """The reference data the tests read, vendored in tests/data (see its README.md for origins).

    Missing is a failure, never a skip: the parity, grading and manifest checks must not pass
    vacuously on a checkout without them.
    """
    from tests.fixture_data import DATA_DIR

    if not (DATA_DIR / "README.md").is_file():
        pytest.fail(f"test fixtures not found at {DATA_DIR}")
    return DATA_DIR


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_causal_lm(model_cache) -> Path:
    from tokenskip.testing.tiny_models import build_tiny_causal_lm

    return build_tiny_causal_lm(model_cache / "tiny-llama")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_MOTO_SCRIPT = """
import sys, threading
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]))
server.start()
print("ready", flush=True)
sys.stdin.read()  # until the test session closes our stdin
server.stop()
"""


# Dummy credentials for the local moto server (the only S3 endpoint tests ever use).
MOTO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP server (moto's ThreadedMotoServer) on 127.0.0.1; yields its endpoint URL.

    It runs in a child process: moto's Flask app left in this process confuses vLLM's kernel
    registration (it inspects every loaded module), and tests here start vLLM engines in-process.
    Dummy credentials go into the environment so s3fs/boto pick them up here and in Ray workers.
    """
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _MOTO_SCRIPT, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    while (line := proc.stdout.readline()) and line.strip() != "ready":
        pass  # moto prints its own start-up line first
    assert line.strip() == "ready", "moto server did not start"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except Exception:
            time.sleep(0.1)
    old = {k: os.environ.get(k) for k in MOTO_CREDENTIALS}
    os.environ.update(MOTO_CREDENTIALS)
    try:
        yield endpoint
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server, request):
    """A fresh bucket on the local moto server; yields (endpoint_url, bucket_name)."""
    import re

    import boto3

    # S3 bucket names: 3-63 chars of [a-z0-9-]; parametrized test names carry brackets and dots.
    name = ("tokenskip-" + re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()))[:63].strip("-")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    yield s3_server, name


@pytest.fixture(params=["local", "s3"])
def local_or_s3_storage(request, tmp_path):
    """A StorageConfig on a local folder, then on a fresh bucket of the moto server; fast retries."""
    from tokenskip.storage import StorageConfig

    if request.param == "local":
        return StorageConfig(root=str(tmp_path / "store"), backoff_s=0.001)
    # Own bucket rather than the s3_bucket fixture: its name comes from the test name, and the
    # "[s3]" of a parametrized test is not a valid bucket name.
    import uuid

    import boto3

    endpoint = request.getfixturevalue("s3_server")
    bucket = f"tokenskip-store-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return StorageConfig(
        root=f"s3://{bucket}/ds", storage_options={"endpoint_url": endpoint}, backoff_s=0.001
    )


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module: the tiny models gain nothing from two, and a busy 2-core box
    makes them spin."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_solver(model_cache) -> Path:
    """A tiny LM trained in seconds to answer ``arithmetic_problems()``: greedy is always right,
    sampling at T=1 is right most of the time (kept rows and rejects both occur)."""
    from tokenskip.testing.tiny_models import build_tiny_solver_lm

    return build_tiny_solver_lm(model_cache / "tiny-solver")


@pytest.fixture(scope="session")
def tiny_long_solver(model_cache) -> Path:
    """A second tiny solver (another seed) trained to answer ``arithmetic_problems()`` in several
    reasoning lines, about three times the tokens of ``tiny_solver``'s answers: a System-2 model beside
    ``tiny_solver``'s System-1. Greedy is always right."""
    from tokenskip.testing.tiny_models import build_tiny_solver_lm

    return build_tiny_solver_lm(model_cache / "tiny-long-solver", seed=1, style="long")


@pytest.fixture(scope="module")
def ray_local():
    """In-process Ray with 2 CPUs for one test module (never `ray stop`)."""
    import ray

    if not ray.is_initialized():
        # Workers write S3 shards too: they get moto's dummy credentials whichever fixture ran first
        # (a Ray started before s3_server would not see the variables it sets).
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": MOTO_CREDENTIALS},
        )
    yield ray
    ray.shutdown()
