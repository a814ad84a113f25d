"""Joining or starting Ray the same way in every job."""

from __future__ import annotations

import os

WORKER_NICENESS_ENV = "RAY_worker_niceness"


def init_ray(log_to_driver: bool = True) -> None:
    """Join the cluster in ``RAY_ADDRESS`` (``ray job submit``, KubeRay), else start a local Ray.

    A local Ray started here runs its workers at normal priority. Ray's default (nice 15) keeps its
    own processes responsive, but on a CPU-only machine it lets the nice-0 driver and control plane
    preempt a generation actor whose OpenMP team spans every core, stalling the whole team: on 2
    cores the pipeline reached 0.80-0.87x of raw vLLM tokens/s at nice 15 and 0.95-0.97x at nice 0
    (``benchmarks/pipeline_throughput.py``). An explicit ``RAY_worker_niceness`` is left as set; a
    cluster's workers keep whatever the cluster was started with.
    """
    import ray

    if ray.is_initialized():
        return
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault(WORKER_NICENESS_ENV, "0")  # read by the Ray processes started below
    ray.init(include_dashboard=False, log_to_driver=log_to_driver)
