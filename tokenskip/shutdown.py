"""A graceful stop on SIGTERM or SIGINT: Kubernetes deleting the pod, a spot preemption notice,
``ray job stop`` (it sends SIGTERM to the driver) or Ctrl-C.

:class:`GracefulStop` holds the two signals for the length of a run. The first one starts the grace
period: the driver takes no new shard into the run, and shards already in the stages that arrive
within ``grace_s`` are still committed. When the period ends (or at a second signal: Ctrl-C twice)
:class:`StopRequested` is raised in the main thread, but only inside :meth:`GracefulStop.stoppable`
(the commit loop) and never in the middle of a shard's commit (:meth:`GracefulStop.committing`), so
the run's storage is always left at a commit boundary. The caller then releases its lease, writes
its report and exits with its own code (``tokenskip run``: 6). Off the main thread (where Python
cannot install handlers) it does nothing.
"""

from __future__ import annotations

import _thread
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

__all__ = ["SIGNALS", "GracefulStop", "StopRequested"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(Exception):
    """A stop signal's grace period is over: leave the commit loop at a commit boundary."""

    def __init__(self, signal_name: str):
        super().__init__(f"stopped by {signal_name}")
        self.signal_name = signal_name


class GracefulStop:
    """``with GracefulStop(grace_s) as stop:`` for a run's length (handlers restored after)."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.signal_name: str | None = None  # the first stop signal received
        self.requested_at: float | None = None
        self._expired = False
        self._stoppable = False
        self._committing = False
        self._timer: threading.Timer | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> GracefulStop:
        self._install()
        return self

    def _install(self) -> None:
        """(Re)install the handlers: ``ray.init`` puts Ray's own C-level SIGTERM handler in place (it
        prints a stack and aborts), behind Python's back, so this runs again once Ray is up."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            previous = signal.signal(sig, self._on_signal)
            self._previous.setdefault(sig, previous)

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            self.requested_at = time.monotonic()
            print(
                f"tokenskip: {self.signal_name}: taking no new shards; shards that finish within "
                f"{self.grace_s:g} s still commit (again to stop now)",
                file=sys.stderr,
                flush=True,
            )
            log.warning(
                "%s received: stopping after a grace period of %.1f s", self.signal_name, self.grace_s
            )
            if self.grace_s > 0:
                # At the deadline the main thread gets the signal again (the handler runs there).
                self._timer = threading.Timer(self.grace_s, _thread.interrupt_main, args=(signum,))
                self._timer.daemon = True
                self._timer.start()
                return
        self._expired = True
        self._raise_if_due()

    def _raise_if_due(self) -> None:
        if self._expired and self._stoppable and not self._committing:
            raise StopRequested(self.signal_name or "a signal")

    @contextmanager
    def stoppable(self) -> Iterator[None]:
        """The region a stop may end (the commit loop); a stop already due ends it at once. Enter it
        after Ray has started (see :meth:`_install`)."""
        self._install()
        self._stoppable = True
        try:
            if self.requested and self.grace_s <= 0:
                self._expired = True
            self._raise_if_due()
            yield
        finally:
            self._stoppable = False

    @contextmanager
    def committing(self) -> Iterator[None]:
        """A shard's commit: a stop that falls due here waits for its end."""
        self._committing = True
        try:
            yield
        finally:
            self._committing = False
        self._raise_if_due()

    def admit(self) -> bool:
        """Whether new work may still start (False once a stop signal came)."""
        return not self.requested
