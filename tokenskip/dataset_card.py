"""The dataset card: ``README.md`` in a committed run's folder, for whoever finds the folder later.

It says what was run (dataset, run, model, generation and compression settings, config hash), what
came out (counts by outcome, achieved ratios), every column of the three tables with what it holds
(from the schemas' own field docs, so the card and the files cannot disagree), the licences of the
sources, and how to load the data.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from tokenskip.config import PipelineConfig
from tokenskip.models import model_name
from tokenskip.schema import COMPRESSED_SCHEMA, ERROR_SCHEMA, REJECT_SCHEMA
from tokenskip.sources import SourceConfig
from tokenskip.storage import MANIFEST_NAME

if TYPE_CHECKING:
    from tokenskip.run_report import RunReport

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


# storage_options keys that hold credentials: never printed or written into a card.
_SECRET_OPTION = re.compile(r"key|secret|token|password|credential", re.IGNORECASE)


def shareable_options(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` without its credentials: what may be printed or written into a card."""
    return {k: v for k, v in (storage_options or {}).items() if not _SECRET_OPTION.search(str(k))}


def loading_snippet(
    root: str, dataset: str, run_id: str | None = None, storage_options: dict[str, Any] | None = None
) -> list[str]:
    """Three lines of Python that read the run (or LATEST) as one Arrow table, with the output's
    ``storage_options`` (an S3 endpoint, ...) except credentials, which a comment line asks for."""
    run = f", run_id={run_id!r}" if run_id else ""
    options = shareable_options(storage_options)
    left_out = sorted(str(k) for k in (storage_options or {}) if k not in options)
    where = f"root={root!r}" + (f", storage_options={options!r}" if options else "")
    lines = [
        "from tokenskip.storage import StorageConfig, read_table",
        f"data = read_table(StorageConfig({where}), {dataset!r}{run})",
        "print(data.num_rows, data.column_names)",
    ]
    if left_out:
        lines.insert(
            1,
            f"# add your credentials ({', '.join(left_out)}) to storage_options, or set them in the environment",
        )
    return lines


def hf_datasets_snippet(root: str, dataset: str, run_id: str) -> list[str]:
    """Lines of Python that load the run's data with Hugging Face ``datasets`` (plain Parquet), from
    exactly the files its manifest lists (no directory listing, so no uncommitted part)."""
    remote = "://" in root
    return [
        "import datasets",
        "from tokenskip.storage import StorageConfig, committed_urls",
        f"files = committed_urls(StorageConfig(root={root!r}), {dataset!r}, 'data', run_id={run_id!r})",
        'data = datasets.load_dataset("parquet", data_files=files, split="train")'
        + ("  # storage_options=... as for the root" if remote else ""),
    ]


def dataset_card(config: PipelineConfig, report: RunReport) -> str:
    """The card's Markdown for a committed run's ``report`` (see :func:`tokenskip.pipeline.run_pipeline`)."""
    counts = report.counts
    c = config
    ratios = ", ".join(f"{k}: {v}" for k, v in counts.achieved_ratio.items()) or "n/a"
    lines = [
        f"# {c.dataset} / {report.run_id}",
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
        f"- model: `{model_name(c.engine.model)}` (n={c.sampling.n}, temperature {c.sampling.temperature}, "
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
        f"- config hash `{report.config_hash or c.content_hash()}` (the full config is in `{MANIFEST_NAME}`)",
        "",
        "## What came out",
        "",
        f"- {counts.input_rows} input rows"
        + (f" ({counts.filtered_out} filtered out by `sources[].where`)" if counts.filtered_out else "")
        + f", {counts.problems_to_generate} problems, "
        f"{counts.samples} generated samples",
        f"- kept: {counts.kept_samples} samples from {counts.kept_problems} problems "
        f"(acceptance {counts.acceptance_rate:.1%})",
        f"- rejects: {counts.reject_rows or 'none'}; "
        f"errors: {counts.errors_by_reason or 'none'}",
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
        f"`data/`, `rejects/` and `errors/` hold one Parquet part per shard; `{MANIFEST_NAME}` lists every "
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
        *loading_snippet(c.output.root, c.dataset, report.run_id, c.output.storage_options),
        "```",
        "",
        "`tokenskip.storage.iter_batches` streams the parts one at a time and `read_dataset` gives a "
        f"`ray.data` dataset; `tokenskip show --root {c.output.root} --dataset {c.dataset}` prints examples.",
        "",
        "The parts are plain Parquet, so Hugging Face `datasets` reads them too (it skips the size and "
        "sha256 checks tokenskip's readers make):",
        "",
        "```python",
        *hf_datasets_snippet(c.output.root, c.dataset, report.run_id),
        "```",
        "",
    ]
    return "\n".join(lines)
