"""The errors tokenskip.storage raises on purpose (every one a :class:`StorageError`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenskip.storage.lease import LockInfo


class StorageError(Exception):
    """Base class of every error this module raises on purpose."""


class CommitConflict(StorageError, FileExistsError):
    """A conditional create lost: the object already exists with different content."""


class AlreadyCommitted(CommitConflict):
    """The run already has a manifest; committed runs are immutable."""


class ShardConflict(CommitConflict):
    """A shard was written again with content different from its committed version."""


class NotCommitted(StorageError, FileNotFoundError):
    """No manifest (or no LATEST pointer): nothing committed to read."""


class IntegrityError(StorageError):
    """A file listed in a manifest is missing or its size/sha256 differs from the record."""


class SchemaMismatch(StorageError, ValueError):
    """Shards of one run disagree on the Arrow schema of a kind."""


class LockHeld(StorageError):
    """The lock is held by someone else and has not expired."""

    def __init__(self, message: str, holder: LockInfo):
        super().__init__(message)
        self.holder = holder


class NotLockOwner(StorageError):
    """Refresh/release by someone who does not hold the lock (never acquired it, or lost it)."""


class DuplicateKeys(StorageError):
    """Two shards of one run hold the same problem (so the same sample keys): never committed."""


class NotFound(StorageError, FileNotFoundError):
    """The output root or the dataset does not exist."""


class VersionMismatch(Exception):
    """Internal: a compare-and-swap found another version (or no object at all)."""
