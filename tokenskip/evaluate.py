"""``tokenskip evaluate``: accuracy and CoT length per compression ratio (TokenSkip's results table).

For every ratio the test set is answered with TokenSkip's ratio-conditioned prompt
(``question<delim>ratio<delim>``; ratio 1.0 is the plain question), graded against the gold answers
(TokenSkip-compatible: the last number counts when no answer is stated), and summarised as one row:

* ``accuracy`` - correct samples / all samples at that ratio (an engine error counts as wrong).
* ``mean_tokens`` - mean generated tokens (the whole completion, as vLLM counts it) over the samples
  that produced output.
* ``achieved_ratio`` - ``mean_tokens`` / ``mean_tokens`` at ratio 1.0 (null without a 1.0 row).
* counts of every verdict, engine errors and completions cut by ``max_tokens``.

One vLLM engine serves every ratio: all prompts of all ratios go to the engine together (one batch per
distinct ``max_tokens``, so exactly one when ``scale_max_tokens_by_ratio`` is off). An optional LoRA
adapter (local folder or fsspec URL, copied to a local cache) is applied per request.

With ``n`` samples per problem (``sampling.n``) it also reports pass@k for every ``pass_k``: the
unbiased estimator of Chen et al. 2021 (:func:`pass_at_k`), averaged over problems; pass@1 is the
accuracy averaged over the n samples. With ``reference: short|long`` it writes the ratio-1.0 row as
the ``short_reference``/``long_reference`` block a TL;DR train config takes (``reference.yaml``).
With ``sweep`` it evaluates several checkpoints and picks the most accurate one within a token
budget, as TL;DR's checkpoint analysis does (:func:`run_sweep`, ``sweep.json``).

Outputs, under ``output`` (a folder or fsspec URL): ``evaluation.parquet`` (the table),
``evaluation.json`` (the table, pass@k, the config and run facts), ``pass_at_k.parquet``,
``samples.parquet`` (every sample: prompt, response, tokens, verdict), ``accuracy_vs_tokens.png``,
``reference.yaml`` when asked for and, when the source had bad records, ``source_errors.parquet``.
``evaluation.json`` is written first with ``"status": "running"`` (so a bad output location fails
before any generation) and last with ``"status": "complete"``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import posixpath
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tokenskip.config import add_config_arguments
from tokenskip.engine import EngineConfig, PromptResult, SamplingConfig, create_llm, generate_safe
from tokenskip.grading import GradingConfig, Verdict, grade_batch
from tokenskip.models import cache_dir, fetch_folder, is_remote, model_name
from tokenskip.prompts import INSTRUCTION, format_ratio, render_prompt
from tokenskip.pruning import ratio_list
from tokenskip.sources import SourceConfig, load_source
from tokenskip.storage import FileStore, StorageConfig
from tokenskip.train.config import ReferencePoint

log = logging.getLogger(__name__)

DEFAULT_RATIOS: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)

TABLE_FILE = "evaluation.parquet"
REPORT_FILE = "evaluation.json"
SAMPLES_FILE = "samples.parquet"
PLOT_FILE = "accuracy_vs_tokens.png"
SOURCE_ERRORS_FILE = "source_errors.parquet"
PASS_FILE = "pass_at_k.parquet"
REFERENCE_FILE = "reference.yaml"
SWEEP_FILE = "sweep.json"
ADAPTER_CONFIG = "adapter_config.json"  # what makes a folder a peft adapter

SAMPLES_SCHEMA = pa.schema(
    [
        pa.field(
            "ratio", pa.float64(), nullable=False, metadata={"doc": "ratio in the prompt (1.0 = plain)"}
        ),
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int64(), nullable=False, metadata={"doc": "0..n-1 within the prompt"}),
        pa.field("question", pa.string()),
        pa.field("answer", pa.string(), metadata={"doc": "gold answer"}),
        pa.field("prompt", pa.string(), metadata={"doc": "the full rendered prompt"}),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("max_tokens", pa.int64(), metadata={"doc": "generated-token cap used at this ratio"}),
        pa.field("response", pa.string(), metadata={"doc": "null when the engine produced nothing"}),
        pa.field("tokens", pa.int64(), metadata={"doc": "generated tokens; null on engine error"}),
        pa.field("finish_reason", pa.string(), metadata={"doc": "stop | length (cut at max_tokens)"}),
        pa.field(
            "verdict", pa.string(), metadata={"doc": "correct|incorrect|unparsable|timeout; null on error"}
        ),
        pa.field("extracted_answer", pa.string()),
        pa.field("error", pa.string(), metadata={"doc": "engine error reason (prompt_too_long, ...)"}),
        pa.field("error_detail", pa.string()),
    ]
)

TABLE_SCHEMA = pa.schema(
    [
        pa.field("ratio", pa.float64(), nullable=False),
        pa.field("n", pa.int64(), nullable=False, metadata={"doc": "samples at this ratio"}),
        pa.field("accuracy", pa.float64(), metadata={"doc": "n_correct / n"}),
        pa.field(
            "mean_tokens", pa.float64(), metadata={"doc": "mean generated tokens of samples with output"}
        ),
        pa.field("achieved_ratio", pa.float64(), metadata={"doc": "mean_tokens / mean_tokens at ratio 1.0"}),
        pa.field("max_tokens", pa.int64(), metadata={"doc": "generated-token cap at this ratio"}),
        pa.field("n_correct", pa.int64(), nullable=False),
        pa.field("n_incorrect", pa.int64(), nullable=False),
        pa.field("n_unparsable", pa.int64(), nullable=False),
        pa.field("n_timeout", pa.int64(), nullable=False),
        pa.field("n_errors", pa.int64(), nullable=False, metadata={"doc": "engine produced no output"}),
        pa.field("n_truncated", pa.int64(), nullable=False, metadata={"doc": "cut at max_tokens"}),
    ]
)


PASS_SCHEMA = pa.schema(
    [
        pa.field("ratio", pa.float64(), nullable=False),
        pa.field("k", pa.int64(), nullable=False),
        pa.field(
            "pass_at_k",
            pa.float64(),
            metadata={"doc": "mean over problems of the unbiased pass@k estimate from each one's n samples"},
        ),
        pa.field("problems", pa.int64(), nullable=False),
        pa.field("samples_per_problem", pa.int64(), metadata={"doc": "n (null if problems differ)"}),
    ]
)


class CheckpointSweepConfig(BaseModel):
    """TL;DR's checkpoint analysis: evaluate several checkpoints, pick the best within a token budget."""

    model_config = ConfigDict(extra="forbid")

    checkpoints: list[str] = Field(
        min_length=1,
        description="Checkpoints to compare, in order (earlier wins ties): LoRA adapter folders (peft "
        "layout, local or fsspec URL; one engine of engine.model serves them all, enable_lora required) "
        "or local full-model folders (config.json, no adapter_config.json; one engine each).",
    )
    token_budget: float | None = Field(
        default=None,
        gt=0,
        description="Highest mean generated tokens (at `ratio`) a checkpoint may use to be picked. None "
        "picks the most accurate checkpoint whatever its length.",
    )
    ratio: float = Field(default=1.0, gt=0, le=1, description="The row of each table that is compared.")


