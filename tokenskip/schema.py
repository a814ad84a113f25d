"""Arrow schemas shared by every stage.

Every table the project writes has one of these schemas, so a reader never guesses columns:

* ``PROBLEM_SCHEMA`` - a problem to solve (loaded by :mod:`tokenskip.sources`).
* ``COMPRESSED_SCHEMA`` - a correct CoT with its pruned versions at every target ratio.
* ``REJECT_SCHEMA`` - a row that left the main path on purpose (wrong answer, duplicate, ...): the
  ``stage`` that rejected it (one of :data:`REJECT_STAGES`), its ``reason`` and ``detail``.
* ``ERROR_SCHEMA`` - a row that could not be processed (malformed input, engine error, ...): the
  ``stage`` that could not process it (one of :data:`ERROR_STAGES`), its ``error`` and
  ``error_detail``, the names an error has wherever it is carried (engine results, the compressor's
  output, the stages' rows).

The stage names are declared here once (:data:`STAGES`); each stage module binds its own as
``STAGE`` and writes it on the rows it takes off the main path, and the ``stage`` fields' docs (which
every dataset card prints) are built from the same constants.

Keys are content hashes (see :func:`problem_id` and :func:`sample_key`): resume, deduplication and
incremental refresh use them and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import Any

import pyarrow as pa

# The dataset build's stages, in pipeline order, as the ``stage`` column of rejects and errors names
# them. The modules: tokenskip.sources, tokenskip.dedup, tokenskip.stages.{generate,grade,compress,write}
# (the ``tokenskip compress`` command is the compress stage run on a file).
SOURCES_STAGE = "sources"
DEDUP_STAGE = "dedup"
GENERATE_STAGE = "generate"
GRADE_STAGE = "grade"
COMPRESS_STAGE = "compress"
WRITE_STAGE = "write"
STAGES = (SOURCES_STAGE, DEDUP_STAGE, GENERATE_STAGE, GRADE_STAGE, COMPRESS_STAGE, WRITE_STAGE)
# The stages that write error rows: records that are not problems, problems the engine could not
# serve (the grade stage copies the generate stage's error onto each of the problem's n sample rows),
# CoTs the scorer could not compress. Grading gives every sample a verdict and never fails a row.
ERROR_STAGES = (SOURCES_STAGE, GENERATE_STAGE, COMPRESS_STAGE)
# The stages that write reject rows: duplicate or contaminated problems, graded-out samples.
REJECT_STAGES = (DEDUP_STAGE, GRADE_STAGE)

PROBLEM_SCHEMA = pa.schema(
    [
        pa.field(
            "id", pa.string(), nullable=False, metadata={"doc": "sha256(source, normalised question)[:32]"}
        ),
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False, metadata={"doc": "gold final answer (no CoT)"}),
        pa.field("source", pa.string(), nullable=False, metadata={"doc": "data set name, e.g. gsm8k"}),
        pa.field("split", pa.string(), nullable=False),
        pa.field("metadata", pa.string(), metadata={"doc": "JSON object: reference solution, level, ..."}),
    ]
)

COMPRESSION_STRUCT = pa.struct(
    [
        pa.field("target_ratio", pa.float64(), metadata={"doc": "the ratio asked of the pruner, e.g. 0.7"}),
        pa.field("text", pa.string(), metadata={"doc": "pruned reasoning + untouched answer tail"}),
        pa.field("tokens", pa.int64(), metadata={"doc": "tokens of text in the target model's tokenizer"}),
        pa.field("achieved_ratio", pa.float64(), metadata={"doc": "tokens / original_tokens"}),
    ]
)

COMPRESSED_SCHEMA = pa.schema(
    [
        pa.field(
            "key", pa.string(), nullable=False, metadata={"doc": "sample key: problem, gen config, index"}
        ),
        pa.field("problem_id", pa.string(), nullable=False, metadata={"doc": "problem key (see PROBLEM_SCHEMA id)"}),
        pa.field("source", pa.string(), metadata={"doc": "data set name, e.g. gsm8k"}),
        pa.field("split", pa.string(), metadata={"doc": "split label of the source"}),
        pa.field("question", pa.string(), metadata={"doc": "the problem as given to the model"}),
        pa.field("answer", pa.string(), metadata={"doc": "gold answer"}),
        pa.field("sample_index", pa.int64(), metadata={"doc": "which of the n samples of the problem (0-based)"}),
        pa.field("model", pa.string(), metadata={"doc": "model that generated the CoT"}),
        pa.field("cot", pa.string(), metadata={"doc": "the full generated CoT"}),
        pa.field("reasoning", pa.string(), metadata={"doc": "the prunable part of the CoT"}),
        pa.field("answer_tail", pa.string(), metadata={"doc": "the final-answer tail, never pruned"}),
        pa.field("extracted_answer", pa.string(), metadata={"doc": "the answer read from the CoT"}),
        pa.field("verdict", pa.string(), metadata={"doc": "grader's verdict (correct for every kept row)"}),
        pa.field("original_tokens", pa.int64(), metadata={"doc": "tokens of cot in the target model's tokenizer"}),
        pa.field("compressions", pa.list_(COMPRESSION_STRUCT), metadata={"doc": "one entry per target ratio"}),
    ]
)

REJECT_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False, metadata={"doc": "sample key, or problem key for dedup"}),
        pa.field("problem_id", pa.string(), metadata={"doc": "problem key"}),
        pa.field(
            "stage", pa.string(), metadata={"doc": f"stage that rejected the row: {', '.join(REJECT_STAGES)}"}
        ),
        pa.field(
            "reason",
            pa.string(),
            metadata={"doc": "incorrect|unparsable|timeout|duplicate|contaminated|policy|too_long"},
        ),
        pa.field("detail", pa.string(), metadata={"doc": "human-readable explanation"}),
        pa.field("sample_index", pa.int64(), metadata={"doc": "which sample (null for problem-level rejects)"}),
        pa.field("cot", pa.string(), metadata={"doc": "the generated CoT, kept for inspection"}),
        pa.field("extracted_answer", pa.string(), metadata={"doc": "the answer read from the CoT"}),
        pa.field("answer", pa.string(), metadata={"doc": "gold answer"}),
    ]
)

ERROR_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), metadata={"doc": "problem or sample key where one could be computed"}),
        pa.field(
            "problem_id", pa.string(), metadata={"doc": "problem key, null when the input was unusable"}
        ),
        pa.field(
            "stage", pa.string(), metadata={"doc": f"stage that could not process it: {', '.join(ERROR_STAGES)}"}
        ),
        pa.field("error", pa.string(), metadata={"doc": "short machine-readable error, e.g. prompt_too_long"}),
        pa.field("error_detail", pa.string(), metadata={"doc": "human-readable explanation"}),
        pa.field("source", pa.string(), metadata={"doc": "data set name"}),
        pa.field("raw", pa.string(), metadata={"doc": "the offending input, JSON-encoded, nothing dropped"}),
    ]
)

# Errors tables written before errors had one name called their error ``reason``/``detail``.
_LEGACY_ERROR_COLUMNS = {"reason": "error", "detail": "error_detail"}


def current_error_columns(table: pa.Table | pa.RecordBatch) -> pa.Table | pa.RecordBatch:
    """An errors table (or batch) with today's column names, whichever names it was written with:
    the one place that reads errors tables of datasets written before ``error``/``error_detail``."""
    names = table.schema.names
    if "error" in names or not any(old in names for old in _LEGACY_ERROR_COLUMNS):
        return table
    return table.rename_columns([_LEGACY_ERROR_COLUMNS.get(name, name) for name in names])


_WS = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """Normalisation used for keys and deduplication: NFKC, lower case, single spaces."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip().lower()


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x1f")
    return h.hexdigest()[:32]


def problem_id(source: str, question: str) -> str:
    """Stable problem key: content hash of the source name and the normalised question."""
    return _digest(source, normalise_text(question))


def config_hash(config: Any) -> str:
    """Hash of a JSON-serialisable config (dicts are hashed with sorted keys)."""
    return _digest(json.dumps(config, sort_keys=True, default=str))


def sample_key(problem_key: str, generation_config_hash: str, sample_index: int) -> str:
    """Stable sample key: problem key + generation-config hash + sample index."""
    return _digest(problem_key, generation_config_hash, str(sample_index))


def empty_table(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows -> table with exactly ``schema``'s columns (missing ones become null)."""
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)
