"""Retention: delete committed runs beyond the newest few, except LATEST's run and pinned runs
(:func:`pin` keeps a run for good, e.g. the one a paper's results came from)."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable

from tokenskip.storage.backends import _backend
from tokenskip.storage.config import StorageConfig
from tokenskip.storage.errors import NotCommitted
from tokenskip.storage.layout import _check_name, _DatasetPaths, _latest_run_id
from tokenskip.storage.readers import _read_manifest, list_committed_runs
from tokenskip.storage.records import _now


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
