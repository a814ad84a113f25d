"""The dataset card: ``README.md`` in a committed run's folder, for whoever finds the folder later.

It says what was run (dataset, run, model, generation and compression settings, config hash), what
came out (counts by outcome, achieved ratios), every column of the three tables with what it holds
(from the schemas' own field docs, so the card and the files cannot disagree), the licences of the
sources, and how to load the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from tokenskip.config import PipelineConfig
from tokenskip.schema import COMPRESSED_SCHEMA, ERROR_SCHEMA, REJECT_SCHEMA
from tokenskip.sources import SourceConfig

# Published licences of the layouts tokenskip knows; a source's own ``license`` wins.
KNOWN_LICENCES = {
    "gsm8k": "MIT (GSM8K, openai/grade-school-math)",
    "math": "MIT (MATH, hendrycks/math)",
}
BUNDLED_DATA = Path(__file__).parent / "data"


def source_licence(source: SourceConfig) -> str:
    if source.license:
        return source.license
    if Path(source.path).resolve().parent == BUNDLED_DATA.resolve():
        return "Apache-2.0 (bundled with tokenskip)"
    return KNOWN_LICENCES.get(source.kind, "not stated (set `license` on the source)")


def _columns(schema: pa.Schema, prefix: str = "") -> list[str]:
    rows = []
    for field in schema:
        doc = (field.metadata or {}).get(b"doc", b"").decode()
        rows.append(f"| `{prefix}{field.name}` | {field.type} | {doc} |")
        item = field.type.value_type if pa.types.is_list(field.type) else field.type
        if pa.types.is_struct(item):
            rows += _columns(pa.schema(list(item)), prefix=f"{prefix}{field.name}[].")
    return rows


def loading_snippet(root: str, dataset: str, run_id: str | None = None) -> list[str]:
    """Three lines of Python that read the run (or LATEST) as one Arrow table."""
    run = f", run_id={run_id!r}" if run_id else ""
    return [
        "from tokenskip.storage import StorageConfig, read_table",
        f"data = read_table(StorageConfig(root={root!r}), {dataset!r}{run})",
        "print(data.num_rows, data.column_names)",
    ]


def dataset_card(config: PipelineConfig, report: dict[str, Any]) -> str:
    """The card's Markdown for a committed run's ``report`` (see :func:`tokenskip.pipeline.run_pipeline`)."""
    counts = report["counts"]
    c = config
    ratios = ", ".join(f"{k}: {v}" for k, v in (counts.get("achieved_ratio") or {}).items()) or "n/a"
    lines = [
        f"# {c.dataset} / {report['run_id']}",
        "",
        (
            "Chain-of-thought data built by tokenskip: the model's own CoTs for each problem, graded against "
            "the gold answer; the correct ones kept whole (built without compression)."
            if c.compression is None
            else "Compressed chain-of-thought data built by tokenskip (TokenSkip, arXiv 2502.12067): the model's "
            "own CoTs for each problem, graded against the gold answer; each correct CoT pruned by token "
            "importance to every target ratio, its "
            + ("digits and " if c.compression.scorer.force_digits else "")
            + "final-answer tail kept."
        ),
        "",
        "## What was run",
        "",
        f"- model: `{c.engine.model}` (n={c.sampling.n}, temperature {c.sampling.temperature}, "
        f"top_p {c.sampling.top_p}, max_tokens {c.sampling.max_tokens}, seed {c.engine.seed})",
        f"- selection: `{c.selection.policy}`"
        + (f", CoTs of <= {c.selection.max_cot_tokens} tokens" if c.selection.max_cot_tokens else "")
        + (
            "; no compression (a pool of plain CoTs: `compressions` is empty)"
            if c.compression is None
            else f"; scorer: `{c.compression.scorer.kind}` (`{c.compression.scorer.model}`); "
            f"ratios {c.compression.ratios}"
        ),
        f"- decontamination: {'on' if c.dedup.enabled and c.dedup.eval_sets else 'off'}"
        + (f" against {', '.join(s.name or s.kind for s in c.dedup.eval_sets)}" if c.dedup.eval_sets else ""),
        f"- config hash `{report.get('config_hash', c.content_hash())}` (the full config is in `_manifest.json`)",
        "",
        "## What came out",
        "",
        f"- {counts['input_rows']} input rows"
        + (f" ({counts['filtered_out']} filtered out by `sources[].where`)" if counts.get("filtered_out") else "")
        + f", {counts['problems_to_generate']} problems, "
        f"{counts['samples']} generated samples",
        f"- kept: {counts['kept_samples']} samples from {counts['kept_problems']} problems "
        f"(acceptance {counts['acceptance_rate']:.1%})",
        f"- rejects: {counts['rejects_by_reason'] or 'none'}; errors: {counts['errors_by_reason'] or 'none'}",
        f"- mean achieved ratio by target: {ratios}",
        "",
        "## Sources",
        "",
        "| source | split | path | licence |",
        "|---|---|---|---|",
    ]
    for s in c.sources:
        lines.append(f"| {s.name or s.kind} | {s.split} | `{s.path}` | {source_licence(s)} |")
    lines += [
        "",
        "The generated CoTs are outputs of the model above; its licence governs their use as well.",
        "",
        "## Files",
        "",
        "`data/`, `rejects/` and `errors/` hold one Parquet part per shard; `_manifest.json` lists every "
        "part with its row count, size and sha256 (readers check them); `report.html` has the figures.",
        "",
    ]
    for title, schema in (
        ("data: kept samples", COMPRESSED_SCHEMA),
        ("rejects: rows left out on purpose", REJECT_SCHEMA),
        ("errors: rows that could not be processed", ERROR_SCHEMA),
    ):
        lines += [f"### {title}", "", "| column | type | meaning |", "|---|---|---|", *_columns(schema), ""]
    lines += [
        "## Loading",
        "",
        "```python",
        *loading_snippet(c.output.root, c.dataset, report["run_id"]),
        "```",
        "",
        "`tokenskip.storage.iter_batches` streams the parts one at a time and `read_dataset` gives a "
        f"`ray.data` dataset; `tokenskip show --root {c.output.root} --dataset {c.dataset}` prints examples.",
        "",
    ]
    return "\n".join(lines)