class EvaluateConfig(BaseModel):
    """One evaluation: a model (optionally with a LoRA adapter), a test set and the ratios to try."""

    model_config = ConfigDict(extra="forbid")

    engine: EngineConfig = Field(
        description="vLLM engine of the base model. With an adapter, set enable_lora and a max_lora_rank "
        ">= the adapter's rank."
    )
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.0, max_tokens=512),
        description="Greedy by default (TokenSkip's setting: reproducible). max_tokens caps every "
        "completion: TokenSkip uses 512 for GSM8K and 1024 for MATH; too low cuts correct long CoTs "
        "(counted in n_truncated), too high only costs time on runaway generations. n > 1 averages "
        "accuracy over n samples per problem.",
    )
    source: SourceConfig = Field(description="The test set (any layout sources.py reads).")
    ratios: list[float] = Field(
        default_factory=lambda: list(DEFAULT_RATIOS),
        min_length=1,
        description="Ratios to condition on, each in (0, 1]; 1.0 is the plain question and the baseline of "
        "achieved_ratio. Every ratio costs one pass over the test set.",
    )
    adapter: str | None = Field(
        default=None,
        description="LoRA adapter folder (peft layout): a local path or an fsspec URL (s3://...), copied to "
        "the local cache once per content. None evaluates the base model.",
    )
    adapter_storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for a remote adapter, e.g. {'endpoint_url': ...}. Credentials belong "
        "in the environment.",
    )
    delimiter: str | None = Field(
        default=None,
        description="Ratio delimiter in the prompt; None = the tokenizer's eos (TokenSkip's choice). Must be "
        "what the model was trained with.",
    )
    instruction: str = Field(
        default=INSTRUCTION, description="Instruction before the question; must match training."
    )
    system: str | None = Field(
        default=None, description="Optional system message; None keeps the chat template's default."
    )
    scale_max_tokens_by_ratio: bool = Field(
        default=False,
        description="TokenSkip's MATH setting: cap each ratio's completion at int(max_tokens x ratio). Makes "
        "low ratios cheaper and enforces the budget, but truncates models that ignore the ratio (their "
        "accuracy drops); off measures how far the model compresses by itself.",
    )
    grading: GradingConfig = Field(
        default_factory=lambda: GradingConfig(last_number_fallback=True),
        description="Grading; last_number_fallback=True matches TokenSkip's evaluation (a response without "
        "an explicit answer is graded by its last number).",
    )
    output: str = Field(min_length=1, description="Output folder or fsspec URL (s3://bucket/prefix).")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for `output` (e.g. {'endpoint_url': ...})."
    )
    limit: int | None = Field(
        default=None,
        ge=1,
        description="Evaluate only the first N problems (quick checks); None evaluates the whole set.",
    )
    pass_k: list[int] = Field(
        default_factory=lambda: [1],
        min_length=1,
        description="k of each pass@k to report, each <= sampling.n (TL;DR: n=8 at T=0.7 on AIME/AMC, "
        "pass@1 averaged over the 8). pass@1 is always the accuracy averaged over the n samples.",
    )
    reference: Literal["short", "long"] | None = Field(
        default=None,
        description="Write the ratio-1.0 row (mean tokens, accuracy) as the short_reference / "
        "long_reference block of a TL;DR train config (reference.yaml, also printed). Evaluate the "
        "short- and the long-CoT reference model on the TL;DR dev set, once each.",
    )
    sweep: CheckpointSweepConfig | None = Field(
        default=None,
        description="Evaluate every checkpoint (each under output/<NN>-<name>/) and pick the best "
        "(output/sweep.json); replaces `adapter`.",
    )

    @field_validator("ratios")
    @classmethod
    def _check_ratios(cls, ratios: list[float]) -> list[float]:
        return ratio_list(ratios, distinct=True)

    @field_validator("grading", mode="before")
    @classmethod
    def _keep_last_number_fallback(cls, grading: Any) -> Any:
        # A partial `grading:` block (say, only timeout_s) must not silently drop the TokenSkip-compatible
        # fallback that this config defaults to; only an explicit `last_number_fallback: false` does.
        if isinstance(grading, dict) and "last_number_fallback" not in grading:
            return {**grading, "last_number_fallback": True}
        return grading

    @field_validator("source")
    @classmethod
    def _resolve_builtin_source(cls, source: SourceConfig) -> SourceConfig:
        from tokenskip.config import resolve_builtin_source

        return resolve_builtin_source(source)

    @model_validator(mode="after")
    def _consistent_options(self) -> EvaluateConfig:
        too_big = [k for k in self.pass_k if not 1 <= k <= self.sampling.n]
        if too_big:
            raise ValueError(f"pass_k values must lie in [1, sampling.n={self.sampling.n}], got {too_big}")
        if self.reference is not None and 1.0 not in self.ratios:
            raise ValueError("reference needs ratio 1.0 in ratios (the plain question)")
        if self.sweep is not None:
            if self.adapter is not None:
                raise ValueError("sweep.checkpoints replace adapter: set one of them")
            if self.sweep.ratio not in self.ratios:
                raise ValueError(f"sweep.ratio {self.sweep.ratio} is not among ratios {self.ratios}")
        return self

    def max_tokens_at(self, ratio: float) -> int:
        """The completion cap at ``ratio`` (TokenSkip truncates max_new_tokens x ratio to an int)."""
        if not self.scale_max_tokens_by_ratio:
            return self.sampling.max_tokens
        return max(1, int(self.sampling.max_tokens * ratio))


