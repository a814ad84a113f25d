"""Live progress from the stages to the driver, before any shard commits.

A shard's summary reaches the driver only when the shard commits, which on a small run can be
minutes after the engine started generating. The stages therefore post small events (an engine is
ready, a batch was generated) to one Ray actor, the board, and the driver's display drains it about
once a second. Posting is fire-and-forget: a stage never waits on the board, and a lost board
(killed, or no display asked for) costs the run nothing but the live figures.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)

# The board holds at most this many undrained events; beyond it the oldest go (a display that
# stopped draining must not grow an actor without bound on a long run).
MAX_PENDING_EVENTS = 10_000


class _Board:
    """The actor behind :class:`ProgressBoard` (a plain class so tests can use it without Ray)."""

    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []

    def post(self, event: dict[str, Any]) -> None:
        self._events.append(event)
        if len(self._events) > MAX_PENDING_EVENTS:
            del self._events[: len(self._events) - MAX_PENDING_EVENTS]

    def drain(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events


class ProgressBoard:
    """A handle the driver creates and passes to stages (it pickles as the actor handle)."""

    def __init__(self, actor: Any):
        self._actor = actor

    @classmethod
    def start(cls) -> ProgressBoard:
        """A new board actor. It takes no CPU from the pool (the stages' reservations stay exact)."""
        import ray

        actor = ray.remote(num_cpus=0, max_restarts=0)(_Board).remote()
        return cls(actor)

    def post(self, event: str, **fields: Any) -> None:
        """Post ``event`` with ``fields`` (JSON-able); never blocks, never raises."""
        try:
            self._actor.post.remote({"event": event, "t": time.time(), **fields})
        except Exception:  # the board is gone: the live display loses a figure, the run goes on
            log.debug("progress board unreachable", exc_info=True)

    def drain(self, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        """The events posted since the last drain, oldest first ([] when the board is unreachable)."""
        import ray

        try:
            return ray.get(self._actor.drain.remote(), timeout=timeout_s)
        except Exception:
            log.debug("progress board unreachable", exc_info=True)
            return []

    def close(self) -> None:
        import ray

        try:
            ray.kill(self._actor)
        except Exception:
            log.debug("progress board already gone", exc_info=True)


class ProgressTally:
    """Counts added on a hot path (each finished request), posted as one ``event`` at most every
    ``interval_s``: a stage makes about one board call a second, however many rows it finishes (a
    call per row would put millions of actor calls on one actor at cluster scale). :meth:`flush`
    posts what is left (at the end of a batch)."""

    def __init__(self, board: ProgressBoard | None, event: str, interval_s: float = 1.0):
        self.board, self.event, self.interval_s = board, event, interval_s
        self._counts: dict[str, int] = {}
        self._posted_at = time.monotonic()

    def add(self, **counts: int) -> None:
        if self.board is None:
            return
        for name, value in counts.items():
            self._counts[name] = self._counts.get(name, 0) + value
        if time.monotonic() - self._posted_at >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        if self.board is not None and self._counts:
            self.board.post(self.event, **self._counts)
        self._counts, self._posted_at = {}, time.monotonic()


def post(board: ProgressBoard | None, event: str, **fields: Any) -> None:
    """Post to ``board`` when there is one (stages run without a board in tests and library use)."""
    if board is not None:
        board.post(event, **fields)
