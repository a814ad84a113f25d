"""Shared fixtures: reference data, tiny local models, a local S3 server.

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

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TOKENSKIP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The reference data sets beside the checkout (../shared/data).

    In CI (CI=true) their absence is a failure, not a skip, so the parity and grading checks can
    never pass vacuously there.
    """
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"reference data not found at {SHARED_DATA}")
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA


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


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP server (moto) on 127.0.0.1; yields its endpoint URL.

    Sets dummy credentials in the environment so s3fs/boto pick them up in this process and in Ray
    workers started afterwards.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(
        {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server, request):
    """A fresh bucket on the local moto server; yields (endpoint_url, bucket_name)."""
    import boto3

    import re

    # S3 bucket names: 3-63 chars of [a-z0-9-]; parametrized test names carry brackets and dots.
    name = ("tokenskip-" + re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()))[:63].strip("-")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    yield s3_server, name
