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
"""

from __future__ import annotations

import base64
import errno
import functools
import hashlib
import io
import json
import logging
import os
import posixpath
import random
import re
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import fsspec.asyn
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from tokenskip.failpoints import failpoint
from tokenskip.schema import COMPRESSED_SCHEMA, ERROR_SCHEMA, REJECT_SCHEMA
from tokenskip.schema import config_hash as compute_config_hash

log = logging.getLogger(__name__)

KINDS = ("data", "rejects", "errors")
MANIFEST_NAME = "_MANIFEST.json"
MANIFEST_FORMAT = 1
# Canonical schemas for kinds that no shard wrote, so a reader always gets a (possibly empty) table.
_DEFAULT_SCHEMAS = {"data": COMPRESSED_SCHEMA, "rejects": REJECT_SCHEMA, "errors": ERROR_SCHEMA}
# Dataset, run, shard and lock names become path components: keep them boring.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,199}$")
# Side files of a run (report.json, _refresh.json, ...): one path component, never a name the layout uses.
_RUN_FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._=+-]{0,199}$")
_RESERVED_RUN_NAMES = frozenset({*KINDS, "_shards", MANIFEST_NAME})
# Markers read per request when walking a run's shards: bounded memory, still concurrent on S3.
_MARKER_CHUNK = 64

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# Errors


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


class _VersionMismatch(Exception):
    """Internal: a compare-and-swap found another version (or no object at all)."""


# --------------------------------------------------------------------------------------------------
# Config and filesystem


class StorageConfig(BaseModel):
    """Where runs live and how hard to try when the store misbehaves."""

    model_config = ConfigDict(extra="forbid")

    root: str = Field(
        min_length=1,
        description="Local folder, 's3://bucket/prefix' or any fsspec URL. Datasets are folders below it.",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to fsspec (e.g. {'endpoint_url': ...}, {'client_kwargs': {...}}, 'anon'). "
        "Credentials normally come from the environment, not from here, so configs stay shareable.",
    )
    retries: int = Field(
        default=4,
        ge=0,
        description="Extra attempts after a transient error (5xx, throttling, dropped connection). More "
        "rides out longer outages; fewer fails fast. Conflicts (412) are never retried.",
    )
    backoff_s: float = Field(
        default=0.2, gt=0, description="First retry delay; doubles each attempt (with jitter)."
    )
    max_backoff_s: float = Field(default=10.0, gt=0, description="Cap on one retry delay.")
    verify_sha256: bool = Field(
        default=True,
        description="Readers check each file's sha256 against the manifest. Costs one hash pass over the "
        "bytes (cheap next to parquet decoding); off still checks sizes.",
    )
    parquet_compression: str = Field(
        default="zstd", description="Parquet codec for parts: zstd is small and fast; 'none' for debugging."
    )
    allow_empty: bool = Field(
        default=False,
        description="Commit a run (and move LATEST to it) even when it loaded no problem or kept no "
        "sample. Off, such a run exits non-zero with the reason and leaves LATEST alone, so a bad input "
        "or a grader that rejects everything never replaces a good dataset with an empty one.",
    )
    run_lease_ttl_s: float = Field(
        default=600.0,
        gt=0,
        description="A run holds a lease on its folder while it writes (renewed every third of this). A "
        "second writer of the same run is refused while the lease lives; a writer that died unannounced "
        "(OOM, lost node) blocks re-runs for up to this long before its lease is taken over.",
    )


def open_filesystem(config: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``config.root`` and the root path inside it (no trailing slash)."""
    fs, root_path = fsspec.core.url_to_fs(config.root, **config.storage_options)
    root_path = root_path.rstrip("/") or "/"
    return fs, root_path


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value) or value in (".", ".."):
        raise ValueError(
            f"invalid {what} {value!r}: use 1-200 characters from [A-Za-z0-9._=+-], starting with a "
            "letter or digit (it becomes a path component)"
        )
    return value


def _check_run_file(name: str) -> str:
    if not isinstance(name, str) or not _RUN_FILE_RE.match(name) or name in _RESERVED_RUN_NAMES:
        raise ValueError(
            f"invalid run file name {name!r}: one path component of [A-Za-z0-9._=+-] (may start with '_'), "
            f"not one of {sorted(_RESERVED_RUN_NAMES)}"
        )
    return name


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    return kind


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------------
# Retries

_TRANSIENT_ERRNOS = {
    errno.EBUSY,  # s3fs: 503 SlowDown / ServiceUnavailable, 409 ConditionalRequestConflict
    getattr(errno, "EREMOTEIO", 121),  # s3fs: 500 InternalError
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.EAGAIN,
    errno.EPIPE,
}


