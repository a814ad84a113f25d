"""Writing a run: shards (each idempotent: parts, then a commit marker), then one commit (the
manifest, written with a conditional create), after checks that the shards agree on schemas, hold
disjoint problems and that every listed part is where its marker says."""

from __future__ import annotations

import hashlib
import io
import posixpath
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from tokenskip.failpoints import failpoint
from tokenskip.schema import COMPRESSED_SCHEMA, ERROR_SCHEMA, REJECT_SCHEMA
from tokenskip.schema import config_hash as compute_config_hash
from tokenskip.storage.backends import LocalBackend, open_backend, sha256_hex
from tokenskip.storage.config import StorageConfig
from tokenskip.storage.errors import (
    AlreadyCommitted,
    CommitConflict,
    DuplicateKeys,
    IntegrityError,
    SchemaMismatch,
    ShardConflict,
)
from tokenskip.storage.layout import (
    LOGS_DIR,
    PARTS_PATTERN,
    DatasetPaths,
    check_kind,
    check_name,
    check_run_file,
    marker_path,
    part_path,
    shards_dir,
    write_latest,
)
from tokenskip.storage.lease import Lock
from tokenskip.storage.readers import iter_file_batches, project_schema, size_mismatch
from tokenskip.storage.records import FileRecord, Manifest, SchemaRecord, ShardRecord, code_version, utc_now

# Canonical schemas for kinds that no shard wrote, so a reader always gets a (possibly empty) table.
_DEFAULT_SCHEMAS = {"data": COMPRESSED_SCHEMA, "rejects": REJECT_SCHEMA, "errors": ERROR_SCHEMA}
# Markers read per request when walking a run's shards: bounded memory, still concurrent on S3.
_MARKER_CHUNK = 64