def load_evaluate_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> EvaluateConfig:
    """Read a YAML EvaluateConfig (``${VAR}`` expanded); ``overrides`` maps dotted keys to values."""
    from tokenskip.config import load_config

    return load_config(EvaluateConfig, path, overrides)


# --------------------------------------------------------------------------------------------------
# The table


def summarize(samples: pa.Table) -> pa.Table:
    """The TokenSkip table (``TABLE_SCHEMA``, ratios descending) from per-sample rows.

    ``samples`` needs ``ratio``, ``tokens``, ``verdict``, ``error``, ``finish_reason`` and
    ``max_tokens`` (``SAMPLES_SCHEMA`` has them).
    """
    by_ratio: dict[float, list[dict[str, Any]]] = {}
    columns = ["ratio", "tokens", "verdict", "error", "finish_reason", "max_tokens"]
    for row in samples.select(columns).to_pylist():
        by_ratio.setdefault(row["ratio"], []).append(row)

    def mean_tokens(rows: list[dict[str, Any]]) -> float | None:
        counts = [r["tokens"] for r in rows if r["error"] is None and r["tokens"] is not None]
        return sum(counts) / len(counts) if counts else None

    baseline = mean_tokens(by_ratio.get(1.0, []))
    table = []
    for ratio in sorted(by_ratio, reverse=True):
        rows = by_ratio[ratio]
        verdicts = [r["verdict"] for r in rows if r["error"] is None]
        counts = {v: verdicts.count(v.value) for v in Verdict}
        mean = mean_tokens(rows)
        caps = {r["max_tokens"] for r in rows}
        table.append(
            {
                "ratio": ratio,
                "n": len(rows),
                "accuracy": counts[Verdict.correct] / len(rows),
                "mean_tokens": mean,
                "achieved_ratio": mean / baseline if mean is not None and baseline else None,
                "max_tokens": caps.pop() if len(caps) == 1 else None,
                "n_correct": counts[Verdict.correct],
                "n_incorrect": counts[Verdict.incorrect],
                "n_unparsable": counts[Verdict.unparsable],
                "n_timeout": counts[Verdict.timeout],
                "n_errors": sum(r["error"] is not None for r in rows),
                "n_truncated": sum(r["error"] is None and r["finish_reason"] == "length" for r in rows),
            }
        )
    return pa.Table.from_pylist(table, schema=TABLE_SCHEMA)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from ``n`` samples of which ``c`` are correct (Chen et al. 2021,
    "Evaluating Large Language Models Trained on Code"): 1 - C(n-c, k) / C(n, k), computed as a
    product so that large n does not overflow. pass@1 = c / n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_table(samples: pa.Table, ks: Sequence[int]) -> pa.Table:
    """``PASS_SCHEMA`` rows (ratios descending, then k): per ratio and k, pass@k averaged over the
    problems, each problem's from its own samples (an engine error counts as a wrong sample).

    ``samples`` needs ``ratio``, ``problem_id`` and ``verdict``."""
    counts: dict[float, dict[str, list[int]]] = {}
    for row in samples.select(["ratio", "problem_id", "verdict"]).to_pylist():
        n_c = counts.setdefault(row["ratio"], {}).setdefault(row["problem_id"], [0, 0])
        n_c[0] += 1
        n_c[1] += row["verdict"] == Verdict.correct.value
    rows = []
    for ratio in sorted(counts, reverse=True):
        problems = counts[ratio].values()
        sizes = {n for n, _ in problems}
        fewest, per_problem = min(sizes), (next(iter(sizes)) if len(sizes) == 1 else None)
        for k in sorted(set(ks)):
            if k > fewest:
                raise ValueError(f"pass@{k} at ratio {ratio}: a problem has only {fewest} samples")
            estimate = sum(pass_at_k(n, c, k) for n, c in problems) / len(problems)
            rows.append(
                {
                    "ratio": ratio,
                    "k": k,
                    "pass_at_k": estimate,
                    "problems": len(problems),
                    "samples_per_problem": per_problem,
                }
            )
    return pa.Table.from_pylist(rows, schema=PASS_SCHEMA)


