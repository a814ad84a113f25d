"""Commit-based storage of run outputs on any fsspec filesystem (local folder, S3, ...).

Layout under ``<root>/<dataset>/``::

    runs/<run_id>/data/part-<shard_id>.parquet      one part per shard and kind (deterministic names)
    runs/<run_id>/rejects/part-<shard_id>.parquet
    runs/<run_id>/errors/part-<shard_id>.parquet
    runs/<run_id>/_shards/<shard_id>.json           shard commit marker (resume)
    runs/<run_id>/_MANIFEST.json                    written LAST with a conditional create = the commit
    LATEST                                          pointer to the newest committed run
    _pins/<run_id>.json                             runs that retention must keep
    _locks/<name>.json                              leases (see :class:`Lock`)

A run becomes visible only when its manifest exists, and readers (:func:`read_table` for small runs,
:func:`iter_batches` streaming file by file, :func:`read_dataset` for Ray Data) read exactly the files
the manifest lists (checking size and sha256), never a directory listing: stray parts from crashed attempts and
runs still in progress are invisible. The manifest and shard markers are written with "create only if
absent" (S3 ``If-None-Match: *``; locally a hard link of a complete temp file), so two writers can
never both commit the same run.

The package, one job a module:

- :mod:`~tokenskip.storage.config`: :class:`StorageConfig` and the fsspec filesystem of its root.
- :mod:`~tokenskip.storage.errors`: the errors raised on purpose.
- :mod:`~tokenskip.storage.layout`: names and paths of the layout above, and the LATEST pointer.
- :mod:`~tokenskip.storage.backends`: retries and the primitives per filesystem family (conditional
  create, compare-and-swap) for local folders, S3 and other fsspec filesystems.
- :mod:`~tokenskip.storage.records`: shard markers, manifests and the records in them.
- :mod:`~tokenskip.storage.runs`: :class:`RunStore`, which writes a run's shards and commits it.
- :mod:`~tokenskip.storage.readers`: the readers of committed runs.
- :mod:`~tokenskip.storage.dataset`: LATEST moves, dataset state files, root and dataset checks.
- :mod:`~tokenskip.storage.retention`: pins and :func:`apply_retention`.
- :mod:`~tokenskip.storage.files`: :class:`FileStore`, plain files outside runs (evaluation outputs,
  model and adapter folders fetched into a local cache).
- :mod:`~tokenskip.storage.lease`: :class:`Lock`, :class:`LockHeartbeat` and :func:`holding` (a lock held
  for the length of a piece of work).

Import from ``tokenskip.storage``; the modules are the code's layout, not its interface.
"""

from tokenskip.storage.config import StorageConfig, open_filesystem
from tokenskip.storage.dataset import (
    delete_dataset_file,
    output_problem,
    read_dataset_file,
    require_dataset,
    set_latest,
    write_dataset_file,
)
from tokenskip.storage.errors import (
    AlreadyCommitted,
    CommitConflict,
    DuplicateKeys,
    IntegrityError,
    LockHeld,
    NotCommitted,
    NotFound,
    NotLockOwner,
    SchemaMismatch,
    ShardConflict,
    StorageError,
)
from tokenskip.storage.files import FileStore, StoredFile
from tokenskip.storage.layout import KINDS, MANIFEST_NAME, part_shard
from tokenskip.storage.lease import Lock, LockHeartbeat, LockInfo, default_owner, holding
from tokenskip.storage.readers import (
    committed_files,
    committed_urls,
    iter_batches,
    latest_run_id,
    list_committed_runs,
    read_dataset,
    read_manifest,
    read_run_file,
    read_table,
)
from tokenskip.storage.records import (
    MANIFEST_FORMAT,
    CodeVersion,
    FileRecord,
    Manifest,
    SchemaRecord,
    ShardRecord,
    code_version,
)
from tokenskip.storage.retention import apply_retention, pin, pinned_runs, unpin
from tokenskip.storage.runs import RunStore

__all__ = [
    "KINDS",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "AlreadyCommitted",
    "CodeVersion",
    "CommitConflict",
    "DuplicateKeys",
    "FileRecord",
    "FileStore",
    "IntegrityError",
    "Lock",
    "LockHeartbeat",
    "holding",
    "LockHeld",
    "LockInfo",
    "Manifest",
    "NotCommitted",
    "NotFound",
    "NotLockOwner",
    "RunStore",
    "SchemaMismatch",
    "SchemaRecord",
    "ShardConflict",
    "ShardRecord",
    "StorageConfig",
    "StorageError",
    "StoredFile",
    "apply_retention",
    "code_version",
    "committed_files",
    "committed_urls",
    "default_owner",
    "delete_dataset_file",
    "iter_batches",
    "latest_run_id",
    "list_committed_runs",
    "open_filesystem",
    "output_problem",
    "part_shard",
    "pin",
    "pinned_runs",
    "read_dataset",
    "read_dataset_file",
    "read_manifest",
    "read_run_file",
    "read_table",
    "require_dataset",
    "set_latest",
    "unpin",
    "write_dataset_file",
]