class RunStore:
    """Writes one run: shards (each idempotent), then one commit. Committed runs never change."""

    def __init__(self, config: StorageConfig, dataset: str, run_id: str):
        self.config = config
        self.dataset = dataset
        self.run_id = check_name(run_id, "run id")
        self._backend, root_path = open_backend(config)
        self._paths = DatasetPaths(root_path, dataset)
        self.run_dir = self._paths.run_dir(run_id)
        self._manifest_path = self._paths.manifest(run_id)

    def __reduce__(self):
        # Ray ships stores to workers: send the arguments, rebuild the filesystem client there.
        return (RunStore, (self.config, self.dataset, self.run_id))

    def _marker_path(self, shard_id: str) -> str:
        return marker_path(self.run_dir, shard_id)

    @property
    def parts_url_pattern(self) -> str:
        """Where the run's shard parts go, as a plan prints it (``.../{data,rejects,errors}/part-<shard>.parquet``)."""
        return posixpath.join(self.run_url, PARTS_PATTERN)

    def local_dir(self) -> Path | None:
        """The run folder as a local path when the output root is on this machine's filesystem (a log
        file can then be appended to in place), else None."""
        return Path(self.run_dir) if isinstance(self._backend, LocalBackend) else None

    @property
    def run_url(self) -> str:
        """The run folder as a user passes it on: a local path, or the URL with its scheme (s3://...)."""
        local = self.local_dir()
        return str(local) if local is not None else self._backend.fs.unstrip_protocol(self.run_dir)

    def local_log_dir(self) -> Path | None:
        """The run's log folder when the run folder is local (a log file is continued there), else None."""
        local = self.local_dir()
        return local / LOGS_DIR if local is not None else None

    def write_log(self, name: str, data: bytes) -> str:
        """Put a log file (one path component, e.g. ``run-<time>-<pid>.log``) in the run's log folder,
        replacing an earlier copy: how a remote run folder gets the driver's log. Returns its path."""
        path = posixpath.join(self.run_dir, LOGS_DIR, check_run_file(name))
        self._backend.write_retried(path, bytes(data))
        return path

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
        check_name(shard_id, "shard id")
        if not tables:
            raise ValueError("write_shard needs at least one table (kind -> pa.Table)")
        for kind, table in tables.items():
            check_kind(kind)
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
            rel = part_path(kind, shard_id)
            self._backend.write(posixpath.join(self.run_dir, rel), data)
            files[kind] = FileRecord(
                path=rel, rows=tables[kind].num_rows, size=len(data), sha256=sha256_hex(data)
            )
        failpoint("shard-parts-written")  # tests: a writer dying between its parts and its marker
        record = ShardRecord(
            shard_id=shard_id,
            created_at=utc_now(),
            files=files,
            schemas={kind: SchemaRecord.of(tables[kind].schema) for kind in encoded},
            summary=summary,
            problem_ids=None if problem_ids is None else sorted(set(problem_ids)),
        )
        return record, encoded

    def _commit_shard(
        self, record: ShardRecord, tables: dict[str, pa.Table] | None, encoded: dict[str, bytes] | None
    ) -> ShardRecord:
        marker_path = self._marker_path(check_name(record.shard_id, "shard id"))
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
            if existing.files[kind].sha256 == sha256_hex(data):
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
        names = self._backend.list_names(shards_dir(self.run_dir))
        return sorted(n.removesuffix(".json") for n in names if n.endswith(".json") and not n.startswith("."))

    def iter_committed_shards(self) -> Iterator[ShardRecord]:
        """Commit markers in shard-id order, read a chunk at a time: memory stays at one chunk of
        markers however many shards the run has. Lists ``_shards/``: for writers only."""
        ids = self.committed_shard_ids()
        for start in range(0, len(ids), _MARKER_CHUNK):
            paths = [marker_path(self.run_dir, i) for i in ids[start : start + _MARKER_CHUNK]]
            for data in self._backend.read_many(paths).values():
                yield ShardRecord.model_validate_json(data)


    def iter_part_batches(
        self,
        record: ShardRecord,
        kind: str,
        columns: list[str] | None = None,
        batch_size: int = 4096,
    ) -> Iterator[pa.RecordBatch]:
        """The rows of one committed shard's part of ``kind``, batch by batch, checked against the
        marker (size, sha256, rows); nothing when the shard wrote no such part."""
        check_kind(kind)
        file = record.files.get(kind)
        if file is None:
            return
        schema = record.schemas[kind].to_arrow()
        yield from iter_file_batches(
            self._backend, posixpath.join(self.run_dir, file.path), file, schema, columns, batch_size
        )

    def write_file(self, name: str, data: bytes) -> str:
        """Write a side file of the run (``report.json``, ``report.html``, ...) next to its manifest,
        replacing any earlier version atomically (readers see old or new bytes); retried on transient
        errors. Allowed after the commit: side files are not part of the manifest. Returns its path."""
        path = posixpath.join(self.run_dir, check_run_file(name))
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        self._backend.write_retried(path, bytes(data))
        return path

    def read_file(self, name: str) -> bytes:
        """A side file written with :meth:`write_file` (FileNotFoundError if absent)."""
        return self._backend.read(posixpath.join(self.run_dir, check_run_file(name)))

    def read_part(self, file: FileRecord, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
        """One committed part of this run (listed by its manifest or a marker), checked against its
        record (size, sha256, rows), with ``schema`` (only ``columns`` if given)."""
        batches = list(
            iter_file_batches(
                self._backend, posixpath.join(self.run_dir, file.path), file, schema, columns, 1 << 20
            )
        )
        target = project_schema(schema, columns, "file")
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
            check_kind(kind)
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
            created_at=utc_now(),
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
            write_latest(self._backend, self._paths, self.run_id)
        return manifest

    def _verify_files(self, files: dict[str, list[FileRecord]]) -> None:
        """Every part the manifest will list must exist with its recorded size (catches a part lost or
        clobbered after its shard committed) - before the commit, not at the first read."""
        for kind, records in files.items():
            mismatch = size_mismatch(self._backend, posixpath.join(self.run_dir, kind), records)
            if mismatch is not None:
                record, size = mismatch
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
