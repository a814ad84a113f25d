import os

import pytest

from tokenskip import ray_runtime


@pytest.mark.slow
def test_a_local_ray_runs_its_workers_at_normal_priority(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(ray_runtime.WORKER_NICENESS_ENV, raising=False)
    assert not ray.is_initialized()
    ray_runtime.init_ray(log_to_driver=False)
    try:
        niceness = ray.get(ray.remote(num_cpus=0.1)(lambda: os.nice(0)).remote())
    finally:
        ray.shutdown()
    assert niceness == os.nice(0)  # Ray's own default would be 15 above the driver


def test_explicit_niceness_and_a_cluster_address_are_left_alone(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))

    monkeypatch.setenv(ray_runtime.WORKER_NICENESS_ENV, "7")
    ray_runtime.init_ray()
    assert os.environ[ray_runtime.WORKER_NICENESS_ENV] == "7"

    monkeypatch.delenv(ray_runtime.WORKER_NICENESS_ENV)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    ray_runtime.init_ray()
    assert ray_runtime.WORKER_NICENESS_ENV not in os.environ  # a cluster keeps its own setting
    assert len(calls) == 2
