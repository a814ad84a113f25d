"""Grading + selection stage: one row per problem (with its samples) -> one row per sample.

Every sample gets a verdict from :mod:`tokenskip.grading` and a ``status``:

* ``kept``   - correct and chosen by the selection policy: it goes on to compression;
* ``reject`` - incorrect / unparsable / timeout, correct but longer than ``max_cot_tokens`` (reason
  ``too_long``), or correct but dropped by the policy (reason ``policy``); it lands in the rejects
  table with its verdict;
* ``error``  - the problem produced no sample (prompt too long, engine error); one error row per
  expected sample, so every (problem, sample index) key appears exactly once in the run. The rows
  carry the generation stage's ``stage``/``error``/``error_detail`` as it wrote them.

A reject row says ``stage`` = :data:`STAGE` and why (``reason``/``detail``); grading never fails a
row, so this stage writes no error of its own.

Input: the generation stage's rows (:data:`INPUT_FIELDS`). Output: :data:`OUTPUT_SCHEMA`, exactly
``n`` rows per problem: a shard is committed once it has ``problems x n`` rows, so a problem with
another number of samples would leave its shard waiting forever. The stage refuses such a batch
with :class:`~tokenskip.stages.contract.RowCountMismatch` instead. Config:
:class:`~tokenskip.grading.GradingConfig` and the policy and length limit of
:class:`~tokenskip.config.SelectionConfig`, with the run's model, generation hash and ``n``
(:func:`map_batches_args`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

from tokenskip.capacity import actor_pool_args
from tokenskip.grading import GradingConfig, Verdict, grade_batch
from tokenskip.metrics import StageMetrics
from tokenskip.schema import GRADE_STAGE, PROBLEM_SCHEMA, sample_key
from tokenskip.stages import generate
from tokenskip.stages.contract import RowCountMismatch, StageContract, check_fields

if TYPE_CHECKING:
    from tokenskip.config import PipelineConfig

STAGE = GRADE_STAGE

# The problem fields the sample rows copy, the shard a problem belongs to, what generation added.
INPUT_FIELDS = [
    *(PROBLEM_SCHEMA.field(name) for name in ("id", "question", "answer", "source", "split")),
    pa.field("shard_id", pa.string()),
    *generate.OUTPUT_FIELDS,
]

# One row per (problem, sample index): the rows every later stage works on.
OUTPUT_SCHEMA = SAMPLE_ROW_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("problem_id", pa.string()),
        pa.field("shard_id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("split", pa.string()),
        pa.field("question", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("sample_index", pa.int64()),
        pa.field("model", pa.string()),
        pa.field("cot", pa.string()),
        pa.field("gen_tokens", pa.int64()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("finish_reason", pa.string()),
        pa.field("gen_seconds", pa.float64()),
        # The problem's shares of its batch's engine steps (tokenskip.stages.generate), for occupancy.
        pa.field("gen_engine_steps", pa.float64()),
        pa.field("gen_engine_running_seqs", pa.float64()),
        pa.field("gen_engine_max_num_seqs", pa.int64()),
        pa.field("verdict", pa.string()),
        pa.field("extracted_answer", pa.string()),
        pa.field("status", pa.string()),
        # The stage that took the row off the main path (a reject's or an error's), null when kept.
        pa.field("stage", pa.string()),
        # A reject's reason; an error's error (the names of REJECT_SCHEMA and ERROR_SCHEMA).
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("error", pa.string()),
        pa.field("error_detail", pa.string()),
    ]
)

CONTRACT = StageContract("grade", pa.schema(INPUT_FIELDS), OUTPUT_SCHEMA)


def too_long(length: int | None, max_cot_tokens: int | None) -> bool:
    """Whether a CoT of ``length`` generated tokens is over the selection's length limit."""
    return max_cot_tokens is not None and length is not None and length > max_cot_tokens


def choose(
    verdicts: list[str], lengths: list[int], policy: str, max_cot_tokens: int | None = None
) -> set[int]:
    """Indices of the correct samples the policy keeps, among those within ``max_cot_tokens``."""
    correct = [
        i
        for i, v in enumerate(verdicts)
        if v == Verdict.correct.value and not too_long(lengths[i], max_cot_tokens)
    ]
    if not correct or policy == "all-correct":
        return set(correct)
    if policy == "first-correct":
        return {correct[0]}
    if policy == "shortest-correct":
        return {min(correct, key=lambda i: (lengths[i], i))}
    raise ValueError(f"unknown selection policy {policy!r}")