def _is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: throttling, 5xx, dropped connections. Never for conflicts."""
    if isinstance(exc, (FileExistsError, FileNotFoundError, PermissionError, StorageError, _VersionMismatch)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    try:  # botocore's own connection errors are not OSErrors
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        if isinstance(exc, (BotoConnectionError, HTTPClientError)):
            return True
    except ImportError:  # pragma: no cover - botocore ships with s3fs
        pass
    return False


def _with_retries(config: StorageConfig, what: str, fn: Callable[[], T]) -> T:
    delay = config.backoff_s
    for attempt in range(config.retries + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt >= config.retries or not _is_transient(exc):
                raise
            log.warning("transient error on %s (attempt %d/%d): %r", what, attempt + 1, config.retries, exc)
            time.sleep(min(delay, config.max_backoff_s) * (0.5 + random.random() / 2))
            delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------------------------------
# Backends: the few primitives commits and locks need, per filesystem family.


class _Backend:
    """Generic fsspec filesystem. Conditional create uses ``pipe_file(mode="create")``, which is
    atomic where the filesystem implements it (memory, GCS) and check-then-write elsewhere; the
    compare-and-swap used by lock takeover is best effort here (read, compare, then write)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, config: StorageConfig):
        self.fs = fs
        self.config = config

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        return _with_retries(self.config, what, fn)

    # -- plain operations
    def read(self, path: str) -> bytes:
        return self._retry(f"read {path}", lambda: self.fs.cat_file(path))

    def read_many(self, paths: list[str]) -> dict[str, bytes]:
        if not paths:
            return {}
        # fs.cat fetches concurrently on async filesystems (s3fs); on_error="raise" keeps it strict.
        out = self._retry(f"read {len(paths)} files", lambda: self.fs.cat(paths, on_error="raise"))
        if len(paths) == 1 and not isinstance(out, dict):
            out = {paths[0]: out}
        return {p: out[p] for p in paths}

    def write(self, path: str, data: bytes) -> None:
        """Overwrite (or create) ``path``; readers see the old or the new bytes, never a mix."""
        self._retry(f"write {path}", lambda: self.fs.pipe_file(path, data))

    def exists(self, path: str) -> bool:
        self.fs.invalidate_cache(posixpath.dirname(path))
        return self._retry(f"exists {path}", lambda: self.fs.exists(path))

    def sizes(self, folder: str) -> dict[str, int]:
        """Name -> size of the files directly under ``folder`` ({} when it does not exist)."""
        self.fs.invalidate_cache(folder)
        try:
            entries = self._retry(f"list {folder}", lambda: self.fs.ls(folder, detail=True))
        except FileNotFoundError:
            return {}
        return {posixpath.basename(e["name"].rstrip("/")): e["size"] for e in entries if e["type"] == "file"}

    def list_names(self, folder: str) -> list[str]:
        """Names directly under ``folder`` (files and folders); [] when it does not exist."""
        self.fs.invalidate_cache(folder)
        try:
            entries = self._retry(f"list {folder}", lambda: self.fs.ls(folder, detail=False))
        except FileNotFoundError:
            return []
        return sorted({posixpath.basename(e.rstrip("/")) for e in entries} - {""})

    def delete_tree(self, path: str) -> None:
        try:
            self._retry(f"delete {path}", lambda: self.fs.rm(path, recursive=True))
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(path)

    def delete(self, path: str) -> None:
        try:
            self._retry(f"delete {path}", lambda: self.fs.rm_file(path))
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(path)

    # -- conditional operations
    def create_exclusive(self, path: str, data: bytes) -> str:
        """Write ``path`` only if absent; returns the new version. Lost race -> :class:`CommitConflict`.

        If a retried attempt finds the very bytes we meant to write, our earlier attempt landed (the
        reply was lost), so that is success, not a conflict.
        """
        try:
            version = self._retry(f"create {path}", lambda: self._create(path, data))
        except FileExistsError as exc:
            existing = self.read_versioned(path)
            if existing is not None and existing[0] == data:
                return existing[1]
            raise CommitConflict(f"{path} already exists (conditional create lost)") from exc
        finally:
            self.fs.invalidate_cache(posixpath.dirname(path))
        return version or _sha256(data)

    def _create(self, path: str, data: bytes) -> str | None:
        """Create-if-absent; FileExistsError if present. Returns the version when the store tells it."""
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self.fs.pipe_file(path, data, mode="create")
        return None

    def read_versioned(self, path: str) -> tuple[bytes, str] | None:
        try:
            data = self.read(path)
        except FileNotFoundError:
            return None
        return data, _sha256(data)

    def replace_if_version(self, path: str, data: bytes, version: str) -> str:
        current = self.read_versioned(path)
        if current is None or current[1] != version:
            raise _VersionMismatch(path)
        self.write(path, data)
        return _sha256(data)

    def delete_if_version(self, path: str, version: str) -> None:
        current = self.read_versioned(path)
        if current is None or current[1] != version:
            raise _VersionMismatch(path)
        self.delete(path)


class _LocalBackend(_Backend):
    """Local (or NFS-like POSIX) folder: atomic visibility via temp file + rename/link; compare-and-swap
    under an ``flock`` guard file, with the content sha256 as the version (contents carry a nonce)."""

    def _tmp_path(self, path: str) -> str:
        folder, name = posixpath.split(path)
        return posixpath.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")

    def _write_tmp(self, path: str, data: bytes) -> str:
        os.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = self._tmp_path(path)
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            _unlink_quiet(tmp)
            raise
        return tmp

    def write(self, path: str, data: bytes) -> None:
        tmp = self._write_tmp(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            _unlink_quiet(tmp)
            raise

    def _create(self, path: str, data: bytes) -> str | None:
        tmp = self._write_tmp(path, data)
        try:
            # link() fails with EEXIST if the target exists, and the target only ever appears complete.
            os.link(tmp, path)
        finally:
            _unlink_quiet(tmp)
        return None

    def list_names(self, folder: str) -> list[str]:
        try:
            return sorted(n for n in os.listdir(folder) if not n.startswith("."))
        except FileNotFoundError:
            return []

    def _guard(self, path: str):
        import fcntl

        os.makedirs(posixpath.dirname(path), exist_ok=True)
        guard_path = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.guard")
        return _FlockGuard(guard_path, fcntl)

    def replace_if_version(self, path: str, data: bytes, version: str) -> str:
        with self._guard(path):
            return super().replace_if_version(path, data, version)

    def delete_if_version(self, path: str, version: str) -> None:
        with self._guard(path):
            super().delete_if_version(path, version)


class _FlockGuard:
    def __init__(self, path: str, fcntl_module: Any):
        self.path = path
        self.fcntl = fcntl_module
        self.fd: int | None = None

    def __enter__(self) -> _FlockGuard:
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        self.fcntl.flock(self.fd, self.fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.fd is not None
        self.fcntl.flock(self.fd, self.fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _is_precondition_failed(exc: BaseException) -> bool:
    cause = exc if hasattr(exc, "response") else exc.__cause__
    response = getattr(cause, "response", None) or {}
    return response.get("Error", {}).get("Code") in ("PreconditionFailed", "412")


class _S3Backend(_Backend):
    """S3 (and S3-compatible stores with conditional writes): ``If-None-Match: *`` for create, the
    object's ETag with ``If-Match`` for compare-and-swap and conditional delete."""

    def _split(self, path: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(path)
        return bucket, key

    def _create(self, path: str, data: bytes) -> str | None:
        # A single PUT with If-None-Match: * (our markers, manifests and locks are small); the reply's
        # ETag is the version later compare-and-swaps use. s3fs maps the 412 to FileExistsError when the
        # store names the condition; some S3-compatible stores do not, hence the second check.
        bucket, key = self._split(path)
        try:
            out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except OSError as exc:
            if not isinstance(exc, FileExistsError) and _is_precondition_failed(exc):
                raise FileExistsError(path) from exc
            raise
        finally:
            self.fs.invalidate_cache(path)
        return out["ETag"]

    def read_versioned(self, path: str) -> tuple[bytes, str] | None:
        bucket, key = self._split(path)

        async def get() -> tuple[bytes, str]:
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with response["Body"] as body:
                return await body.read(), response["ETag"]

        try:
            # One GET gives bytes and ETag of the same object version (HEAD + GET could straddle a write).
            return self._retry(f"read {path}", lambda: fsspec.asyn.sync(self.fs.loop, get))
        except FileNotFoundError:
            return None

    def replace_if_version(self, path: str, data: bytes, version: str) -> str:
        bucket, key = self._split(path)
        try:
            out = self._retry(
                f"replace {path}",
                lambda: self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=version),
            )
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) or _is_precondition_failed(exc):
                raise _VersionMismatch(path) from exc
            raise
        finally:
            self.fs.invalidate_cache(path)
        return out["ETag"]

    def delete_if_version(self, path: str, version: str) -> None:
        bucket, key = self._split(path)
        try:
            self._retry(
                f"delete {path}",
                lambda: self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version),
            )
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) or _is_precondition_failed(exc):
                raise _VersionMismatch(path) from exc
            raise
        finally:
            self.fs.invalidate_cache(path)


