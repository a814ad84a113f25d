"""Names and paths of the storage layout (see :mod:`tokenskip.storage`), and the LATEST pointer.

Dataset, run, shard and lock names become path components, so they are checked here before any path
is built from them.
"""

from __future__ import annotations

import json
import posixpath
import re
from typing import TYPE_CHECKING

from tokenskip.storage.errors import NotCommitted
from tokenskip.storage.records import utc_now

if TYPE_CHECKING:
    from tokenskip.storage.backends import Backend

KINDS = ("data", "rejects", "errors")
MANIFEST_NAME = "_MANIFEST.json"
# A run's log files: runs/<run_id>/logs/<name>.log (beside the data, never listed by the manifest).
LOGS_DIR = "logs"
# Dataset, run, shard and lock names become path components: keep them boring.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,199}$")
# Side files of a run (report.json, _refresh.json, ...): one path component, never a name the layout uses.
RUN_FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._=+-]{0,199}$")
# A run's shard commit markers: runs/<run_id>/_shards/<shard_id>.json.
SHARDS_DIR = "_shards"
_RESERVED_RUN_NAMES = frozenset({*KINDS, SHARDS_DIR, MANIFEST_NAME, LOGS_DIR})
_PART_PREFIX, _PART_SUFFIX = "part-", ".parquet"


def check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value) or value in (".", ".."):
        raise ValueError(
            f"invalid {what} {value!r}: use 1-200 characters from [A-Za-z0-9._=+-], starting with a "
            "letter or digit (it becomes a path component)"
        )
    return value


def check_run_file(name: str) -> str:
    if not isinstance(name, str) or not RUN_FILE_RE.match(name) or name in _RESERVED_RUN_NAMES:
        raise ValueError(
            f"invalid run file name {name!r}: one path component of [A-Za-z0-9._=+-] (may start with '_'), "
            f"not one of {sorted(_RESERVED_RUN_NAMES)}"
        )
    return name


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    return kind


def part_path(kind: str, shard_id: str) -> str:
    """A shard's part of ``kind``, relative to its run folder (what ``FileRecord.path`` holds):
    ``<kind>/part-<shard_id>.parquet``. Deterministic, so a retried write replaces its own part."""
    return posixpath.join(check_kind(kind), f"{_PART_PREFIX}{check_name(shard_id, 'shard id')}{_PART_SUFFIX}")


def part_shard(kind: str, path: str) -> str:
    """The shard id in a part path :func:`part_path` made (``data/part-<shard>.parquet`` -> ``<shard>``)."""
    prefix = posixpath.join(check_kind(kind), _PART_PREFIX)
    if not (path.startswith(prefix) and path.endswith(_PART_SUFFIX)):
        raise ValueError(f"unexpected part path {path!r} for kind {kind!r}")
    return path[len(prefix) : -len(_PART_SUFFIX)]


# What the parts of every shard of a run look like, for a plan to print.
PARTS_PATTERN = posixpath.join("{" + ",".join(KINDS) + "}", f"{_PART_PREFIX}<shard>{_PART_SUFFIX}")


def shards_dir(run_dir: str) -> str:
    """The folder of a run's shard commit markers."""
    return posixpath.join(run_dir, SHARDS_DIR)


def marker_path(run_dir: str, shard_id: str) -> str:
    """A shard's commit marker in its run folder."""
    return posixpath.join(shards_dir(run_dir), f"{check_name(shard_id, 'shard id')}.json")


class DatasetPaths:
    def __init__(self, root_path: str, dataset: str):
        self.dataset_dir = posixpath.join(root_path, check_name(dataset, "dataset name"))
        self.runs_dir = posixpath.join(self.dataset_dir, "runs")
        self.latest = posixpath.join(self.dataset_dir, "LATEST")
        self.pins_dir = posixpath.join(self.dataset_dir, "_pins")
        self.locks_dir = posixpath.join(self.dataset_dir, "_locks")

    def run_dir(self, run_id: str) -> str:
        return posixpath.join(self.runs_dir, check_name(run_id, "run id"))

    def manifest(self, run_id: str) -> str:
        return posixpath.join(self.run_dir(run_id), MANIFEST_NAME)


def write_latest(backend: Backend, paths: DatasetPaths, run_id: str) -> None:
    backend.write(paths.latest, json.dumps({"run_id": run_id, "updated_at": utc_now()}).encode())


def latest_run_id_at(backend: Backend, paths: DatasetPaths, dataset: str) -> str:
    try:
        pointer = json.loads(backend.read(paths.latest))
    except FileNotFoundError:
        raise NotCommitted(f"dataset {dataset!r} has no LATEST pointer: no run was committed yet") from None
    return pointer["run_id"]
