"""Readers of committed runs: the files a run's manifest lists and no others, each checked against
its record (size, sha256, rows) - whole tables (:func:`read_table`), streamed batches
(:func:`iter_batches`), Ray Data (:func:`read_dataset`), side files (:func:`read_run_file`) - and
the committed runs of a dataset."""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from tokenskip.storage.backends import Backend, open_backend, sha256_hex
from tokenskip.storage.config import StorageConfig
from tokenskip.storage.errors import IntegrityError, NotCommitted, StorageError
from tokenskip.storage.layout import (
    NAME_RE,
    DatasetPaths,
    check_kind,
    check_run_file,
    latest_run_id_at,
)
from tokenskip.storage.records import FileRecord, Manifest


def read_manifest_at(backend: Backend, paths: DatasetPaths, dataset: str, run_id: str | None) -> Manifest:
    if run_id is None:
        run_id = latest_run_id_at(backend, paths, dataset)
    try:
        data = backend.read(paths.manifest(run_id))
    except FileNotFoundError:
        raise NotCommitted(
            f"run {run_id!r} of dataset {dataset!r} has no manifest: it is not committed (or was deleted)"
        ) from None
    return Manifest.model_validate_json(data)


def _open_run(config: StorageConfig, dataset: str, run_id: str | None) -> tuple[Backend, Manifest, str]:
    """The backend, manifest and run folder of a committed run (LATEST's when ``run_id`` is None)."""
    backend, root_path = open_backend(config)
    paths = DatasetPaths(root_path, dataset)
    manifest = read_manifest_at(backend, paths, dataset, run_id)
    return backend, manifest, paths.run_dir(manifest.run_id)


def read_manifest(config: StorageConfig, dataset: str, run_id: str | None = None) -> Manifest:
    """The manifest of ``run_id``, or of the run LATEST points to when None."""
    backend, root_path = open_backend(config)
    return read_manifest_at(backend, DatasetPaths(root_path, dataset), dataset, run_id)


def _kind_schema(manifest: Manifest, kind: str) -> pa.Schema:
    if kind not in manifest.schemas:
        raise StorageError(
            f"run {manifest.run_id!r} of {manifest.dataset!r} has no {kind!r} table; "
            f"it has {sorted(manifest.schemas)}"
        )
    return manifest.schemas[kind].to_arrow()


def project_schema(schema: pa.Schema, columns: list[str] | None, kind: str) -> pa.Schema:
    if columns is None:
        return schema
    unknown = sorted(set(columns) - set(schema.names))
    if unknown:
        raise ValueError(f"unknown columns {unknown} for {kind!r}; the schema has {schema.names}")
    return pa.schema([schema.field(c) for c in columns], metadata=schema.metadata)


def _check_bytes(config: StorageConfig, path: str, data: bytes, record: FileRecord) -> bytes:
    """``data`` (the bytes read from ``path``), refused unless size (and sha256 when configured) match
    its record."""
    if len(data) != record.size:
        raise IntegrityError(f"{path}: {len(data)} bytes, the manifest says {record.size}")
    if config.verify_sha256 and sha256_hex(data) != record.sha256:
        raise IntegrityError(f"{path}: sha256 differs from the manifest")
    return data


def _read_checked(backend: Backend, path: str, record: FileRecord) -> bytes:
    """One file's bytes, refused unless size (and sha256 when configured) match its record."""
    try:
        data = backend.read(path)
    except FileNotFoundError:
        raise IntegrityError(f"{path}: listed in the manifest (or shard marker) but missing") from None
    return _check_bytes(backend.config, path, data, record)


