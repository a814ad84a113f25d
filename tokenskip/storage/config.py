"""Where runs live (:class:`StorageConfig`) and the fsspec filesystem that reaches them."""

from __future__ import annotations

from typing import Any

import fsspec
from pydantic import BaseModel, ConfigDict, Field


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
