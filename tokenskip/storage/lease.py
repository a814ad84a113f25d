"""Leases (:class:`Lock`): a lock file with owner and expiry, taken with a conditional create and
taken over with a compare-and-swap, and :class:`LockHeartbeat`, which keeps a held lease alive."""

from __future__ import annotations

import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from pydantic import BaseModel, Field

from tokenskip.storage.backends import open_backend
from tokenskip.storage.config import StorageConfig
from tokenskip.storage.errors import CommitConflict, LockHeld, NotLockOwner, StorageError, VersionMismatch
from tokenskip.storage.layout import DatasetPaths, check_name

log = logging.getLogger(__name__)


class LockInfo(BaseModel):
    name: str
    owner: str
    acquired_at: float
    expires_at: float
    host: str
    pid: int
    nonce: str = Field(description="Unique per write, so two writes never have the same bytes/version.")

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at

    def holder_died_here(self) -> bool:
        """True when the holder ran on this machine and its process is gone: its lease need not run
        out before a re-run takes over (a driver killed by OOM or SIGKILL on a laptop). A holder on
        another machine, or a reused pid, keeps the lease until it expires."""
        if self.host != socket.gethostname():
            return False
        import psutil  # ships with Ray

        try:
            return psutil.Process(self.pid).status() == psutil.STATUS_ZOMBIE  # killed, not yet reaped
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:  # access denied and the like: assume alive
            return False


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:8]}"


class Lock:
    """A lease in ``<root>/<dataset>/_locks/<name>.json``: owner + expiry, taken with a conditional
    create. Expiry uses wall clocks, so ``ttl_s`` must dwarf the clock skew between machines; a holder
    that works longer than ``ttl_s`` must call :meth:`refresh` (heartbeat) in time.

    Takeover of an expired lock is a compare-and-swap on the version of the lock object we read (S3:
    ``PUT`` with ``If-Match: <ETag>``; local: content hash compared under an ``flock``). Of two
    contenders that both saw the same expired lease, exactly one swap succeeds; the other finds a new
    version, re-reads and sees a live lease (:class:`LockHeld`). A plain delete-then-create would let
    the slower contender delete the winner's fresh lease and both would believe they hold it.
    """

    def __init__(
        self, config: StorageConfig, dataset: str, name: str, ttl_s: float, owner: str | None = None
    ):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.config = config
        self.dataset = dataset
        self.name = check_name(name, "lock name")
        self.ttl_s = ttl_s
        self.owner = owner or default_owner()
        self._backend, root_path = open_backend(config)
        self.path = posixpath.join(DatasetPaths(root_path, dataset).locks_dir, f"{name}.json")
        self._version: str | None = None
        self.info: LockInfo | None = None

    def _new_info(self, acquired_at: float | None = None) -> LockInfo:
        now = time.time()
        return LockInfo(
            name=self.name,
            owner=self.owner,
            acquired_at=now if acquired_at is None else acquired_at,
            expires_at=now + self.ttl_s,
            host=socket.gethostname(),
            pid=os.getpid(),
            nonce=uuid.uuid4().hex,
        )

    def holder(self) -> LockInfo | None:
        """Who holds the lock file now (expired or not), or None."""
        current = self._backend.read_versioned(self.path)
        return None if current is None else LockInfo.model_validate_json(current[0])

    def acquire(self) -> LockInfo:
        """Take the lock: create it, or take over an expired lease (or our own). Raises :class:`LockHeld`."""
        for _ in range(20):  # each pass ends in success, LockHeld, or a race that a re-read resolves
            info = self._new_info()
            data = info.model_dump_json().encode()
            try:
                self._version = self._backend.create_exclusive(self.path, data)
                self.info = info
                return info
            except CommitConflict:
                pass
            except VersionMismatch:
                continue  # taken over right after we created it: re-read below on the next pass
            current = self._backend.read_versioned(self.path)
            if current is None:
                continue  # released between our create and our read: try to create again
            holder = LockInfo.model_validate_json(current[0])
            if holder.owner != self.owner and not holder.expired() and not holder.holder_died_here():
                raise LockHeld(
                    f"lock {self.name!r} of {self.dataset!r} is held by {holder.owner!r} (host {holder.host}, "
                    f"pid {holder.pid}) until {datetime.fromtimestamp(holder.expires_at, timezone.utc)}",
                    holder,
                )
            try:
                # Expired (or ours from an earlier acquire): swap only the exact version we judged.
                self._version = self._backend.replace_if_version(self.path, data, current[1])
            except VersionMismatch:
                continue
            if holder.owner != self.owner:
                state = "expired" if holder.expired() else "dead holder's"
                log.warning("took over %s lock %s from %s", state, self.name, holder.owner)
            self.info = info
            return info
        raise StorageError(f"lock {self.name!r}: could not settle who holds it after 20 attempts")

    def refresh(self) -> LockInfo:
        """Heartbeat: push the expiry ``ttl_s`` into the future. :class:`NotLockOwner` if we lost it."""
        if self._version is None or self.info is None:
            raise NotLockOwner(f"lock {self.name!r}: {self.owner!r} does not hold it (never acquired)")
        info = self._new_info(acquired_at=self.info.acquired_at)
        try:
            self._version = self._backend.replace_if_version(
                self.path, info.model_dump_json().encode(), self._version
            )
        except VersionMismatch:
            self._version = self.info = None
            raise NotLockOwner(
                f"lock {self.name!r}: {self.owner!r} lost it (expired and taken over)"
            ) from None
        self.info = info
        return info

    def release(self) -> None:
        """Delete the lock file, only if we still hold it (:class:`NotLockOwner` otherwise)."""
        current = self._backend.read_versioned(self.path)
        if current is None:
            self._version = self.info = None
            raise NotLockOwner(f"lock {self.name!r} is not held by anyone; {self.owner!r} cannot release it")
        holder = LockInfo.model_validate_json(current[0])
        if holder.owner != self.owner or self._version is None:
            raise NotLockOwner(
                f"lock {self.name!r} is held by {holder.owner!r}; this Lock ({self.owner!r}) did not acquire it"
            )
        try:
            self._backend.delete_if_version(self.path, self._version)
        except VersionMismatch:
            raise NotLockOwner(f"lock {self.name!r}: {self.owner!r} lost it before releasing") from None
        finally:
            self._version = self.info = None

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.release()
        except NotLockOwner:
            if exc_type is None:
                raise
            log.warning("lock %s was lost while an error was raised", self.name, exc_info=True)


