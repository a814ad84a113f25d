"""CoT compression, the library: CoT -> reasoning + answer tail -> pruned reasoning at every target ratio.

TokenSkip prunes the reasoning of a correct CoT to several ratios and trains on
``question<eos>ratio<eos>compressed CoT``. :class:`Compressor` does the pruning for a batch of CoTs
(the pipeline's compress stage, :mod:`tokenskip.stages.compress`, runs it on the kept samples):

* each CoT is split by :func:`tokenskip.grading.split_answer_tail` into the prunable reasoning and
  the final-answer tail, which is never pruned (a pruned answer would teach wrong answers);
* the reasoning of every row is scored ONCE (one batched scorer pass, :mod:`tokenskip.scoring`) and
  pruned to every ratio from those scores;
* each compression is ``pruned reasoning + the original separator + tail``, with its token count in
  the target model's tokenizer and its achieved ratio (tokens / tokens of the full CoT).

:class:`Compressor` is a Ray Data ``map_batches`` callable class (loads its models once per actor);
:func:`compress_file` runs it over a jsonl/parquet file for the CLI. A row that cannot be compressed
(missing/empty CoT, scorer failure) keeps its columns and gets ``error``/``error_detail``; the rest
of the batch is unaffected.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tokenskip.fallback import batch_then_rows, error_text
from tokenskip.grading import split_answer_tail
from tokenskip.models import ModelRef
from tokenskip.pruning import ratio_list
from tokenskip.schema import COMPRESS_STAGE, COMPRESSION_STRUCT, ERROR_SCHEMA
from tokenskip.scoring import ScorerConfig, build_scorer

log = logging.getLogger(__name__)

ADDED_COLUMNS = ["reasoning", "answer_tail", "original_tokens", "compressions", "error", "error_detail"]


class CompressConfig(BaseModel):
    """How to compress CoTs: target ratios, the importance scorer, the tokenizer that counts."""

    model_config = ConfigDict(extra="forbid")

    ratios: list[float] = Field(
        default_factory=lambda: [0.9, 0.8, 0.7, 0.6, 0.5],
        description="Target kept fractions of the reasoning's tokens (TokenSkip: 0.9..0.5). More ratios "
        "cost almost nothing (one scorer pass serves all) but multiply the training rows.",
    )
    scorer: ScorerConfig = Field(
        default_factory=ScorerConfig,
        description="Token-importance scorer. llmlingua2 is TokenSkip's; selfinfo needs only a causal LM.",
    )
    target_tokenizer: ModelRef | None = Field(
        default=None,
        description="HF id or folder of the model to be trained; its tokenizer counts original/compressed "
        "tokens (achieved ratios). None counts with the scorer model's tokenizer: fine for monitoring, "
        "but achieved ratios then refer to a different vocabulary than the trained model's.",
    )
    split_answer: bool = Field(
        default=True,
        description="Prune only the reasoning and re-attach the final-answer tail untouched (TokenSkip). "
        "False prunes the whole CoT, answer included: shorter, but the answer can be damaged.",
    )

    @field_validator("ratios")
    @classmethod
    def _check_ratios(cls, ratios: list[float]) -> list[float]:
        return ratio_list(ratios, distinct=True)

    @model_validator(mode="after")
    def _forcing_for_the_target(self) -> CompressConfig:
        # The scorer's auto forcing follows TokenSkip for the target model's family; without a
        # target_tokenizer the dataset-building config decides (its generating model is the target).
        if self.target_tokenizer:
            self.scorer = self.scorer.resolve_forcing(self.target_tokenizer)
        return self


def _as_list(values: Any) -> list:
    # Ray hands numpy arrays (batch_format="numpy"), plain callers lists.
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _join(pruned: str, reasoning: str, tail: str) -> str:
    """Pruned reasoning + the whitespace that separated reasoning and tail in the CoT + tail."""
    if not tail:
        return pruned
    if not pruned:
        return tail
    separator = reasoning[len(reasoning.rstrip()) :] or (" " if not tail[:1].isspace() else "")
    return pruned.rstrip() + separator + tail


class Compressor:
    """Ray Data ``map_batches`` callable: adds the compression columns to a batch with a ``cot`` column.

    Output columns, added to every input column (passed through unchanged): ``reasoning``,
    ``answer_tail``, ``original_tokens`` (target tokenizer, full CoT), ``compressions`` (list of
    :data:`tokenskip.schema.COMPRESSION_STRUCT` dicts, one per ratio, in config order), ``error`` and
    ``error_detail`` (None unless the row could not be compressed; its other new columns are None).
    """

    def __init__(self, config: CompressConfig, *, cot_column: str = "cot"):
        from transformers import AutoTokenizer

        self.config = config
        self.cot_column = cot_column
        self.scorer = build_scorer(config.scorer)
        if config.target_tokenizer:
            self.tokenizer = AutoTokenizer.from_pretrained(config.target_tokenizer)
        else:
            self.tokenizer = getattr(self.scorer, "tokenizer", None) or AutoTokenizer.from_pretrained(
                getattr(self.scorer, "model_path", config.scorer.model)
            )

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text in the target tokenizer (no special tokens)."""
        if not texts:
            return []
        return [
            len(ids) for ids in self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        ]

    def _prune_rows(self, reasonings: list[str]) -> list[dict[float, str] | Exception]:
        """Scorer output per row, or the exception that row failed with: one failing row must not
        fail the others (:func:`tokenskip.fallback.batch_then_rows`)."""
        return batch_then_rows(
            lambda texts: self.scorer.prune(texts, self.config.ratios),
            reasonings,
            lambda _text, exc: exc,
            what="scoring",
        )

    def __call__(self, batch: dict[str, Any] | pa.Table) -> dict[str, list]:
        if isinstance(batch, pa.Table):  # Ray's batch_format="pyarrow"
            batch = batch.to_pydict()
        if self.cot_column not in batch:
            raise KeyError(f"batch has no {self.cot_column!r} column (columns: {sorted(batch)})")
        cots = _as_list(batch[self.cot_column])
        n = len(cots)
        new: dict[str, list] = {name: [None] * n for name in ADDED_COLUMNS}

        todo: list[int] = []
        for i, cot in enumerate(cots):
            if not isinstance(cot, str):
                new["error"][i] = "invalid_cot"
                new["error_detail"][i] = f"{self.cot_column} must be a string, got {type(cot).__name__}"
            elif not cot.strip():
                new["error"][i] = "empty_cot"
                new["error_detail"][i] = f"{self.cot_column} is empty: nothing to compress"
            else:
                todo.append(i)

        splits: dict[int, tuple[str, str]] = {}
        for i in list(todo):
            try:
                splits[i] = split_answer_tail(cots[i]) if self.config.split_answer else (cots[i], "")
            except Exception as e:  # becomes the row's error
                new["error"][i], new["error_detail"][i] = "split_error", f"{type(e).__name__}: {e}"
                todo.remove(i)

        texts: dict[int, list[str]] = {}
        for i, result in zip(todo, self._prune_rows([splits[i][0] for i in todo]), strict=True):
            if isinstance(result, Exception):
                new["error"][i], new["error_detail"][i] = "scoring_error", error_text(result)
            else:
                texts[i] = [_join(result[r], *splits[i]) for r in self.config.ratios]
        done = list(texts)
        flat = [cots[i] for i in done] + [t for i in done for t in texts[i]]
        counts = self.count_tokens(flat)
        k = len(self.config.ratios)
        for j, i in enumerate(done):
            original = counts[j]
            comp_counts = counts[len(done) + j * k : len(done) + (j + 1) * k]
            new["reasoning"][i], new["answer_tail"][i] = splits[i]
            new["original_tokens"][i] = original
            new["compressions"][i] = [
                {
                    "target_ratio": ratio,
                    "text": text,
                    "tokens": tokens,
                    "achieved_ratio": tokens / original if original else 1.0,
                }
                for ratio, text, tokens in zip(self.config.ratios, texts[i], comp_counts, strict=True)
            ]

        out = {name: values for name, values in batch.items() if name not in ADDED_COLUMNS}
        out.update(new)
        return out