def _backend(config: StorageConfig) -> tuple[_Backend, str]:
    fs, root_path = open_filesystem(config)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" in protocols or "local" in protocols:
        return _LocalBackend(fs, config), root_path
    if "s3" in protocols or "s3a" in protocols:
        return _S3Backend(fs, config), root_path
    return _Backend(fs, config), root_path


# --------------------------------------------------------------------------------------------------
# Records


class FileRecord(BaseModel):
    """One committed file, relative to the run folder."""

    path: str = Field(description="Path relative to the run folder, e.g. data/part-0003.parquet.")
    rows: int = Field(description="Rows in the file.")
    size: int = Field(description="Bytes; readers refuse a file of another size.")
    sha256: str = Field(description="Hex sha256 of the bytes; readers check it when verify_sha256.")


class SchemaRecord(BaseModel):
    text: str = Field(description="Human-readable Arrow schema.")
    ipc_base64: str = Field(description="Arrow IPC-serialised schema (exact, with field metadata).")

    @classmethod
    def of(cls, schema: pa.Schema) -> SchemaRecord:
        return cls(
            text=schema.to_string(), ipc_base64=base64.b64encode(schema.serialize().to_pybytes()).decode()
        )

    def to_arrow(self) -> pa.Schema:
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(self.ipc_base64)))


class ShardRecord(BaseModel):
    """Commit marker of one shard: the files it wrote. Written once (conditional create)."""

    shard_id: str
    created_at: str
    files: dict[str, FileRecord] = Field(description="Kind -> the part written for it.")
    schemas: dict[str, SchemaRecord] = Field(description="Kind -> Arrow schema of the part.")
    problem_ids: list[str] | None = Field(
        default=None,
        description="Problems whose generated samples this shard holds (sorted). Resume skips them and "
        "the commit refuses two shards sharing one; None for shards that hold no generated work (the "
        "input stage's rejects and errors) and for markers written before this field existed.",
    )
    summary: dict[str, Any] | None = Field(
        default=None,
        description="JSON summary of the shard's rows (tokenskip.summary.ShardSummary), so end-of-run "
        "statistics merge small records instead of re-reading parts. None on markers written before it "
        "existed (or without one): readers then compute it from the parts.",
    )


class CodeVersion(BaseModel):
    package_version: str | None
    git_sha: str | None


class Manifest(BaseModel):
    """The commit record of a run: exactly what a reader reads."""

    format: int = MANIFEST_FORMAT
    dataset: str
    run_id: str
    created_at: str
    code_version: CodeVersion
    config: Any = None
    config_hash: str | None = None
    model: str | None = None
    counts: dict[str, Any] = Field(default_factory=dict, description="Per-stage counts from the pipeline.")
    rows: dict[str, int] = Field(description="Kind -> total rows over its files.")
    schemas: dict[str, SchemaRecord] = Field(description="Kind -> Arrow schema every file of it has.")
    files: dict[str, list[FileRecord]] = Field(description="Kind -> files, in shard-id order.")
    shards: list[str] = Field(description="Committed shard ids.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Other fields passed to commit().")


