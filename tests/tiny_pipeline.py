"""The tiny pipeline that the end-to-end tests run: arithmetic problems, a tiny local model, 4-problem shards.

:func:`tiny_pipeline_data` builds the config those tests start from. A keyword replaces a whole
top-level section (never merges into it), so a test that passes ``sampling={...}`` gets exactly that
section; the ``tiny_*`` section builders spell the usual sections, with the few values tests change.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenskip.config import PipelineConfig
from tokenskip.schema import problem_id, sample_key
from tokenskip.storage import StorageConfig
from tokenskip.testing.tiny_models import arithmetic_problems

DATASET = "tiny-arith"
SOURCE = "tiny"
# The problem files carry their own ids; no other field goes into the problems' metadata.
ID_FIELD_MAP = {"question": "question", "answer": "answer", "id": "id", "metadata": []}
# Only question and answer mapped: ids are hashed, every other field is kept as metadata.
ANSWER_FIELD_MAP = {"question": "question", "answer": "answer"}


def tiny_problems(count: int = 12) -> list[dict]:
    """The tiny solver's arithmetic problems as problem-file rows (id, question, answer)."""
    return [{k: p[k] for k in ("id", "question", "answer")} for p in arithmetic_problems(count)]


def write_problems(path: Path, rows: list[dict], raw_lines: list[bytes] = ()) -> Path:
    """A JSON-lines problem file: one line per row, then ``raw_lines`` as they are (malformed input)."""
    with open(path, "wb") as f:
        for row in rows:
            f.write((json.dumps(row) + "\n").encode())
        for line in raw_lines:
            f.write(line + b"\n")
    return path


def tiny_source(path: Path, name: str = SOURCE, field_map: dict | None = None) -> dict:
    return {
        "path": str(path),
        "kind": "custom",
        "name": name,
        "field_map": dict(field_map or ID_FIELD_MAP),
    }


def tiny_engine(model: Path) -> dict:
    return {"model": str(model), "max_model_len": 256, "kv_cache_memory_bytes": 128 << 20}


def tiny_compression(model: Path, ratios: list[float] = (0.9, 0.7, 0.5), batch_size: int | None = 8) -> dict:
    """Self-information scoring with the same tiny model (no second model to build)."""
    scorer = {"kind": "selfinfo", "model": str(model)}
    if batch_size is not None:
        scorer["batch_size"] = batch_size
    return {"ratios": list(ratios), "scorer": scorer, "target_tokenizer": str(model)}


def tiny_resources(**changes) -> dict:
    """Fractions of a CPU per stage so that a 2-CPU local Ray runs them all; shards of 4 problems."""
    return {
        "generation_cpus": 0.5,
        "compression_cpus": 0.25,
        "grading_cpus": 0.25,
        "shard_size": 4,
        "generation_batch_size": 8,
        "omp_threads": 1,
        **changes,
    }


def tiny_pipeline_data(model: Path, problems_path: Path, output: StorageConfig | dict, **sections) -> dict:
    """The tiny pipeline as plain data (what a YAML config file holds); ``sections`` replace whole sections."""
    data = {
        "dataset": DATASET,
        "sources": [tiny_source(problems_path)],
        "engine": tiny_engine(model),
        "sampling": {"n": 2, "temperature": 1.0, "max_tokens": 64},
        "compression": tiny_compression(model),
        "output": output.model_dump() if isinstance(output, StorageConfig) else output,
        "resources": tiny_resources(),
    }
    data.update(sections)
    return data


def tiny_pipeline_config(
    model: Path, problems_path: Path, output: StorageConfig, **sections
) -> PipelineConfig:
    return PipelineConfig.model_validate(tiny_pipeline_data(model, problems_path, output, **sections))


def expected_keys(
    config: PipelineConfig, problems: list[dict] | None = None, source: str = SOURCE
) -> set[str]:
    """Every (problem, sample) key a complete run of ``config`` over ``problems`` must write exactly once."""
    return {
        sample_key(problem_id(source, p["question"]), config.generation_hash(), i)
        for p in (tiny_problems() if problems is None else problems)
        for i in range(config.sampling.n)
    }