# ---------------------------------------------------------------------------------------------
# File -> file (CLI)


def _read_rows(path: str, storage_options: dict | None) -> tuple[list[dict], list[dict]]:
    """Rows of a jsonl or parquet file, and error rows for jsonl lines that are not JSON objects."""
    import fsspec
    import pyarrow.parquet as pq

    rows: list[dict] = []
    bad: list[dict] = []
    with fsspec.open(path, "rb", compression="infer", **(storage_options or {})) as f:
        if path.endswith(".parquet"):
            return pq.read_table(f).to_pylist(), []
        for lineno, line in enumerate(f, start=1):
            text = line.decode("utf-8", errors="replace").strip()
            if not text:
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                bad.append({"error": "invalid_json", "error_detail": f"line {lineno}: {e}", "raw": text})
                continue
            if not isinstance(row, dict):
                bad.append({"error": "invalid_json", "error_detail": f"line {lineno}: not an object", "raw": text})
                continue
            rows.append(row)
    return rows, bad


def _write_parquet(table: pa.Table, path: str, storage_options: dict | None) -> None:
    import fsspec
    import pyarrow.parquet as pq

    if "://" not in path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with fsspec.open(path, "wb", **(storage_options or {})) as f:
        pq.write_table(table, f)


def _column(values: list) -> pa.Array:
    """An input column as Arrow; a column whose rows disagree in type becomes JSON text, not a crash."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        return pa.array(
            [v if v is None or isinstance(v, str) else json.dumps(v, default=str) for v in values]
        )


def _records_table(records: list[dict]) -> pa.Table:
    names = list(dict.fromkeys(k for r in records for k in r))
    typed = {
        "reasoning": pa.string(),
        "answer_tail": pa.string(),
        "original_tokens": pa.int64(),
        "compressions": pa.list_(COMPRESSION_STRUCT),
    }
    columns = {
        name: pa.array([r.get(name) for r in records], type=typed[name])
        if name in typed
        else _column([r.get(name) for r in records])
        for name in names
    }
    return pa.table(columns)


def _errors_path(output_path: str) -> str:
    return output_path.removesuffix(".parquet") + ".errors.parquet"


def _check_output_writable(path: str, storage_options: dict | None) -> None:
    """Fail before any scoring when ``path`` cannot be written (minutes of work otherwise lost)."""
    if "://" in path:
        return  # an object store: its write reports the problem (no probe without writing)
    folder = Path(path).parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {folder} is a file")
    probe = folder / f".tokenskip-probe-{os.getpid()}"
    try:
        probe.touch()
    except OSError as exc:
        raise PermissionError(f"cannot write {path}: {folder} is not writable ({exc.strerror})") from None
    probe.unlink()


def _remove_stale(path: str, storage_options: dict | None) -> None:
    """An errors file left by an earlier run would read as this run's errors."""
    import fsspec

    fs, fs_path = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if fs.exists(fs_path):
        fs.rm_file(fs_path)