class GradeSelectStage:
    """``map_batches`` callable (pyarrow in, pyarrow out)."""

    def __init__(
        self,
        grading: GradingConfig,
        policy: str,
        model: str,
        generation_hash: str,
        n_samples: int,
        max_cot_tokens: int | None = None,
    ):
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        self.grading = grading
        self.policy = policy
        self.max_cot_tokens = max_cot_tokens
        self.model = model
        self.generation_hash = generation_hash
        self.n_samples = n_samples
        self.metrics = StageMetrics()

    def __call__(self, batch: pa.Table) -> pa.Table:
        check_fields(batch.schema, INPUT_FIELDS, STAGE)
        problems = batch.to_pylist()
        for p in problems:
            samples = p["samples"] or []
            if not p["error"] and len(samples) != self.n_samples:
                raise RowCountMismatch(
                    f"grade stage: problem {p['id']!r} (shard {p['shard_id']!r}) has {len(samples)} samples, "
                    f"expected n={self.n_samples}: its shard would never reach problems x n rows"
                )
        flat_texts, flat_golds, owners = [], [], []
        for p_index, p in enumerate(problems):
            for s in p["samples"] or []:
                flat_texts.append(s["text"])
                flat_golds.append(p["answer"])
                owners.append(p_index)
        results = grade_batch(flat_texts, flat_golds, self.grading) if flat_texts else []
        by_problem: dict[int, list] = {}
        for owner, result in zip(owners, results, strict=True):
            by_problem.setdefault(owner, []).append(result)

        rows = []
        for p_index, p in enumerate(problems):
            base = {
                "problem_id": p["id"],
                "shard_id": p["shard_id"],
                "source": p["source"],
                "split": p["split"],
                "question": p["question"],
                "answer": p["answer"],
                "model": self.model,
                "prompt_tokens": p.get("prompt_tokens"),
                "gen_seconds": p.get("gen_seconds"),
                "gen_engine_steps": p.get("gen_engine_steps"),
                "gen_engine_running_seqs": p.get("gen_engine_running_seqs"),
                "gen_engine_max_num_seqs": p.get("gen_engine_max_num_seqs"),
            }
            samples = p["samples"] or []
            if p["error"]:
                for idx in range(self.n_samples):
                    rows.append(
                        base
                        | {
                            "key": sample_key(p["id"], self.generation_hash, idx),
                            "sample_index": idx,
                            "status": "error",
                            "stage": p["stage"],
                            "error": p["error"],
                            "error_detail": p["error_detail"],
                        }
                    )
                continue
            graded = by_problem[p_index]
            verdicts = [g.verdict.value for g in graded]
            lengths = [s["tokens"] for s in samples]
            kept = choose(verdicts, lengths, self.policy, self.max_cot_tokens)
            for idx, (s, g) in enumerate(zip(samples, graded, strict=True)):
                row = base | {
                    "key": sample_key(p["id"], self.generation_hash, idx),
                    "sample_index": idx,
                    "cot": s["text"],
                    "gen_tokens": s["tokens"],
                    "finish_reason": s["finish_reason"],
                    "verdict": g.verdict.value,
                    "extracted_answer": g.extracted_answer,
                }
                if idx in kept:
                    row |= {"status": "kept"}
                elif g.verdict == Verdict.correct and too_long(lengths[idx], self.max_cot_tokens):
                    detail = f"CoT of {lengths[idx]} tokens, over selection.max_cot_tokens {self.max_cot_tokens}"
                    row |= {"status": "reject", "stage": STAGE, "reason": "too_long", "detail": detail}
                elif g.verdict == Verdict.correct:
                    detail = f"not chosen by {self.policy}"
                    row |= {"status": "reject", "stage": STAGE, "reason": "policy", "detail": detail}
                else:
                    row |= {"status": "reject", "stage": STAGE, "reason": g.verdict.value, "detail": g.detail}
                rows.append(row)
        if len(rows) != batch.num_rows * self.n_samples:  # every branch above yields n rows a problem
            raise RowCountMismatch(
                f"grade stage: {len(rows)} sample rows for {batch.num_rows} problems x n={self.n_samples}"
            )
        self.metrics.record_rows(STAGE, len(rows))
        for r in rows:
            if r["status"] == "reject":  # generation errors are counted by the generation stage
                self.metrics.record_rejects(STAGE, r["reason"])
        return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


def map_batches_args(config: PipelineConfig) -> dict[str, Any]:
    """``Dataset.map_batches`` arguments that run this stage as ``config`` says."""
    from tokenskip.config import PoolSize
    from tokenskip.models import model_name

    return {
        "fn": GradeSelectStage,
        "fn_constructor_kwargs": {
            "grading": config.grading,
            "policy": config.selection.policy,
            "model": model_name(config.engine.model),
            "generation_hash": config.generation_hash(),
            "n_samples": config.sampling.n,
            "max_cot_tokens": config.selection.max_cot_tokens,
        },
        "batch_format": "pyarrow",
        "num_cpus": config.resources.grading_cpus,
        # One grader; if it is lost, its batches are redone by the driver (tokenskip.capacity).
        **actor_pool_args(PoolSize(min=1, max=1)),
    }
