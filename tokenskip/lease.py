"""Holding a storage :class:`~tokenskip.storage.Lock` for the length of a piece of work.

A pipeline run holds its run's lease and a refresh its dataset's refresh lock the same way: take
the lock (``LockHeld`` propagates: someone else is at work), renew it from a heartbeat thread while
the work runs, and release it afterwards, unless it was lost (taken over after a missed renewal):
then it is the new holder's, and releasing it would pull it from under them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from tokenskip.storage import Lock, LockHeartbeat, NotLockOwner

log = logging.getLogger(__name__)


@contextmanager
def holding(
    lock: Lock, interval: float, *, what: str, thread_name: str = "lease-heartbeat"
) -> Iterator[LockHeartbeat]:
    """Acquire ``lock``, renew it every ``interval`` seconds while the body runs, release it after.

    Yields the heartbeat: the body checks ``heartbeat.lost`` before it commits anything, and the
    caller may read ``beats``/``lost`` afterwards. ``what`` names the lock in the log ("run lease").
    """
    lock.acquire()
    heartbeat = LockHeartbeat(lock, interval, thread_name=thread_name)
    try:
        with heartbeat:
            yield heartbeat
    finally:
        if not heartbeat.lost:
            try:
                lock.release()
            except NotLockOwner:
                log.warning("%s was lost before release", what, exc_info=True)