def compress_file(
    input_path: str | Path,
    output_path: str | Path,
    config: CompressConfig,
    *,
    cot_column: str = "cot",
    batch_size: int = 32,
    limit: int | None = None,
    storage_options: dict | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Compress the CoTs of a jsonl/parquet file (local or fsspec URL) into a parquet file.

    ``output_path`` gets one row per compressed CoT: the input columns plus ``reasoning``,
    ``answer_tail``, ``original_tokens`` and ``compressions``. Rows that could not be compressed (and
    jsonl lines that are not JSON objects) go to ``<output>.errors.parquet`` with
    :data:`tokenskip.schema.ERROR_SCHEMA` and the offending row in ``raw``, nothing dropped. Returns
    a summary: rows in/out, errors (by reason), mean achieved ratio per target ratio, seconds.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    input_path, output_path = str(input_path), str(output_path)
    started = time.perf_counter()
    _check_output_writable(output_path, storage_options)
    rows, bad_lines = _read_rows(input_path, storage_options)
    if limit is not None:
        rows = rows[:limit]
    if rows and not any(cot_column in r for r in rows):
        from tokenskip.errors import UserError

        fields = sorted({name for r in rows for name in r})
        raise UserError(
            f"{input_path} has no {cot_column!r} field; its fields: {', '.join(fields)} "
            "(name the CoT's field with --cot-field)"
        )

    compressor = Compressor(config, cot_column=cot_column)
    kept: list[dict] = []
    errors: list[dict] = [
        {
            "stage": COMPRESS_STAGE,
            "error": b["error"],
            "error_detail": b["error_detail"],
            "source": input_path,
            "raw": b["raw"],
        }
        for b in bad_lines
    ]
    achieved: dict[float, list[float]] = defaultdict(list)
    with tqdm(total=len(rows), desc="compress", unit="cot", disable=not progress) as bar:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            columns = sorted({k for r in chunk for k in r} - set(ADDED_COLUMNS))
            batch = {name: [r.get(name) for r in chunk] for name in columns}
            batch.setdefault(cot_column, [None] * len(chunk))
            out = compressor(batch)
            for j, row in enumerate(chunk):
                if out["error"][j]:
                    errors.append(
                        {
                            "key": row.get("key") or (str(row["id"]) if row.get("id") is not None else None),
                            "stage": COMPRESS_STAGE,
                            "error": out["error"][j],
                            "error_detail": out["error_detail"][j],
                            "source": input_path,
                            "raw": json.dumps(row, default=str, ensure_ascii=False),
                        }
                    )
                    continue
                record = {k: v for k, v in row.items() if k not in ADDED_COLUMNS}
                for name in ("reasoning", "answer_tail", "original_tokens", "compressions"):
                    record[name] = out[name][j]
                for c in record["compressions"]:
                    achieved[c["target_ratio"]].append(c["achieved_ratio"])
                kept.append(record)
            bar.update(len(chunk))

    if kept:
        table = _records_table(kept)
    else:
        table = pa.schema(
            [("reasoning", pa.string()), ("answer_tail", pa.string()), ("original_tokens", pa.int64())]
            + [("compressions", pa.list_(COMPRESSION_STRUCT))]
        ).empty_table()
    _write_parquet(table, output_path, storage_options)
    errors_output = None
    _remove_stale(_errors_path(output_path), storage_options)
    if errors:
        errors_output = _errors_path(output_path)
        _write_parquet(
            pa.Table.from_pylist(
                [{f.name: e.get(f.name) for f in ERROR_SCHEMA} for e in errors], schema=ERROR_SCHEMA
            ),
            errors_output,
            storage_options,
        )
    return {
        "input": input_path,
        "output": output_path,
        "errors_output": errors_output,
        "rows_in": len(rows) + len(bad_lines),
        "rows_out": len(kept),
        "errors": len(errors),
        "errors_by_reason": dict(Counter(e["error"] for e in errors)),
        "mean_achieved_ratio": {
            r: (sum(achieved[r]) / len(achieved[r]) if achieved[r] else math.nan) for r in config.ratios
        },
        "seconds": time.perf_counter() - started,
    }
