"""The pipeline's compress stage (Ray Data): the ``kept`` sample rows get their compressions; every
other row passes through.

Input: the grade stage's sample rows (:data:`INPUT_SCHEMA`). Output: :data:`OUTPUT_SCHEMA`, the same
rows with :data:`OUTPUT_FIELDS` appended, filled for the kept rows the stage compressed. Config:
:class:`~tokenskip.compress.CompressConfig` and the compression fields of
:class:`~tokenskip.config.ResourcesConfig` (:func:`map_batches_args`).

The scoring itself is :class:`tokenskip.compress.Compressor` (score once, prune at every ratio),
which already isolates a row its scorer fails on (:mod:`tokenskip.fallback`) and reports it
as that row's ``error``/``error_detail``. Such a row becomes an error row here (status ``error``,
``stage`` = :data:`STAGE`, the compressor's ``error``/``error_detail``), and the write stage puts it
in the run's errors; the other rows of its batch keep their compressions.

A run built without compression (``compression: null``, a pool of plain CoTs) has no compress
stage: :func:`keep_cots_whole` takes its place (a plain task, no scorer), giving the kept rows their
reasoning / answer tail split, ``original_tokens`` = the generated tokens and ``compressions: []``,
so the data schema is the same and ``train`` reads it (with ``mix.ratios: [1.0]``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from tokenskip.capacity import actor_pool_args
from tokenskip.grading import split_answer_tail
from tokenskip.metrics import StageMetrics
from tokenskip.schema import COMPRESS_STAGE, COMPRESSED_SCHEMA
from tokenskip.stages import grade
from tokenskip.stages.contract import StageContract, check_fields

if TYPE_CHECKING:
    from tokenskip.compress import CompressConfig
    from tokenskip.config import PipelineConfig

STAGE = COMPRESS_STAGE

INPUT_SCHEMA = grade.OUTPUT_SCHEMA

# Appended to every row; null on the rows the stage did not compress (rejects, earlier errors).
OUTPUT_FIELDS = [
    pa.field("reasoning", pa.string()),
    pa.field("answer_tail", pa.string()),
    pa.field("original_tokens", pa.int64()),
    COMPRESSED_SCHEMA.field("compressions"),
    # Set on every row the stage worked on (compressed or failed): its share of the scoring time.
    pa.field("compress_seconds", pa.float64()),
]

OUTPUT_SCHEMA = pa.schema(list(INPUT_SCHEMA) + OUTPUT_FIELDS)

# keep_cots_whole (compression: null) has the same contract: the data schema does not change.
CONTRACT = StageContract("compress", INPUT_SCHEMA, OUTPUT_SCHEMA)

# Compressor output columns that the output rows take over unchanged (on success).
_COMPRESSED_COLUMNS = ("reasoning", "answer_tail", "original_tokens", "compressions")


class CompressKeptStage:
    """``map_batches`` callable: compress the ``kept`` rows (score once, prune at every ratio)."""

    def __init__(
        self,
        compression: CompressConfig,
        *,
        cpus: float = 0.5,
        omp_threads: int | None = None,
        batch_size: int = 32,
    ):
        from tokenskip.compress import Compressor
        from tokenskip.torch_thread import TorchThread

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # Ray Data hands over whole shards (so the write stage gets them whole); score in chunks.
        self.batch_size = batch_size
        # The scoring model is loaded and run on one thread of ours (see tokenskip.torch_thread).
        self.torch_thread = TorchThread(omp_threads, cpus, name="scorer")
        self.compressor = self.torch_thread.run(Compressor, compression)
        self.metrics = StageMetrics()

    def __call__(self, batch: pa.Table) -> pa.Table:
        check_fields(batch.schema, INPUT_SCHEMA, STAGE)
        rows = batch.to_pylist()
        kept = [i for i, r in enumerate(rows) if r["status"] == "kept"]
        for row in rows:
            row.update(dict.fromkeys(f.name for f in OUTPUT_FIELDS))
        started = time.perf_counter()
        for start in range(0, len(kept), self.batch_size):
            chunk = kept[start : start + self.batch_size]
            out = self.torch_thread.run(self.compressor, {"cot": [rows[i]["cot"] for i in chunk]})
            for j, i in enumerate(chunk):
                if out["error"][j]:
                    rows[i].update(
                        status="error", stage=STAGE, error=out["error"][j], error_detail=out["error_detail"][j]
                    )
                    self.metrics.record_errors(STAGE, out["error"][j])
                else:
                    rows[i].update({name: out[name][j] for name in _COMPRESSED_COLUMNS})
        seconds = time.perf_counter() - started
        for i in kept:
            rows[i]["compress_seconds"] = seconds / len(kept)
        self.metrics.record_rows(STAGE, len(kept))
        self.metrics.record_stage_seconds(STAGE, seconds if kept else 0.0)
        return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


def keep_cots_whole(batch: pa.Table) -> pa.Table:
    """``map_batches`` function of a run without compression: the kept rows get the fields a
    compressed row has (reasoning and answer tail split as compression splits them, ``original_tokens``
    = the generated tokens, no compressions); every other row passes through with them null."""
    check_fields(batch.schema, INPUT_SCHEMA, "keep whole")
    rows = batch.to_pylist()
    for row in rows:
        row.update(dict.fromkeys(f.name for f in OUTPUT_FIELDS))
        if row["status"] == "kept":
            reasoning, tail = split_answer_tail(row["cot"])
            row.update(
                reasoning=reasoning, answer_tail=tail, original_tokens=row["gen_tokens"], compressions=[]
            )
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


def rows_per_generation_batch(config: PipelineConfig) -> int:
    """Sample rows the grade stage makes of one generation batch: its problems x n."""
    return config.resources.generation_batch_size * config.sampling.n


def map_batches_args(config: PipelineConfig) -> dict[str, Any]:
    """``Dataset.map_batches`` arguments that run this stage as ``config`` says (without compression:
    :func:`keep_cots_whole`, a task that loads nothing)."""
    r = config.resources
    if config.compression is None:
        return {
            "fn": keep_cots_whole,
            "batch_size": None,  # whole blocks: shards stay whole for the write stage
            "batch_format": "pyarrow",
            "num_cpus": r.grading_cpus,
            "max_retries": -1,
        }
    return {
        "fn": CompressKeptStage,
        "fn_constructor_kwargs": {
            "compression": config.compression,
            "cpus": r.compression_cpus,
            "omp_threads": r.omp_threads,
            "batch_size": r.compression_batch_size,
        },
        # One generation batch's sample rows (its problems x n) per call. The grade stage turns each
        # generation batch into one block of that many rows, so every call gets one whole block and
        # shards stay whole for the write stage; the stage itself scores in chunks of
        # compression_batch_size. A whole-block ``None`` would do the same on CPU, but Ray Data
        # refuses ``batch_size=None`` with ``num_gpus`` (when it builds the graph): one value for both.
        "batch_size": rows_per_generation_batch(config),
        "batch_format": "pyarrow",
        "num_cpus": r.compression_cpus,
        "num_gpus": r.compression_gpus,
        # An elastic pool whose lost actors' batches are redone by the driver (tokenskip.capacity).
        **actor_pool_args(r.compression_actors),
    }
