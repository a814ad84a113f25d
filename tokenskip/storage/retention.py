"""Retention: delete committed runs beyond the newest few, except LATEST's run and pinned runs
(:func:`pin` keeps a run for good, e.g. the one a paper's results came from)."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable

from tokenskip.storage.backends import open_backend
from tokenskip.storage.config import StorageConfig
from tokenskip.storage.errors import NotCommitted
from tokenskip.storage.layout import DatasetPaths, check_name, latest_run_id_at
from tokenskip.storage.readers import list_committed_runs, read_manifest_at
from tokenskip.storage.records import utc_now


def pin(config: StorageConfig, dataset: str, run_id: str, reason: str = "") -> None:
    """Protect a committed run from retention."""
    backend, root_path = open_backend(config)
    paths = DatasetPaths(root_path, dataset)
    read_manifest_at(backend, paths, dataset, run_id)
    backend.write(
        posixpath.join(paths.pins_dir, f"{run_id}.json"),
        json.dumps({"run_id": run_id, "reason": reason, "pinned_at": utc_now()}).encode(),
    )


def unpin(config: StorageConfig, dataset: str, run_id: str) -> None:
    backend, root_path = open_backend(config)
    paths = DatasetPaths(root_path, dataset)
    backend.delete(posixpath.join(paths.pins_dir, f"{check_name(run_id, 'run id')}.json"))


def pinned_runs(config: StorageConfig, dataset: str) -> set[str]:
    backend, root_path = open_backend(config)
    paths = DatasetPaths(root_path, dataset)
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
    backend, root_path = open_backend(config)
    paths = DatasetPaths(root_path, dataset)
    runs = [m.run_id for m in list_committed_runs(config, dataset)]
    protected = (
        set(pinned) | pinned_runs(config, dataset) | set(runs[len(runs) - keep_last :] if keep_last else [])
    )
    try:
        protected.add(latest_run_id_at(backend, paths, dataset))
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
