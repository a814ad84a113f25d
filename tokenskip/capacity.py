"""Losing capacity never hangs a run: elastic actor pools, a placement check, dropped work redone.

Every actor pool of the run (generation engines, scorers, graders) is a Ray Data autoscaling pool
(:func:`pool_strategy`: ``min..max`` from :class:`~tokenskip.config.PoolSize`, starting at ``max``).
Its actors restart when they die (``max_restarts=-1``) but their tasks are not retried on them
(``max_task_retries=0``, :func:`actor_pool_args`): an actor on a lost node can only restart once
capacity returns, and a task pinned to it would wait for that forever. Such a task fails instead,
Ray Data drops its block (``DataContext.max_errored_blocks = -1``, set per dataset by
:func:`tolerate_dropped_blocks`) and goes on with the actors that remain; the restarted actor rejoins
the pool when its node (or a new one) has room. The driver then runs the shards that did not arrive
in another pass of the same run (:mod:`tokenskip.pipeline`), so every key still lands exactly once.

Before each pass :func:`wait_for_capacity` places every pool's minimum at once as a placement group
and removes it again; if the cluster cannot place it within ``resources.capacity_wait_s`` the run
fails with :class:`CapacityUnavailable`, one line naming what is missing. Ray Data's own
``DataContext.wait_for_min_actors_s`` was the first candidate, but it waits for the actors to be
*ready*, which includes building each engine (and downloading its weights), so it cannot tell a
missing node from a slow start, and its error does not say which resources are missing.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from tokenskip.config import PipelineConfig, PoolSize

log = logging.getLogger(__name__)

__all__ = [
    "CapacityUnavailable",
    "DroppedBlocks",
    "PoolDemand",
    "LostTasks",
    "actor_pool_args",
    "lost_with_an_actor",
    "pool_demands",
    "pool_strategy",
    "tolerate_dropped_blocks",
    "wait_for_capacity",
]


class CapacityUnavailable(RuntimeError):
    """The cluster cannot place the minimum of the run's actor pools (the message names what is
    missing). Committed shards stay committed; a re-run resumes when there is capacity."""


def pool_strategy(size: PoolSize | int, **options: Any):
    """Ray Data's actor pool for ``size`` (an int: fixed): fixed, or autoscaling between min and max.
    An elastic pool starts at ``max`` (engines are slow to start: ask for all of them at once) and is
    never held back by actors that cannot be placed; Ray Data scales idle ones down to ``min``."""
    import ray

    from tokenskip.config import PoolSize

    if isinstance(size, int):
        size = PoolSize(min=size, max=size)

    if size.fixed:
        return ray.data.ActorPoolStrategy(size=size.min, **options)
    return ray.data.ActorPoolStrategy(min_size=size.min, max_size=size.max, initial_size=size.max, **options)


LostTasks = Literal["redo", "retry"]
"""What happens to the tasks a dead actor held: ``redo`` fails them at once (the driver's next pass
redoes their shards on the actors that remain: the pipeline, where a lost node must not hang the
run); ``retry`` keeps them for the restarted actor (Ray's own retry: a standalone Ray Data pipeline
with no driver pass to redo them, which waits for the actor to come back)."""


def actor_pool_args(size: PoolSize | int, *, lost_tasks: LostTasks = "redo", **options: Any) -> dict[str, Any]:
    """``map_batches`` arguments for an actor pool of ``size`` that survives losing actors: a dead
    actor restarts when there is room (``max_restarts=-1``); its tasks fail rather than wait for it
    (``lost_tasks="redo"``: ``max_task_retries=0``, the driver redoes their shards) or are retried on
    it once it is back (``"retry"``: ``max_task_retries=-1``)."""
    if lost_tasks not in ("redo", "retry"):
        raise ValueError(f"lost_tasks must be 'redo' or 'retry', not {lost_tasks!r}")
    retries = 0 if lost_tasks == "redo" else -1
    return {"compute": pool_strategy(size, **options), "max_restarts": -1, "max_task_retries": retries}


def lost_with_an_actor(errors: list[BaseException]) -> bool:
    """Whether every one of a pass's dropped-task ``errors`` is an actor that died under its task
    (killed, OOM, its node lost): that work is redone in another pass; any other error is the run's
    own failure and is raised."""
    from ray.exceptions import RayActorError

    return bool(errors) and all(isinstance(e, RayActorError) for e in errors)


def tolerate_dropped_blocks(dataset) -> None:
    """Let ``dataset`` go on past failed tasks (their blocks are dropped; the driver redoes those
    shards) instead of ending the whole execution at the first lost actor."""
    dataset.context.max_errored_blocks = -1


class DroppedBlocks(logging.Handler):
    """Collects the errors of the tasks Ray Data dropped during one pass (it logs each, with its
    exception), so a pass that commits nothing can fail with the real cause."""

    LOGGER = "ray.data._internal.execution.streaming_executor_state"

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            with self._lock:
                self.errors.append(record.exc_info[1])

    def __enter__(self) -> DroppedBlocks:
        logging.getLogger(self.LOGGER).addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger(self.LOGGER).removeHandler(self)


@dataclass(frozen=True)
class PoolDemand:
    """The minimum of one actor pool: ``actors`` actors of ``cpus``/``gpus`` each."""

    name: str
    actors: int
    cpus: float
    gpus: float = 0.0

    def bundle(self) -> dict[str, float]:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}


def pool_demands(config: PipelineConfig) -> list[PoolDemand]:
    """What the run's pools need placed at once before a pass can make progress."""
    r = config.resources
    demands = [PoolDemand("generation", r.generation_actors.min, r.generation_cpus, r.generation_gpus)]
    if config.compression is not None:  # without compression there is no scorer pool
        demands.append(PoolDemand("scorer", r.compression_actors.min, r.compression_cpus, r.compression_gpus))
    return [*demands, PoolDemand("grading", 1, r.grading_cpus)]