@functools.lru_cache(maxsize=1)
def code_version() -> CodeVersion:
    """tokenskip's version and, when running from a git checkout, its commit."""
    import importlib.metadata

    import tokenskip

    version = getattr(tokenskip, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version("tokenskip")
        except importlib.metadata.PackageNotFoundError:
            version = None
    sha = None
    try:
        package_dir = os.path.dirname(os.path.abspath(tokenskip.__file__))
        result = subprocess.run(
            ["git", "-C", package_dir, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if result.returncode == 0:
            sha = result.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass  # no git binary or not a checkout: the package version has to do
    return CodeVersion(package_version=version, git_sha=sha)


# --------------------------------------------------------------------------------------------------
# Paths


class _DatasetPaths:
    def __init__(self, root_path: str, dataset: str):
        self.dataset_dir = posixpath.join(root_path, _check_name(dataset, "dataset name"))
        self.runs_dir = posixpath.join(self.dataset_dir, "runs")
        self.latest = posixpath.join(self.dataset_dir, "LATEST")
        self.pins_dir = posixpath.join(self.dataset_dir, "_pins")
        self.locks_dir = posixpath.join(self.dataset_dir, "_locks")

    def run_dir(self, run_id: str) -> str:
        return posixpath.join(self.runs_dir, _check_name(run_id, "run id"))

    def manifest(self, run_id: str) -> str:
        return posixpath.join(self.run_dir(run_id), MANIFEST_NAME)


# --------------------------------------------------------------------------------------------------
# Writer


class RunStore:
    """Writes one run: shards (each idempotent), then one commit. Committed runs never change."""

    def __init__(self, config: StorageConfig, dataset: str, run_id: str):
        self.config = config
        self.dataset = dataset
        self.run_id = _check_name(run_id, "run id")
        self._backend, root_path = _backend(config)
        self._paths = _DatasetPaths(root_path, dataset)
        self.run_dir = self._paths.run_dir(run_id)
        self._manifest_path = self._paths.manifest(run_id)

    def __reduce__(self):
        # Ray ships stores to workers: send the arguments, rebuild the filesystem client there.
        return (RunStore, (self.config, self.dataset, self.run_id))

    def _marker_path(self, shard_id: str) -> str:
        return posixpath.join(self.run_dir, "_shards", f"{shard_id}.json")

    def local_dir(self) -> Path | None:
        """The run folder as a local path when the output root is on this machine's filesystem (a log
        file can then be appended to in place), else None."""
        return Path(self.run_dir) if isinstance(self._backend, _LocalBackend) else None

    def is_committed(self) -> bool:
        return self._backend.exists(self._manifest_path)

    def _refuse_if_committed(self) -> None:
        if self.is_committed():
            raise AlreadyCommitted(f"run {self.run_id!r} of dataset {self.dataset!r} is already committed")

    def _encode(self, table: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        compression = None if self.config.parquet_compression == "none" else self.config.parquet_compression
        pq.write_table(table, sink, compression=compression)
        return sink.getvalue().to_pybytes()

    def write_shard(
        self,
        shard_id: str,
        tables: dict[str, pa.Table],
        *,
        summary: dict[str, Any] | BaseModel | None = None,
        problem_ids: Iterable[str] | None = None,
    ) -> ShardRecord:
        """Write one parquet part per kind, then the shard's commit marker: :meth:`write_parts` then
        :meth:`commit_shard` in one call.

        ``summary`` (a JSON-able dict or a pydantic model, e.g. :class:`tokenskip.summary.ShardSummary`)
        goes into the marker, so end-of-run statistics need the markers only. ``problem_ids``: the
        problems whose generated samples the shard holds (resume and the commit's duplicate check use
        them). Writing a committed shard again with the same content returns its record and writes
        nothing (the committed marker keeps its summary); different content raises
        :class:`ShardConflict` (and leaves the committed parts untouched).
        """
        record, encoded = self._write_parts(shard_id, tables, summary, problem_ids)
        return self._commit_shard(record, tables, encoded)

    def write_parts(
        self,
        shard_id: str,
        tables: dict[str, pa.Table],
        *,
        summary: dict[str, Any] | BaseModel | None = None,
        problem_ids: Iterable[str] | None = None,
    ) -> ShardRecord:
        """Write the shard's parts only and return the record that :meth:`commit_shard` turns into
        its marker: workers write the data, the driver commits. Parts without a marker are invisible
        (readers and the manifest follow markers) and are overwritten by a retry (same names). For a
        shard already committed with the same content, nothing is written and its marker's record
        comes back; different content raises :class:`ShardConflict`."""
        return self._write_parts(shard_id, tables, summary, problem_ids)[0]

    def commit_shard(self, record: ShardRecord) -> ShardRecord:
        """Create the shard's commit marker from ``record`` (conditional create). Another attempt's
        marker with the same parts (sha256) is success; with other parts, :class:`ShardConflict`."""
        return self._commit_shard(record, None, None)

    def _write_parts(
        self,
        shard_id: str,
        tables: dict[str, pa.Table],
        summary: dict[str, Any] | BaseModel | None,
        problem_ids: Iterable[str] | None,
    ) -> tuple[ShardRecord, dict[str, bytes]]:
        if isinstance(summary, BaseModel):
            summary = summary.model_dump(mode="json")
        if summary is not None and not isinstance(summary, dict):
            raise TypeError(f"summary must be a dict, a pydantic model or None, got {type(summary).__name__}")
        _check_name(shard_id, "shard id")
        if not tables:
            raise ValueError("write_shard needs at least one table (kind -> pa.Table)")
        for kind, table in tables.items():
            _check_kind(kind)
            if not isinstance(table, pa.Table):
                raise TypeError(f"tables[{kind!r}] must be a pyarrow.Table, got {type(table).__name__}")
        self._refuse_if_committed()

        encoded = {kind: self._encode(table) for kind, table in sorted(tables.items())}
        existing = self._read_marker(self._marker_path(shard_id))
        if existing is not None:
            # Checked before touching the parts, so a conflicting rewrite cannot clobber committed data.
            return self._same_shard_or_raise(existing, tables, encoded), encoded

        files = {}
        for kind, data in encoded.items():
            rel = f"{kind}/part-{shard_id}.parquet"
            self._backend.write(posixpath.join(self.run_dir, rel), data)
            files[kind] = FileRecord(
                path=rel, rows=tables[kind].num_rows, size=len(data), sha256=_sha256(data)
            )
        failpoint("shard-parts-written")  # tests: a writer dying between its parts and its marker
        record = ShardRecord(
            shard_id=shard_id,
            created_at=_now(),
            files=files,
            schemas={kind: SchemaRecord.of(tables[kind].schema) for kind in encoded},
            summary=summary,
            problem_ids=None if problem_ids is None else sorted(set(problem_ids)),
        )
        return record, encoded

    def _commit_shard(
        self, record: ShardRecord, tables: dict[str, pa.Table] | None, encoded: dict[str, bytes] | None
    ) -> ShardRecord:
        marker_path = self._marker_path(_check_name(record.shard_id, "shard id"))
        try:
            self._backend.create_exclusive(marker_path, record.model_dump_json(indent=1).encode())
        except CommitConflict:
            # Another attempt of this shard committed first (or this record came from its marker).
            # Deterministic part names mean concurrent attempts must write the same content; the
            # sha256 in the marker (checked by readers) catches the case where they did not.
            existing = self._read_marker(marker_path)
            if existing is None:  # only retention deletes markers, and only of committed runs
                raise ShardConflict(
                    f"shard {record.shard_id!r} of run {self.run_id!r}: marker vanished"
                ) from None
            if tables is not None and encoded is not None:
                return self._same_shard_or_raise(existing, tables, encoded)
            same = set(existing.files) == set(record.files) and all(
                existing.files[k].sha256 == record.files[k].sha256 for k in record.files
            )
            if not same:
                raise ShardConflict(
                    f"shard {record.shard_id!r} of run {self.run_id!r} is already committed with other parts"
                ) from None
            return existing
        return record

    def _same_shard_or_raise(
        self, existing: ShardRecord, tables: dict[str, pa.Table], encoded: dict[str, bytes]
    ) -> ShardRecord:
        if set(existing.files) != set(encoded):
            raise ShardConflict(
                f"shard {existing.shard_id!r} of run {self.run_id!r} is committed with kinds "
                f"{sorted(existing.files)}, not {sorted(encoded)}"
            )
        for kind, data in encoded.items():
            if existing.files[kind].sha256 == _sha256(data):
                continue
            # Same rows may encode differently (another pyarrow version): compare contents too.
            committed = pq.read_table(
                io.BytesIO(self._backend.read(posixpath.join(self.run_dir, existing.files[kind].path)))
            )
            if not committed.equals(tables[kind]):
                raise ShardConflict(
                    f"shard {existing.shard_id!r} of run {self.run_id!r} is already committed with different "
                    f"{kind!r} content; shard ids must name deterministic content"
                )
        return existing

    def _read_marker(self, path: str) -> ShardRecord | None:
        try:
            return ShardRecord.model_validate_json(self._backend.read(path))
        except FileNotFoundError:
            return None

    def committed_shard_ids(self) -> list[str]:
        """Ids of the shards with a commit marker, from one listing (markers only appear complete)."""
        folder = posixpath.join(self.run_dir, "_shards")
        names = self._backend.list_names(folder)
        return sorted(n.removesuffix(".json") for n in names if n.endswith(".json") and not n.startswith("."))

    def iter_committed_shards(self) -> Iterator[ShardRecord]:
        """Commit markers in shard-id order, read a chunk at a time: memory stays at one chunk of
        markers however many shards the run has. Lists ``_shards/``: for writers only."""
        folder = posixpath.join(self.run_dir, "_shards")
        ids = self.committed_shard_ids()
        for start in range(0, len(ids), _MARKER_CHUNK):
            paths = [posixpath.join(folder, f"{i}.json") for i in ids[start : start + _MARKER_CHUNK]]
            for data in self._backend.read_many(paths).values():
                yield ShardRecord.model_validate_json(data)

    def committed_shards(self) -> dict[str, ShardRecord]:
        """Shards with a commit marker (for resume: skip these). Lists ``_shards/``, so it is for
        writers only; readers use the manifest. Holds every marker at once: prefer
        :meth:`committed_shard_ids` or :meth:`iter_committed_shards` on big runs."""
        return {record.shard_id: record for record in self.iter_committed_shards()}

    def iter_part_batches(
        self,
        record: ShardRecord,
        kind: str,
        columns: list[str] | None = None,
        batch_size: int = 4096,
    ) -> Iterator[pa.RecordBatch]:
        """The rows of one committed shard's part of ``kind``, batch by batch, checked against the
        marker (size, sha256, rows); nothing when the shard wrote no such part."""
        _check_kind(kind)
        file = record.files.get(kind)
        if file is None:
            return
        schema = record.schemas[kind].to_arrow()
        yield from _iter_file_batches(
            self._backend, posixpath.join(self.run_dir, file.path), file, schema, columns, batch_size
        )

    def write_file(self, name: str, data: bytes) -> str:
        """Write a side file of the run (``report.json``, ``report.html``, ...) next to its manifest,
        replacing any earlier version atomically (readers see old or new bytes); retried on transient
        errors. Allowed after the commit: side files are not part of the manifest. Returns its path."""
        path = posixpath.join(self.run_dir, _check_run_file(name))
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        data = bytes(data)
        if isinstance(self._backend, _LocalBackend):
            # The local write is atomic (temp + rename) but not retried on its own.
            self._backend._retry(f"write {path}", lambda: self._backend.write(path, data))
        else:
            self._backend.write(path, data)
        return path

    def read_file(self, name: str) -> bytes:
        """A side file written with :meth:`write_file` (FileNotFoundError if absent)."""
        return self._backend.read(posixpath.join(self.run_dir, _check_run_file(name)))

    def read_part(self, file: FileRecord, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
        """One committed part of this run (listed by its manifest or a marker), checked against its
        record (size, sha256, rows), with ``schema`` (only ``columns`` if given)."""
        batches = list(
            _iter_file_batches(
                self._backend, posixpath.join(self.run_dir, file.path), file, schema, columns, 1 << 20
            )
        )
        target = _project(schema, columns, "file")
        return pa.Table.from_batches(batches, schema=target) if batches else target.empty_table()

    def folder_exists(self) -> bool:
        """Whether anything was written for this run (committed or not): an attempt's folder."""
        return self._backend.exists(self.run_dir)

    def shard_problem_ids(self, record: ShardRecord) -> set[str]:
        """The problems a committed shard holds: from its marker, or (markers written before markers
        recorded them) from the ``problem_id`` column of its parts."""
        if record.problem_ids is not None:
            return set(record.problem_ids)
        ids: set[str] = set()
        for file in record.files.values():
            if file.rows:
                data = self._backend.read(posixpath.join(self.run_dir, file.path))
                column = pq.read_table(io.BytesIO(data), columns=["problem_id"]).column(0)
                ids.update(p for p in column.to_pylist() if p is not None)
        return ids

    def lease(self) -> Lock:
        """The lease a writer of this run holds while it works (``_locks/run-<run_id>.json``): a second
        writer of the same run is refused before it starts any work (:class:`LockHeld`)."""
        return Lock(self.config, self.dataset, f"run-{self.run_id}", ttl_s=self.config.run_lease_ttl_s)

    def commit(
        self,
        manifest_fields: dict[str, Any],
        schemas: dict[str, pa.Schema] | None = None,
        *,
        move_latest: bool = True,
    ) -> Manifest:
        """Write the manifest (conditional create = the commit), then point LATEST at this run unless
        ``move_latest`` is False (the caller decides whether the run is fit to be LATEST).

        ``manifest_fields`` may hold ``config`` (JSON-able; its hash is computed if ``config_hash`` is
        absent), ``config_hash``, ``model``, ``counts`` (per stage); other keys land in ``extra``.
        ``schemas`` gives the Arrow schema of kinds that no shard wrote (data/rejects/errors default to the
        shared schemas). Raises :class:`AlreadyCommitted` if the run is committed (also on a lost race).
        """
        self._refuse_if_committed()
        fields = dict(manifest_fields)
        known = {k: fields.pop(k) for k in ("config", "config_hash", "model", "counts") if k in fields}
        if isinstance(known.get("config"), BaseModel):
            known["config"] = known["config"].model_dump(mode="json")
        if "config" in known and "config_hash" not in known:
            known["config_hash"] = compute_config_hash(known["config"])
        # Marker by marker: only files and schemas are kept (summaries are dropped as we go), and a
        # compact fingerprint of each problem for the duplicate check.
        shard_ids: list[str] = []
        problems = _ProblemOwners(self.run_id)
        kind_schemas: dict[str, SchemaRecord] = {}
        files: dict[str, list[FileRecord]] = {}
        for record in self.iter_committed_shards():
            shard_id = record.shard_id
            shard_ids.append(shard_id)
            problems.add(record)
            for kind, file in record.files.items():
                schema = record.schemas[kind]
                first = kind_schemas.setdefault(kind, schema)
                if first.ipc_base64 != schema.ipc_base64 and not first.to_arrow().equals(schema.to_arrow()):
                    raise SchemaMismatch(
                        f"run {self.run_id!r}: shard {shard_id!r} has {kind!r} schema\n{schema.text}\n"
                        f"but an earlier shard has\n{first.text}"
                    )
                files.setdefault(kind, []).append(file)
        problems.check(lambda shard_id: self._read_marker(self._marker_path(shard_id)).problem_ids or [])
        for kind, schema in {**_DEFAULT_SCHEMAS, **(schemas or {})}.items():
            _check_kind(kind)
            if kind in kind_schemas:
                if not kind_schemas[kind].to_arrow().equals(schema) and kind in (schemas or {}):
                    raise SchemaMismatch(f"run {self.run_id!r}: {kind!r} schema passed to commit differs")
            else:
                kind_schemas[kind] = SchemaRecord.of(schema)
                files[kind] = []
        self._verify_files(files)

        manifest = Manifest(
            dataset=self.dataset,
            run_id=self.run_id,
            created_at=_now(),
            code_version=code_version(),
            rows={kind: sum(f.rows for f in fs) for kind, fs in files.items()},
            schemas=kind_schemas,
            files=files,
            shards=shard_ids,
            extra=fields,
            **known,
        )
        try:
            self._backend.create_exclusive(self._manifest_path, manifest.model_dump_json(indent=1).encode())
        except CommitConflict as exc:
            raise AlreadyCommitted(
                f"run {self.run_id!r} of dataset {self.dataset!r} was committed by someone else"
            ) from exc
        # LATEST is only a pointer, moved after the commit: a crash here leaves it on the previous run.
        if move_latest:
            _write_latest(self._backend, self._paths, self.run_id)
        return manifest

    def _verify_files(self, files: dict[str, list[FileRecord]]) -> None:
        """Every part the manifest will list must exist with its recorded size (catches a part lost or
        clobbered after its shard committed) - before the commit, not at the first read."""
        for kind, records in files.items():
            # One listing per kind instead of one HEAD per file; the listing only confirms, never decides.
            sizes = self._backend.sizes(posixpath.join(self.run_dir, kind)) if records else {}
            for record in records:
                size = sizes.get(posixpath.basename(record.path))
                if size != record.size:
                    raise IntegrityError(
                        f"run {self.run_id!r}: {record.path} is {'missing' if size is None else f'{size} bytes'}"
                        f", its shard marker says {record.size} bytes; rewrite that shard in a new run"
                    )


class _ProblemOwners:
    """The commit's duplicate check: a problem's samples (and so their keys) must live in exactly one
    shard of a run; two shards sharing one means attempts planned shards differently, and committing
    both would list every such sample twice. Holds 8 bytes per problem (the first 64 bits of its id,
    which is a hex digest) plus the shard index, not the id strings, so a million problems cost ~16 MB;
    a clash of fingerprints is confirmed on the full ids before it is reported."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._prints: list[np.ndarray] = []
        self._shards: list[np.ndarray] = []
        self._shard_ids: list[str] = []

    def add(self, record: ShardRecord) -> None:
        ids = record.problem_ids or []
        index = len(self._shard_ids)
        self._shard_ids.append(record.shard_id)
        self._prints.append(np.fromiter((_fingerprint(p) for p in ids), dtype=np.uint64, count=len(ids)))
        self._shards.append(np.full(len(ids), index, dtype=np.int64))

    def check(self, read_ids: Callable[[str], list[str]]) -> None:
        """:class:`DuplicateKeys` naming a problem held by two shards. ``read_ids(shard_id)`` re-reads
        a shard's ids to confirm a fingerprint clash."""
        if not self._prints:
            return
        prints, shards = np.concatenate(self._prints), np.concatenate(self._shards)
        order = np.argsort(prints, kind="stable")
        prints, shards = prints[order], shards[order]
        clash = np.nonzero((prints[1:] == prints[:-1]) & (shards[1:] != shards[:-1]))[0]
        for i in clash:
            a, b = self._shard_ids[shards[i]], self._shard_ids[shards[i + 1]]
            common = sorted(set(read_ids(a)) & set(read_ids(b)))
            if common:
                raise DuplicateKeys(
                    f"run {self.run_id!r}: problem {common[0]!r} is in shard {a!r} and in shard {b!r}; "
                    "committing both would list its sample keys twice"
                )


def _fingerprint(problem_id: str) -> int:
    """64 bits of a problem id: its leading hex digits (ids are sha256 digests), or a hash of ids
    that are not hex (hand-made tables)."""
    try:
        return int(problem_id[:16], 16)
    except ValueError:
        return int.from_bytes(hashlib.blake2b(problem_id.encode(), digest_size=8).digest(), "big")


def _write_latest(backend: _Backend, paths: _DatasetPaths, run_id: str) -> None:
    backend.write(paths.latest, json.dumps({"run_id": run_id, "updated_at": _now()}).encode())


# --------------------------------------------------------------------------------------------------
# Readers


def _latest_run_id(backend: _Backend, paths: _DatasetPaths, dataset: str) -> str:
    try:
        pointer = json.loads(backend.read(paths.latest))
    except FileNotFoundError:
        raise NotCommitted(f"dataset {dataset!r} has no LATEST pointer: no run was committed yet") from None
    return pointer["run_id"]


def _read_manifest(backend: _Backend, paths: _DatasetPaths, dataset: str, run_id: str | None) -> Manifest:
    if run_id is None:
        run_id = _latest_run_id(backend, paths, dataset)
    try:
        data = backend.read(paths.manifest(run_id))
    except FileNotFoundError:
        raise NotCommitted(
            f"run {run_id!r} of dataset {dataset!r} has no manifest: it is not committed (or was deleted)"
        ) from None
    return Manifest.model_validate_json(data)


def read_manifest(config: StorageConfig, dataset: str, run_id: str | None = None) -> Manifest:
    """The manifest of ``run_id``, or of the run LATEST points to when None."""
    backend, root_path = _backend(config)
    return _read_manifest(backend, _DatasetPaths(root_path, dataset), dataset, run_id)


def _kind_schema(manifest: Manifest, kind: str) -> pa.Schema:
    if kind not in manifest.schemas:
        raise StorageError(
            f"run {manifest.run_id!r} of {manifest.dataset!r} has no {kind!r} table; "
            f"it has {sorted(manifest.schemas)}"
        )
    return manifest.schemas[kind].to_arrow()


def read_table(
    config: StorageConfig,
    dataset: str,
    kind: str = "data",
    run_id: str | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """All rows of ``kind`` in a committed run (LATEST when ``run_id`` is None), read from exactly the
    files its manifest lists, each checked against its recorded size (and sha256), with the schema the
    manifest records (only ``columns`` if given)."""
    _check_kind(kind)
    backend, root_path = _backend(config)
    paths = _DatasetPaths(root_path, dataset)
    manifest = _read_manifest(backend, paths, dataset, run_id)
    schema = _project(_kind_schema(manifest, kind), columns, kind)
    run_dir = paths.run_dir(manifest.run_id)
    records = {posixpath.join(run_dir, f.path): f for f in manifest.files.get(kind, [])}
    try:
        blobs = backend.read_many(list(records))
    except FileNotFoundError as exc:
        raise IntegrityError(
            f"run {manifest.run_id!r}: a {kind!r} file listed in the manifest is missing"
        ) from exc
    tables = []
    for path, record in records.items():
        data = blobs[path]
        if len(data) != record.size:
            raise IntegrityError(f"{path}: {len(data)} bytes, the manifest says {record.size}")
        if config.verify_sha256 and _sha256(data) != record.sha256:
            raise IntegrityError(f"{path}: sha256 differs from the manifest")
        table = pq.read_table(io.BytesIO(data), columns=columns)
        if table.num_rows != record.rows:
            raise IntegrityError(f"{path}: {table.num_rows} rows, the manifest says {record.rows}")
        tables.append(table if table.schema.equals(schema, check_metadata=True) else table.cast(schema))
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables)


def _project(schema: pa.Schema, columns: list[str] | None, kind: str) -> pa.Schema:
    if columns is None:
        return schema
    unknown = sorted(set(columns) - set(schema.names))
    if unknown:
        raise ValueError(f"unknown columns {unknown} for {kind!r}; the schema has {schema.names}")
    return pa.schema([schema.field(c) for c in columns], metadata=schema.metadata)


def _read_checked(backend: _Backend, path: str, record: FileRecord) -> bytes:
    """One file's bytes, refused unless size (and sha256 when configured) match its record."""
    try:
        data = backend.read(path)
    except FileNotFoundError:
        raise IntegrityError(f"{path}: listed in the manifest (or shard marker) but missing") from None
    if len(data) != record.size:
        raise IntegrityError(f"{path}: {len(data)} bytes, the manifest says {record.size}")
    if backend.config.verify_sha256 and _sha256(data) != record.sha256:
        raise IntegrityError(f"{path}: sha256 differs from the manifest")
    return data


def _iter_file_batches(
    backend: _Backend,
    path: str,
    record: FileRecord,
    schema: pa.Schema,
    columns: list[str] | None,
    batch_size: int,
) -> Iterator[pa.RecordBatch]:
    """Batches of one checked file with exactly ``schema`` (projected to ``columns``). Parquet needs
    its footer first, so the file is read whole (checked, then decoded batch by batch): peak memory is
    one file's bytes plus one decoded batch, whatever the size of the run."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    target = _project(schema, columns, "file")
    data = _read_checked(backend, path, record)
    parquet = pq.ParquetFile(pa.BufferReader(data))
    if parquet.metadata.num_rows != record.rows:
        raise IntegrityError(f"{path}: {parquet.metadata.num_rows} rows, the manifest says {record.rows}")
    for batch in parquet.iter_batches(batch_size=batch_size, columns=target.names):
        yield batch if batch.schema.equals(target, check_metadata=True) else batch.cast(target)


def iter_batches(
    config: StorageConfig,
    dataset: str,
    kind: str = "data",
    run_id: str | None = None,
    columns: list[str] | None = None,
    batch_size: int = 4096,
) -> Iterator[pa.RecordBatch]:
    """The rows of ``kind`` in a committed run (LATEST when ``run_id`` is None) as record batches of at
    most ``batch_size`` rows, file by file in manifest order: the files the manifest lists and no
    others, each checked against its size/sha256/rows before any of its rows are yielded, with the
    manifest's schema (only ``columns`` if given). Memory stays at about one file, not the run."""
    _check_kind(kind)
    backend, root_path = _backend(config)
    paths = _DatasetPaths(root_path, dataset)
    manifest = _read_manifest(backend, paths, dataset, run_id)
    schema = _kind_schema(manifest, kind)
    _project(schema, columns, kind)  # unknown columns fail before the first read
    run_dir = paths.run_dir(manifest.run_id)
    for record in manifest.files.get(kind, []):
        yield from _iter_file_batches(
            backend, posixpath.join(run_dir, record.path), record, schema, columns, batch_size
        )


def read_dataset(
    config: StorageConfig,
    dataset: str,
    kind: str = "data",
    run_id: str | None = None,
    columns: list[str] | None = None,
    **read_parquet_args: Any,
):
    """A :class:`ray.data.Dataset` over ``kind`` of a committed run, read by Ray workers from exactly
    the manifest's files (never a directory listing) with the manifest's schema.

    Before building it, one listing per kind checks that every file exists with its recorded size
    (catches a lost or truncated part); the sha256 is not checked here, since the bytes are read on the
    workers (use :func:`iter_batches` for a fully checked read). ``read_parquet_args`` go to
    ``ray.data.read_parquet`` (e.g. ``override_num_blocks``)."""
    import ray.data
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    _check_kind(kind)
    backend, root_path = _backend(config)
    paths = _DatasetPaths(root_path, dataset)
    manifest = _read_manifest(backend, paths, dataset, run_id)
    schema = _kind_schema(manifest, kind)
    _project(schema, columns, kind)  # unknown columns fail here, not on a worker
    run_dir = paths.run_dir(manifest.run_id)
    records = [r for r in manifest.files.get(kind, []) if r.rows]
    if not records:
        return ray.data.from_arrow(_project(schema, columns, kind).empty_table())
    sizes = backend.sizes(posixpath.join(run_dir, kind))
    for record in records:
        size = sizes.get(posixpath.basename(record.path))
        if size != record.size:
            raise IntegrityError(
                f"{posixpath.join(run_dir, record.path)}: "
                f"{'missing' if size is None else f'{size} bytes'}, the manifest says {record.size}"
            )
    ds = ray.data.read_parquet(
        [posixpath.join(run_dir, r.path) for r in records],
        filesystem=PyFileSystem(FSSpecHandler(backend.fs)),
        schema=schema,
        **read_parquet_args,
    )
    return ds if columns is None else ds.select_columns(columns)


def _dataset_file_path(config: StorageConfig, dataset: str, name: str) -> tuple[_Backend, str]:
    """A dataset-level state file, e.g. ``_refresh/in_progress.json``: components of
    [A-Za-z0-9._=+-], the first starting with '_' so it never meets ``runs/`` or ``LATEST``."""
    parts = name.split("/") if isinstance(name, str) else []
    if (
        not parts
        or not parts[0].startswith("_")
        or any(not _RUN_FILE_RE.match(p) or p in (".", "..") for p in parts)
    ):
        raise ValueError(f"invalid dataset file name {name!r}: e.g. '_refresh/in_progress.json'")
    backend, root_path = _backend(config)
    return backend, posixpath.join(_DatasetPaths(root_path, dataset).dataset_dir, *parts)


def read_dataset_file(config: StorageConfig, dataset: str, name: str) -> bytes | None:
    """A dataset-level state file's bytes, or None when it does not exist."""
    backend, path = _dataset_file_path(config, dataset, name)
    try:
        return backend.read(path)
    except FileNotFoundError:
        return None


def write_dataset_file(config: StorageConfig, dataset: str, name: str, data: bytes) -> None:
    """Write (replace atomically, retried) a dataset-level state file."""
    backend, path = _dataset_file_path(config, dataset, name)
    if isinstance(backend, _LocalBackend):
        backend._retry(f"write {path}", lambda: backend.write(path, data))
    else:
        backend.write(path, data)


def delete_dataset_file(config: StorageConfig, dataset: str, name: str) -> None:
    """Delete a dataset-level state file (nothing if absent)."""
    backend, path = _dataset_file_path(config, dataset, name)
    backend.delete(path)


def read_run_file(config: StorageConfig, dataset: str, name: str, run_id: str | None = None) -> bytes:
    """A side file of a committed run (``report.json``, ``report.txt``, ``report.html``, ...; LATEST's
    run when ``run_id`` is None), written with :meth:`RunStore.write_file`."""
    backend, root_path = _backend(config)
    paths = _DatasetPaths(root_path, dataset)
    manifest = _read_manifest(backend, paths, dataset, run_id)
    return backend.read(posixpath.join(paths.run_dir(manifest.run_id), _check_run_file(name)))


def committed_files(
    config: StorageConfig, dataset: str, kind: str = "data", run_id: str | None = None
) -> tuple[fsspec.AbstractFileSystem, list[str], pa.Schema]:
    """The filesystem, full paths and schema of ``kind``'s files in a committed run, for readers that
    parallelise themselves (e.g. ``ray.data.read_parquet(paths, filesystem=PyFileSystem(FSSpecHandler(
    fs)), schema=schema)``). They read exactly the manifest's files but skip the size/sha256 checks that
    :func:`read_table` does."""
    _check_kind(kind)
    backend, root_path = _backend(config)
    paths = _DatasetPaths(root_path, dataset)
    manifest = _read_manifest(backend, paths, dataset, run_id)
    schema = _kind_schema(manifest, kind)
    run_dir = paths.run_dir(manifest.run_id)
    return backend.fs, [posixpath.join(run_dir, f.path) for f in manifest.files.get(kind, [])], schema


def list_committed_runs(config: StorageConfig, dataset: str) -> list[Manifest]:
    """Committed runs (those with a manifest), oldest commit first. Lists ``runs/`` to find
    candidates; folders without a manifest (in progress, crashed) are not runs."""
    backend, root_path = _backend(config)
    paths = _DatasetPaths(root_path, dataset)
    candidates = [n for n in backend.list_names(paths.runs_dir) if _NAME_RE.match(n)]
    manifest_paths = [paths.manifest(n) for n in candidates]
    manifests = []
    for path in manifest_paths:
        try:
            manifests.append(Manifest.model_validate_json(backend.read(path)))
        except FileNotFoundError:
            continue
    return sorted(manifests, key=lambda m: (m.created_at, m.run_id))


def latest_run_id(config: StorageConfig, dataset: str) -> str:
    """The run LATEST points to (:class:`NotCommitted` if none)."""
    backend, root_path = _backend(config)
    return _latest_run_id(backend, _DatasetPaths(root_path, dataset), dataset)


def output_problem(config: StorageConfig) -> str | None:
    """Why runs cannot be written under ``config.root`` (None: they can, as far as can be told
    without writing): a local root whose nearest existing folder is not writable, or an object-store
    root whose bucket does not exist."""
    backend, root_path = _backend(config)
    if isinstance(backend, _LocalBackend):
        folder = os.path.abspath(root_path)
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            return f"output root {config.root!r}: {folder} is a file, not a folder"
        try:  # a probe file, not os.access: root passes access checks on read-only mounts and /proc
            fd, probe = tempfile.mkstemp(prefix=".tokenskip-probe-", dir=folder)
        except OSError as exc:
            return f"output root {config.root!r}: {folder} is not writable ({exc.strerror or exc})"
        os.close(fd)
        os.unlink(probe)
        return None
    bucket = root_path.strip("/").split("/", 1)[0]
    try:
        if not backend.exists(bucket):
            return f"output root {config.root!r}: bucket {bucket!r} does not exist"
    except PermissionError as exc:
        return f"output root {config.root!r}: access denied to bucket {bucket!r} ({exc})"
    return None


def require_dataset(config: StorageConfig, dataset: str) -> None:
    """:class:`NotFound` unless the output root exists and holds ``dataset`` (a LATEST pointer or a
    ``runs/`` folder), so commands on a mistyped root or dataset say so instead of reporting nothing."""
    backend, root_path = _backend(config)
    paths = _DatasetPaths(root_path, dataset)
    if not backend.exists(root_path):
        raise NotFound(f"output root {config.root!r} does not exist")
    if not (backend.exists(paths.latest) or backend.list_names(paths.runs_dir)):
        raise NotFound(f"dataset {dataset!r} not found under {config.root!r} (no LATEST, no runs)")


def set_latest(config: StorageConfig, dataset: str, run_id: str) -> None:
    """Point LATEST at a committed run (rollback / roll forward). Refuses a run without manifest."""
    if not run_id:
        raise ValueError("set_latest needs the run id to point LATEST at")
    backend, root_path = _backend(config)
    paths = _DatasetPaths(root_path, dataset)
    _read_manifest(backend, paths, dataset, run_id)
    _write_latest(backend, paths, run_id)


def pin(config: StorageConfig, dataset: str, run_id: str, reason: str = "") -> None:
    """Protect a committed run from retention."""
    backend, root_path = _backend(config)
    paths = _DatasetPaths(root_path, dataset)
    _read_manifest(backend, paths, dataset, run_id)
    backend.write(
        posixpath.join(paths.pins_dir, f"{run_id}.json"),
        json.dumps({"run_id": run_id, "reason": reason, "pinned_at": _now()}).encode(),
    )


def unpin(config: StorageConfig, dataset: str, run_id: str) -> None:
    backend, root_path = _backend(config)
    paths = _DatasetPaths(root_path, dataset)
    backend.delete(posixpath.join(paths.pins_dir, f"{_check_name(run_id, 'run id')}.json"))


def pinned_runs(config: StorageConfig, dataset: str) -> set[str]:
    backend, root_path = _backend(config)
    paths = _DatasetPaths(root_path, dataset)
    return {n.removesuffix(".json") for n in backend.list_names(paths.pins_dir) if n.endswith(".json")}


def apply_retention(
    config: StorageConfig, dataset: str, keep_last: int, pinned: Iterable[str] = ()
) -> list[str]:
    """Delete committed runs beyond the newest ``keep_last``, except LATEST's run, runs in ``pinned``
    and runs pinned with :func:`pin`. Runs without a manifest (possibly still being written) are never
    touched. Returns the deleted run ids, oldest first. Hold a :class:`Lock` around it if writers or
    other retention jobs can run at the same time."""
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0, got {keep_last}")
    backend, root_path = _backend(config)
    paths = _DatasetPaths(root_path, dataset)
    runs = [m.run_id for m in list_committed_runs(config, dataset)]
    protected = (
        set(pinned) | pinned_runs(config, dataset) | set(runs[len(runs) - keep_last :] if keep_last else [])
    )
    try:
        protected.add(_latest_run_id(backend, paths, dataset))
    except NotCommitted:
        pass
    deleted = []
    for run_id in runs:
        if run_id in protected:
            continue
        # Manifest first: the run is uncommitted (invisible) before any of its files go.
        backend.delete(paths.manifest(run_id))
        backend.delete_tree(paths.run_dir(run_id))
        deleted.append(run_id)
    return deleted


# --------------------------------------------------------------------------------------------------
# Locks


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
        self.name = _check_name(name, "lock name")
        self.ttl_s = ttl_s
        self.owner = owner or default_owner()
        self._backend, root_path = _backend(config)
        self.path = posixpath.join(_DatasetPaths(root_path, dataset).locks_dir, f"{name}.json")
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
            except _VersionMismatch:
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
            except _VersionMismatch:
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
        except _VersionMismatch:
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
        except _VersionMismatch:
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