class LockHeartbeat:
    """Renews a held :class:`Lock` every ``interval`` seconds in a daemon thread, so a long run (a
    refresh, a pipeline run's folder lease) never outlives its lease while it works. A lost lease
    (someone took it over) stops the beats and is reported by :attr:`lost`."""

    def __init__(self, lock: Lock, interval: float, thread_name: str = "lease-heartbeat"):
        self.lock = lock
        self.interval = interval
        self.lost: str | None = None
        self.beats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{thread_name}-{lock.name}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.lock.refresh()
                self.beats += 1
            except NotLockOwner as exc:
                self.lost = str(exc)
                log.error("lock %s lost: %s", self.lock.name, exc)
                return
            except Exception:  # a transient store error: the next beat tries again before the lease ends
                log.warning("lock heartbeat failed; retrying in %.0fs", self.interval, exc_info=True)

    def __enter__(self) -> LockHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def holding(
    lock: Lock, interval: float, *, what: str, thread_name: str = "lease-heartbeat"
) -> Iterator[LockHeartbeat]:
    """Hold ``lock`` for the length of a piece of work (a pipeline run's lease, a refresh's lock):
    acquire it (``LockHeld`` propagates: someone else is at work), renew it every ``interval`` seconds while the body runs, release it after.

    Yields the heartbeat: the body checks ``heartbeat.lost`` before it commits anything, and the
    caller may read ``beats``/``lost`` afterwards. ``what`` names the lock in the log ("run lease").
    A lost lock is not released: it is the new holder's, and releasing it would pull it from under
    them.
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