def wait_for_capacity(demands: list[PoolDemand], timeout_s: float) -> float:
    """Wait until the cluster can place every pool's minimum at once (a placement group of them,
    removed again at once); returns the seconds waited. Raises :class:`CapacityUnavailable` naming
    the missing resources after ``timeout_s``. A placement group is also what an autoscaling
    cluster reads as demand, so waiting here is what makes it add nodes."""
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = [d.bundle() for d in demands for _ in range(d.actors)]
    started = time.monotonic()
    group = placement_group(bundles, strategy="PACK", name="tokenskip-capacity-check")
    try:
        ready = group.wait(timeout_seconds=timeout_s)
    finally:
        remove_placement_group(group)
    waited = time.monotonic() - started
    if not ready:
        raise CapacityUnavailable(missing_capacity_text(demands, _free_per_node(), timeout_s))
    if waited > 1:
        log.info("the pools' minimum became placeable after %.1f s", waited)
    return waited


def _free_per_node() -> list[dict[str, float]]:
    import ray

    try:
        from ray._private.state import available_resources_per_node

        return [dict(r) for r in available_resources_per_node().values()]
    except Exception:  # noqa: BLE001 - a private API: fall back to the cluster's total
        return [dict(ray.available_resources())]


def missing_capacity_text(demands: list[PoolDemand], free: list[dict[str, float]], timeout_s: float) -> str:
    """One line: which pools' actors do not fit into the nodes' free resources (first fit, largest
    bundles first, as the scheduler would have to place them) and what each node has free."""
    nodes = [dict(n) for n in free]
    unplaced: dict[str, int] = {}
    for demand in sorted(demands, key=lambda d: (d.gpus, d.cpus), reverse=True):
        for _ in range(demand.actors):
            for node in nodes:
                if all(node.get(k, 0.0) + 1e-9 >= v for k, v in demand.bundle().items()):
                    for k, v in demand.bundle().items():
                        node[k] = node.get(k, 0.0) - v
                    break
            else:
                unplaced[demand.name] = unplaced.get(demand.name, 0) + 1
    needs = ", ".join(f"{d.name} {d.actors} x {_resources_text(d.bundle())}" for d in demands if d.actors)
    short = (
        "; ".join(
            f"{d.name}: {unplaced[d.name]} of its minimum {d.actors} x {_resources_text(d.bundle())}"
            for d in demands
            if unplaced.get(d.name)
        )
        or "the pools together (the cluster's free resources changed while waiting)"
    )
    free_text = " | ".join(_resources_text(n, keys=("CPU", "GPU")) for n in free) or "no alive node"
    return (
        f"the cluster cannot place the run's actor pools within {timeout_s:g} s "
        f"(resources.capacity_wait_s): missing {short}; needed at once: {needs}; "
        f"free per node: {free_text}. Committed shards are kept; a re-run resumes when there is capacity "
        f"(or lower the pools' minimum, e.g. --set resources.generation_actors=1..N)"
    )


def _resources_text(resources: dict[str, float], keys: tuple[str, ...] | None = None) -> str:
    items = [(k, v) for k, v in resources.items() if keys is None or k in keys]
    return "{" + ", ".join(f"{k}: {_number(v)}" for k, v in items) + "}"


def _number(value: float) -> str:
    return str(int(value)) if math.isclose(value, round(value)) else f"{value:g}"
