"""The run report: what one call of :func:`tokenskip.pipeline.run_pipeline` did, as one typed object.

The run produces it; ``report.json`` is its JSON (:meth:`RunReport.to_json`, the format it always had:
optional parts are left out, not written as null), ``report.txt`` and the CLI's summary are
:meth:`RunReport.summary_text`, and the HTML page, the dataset card and refresh read its fields. A
``report.json`` of an earlier run reads back with ``RunReport.model_validate_json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from tokenskip.summary import RunCounts


class AttemptReport(BaseModel):
    """What this attempt did (a resumed run's earlier attempts are in the counts, not here)."""

    shards_committed: int = 0
    shards_resumed: int = 0
    problems_generated: int = 0
    samples_generated: int = 0
    tokens_generated: int = 0
    tokens_per_second: float = 0.0
    load_seconds: float = 0.0
    dedup_seconds: float = 0.0
    pipeline_seconds: float = 0.0
    generation_seconds: float = 0.0
    compression_seconds: float = 0.0
    # Mean running sequences / max_num_seqs over the generation engines' steps (None: no steps).
    engine_occupancy: float | None = None
    engine_max_num_seqs: int | None = None
    generation_max_concurrent_batches: int | None = None
    generation_admission: str | None = None
    wall_seconds: float = 0.0
    # (seconds since the attempt began, tokens generated so far) at each committed shard.
    progress: list[dict[str, int | float]] = Field(default_factory=list)
    commit_seconds: float = 0.0

    def occupancy_text(self) -> str:
        if self.engine_occupancy is None:
            return "n/a (no generation in this attempt)"
        return (
            f"{self.engine_occupancy:.2f} of max_num_seqs {self.engine_max_num_seqs} "
            f"({self.generation_admission} admission, <= {self.generation_max_concurrent_batches} "
            "batches held per actor)"
        )


# Left out of the JSON when unset: a report has them only when they apply.
_OPTIONAL = ("model", "config_hash", "attempt", "stopped", "pending_shards", "refused")


class RunReport(BaseModel):
    """The run report. ``attempt`` is None when the run was committed before this call (nothing ran)."""

    dataset: str
    run_id: str
    model: str | None = None
    config_hash: str | None = None
    counts: RunCounts
    attempt: AttemptReport | None = None
    committed: bool = False
    # The signal that stopped the attempt (SIGTERM, SIGINT).
    stopped: str | None = None
    # Shards still to run (a budgeted or stopped attempt).
    pending_shards: int | None = None
    # Why the finished run was not published.
    refused: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for name in _OPTIONAL:
            if data.get(name) is None:
                data.pop(name, None)
        return data

    @classmethod
    def read(cls, report: RunReport | Mapping[str, Any]) -> RunReport:
        """``report``, or a ``report.json``'s parsed content validated (any run's: missing parts take
        their defaults). Raises TypeError for anything else, pydantic's ValidationError (a
        ValueError) for a mapping that is not a run report."""
        if isinstance(report, RunReport):
            return report
        if not isinstance(report, Mapping):
            raise TypeError(f"report must be a RunReport or a report.json mapping, got {type(report).__name__}")
        return cls.model_validate(report)

    def to_json(self) -> str:
        """``report.json``'s text."""
        return json.dumps(self.model_dump(mode="json"), indent=2)

    def summary_text(self) -> str:
        """``report.txt`` and the end of ``tokenskip run``'s console: the run's figures for a person."""
        s = self.counts
        lines = [
            f"tokenskip run report: dataset {self.dataset}, run {self.run_id}",
            f"  input rows        {s.input_rows}  (load errors {s.load_errors}, duplicates "
            f"{s.dedup.get('duplicate', 0)}, contaminated {s.dedup.get('contaminated', 0)}"
            + (f", filtered out by sources[].where {s.filtered_out})" if s.filtered_out else ")"),
            f"  problems          {s.problems_to_generate} generated x n -> {s.samples} samples",
            f"  kept              {s.kept_samples} samples from {s.kept_problems} problems "
            f"(acceptance {s.acceptance_rate:.1%} of graded samples)",
            f"  rejects           {s.reject_rows}",
            f"  errors            {s.errors_by_reason}",
            f"  achieved ratio    {s.achieved_ratio}",
        ]
        a = self.attempt
        if a is None:
            lines.append("  this attempt      none: the run was committed before")
            return "\n".join(lines)
        lines += [
            f"  this attempt      {a.shards_committed} shards, {a.problems_generated} problems, "
            f"{a.tokens_generated} tokens in {a.wall_seconds:.1f}s ({a.tokens_per_second:.1f} tok/s overall)",
            f"  engine occupancy  {a.occupancy_text()}",
            f"  stage wall time   load {a.load_seconds:.1f}s, dedup {a.dedup_seconds:.1f}s, "
            f"generate+grade+compress {a.pipeline_seconds:.1f}s, commit {a.commit_seconds:.1f}s",
        ]
        return "\n".join(lines)