def format_pass_at_k(table: pa.Table) -> str:
    """One line per ratio: ``pass@1 62.50%  pass@4 87.50%  (8 problems x 4 samples)``."""
    by_ratio: dict[float, list[dict[str, Any]]] = {}
    for row in table.to_pylist():
        by_ratio.setdefault(row["ratio"], []).append(row)
    lines = []
    for ratio, rows in by_ratio.items():
        cells = "  ".join(f"pass@{r['k']} {100 * r['pass_at_k']:.2f}%" for r in rows)
        n = rows[0]["samples_per_problem"]
        lines.append(f"ratio {ratio:g}: {cells}  ({rows[0]['problems']} problems x {n or 'varying'} samples)")
    return "\n".join(lines)


def reference_point(table: pa.Table, ratio: float = 1.0) -> ReferencePoint:
    """(mean generated tokens, accuracy) of ``table``'s row at ``ratio``: a TL;DR reference point."""
    rows = [r for r in table.to_pylist() if r["ratio"] == ratio]
    if not rows:
        raise ValueError(f"no row at ratio {ratio} to take a reference point from")
    (row,) = rows
    if row["mean_tokens"] is None:
        raise ValueError(f"no sample at ratio {ratio} produced output: no token count for a reference point")
    return ReferencePoint(tokens=round(row["mean_tokens"], 2), accuracy=round(row["accuracy"], 4))


def reference_yaml(kind: Literal["short", "long"], point: ReferencePoint, *, measured_on: str) -> str:
    """The ``short_reference:``/``long_reference:`` block of a TL;DR train config (``tldr:`` section),
    with a comment saying what it was measured on."""
    block = yaml.safe_dump({f"{kind}_reference": point.model_dump()}, sort_keys=False)
    return (
        f"# measured by tokenskip evaluate: {measured_on}\n# paste under `tldr:` in the train config\n{block}"
    )


