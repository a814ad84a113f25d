"""Backends: the few primitives commits and locks need, per filesystem family (generic fsspec, local
folder, S3), each retried on transient errors (throttling, 5xx, dropped connections)."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import posixpath
import random
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
import fsspec.asyn

from tokenskip.storage.config import StorageConfig, open_filesystem
from tokenskip.storage.errors import CommitConflict, StorageError, VersionMismatch

log = logging.getLogger(__name__)

T = TypeVar("T")


def sha256_hex(data: bytes) -> str:
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
    if isinstance(exc, (FileExistsError, FileNotFoundError, PermissionError, StorageError, VersionMismatch)):
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


def with_retries(config: StorageConfig, what: str, fn: Callable[[], T]) -> T:
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


class Backend:
    """Generic fsspec filesystem. Conditional create uses ``pipe_file(mode="create")``, which is
    atomic where the filesystem implements it (memory, GCS) and check-then-write elsewhere; the
    compare-and-swap used by lock takeover is best effort here (read, compare, then write)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, config: StorageConfig):
        self.fs = fs
        self.config = config

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        return with_retries(self.config, what, fn)

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

    def write_retried(self, path: str, data: bytes) -> None:
        """:meth:`write`, retried as a whole on transient errors (side and state files). Here
        :meth:`write` already retries."""
        self.write(path, data)

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
        return version or sha256_hex(data)

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
        return data, sha256_hex(data)

    def replace_if_version(self, path: str, data: bytes, version: str) -> str:
        current = self.read_versioned(path)
        if current is None or current[1] != version:
            raise VersionMismatch(path)
        self.write(path, data)
        return sha256_hex(data)

    def delete_if_version(self, path: str, version: str) -> None:
        current = self.read_versioned(path)
        if current is None or current[1] != version:
            raise VersionMismatch(path)
        self.delete(path)


class LocalBackend(Backend):
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

    def write_retried(self, path: str, data: bytes) -> None:
        # The local write is atomic (temp + rename) but not retried on its own.
        self._retry(f"write {path}", lambda: self.write(path, data))

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


class _S3Backend(Backend):
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

    def _call_if_version(self, what: str, path: str, method: str, **kwargs: Any) -> dict[str, Any]:
        """One S3 call conditional on ``IfMatch`` in ``kwargs``: a 412 (another version) or a missing
        object is :class:`VersionMismatch`."""
        bucket, key = self._split(path)
        try:
            return self._retry(
                f"{what} {path}", lambda: self.fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)
            )
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) or _is_precondition_failed(exc):
                raise VersionMismatch(path) from exc
            raise
        finally:
            self.fs.invalidate_cache(path)

    def replace_if_version(self, path: str, data: bytes, version: str) -> str:
        return self._call_if_version("replace", path, "put_object", Body=data, IfMatch=version)["ETag"]

    def delete_if_version(self, path: str, version: str) -> None:
        self._call_if_version("delete", path, "delete_object", IfMatch=version)


def open_backend(config: StorageConfig) -> tuple[Backend, str]:
    fs, root_path = open_filesystem(config)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" in protocols or "local" in protocols:
        return LocalBackend(fs, config), root_path
    if "s3" in protocols or "s3a" in protocols:
        return _S3Backend(fs, config), root_path
    return Backend(fs, config), root_path
