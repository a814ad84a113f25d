"""The records a commit is made of: file and schema records, shard markers, the run manifest, and the
code version a manifest names."""

from __future__ import annotations

import base64
import functools
import os
import subprocess
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, Field

MANIFEST_FORMAT = 1


def utc_now() -> str:
    """The timestamp records carry (UTC, ISO 8601)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


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