def format_table(table: pa.Table) -> str:
    """The table as aligned text (what the CLI prints)."""
    header = [
        "ratio",
        "accuracy",
        "mean_tokens",
        "achieved",
        "n",
        "unparsable",
        "timeout",
        "errors",
        "truncated",
    ]
    lines = [header]
    for r in table.to_pylist():
        lines.append(
            [
                f"{r['ratio']:g}",
                f"{100 * r['accuracy']:.2f}%",
                "-" if r["mean_tokens"] is None else f"{r['mean_tokens']:.1f}",
                "-" if r["achieved_ratio"] is None else f"{r['achieved_ratio']:.3f}",
                str(r["n"]),
                str(r["n_unparsable"]),
                str(r["n_timeout"]),
                str(r["n_errors"]),
                str(r["n_truncated"]),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in lines)


def plot_accuracy_vs_tokens(table: pa.Table, title: str = "") -> bytes:
    """PNG bytes: accuracy (%) against mean generated tokens, one labelled point per ratio."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    from matplotlib.figure import Figure

    rows = [r for r in table.to_pylist() if r["mean_tokens"] is not None]
    fig = Figure(figsize=(6, 4.5), dpi=100)
    ax = fig.add_subplot()
    xs = [r["mean_tokens"] for r in rows]
    ys = [100 * r["accuracy"] for r in rows]
    ax.plot(xs, ys, "o-", color="tab:blue")
    for r, x, y in zip(rows, xs, ys, strict=True):
        ax.annotate(format_ratio(r["ratio"]), (x, y), textcoords="offset points", xytext=(4, 6))
    ax.margins(0.1)  # room for the labels of the outermost points
    ax.set_xlabel("mean generated tokens")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "accuracy vs CoT tokens per compression ratio")
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# Evaluation


def _sample_rows(
    problems: list[dict[str, Any]],
    ratio: float,
    prompts: Sequence[str],
    results: Sequence[PromptResult],
    max_tokens: int,
    samples_per_prompt: int,
) -> list[dict[str, Any]]:
    rows = []
    for problem, prompt, result in zip(problems, prompts, results, strict=True):
        base = {
            "ratio": ratio,
            "problem_id": problem["id"],
            "question": problem["question"],
            "answer": problem["answer"],
            "prompt": prompt,
            "prompt_tokens": result.prompt_tokens,
            "max_tokens": max_tokens,
        }
        if result.error:  # one row per sample that was asked for, so every ratio's n is problems x n
            error = {"error": result.error, "error_detail": result.error_detail}
            rows += [{**base, "sample_index": index, **error} for index in range(samples_per_prompt)]
            continue
        for index, gen in enumerate(result.generations):
            rows.append(
                {
                    **base,
                    "sample_index": index,
                    "response": gen.text,
                    "tokens": gen.token_count,
                    "finish_reason": gen.finish_reason,
                }
            )
    return rows


def ratio_prompts(config: EvaluateConfig, tokenizer: Any, questions: list[str]) -> dict[float, list[str]]:
    """The generation prompt of every question at every ratio of ``config``: its delimiter, instruction
    and system message, in the tokenizer's chat template (no ratio marker at 1.0)."""
    return {
        ratio: [
            render_prompt(
                tokenizer,
                question,
                ratio=ratio if ratio < 1.0 else None,
                delimiter=config.delimiter,
                instruction=config.instruction,
                system=config.system,
            )
            for question in questions
        ]
        for ratio in config.ratios
    }


def generate_samples(config: EvaluateConfig, problems: pa.Table, llm, adapter_path: str | None) -> pa.Table:
    """Generate and grade every (ratio, problem) pair with one engine: ``SAMPLES_SCHEMA`` rows."""
    tokenizer = llm.get_tokenizer()
    problem_rows = problems.to_pylist()
    prompts = ratio_prompts(config, tokenizer, [p["question"] for p in problem_rows])
    # All ratios sharing a cap go to the engine in one call, so its batch stays full.
    by_cap: dict[int, list[float]] = {}
    for ratio in config.ratios:
        by_cap.setdefault(config.max_tokens_at(ratio), []).append(ratio)
    results: dict[float, list[PromptResult]] = {}
    for cap, ratios in by_cap.items():
        batch = [prompt for ratio in ratios for prompt in prompts[ratio]]
        sampling = config.sampling.model_copy(update={"max_tokens": cap})
        # What the console shows while it waits: vLLM's progress bar on a terminal, else one line.
        live = sys.stderr.isatty()
        log.info("generating %d completions (ratios %s, max_tokens %d)", len(batch), ratios, cap)
        if not live:
            print(f"generating {len(batch)} completions (ratios {ratios}, max_tokens {cap})", flush=True)
        out = generate_safe(llm, batch, sampling, lora_path=adapter_path, use_tqdm=live)
        for i, ratio in enumerate(ratios):
            results[ratio] = out[i * len(problem_rows) : (i + 1) * len(problem_rows)]

    rows = []
    for ratio in config.ratios:
        rows += _sample_rows(
            problem_rows,
            ratio,
            prompts[ratio],
            results[ratio],
            config.max_tokens_at(ratio),
            config.sampling.n,
        )
    graded = [r for r in rows if r.get("error") is None]
    verdicts = grade_batch([r["response"] for r in graded], [r["answer"] for r in graded], config.grading)
    for row, result in zip(graded, verdicts, strict=True):
        row["verdict"] = result.verdict.value
        row["extracted_answer"] = result.extracted_answer
    return pa.Table.from_pylist(
        [{f.name: r.get(f.name) for f in SAMPLES_SCHEMA} for r in rows], SAMPLES_SCHEMA
    )


def _output_store(config: EvaluateConfig) -> FileStore:
    """Where the outputs go: the storage layer's files (atomic where the store allows, retried on
    throttling and 5xx)."""
    return FileStore(StorageConfig(root=config.output, storage_options=config.storage_options))


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


@dataclass(frozen=True)
class Evaluation:
    """What one evaluation measured (also written under ``output``)."""

    output: str
    table: pa.Table
    """``TABLE_SCHEMA``: one row per ratio."""
    pass_at_k: pa.Table
    """``PASS_SCHEMA``: pass@k per ratio for every configured k."""
    reference: ReferencePoint | None
    """The ratio-1.0 reference point, when ``config.reference`` asked for it."""


def evaluate(config: EvaluateConfig, *, llm=None) -> pa.Table:
    """Run the evaluation, write every output under ``config.output`` and return the table
    (:func:`run_evaluation` returns everything it measured)."""
    return run_evaluation(config, llm=llm).table


def run_evaluation(config: EvaluateConfig, *, llm=None) -> Evaluation:
    """Run the evaluation and write every output under ``config.output``.

    ``llm`` reuses an engine the caller already built (it must have been built from ``config.engine``,
    with LoRA enabled when an adapter is set); None builds one.
    """
    if config.sweep is not None:
        raise ValueError("this config sweeps checkpoints: run it with run_sweep")
    started = time.time()
    loaded = load_source(config.source)
    problems, source_errors = loaded.problems, loaded.errors
    if config.limit is not None:
        problems = problems.slice(0, config.limit)
    if problems.num_rows == 0:
        raise ValueError(
            f"no usable problems in {config.source.path} ({source_errors.num_rows} bad records); "
            "nothing to evaluate"
        )
    if config.adapter and llm is None and not config.engine.enable_lora:
        raise ValueError(
            "an adapter needs engine.enable_lora: true (and max_lora_rank >= the adapter's rank)"
        )
    out = _output_store(config)
    # Storage options may carry credentials: never written out.
    config_json = config.model_dump(
        mode="json",
        exclude={"storage_options": True, "adapter_storage_options": True, "source": {"storage_options"}},
    )
    # A placeholder report first: a wrong URL or missing credentials fail now, not after generation.
    out.write(REPORT_FILE, json.dumps({"status": "running", "config": config_json}, indent=2).encode())

    adapter_path = None
    if config.adapter:  # a peft folder; a remote one is copied into the local cache (again when it changed)
        adapter_path = fetch_folder(
            config.adapter,
            config.adapter_storage_options,
            cache=cache_dir() / "adapters",
            required_file=ADAPTER_CONFIG,
        )
    if llm is None:
        llm = create_llm(config.engine)
    generation_started = time.time()
    samples = generate_samples(config, problems, llm, adapter_path)
    generation_s = time.time() - generation_started
    table = summarize(samples)
    passes = pass_at_k_table(samples, config.pass_k)
    reference = reference_point(table) if config.reference else None

    report = {
        "status": "complete",
        "model": model_name(config.engine.model),
        "adapter": config.adapter,
        "source": config.source.path,
        "problems": problems.num_rows,
        "source_errors": source_errors.num_rows,
        "source_filtered_out": loaded.filtered_out,
        "generation_seconds": round(generation_s, 3),
        "total_seconds": round(time.time() - started, 3),
        "table": table.to_pylist(),
        "pass_at_k": passes.to_pylist(),
        "reference": {f"{config.reference}_reference": reference.model_dump()} if reference else None,
        "config": config_json,
    }
    out.write(SAMPLES_FILE, _parquet_bytes(samples))
    if source_errors.num_rows:
        out.write(SOURCE_ERRORS_FILE, _parquet_bytes(source_errors))
    out.write(TABLE_FILE, _parquet_bytes(table))
    out.write(PASS_FILE, _parquet_bytes(passes))
    if reference is not None:
        block = reference_yaml(
            config.reference, reference, measured_on=_measured_on(config, problems.num_rows)
        )
        out.write(REFERENCE_FILE, block.encode())
    title = os.path.basename(config.engine.model.rstrip("/")) + (" + adapter" if config.adapter else "")
    out.write(PLOT_FILE, plot_accuracy_vs_tokens(table, title))
    # Last: "complete" means every file is there.
    out.write(REPORT_FILE, json.dumps(report, indent=2).encode())
    return Evaluation(output=config.output, table=table, pass_at_k=passes, reference=reference)


def _measured_on(config: EvaluateConfig, problems: int) -> str:
    model = model_name(config.engine.model) + (f" + {config.adapter}" if config.adapter else "")
    s = config.sampling
    return (
        f"{model} on {config.source.path} ({problems} problems x n={s.n}, T={s.temperature}, "
        f"max_tokens {s.max_tokens})"
    )


# --------------------------------------------------------------------------------------------------
# Checkpoint sweep


class CheckpointScore(BaseModel):
    """One checkpoint's row of a sweep: its accuracy and length at the sweep's ratio."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str
    output: str = Field(description="Where its evaluation was written.")
    accuracy: float
    mean_tokens: float | None
    within_budget: bool


class SweepResult(BaseModel):
    """The outcome of a checkpoint sweep (``sweep.json``)."""

    model_config = ConfigDict(extra="forbid")

    ratio: float
    token_budget: float | None
    scores: list[CheckpointScore]
    best: CheckpointScore | None = Field(description="The pick; None when no checkpoint fits the budget.")
    reason: str = Field(description="Why best is what it is, in one line.")


def score_checkpoint(
    checkpoint: str, output: str, table: pa.Table, *, ratio: float, token_budget: float | None
) -> CheckpointScore:
    """A checkpoint's sweep row from its evaluation table's row at ``ratio``."""
    (row,) = [r for r in table.to_pylist() if r["ratio"] == ratio]
    mean = row["mean_tokens"]
    fits = token_budget is None or (mean is not None and mean <= token_budget)
    return CheckpointScore(
        checkpoint=checkpoint, output=output, accuracy=row["accuracy"], mean_tokens=mean, within_budget=fits
    )


def pick_checkpoint(
    scores: Sequence[CheckpointScore], *, ratio: float, token_budget: float | None
) -> SweepResult:
    """The most accurate checkpoint among those within the budget; fewer tokens, then the earlier
    checkpoint, break ties. ``best`` is None (and ``reason`` says why) when none fits."""
    if not scores:
        raise ValueError("a sweep needs at least one checkpoint")
    fitting = [(i, s) for i, s in enumerate(scores) if s.within_budget]
    if not fitting:
        lengths = ", ".join("no output" if s.mean_tokens is None else f"{s.mean_tokens:.1f}" for s in scores)
        reason = f"no checkpoint within the token budget {token_budget:g} (mean tokens: {lengths})"
        return SweepResult(
            ratio=ratio, token_budget=token_budget, scores=list(scores), best=None, reason=reason
        )
    _, best = max(fitting, key=lambda t: (t[1].accuracy, -(t[1].mean_tokens or 0.0), -t[0]))
    among = "" if token_budget is None else f" among {len(fitting)} within {token_budget:g} tokens"
    tokens = "no output" if best.mean_tokens is None else f"{best.mean_tokens:.1f} mean tokens"
    reason = f"highest accuracy{among}: {best.accuracy:.2%} at {tokens} (ratio {ratio:g})"
    return SweepResult(ratio=ratio, token_budget=token_budget, scores=list(scores), best=best, reason=reason)


def checkpoint_kind(checkpoint: str) -> Literal["adapter", "model"]:
    """``model`` for a local folder holding a full model (config.json, no adapter_config.json);
    ``adapter`` otherwise (a peft folder, local or remote: its evaluation checks it)."""
    local = Path(checkpoint.removeprefix("file://"))
    if not is_remote(checkpoint) and local.is_dir() and not (local / ADAPTER_CONFIG).exists():
        if (local / "config.json").is_file():
            return "model"
    return "adapter"


def _checkpoint_folder(index: int, checkpoint: str) -> str:
    name = posixpath.basename(checkpoint.rstrip("/")) or "checkpoint"
    return f"{index:02d}-{name}"


def run_sweep(config: EvaluateConfig, *, llm=None) -> SweepResult:
    """Evaluate every checkpoint of ``config.sweep`` (each under ``output/<NN>-<name>/``, as a whole
    evaluation) and pick the best (:func:`pick_checkpoint`); the result is written to
    ``output/sweep.json``. Adapters share one engine (``llm``, or one built here)."""
    sweep = config.sweep
    if sweep is None:
        raise ValueError("the config has no sweep section")
    kinds = [checkpoint_kind(c) for c in sweep.checkpoints]
    if "adapter" in kinds and llm is None:
        if not config.engine.enable_lora:
            raise ValueError(
                "adapter checkpoints need engine.enable_lora: true (and max_lora_rank >= their rank)"
            )
        llm = create_llm(config.engine)
    scores = []
    base = config.model_copy(update={"sweep": None})
    for index, (checkpoint, kind) in enumerate(zip(sweep.checkpoints, kinds, strict=True)):
        output = posixpath.join(config.output.rstrip("/"), _checkpoint_folder(index, checkpoint))
        if kind == "adapter":
            one = base.model_copy(update={"adapter": checkpoint, "output": output})
            evaluation = run_evaluation(one, llm=llm)
        else:  # a full fine-tune: its own engine
            engine = config.engine.model_copy(update={"model": checkpoint})
            evaluation = run_evaluation(base.model_copy(update={"engine": engine, "output": output}))
        log.info("checkpoint %s evaluated: %s", checkpoint, output)
        scores.append(
            score_checkpoint(
                checkpoint, output, evaluation.table, ratio=sweep.ratio, token_budget=sweep.token_budget
            )
        )
    result = pick_checkpoint(scores, ratio=sweep.ratio, token_budget=sweep.token_budget)
    _output_store(config).write(SWEEP_FILE, result.model_dump_json(indent=2).encode())
    return result


def format_sweep(result: SweepResult) -> str:
    """The sweep as aligned text: one line per checkpoint (``*`` marks the pick), then the reason."""
    lines = [f"checkpoint sweep at ratio {result.ratio:g}, token budget {result.token_budget}"]
    for score in result.scores:
        mark = "*" if result.best is not None and score.checkpoint == result.best.checkpoint else " "
        tokens = "-" if score.mean_tokens is None else f"{score.mean_tokens:.1f}"
        fits = "" if score.within_budget else "  over budget"
        lines.append(f"{mark} {score.accuracy:7.2%}  {tokens:>8}  {score.checkpoint}{fits}")
    lines.append((f"best: {result.best.checkpoint}: " if result.best else "") + result.reason)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line


def run_command(args: argparse.Namespace) -> int:
    """``tokenskip evaluate``: the table on stdout, the outputs under ``output``. With ``--num-gpus`` or
    ``--num-cpus`` the evaluation runs as one Ray task reserving them: a job's driver usually runs on
    the head node, which may have no GPU, and the task puts the vLLM engine on a node that has one."""
    from tokenskip.config import parse_overrides
    from tokenskip.console import place_log

    config = load_evaluate_config(args.config, parse_overrides(args.set))
    if args.dry_run:
        print(json.dumps(config.model_dump(mode="json"), indent=1))
        return 0
    place_log(getattr(args, "run_log", None), config.output)  # the log goes with the outputs
    if args.num_gpus is None and args.num_cpus is None:
        text, code = run_config(config)
    else:
        import ray

        from tokenskip.ray_runtime import init_ray

        init_ray()  # joins the job's cluster (RAY_ADDRESS) or starts a local one, as every command does
        task = ray.remote(num_gpus=args.num_gpus or 0, num_cpus=args.num_cpus or 1)(run_config)
        text, code = ray.get(task.remote(config))
    print(text)
    return code


def run_config(config: EvaluateConfig) -> tuple[str, int]:
    """Run what ``config`` asks (one evaluation, or a checkpoint sweep) and return what to print and
    the exit code: 1 when a sweep finds no checkpoint within its budget. Shared by the CLI and the
    Ray job (which may run it as a task on a GPU node)."""
    if config.sweep is not None:
        result = run_sweep(config)
        outputs = f"outputs: {config.output.rstrip('/')}/{{{SWEEP_FILE},<NN>-<checkpoint>/}}"
        return f"{format_sweep(result)}\n{outputs}", 0 if result.best is not None else 1
    evaluation = run_evaluation(config)
    files = [TABLE_FILE, REPORT_FILE, PASS_FILE, SAMPLES_FILE, PLOT_FILE]
    parts = [format_table(evaluation.table), format_pass_at_k(evaluation.pass_at_k)]
    if evaluation.reference is not None:
        parts.append(
            yaml.safe_dump({f"{config.reference}_reference": evaluation.reference.model_dump()}).rstrip()
        )
        files.append(REFERENCE_FILE)
    parts.append(f"outputs: {config.output.rstrip('/')}/{{{','.join(files)}}}")
    return "\n".join(parts), 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(
        parser,
        config_help="YAML EvaluateConfig (see tokenskip/configs/evaluate_example.yaml)",
        dry_run_help="validate and print the config, do not run",
    )
    parser.add_argument(
        "--num-gpus",
        type=float,
        default=None,
        help="run as a Ray task reserving this many GPUs (engine.tensor_parallel_size for vLLM on GPU)",
    )
    parser.add_argument(
        "--num-cpus", type=float, default=None, help="run as a Ray task reserving this many CPUs"
    )
