"""A dataset's folder outside its runs: where LATEST points (:func:`set_latest`), its state files
(e.g. ``_refresh/in_progress.json``), and the checks that an output root can take runs and that a
dataset exists."""

from __future__ import annotations

import os
import posixpath
import tempfile

from tokenskip.storage.backends import Backend, LocalBackend, open_backend
from tokenskip.storage.config import StorageConfig
from tokenskip.storage.errors import NotFound
from tokenskip.storage.layout import RUN_FILE_RE, DatasetPaths, write_latest
from tokenskip.storage.readers import read_manifest_at


def _dataset_file_path(config: StorageConfig, dataset: str, name: str) -> tuple[Backend, str]:
    """A dataset-level state file, e.g. ``_refresh/in_progress.json``: components of
    [A-Za-z0-9._=+-], the first starting with '_' so it never meets ``runs/`` or ``LATEST``."""
    parts = name.split("/") if isinstance(name, str) else []
    if (
        not parts
        or not parts[0].startswith("_")
        or any(not RUN_FILE_RE.match(p) or p in (".", "..") for p in parts)
    ):
        raise ValueError(f"invalid dataset file name {name!r}: e.g. '_refresh/in_progress.json'")
    backend, root_path = open_backend(config)
    return backend, posixpath.join(DatasetPaths(root_path, dataset).dataset_dir, *parts)


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
    backend.write_retried(path, data)


def delete_dataset_file(config: StorageConfig, dataset: str, name: str) -> None:
    """Delete a dataset-level state file (nothing if absent)."""
    backend, path = _dataset_file_path(config, dataset, name)
    backend.delete(path)


def output_problem(config: StorageConfig) -> str | None:
    """Why runs cannot be written under ``config.root`` (None: they can, as far as can be told
    without writing): a local root whose nearest existing folder is not writable, or an object-store
    root whose bucket does not exist."""
    backend, root_path = open_backend(config)
    if isinstance(backend, LocalBackend):
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
    backend, root_path = open_backend(config)
    paths = DatasetPaths(root_path, dataset)
    if not backend.exists(root_path):
        raise NotFound(f"output root {config.root!r} does not exist")
    if not (backend.exists(paths.latest) or backend.list_names(paths.runs_dir)):
        raise NotFound(f"dataset {dataset!r} not found under {config.root!r} (no LATEST, no runs)")


def set_latest(config: StorageConfig, dataset: str, run_id: str) -> None:
    """Point LATEST at a committed run (rollback / roll forward). Refuses a run without manifest."""
    if not run_id:
        raise ValueError("set_latest needs the run id to point LATEST at")
    backend, root_path = open_backend(config)
    paths = DatasetPaths(root_path, dataset)
    read_manifest_at(backend, paths, dataset, run_id)
    write_latest(backend, paths, run_id)
