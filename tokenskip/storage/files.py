"""Plain files below a root that are not runs: an evaluation's outputs, and the model, scorer and
adapter folders :func:`tokenskip.models.fetch_folder` copies into its local cache. Every call is
retried on transient errors (throttling, 5xx, dropped connections) as the run store's are."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

from tokenskip.storage.backends import open_backend, with_retries
from tokenskip.storage.config import StorageConfig


@dataclass(frozen=True)
class StoredFile:
    """One file below a :class:`FileStore`'s root."""

    name: str
    """Path relative to the root, '/'-separated."""
    size: int | None
    version: str
    """What changes when the file does: the store's ETag, else its modification time."""


class FileStore:
    """Reads, lists and writes plain files below ``config.root`` (a local folder or fsspec URL)."""

    def __init__(self, config: StorageConfig):
        self.config = config
        self._backend, self._root = open_backend(config)

    def _path(self, name: str) -> str:
        return posixpath.join(self._root, name)

    def write(self, name: str, data: bytes) -> None:
        """Replace (or create) ``name``: readers see the old or the new bytes, never a mix; local
        folders are created as needed (object stores need none, and creating one makes a bucket)."""
        self._backend.write_retried(self._path(name), data)

    def list(self) -> list[StoredFile]:
        """Every file below the root (recursively), by name; [] when there is none."""
        fs = self._backend.fs
        fs.invalidate_cache(self._root)
        try:
            found = with_retries(
                self.config, f"list {self.config.root}", lambda: fs.find(self._root, detail=True)
            )
        except FileNotFoundError:
            return []
        files = []
        for path, info in found.items():
            if info.get("type") == "directory" or path.endswith("/"):  # S3 "folder" markers
                continue
            version = next(
                (str(info[k]) for k in ("ETag", "etag", "mtime", "LastModified", "created") if info.get(k)),
                "",
            )
            name = posixpath.relpath(path, self._root)
            files.append(StoredFile(name=name, size=info.get("size"), version=version))
        return sorted(files, key=lambda f: f.name)

    def download(self, name: str, dest: Path) -> None:
        """Copy ``name`` to the local file ``dest`` (its folder must exist)."""
        fs = self._backend.fs
        with_retries(self.config, f"download {name}", lambda: fs.get_file(self._path(name), str(dest)))
