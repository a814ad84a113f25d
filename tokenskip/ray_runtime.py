"""Joining or starting Ray the same way in every job."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator

WORKER_NICENESS_ENV = "RAY_worker_niceness"
# Ray picks the node's address with this switch: off, a node is single-machine and every server it
# starts (GCS, raylet, object manager, workers, agents) binds the loopback address only.
RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


# Set by Ray's job supervisor in a submitted job's driver: the job's runtime_env (working_dir, ...).
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_working_dir() -> str | None:
    """The ``working_dir`` a ``ray job submit`` gave this driver (None outside such a job). The job
    then runs in Ray's own unpacked copy of it, on whichever node runs the driver, so the current
    folder is not the submitter's."""
    try:
        job_config = json.loads(os.environ.get(RAY_JOB_CONFIG_ENV) or "{}")
    except ValueError:
        return None
    runtime_env = job_config.get("runtime_env") if isinstance(job_config, dict) else None
    working_dir = runtime_env.get("working_dir") if isinstance(runtime_env, dict) else None
    return str(working_dir) if working_dir else None


def relative_root_problem(root: str, what: str = "output root") -> str | None:
    """Why a local relative ``root`` cannot be used here (None: it can). Inside a Ray job with a
    working_dir it would resolve in Ray's per-job copy of that folder (``.../runtime_resources/
    working_dir_files/_ray_pkg_...``), where the user never looks and which Ray deletes; the
    submitter's own folder is unknown to the job and may be on another machine. So it is refused
    rather than resolved."""
    if job_working_dir() is None or ("://" in root and not root.startswith("file://")):
        return None
    path = os.path.expanduser(root.removeprefix("file://"))
    if os.path.isabs(path):
        return None
    return (
        f"{what} {root!r} is relative: inside a Ray job it would land in the job's own copy of the "
        f"working directory ({os.getcwd()}), not where you submitted from; use an absolute path "
        "(e.g. --set output.root=$PWD/outputs with a local head) or an s3:// root"
    )


def init_ray(log_to_driver: bool | None = None) -> None:
    """Join the cluster in ``RAY_ADDRESS`` (``ray job submit``, KubeRay), else start a local Ray.

    A local Ray started here listens on 127.0.0.1 only: Ray's job API and GCS run code for whoever
    reaches them, and by default they bind every interface (a laptop demo would open them to its
    network). Joining an existing cluster is unchanged.

    It also runs its workers at normal priority. Ray's default (nice 15) keeps its own processes
    responsive, but on a CPU-only machine it lets the nice-0 driver and control plane preempt a
    generation actor whose OpenMP team spans every core, stalling the whole team: on 2 cores the
    pipeline reached 0.80-0.87x of raw vLLM tokens/s at nice 15 and 0.95-0.97x at nice 0
    (``benchmarks/pipeline_throughput.py``). An explicit ``RAY_worker_niceness`` is left as set; a
    cluster's workers keep whatever the cluster was started with.

    Under the CLI's quiet console (:func:`tokenskip.console.console_logging`) Ray keeps its own
    start-up lines and the workers' output off the console (``log_to_driver`` defaults to False),
    and a local Ray's workers write their output to the job's log file. ``log_to_driver``: force it.
    """
    import ray

    from tokenskip.console import VLLM_LOGGING_ENV, WORKER_LOG_ENV

    if ray.is_initialized():
        return
    worker_log = os.environ.get(WORKER_LOG_ENV)
    kwargs: dict = {"include_dashboard": False, "log_to_driver": worker_log is None}
    if log_to_driver is not None:
        kwargs["log_to_driver"] = log_to_driver
    if worker_log:
        # Ray's own start-up notices (token auth, deprecations) are for its operators, not the run's.
        kwargs["logging_level"] = logging.ERROR
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
        return
    if worker_log:
        kwargs["runtime_env"] = {
            "worker_process_setup_hook": "tokenskip.console.redirect_worker_output",
            # vLLM's own handler in workers: their stdout is the log file (see tokenskip.console).
            "env_vars": {WORKER_LOG_ENV: worker_log, VLLM_LOGGING_ENV: "1"},
        }
    os.environ.setdefault(WORKER_NICENESS_ENV, "0")  # read by the Ray processes started below
    with _loopback_only():
        ray.init(**kwargs)


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """While a local Ray starts: single-machine, bound to loopback. The environment carries the
    switch to the processes Ray starts (they keep it); Ray's constant is read at import, so the
    driver's module gets the same value. Both are restored afterwards, so a later ``ray start`` or
    ``ray.init`` of this process's own making behaves as Ray's defaults say."""
    import ray._private.ray_constants as constants

    saved_env, saved_constant = os.environ.get(RAY_CLUSTER_ENV), constants.ENABLE_RAY_CLUSTER
    os.environ[RAY_CLUSTER_ENV] = "0"
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_env is None:
            os.environ.pop(RAY_CLUSTER_ENV, None)
        else:
            os.environ[RAY_CLUSTER_ENV] = saved_env