def size_mismatch(
    backend: Backend, folder: str, records: list[FileRecord]
) -> tuple[FileRecord, int | None] | None:
    """The first of ``records`` (files of one kind, all in ``folder``) whose listed size differs from
    its record, with the size found (None: missing); None when all match. One listing for the lot
    instead of one HEAD per file: the listing only confirms, never decides what is read."""
    sizes = backend.sizes(folder) if records else {}
    for record in records:
        size = sizes.get(posixpath.basename(record.path))
        if size != record.size:
            return record, size
    return None


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
    check_kind(kind)
    backend, manifest, run_dir = _open_run(config, dataset, run_id)
    schema = project_schema(_kind_schema(manifest, kind), columns, kind)
    records = {posixpath.join(run_dir, f.path): f for f in manifest.files.get(kind, [])}
    try:
        blobs = backend.read_many(list(records))
    except FileNotFoundError as exc:
        raise IntegrityError(
            f"run {manifest.run_id!r}: a {kind!r} file listed in the manifest is missing"
        ) from exc
    tables = []
    for path, record in records.items():
        data = _check_bytes(config, path, blobs[path], record)
        table = pq.read_table(io.BytesIO(data), columns=columns)
        if table.num_rows != record.rows:
            raise IntegrityError(f"{path}: {table.num_rows} rows, the manifest says {record.rows}")
        tables.append(table if table.schema.equals(schema, check_metadata=True) else table.cast(schema))
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables)


def iter_file_batches(
    backend: Backend,
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
    target = project_schema(schema, columns, "file")
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
    check_kind(kind)
    backend, manifest, run_dir = _open_run(config, dataset, run_id)
    schema = _kind_schema(manifest, kind)
    project_schema(schema, columns, kind)  # unknown columns fail before the first read
    for record in manifest.files.get(kind, []):
        yield from iter_file_batches(
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

    check_kind(kind)
    backend, manifest, run_dir = _open_run(config, dataset, run_id)
    schema = _kind_schema(manifest, kind)
    project_schema(schema, columns, kind)  # unknown columns fail here, not on a worker
    records = [r for r in manifest.files.get(kind, []) if r.rows]
    if not records:
        return ray.data.from_arrow(project_schema(schema, columns, kind).empty_table())
    mismatch = size_mismatch(backend, posixpath.join(run_dir, kind), records)
    if mismatch is not None:
        record, size = mismatch
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


def read_run_file(config: StorageConfig, dataset: str, name: str, run_id: str | None = None) -> bytes:
    """A side file of a committed run (``report.json``, ``report.txt``, ``report.html``, ...; LATEST's
    run when ``run_id`` is None), written with :meth:`RunStore.write_file`."""
    backend, _, run_dir = _open_run(config, dataset, run_id)
    return backend.read(posixpath.join(run_dir, check_run_file(name)))


def committed_files(
    config: StorageConfig, dataset: str, kind: str = "data", run_id: str | None = None
) -> tuple[fsspec.AbstractFileSystem, list[str], pa.Schema]:
    """The filesystem, full paths and schema of ``kind``'s files in a committed run, for readers that
    parallelise themselves (e.g. ``ray.data.read_parquet(paths, filesystem=PyFileSystem(FSSpecHandler(
    fs)), schema=schema)``). They read exactly the manifest's files but skip the size/sha256 checks that
    :func:`read_table` does."""
    check_kind(kind)
    backend, manifest, run_dir = _open_run(config, dataset, run_id)
    schema = _kind_schema(manifest, kind)
    return backend.fs, [posixpath.join(run_dir, f.path) for f in manifest.files.get(kind, [])], schema


def committed_urls(
    config: StorageConfig, dataset: str, kind: str = "data", run_id: str | None = None
) -> list[str]:
    """The manifest's files of ``kind`` as paths any fsspec-based reader opens: plain paths for a
    local root, ``s3://...`` URLs otherwise (pass the root's ``storage_options`` along), e.g.
    ``datasets.load_dataset("parquet", data_files=committed_urls(...), split="train")``. Like
    :func:`committed_files`, readers of these skip the size/sha256 checks."""
    fs, paths, _ = committed_files(config, dataset, kind, run_id)
    if "file" in ([fs.protocol] if isinstance(fs.protocol, str) else list(fs.protocol)):
        return paths
    return [fs.unstrip_protocol(p) for p in paths]


def list_committed_runs(config: StorageConfig, dataset: str) -> list[Manifest]:
    """Committed runs (those with a manifest), oldest commit first. Lists ``runs/`` to find
    candidates; folders without a manifest (in progress, crashed) are not runs."""
    backend, root_path = open_backend(config)
    paths = DatasetPaths(root_path, dataset)
    candidates = [n for n in backend.list_names(paths.runs_dir) if NAME_RE.match(n)]
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
    backend, root_path = open_backend(config)
    return latest_run_id_at(backend, DatasetPaths(root_path, dataset), dataset)
