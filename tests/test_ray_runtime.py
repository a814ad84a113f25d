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


def _listening_addresses(pids: set[int]) -> set[tuple[str, int, int]]:
    import psutil

    return {
        (c.laddr.ip, c.laddr.port, c.pid)
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    }


@pytest.mark.slow
def test_a_local_ray_listens_on_loopback_only(monkeypatch):
    import ipaddress

    import psutil
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    ray_runtime.init_ray(log_to_driver=False)
    try:
        # A task makes the raylet start a worker, which listens too.
        ray.get(ray.remote(num_cpus=0.1)(lambda: os.getpid()).remote())
        ray_pids = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
        listening = _listening_addresses(ray_pids)
        names = {pid: psutil.Process(pid).name() for _, _, pid in listening}
    finally:
        ray.shutdown()
    assert any("gcs_server" in n for n in names.values()) and any("raylet" in n for n in names.values())

    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        mapped = getattr(address, "ipv4_mapped", None)
        return (mapped or address).is_loopback

    exposed = sorted((ip, port, names[pid]) for ip, port, pid in listening if not loopback(ip))
    assert exposed == [], f"Ray servers listening beyond loopback: {exposed}"
    # The switch does not outlive the start: a later `ray start` of the user's is Ray's default.
    assert ray_runtime.RAY_CLUSTER_ENV not in os.environ
