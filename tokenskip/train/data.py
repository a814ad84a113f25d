"""Training data: read a source, turn it into chat examples, tokenize with the model's chat template,
and order it with a stateless, seeded sampler.

Every worker reads and tokenizes the same (small) example list and takes its own slice of each global
batch. Ordering is a pure function of (seed, step), so resuming needs only the step and there is no
iterator state to save; a Ray Data pipeline would stream larger sets, but it cannot follow TL;DR's
domain weights, which change during the run.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from tokenskip import prompts
from tokenskip.sft import build_sft_records
from tokenskip.train.config import DataSourceConfig

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)


class TrainingDataError(ValueError):
    """The training data cannot be used (unknown format, missing columns, no examples left)."""


def _read_file(path: str, storage_options: dict[str, Any]) -> pa.Table:
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb", **storage_options) as handle:
        raw = handle.read()
    if path.endswith(".parquet"):
        return pq.read_table(io.BytesIO(raw))
    if path.endswith((".jsonl", ".json")):
        rows = []
        for number, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise TrainingDataError(f"{path}:{number}: not valid JSON ({err})") from err
        return pa.Table.from_pylist(rows)
    raise TrainingDataError(f"{path}: expected a .jsonl or .parquet file")


def read_source_table(source: DataSourceConfig) -> pa.Table:
    """The raw table of ``source``: one file, or a committed dataset read through its manifest."""
    if source.path:
        table = _read_file(source.path, source.storage_options)
    else:
        from tokenskip.storage import StorageConfig, read_table

        storage = StorageConfig(root=source.storage_root, storage_options=source.storage_options)
        table = read_table(storage, source.dataset, kind="data", run_id=source.run_id)
    if source.limit is not None:
        table = table.slice(0, source.limit)
    return table


def _detect_format(table: pa.Table, source: DataSourceConfig) -> str:
    if source.format != "auto":
        return source.format
    columns = set(table.column_names)
    if "compressions" in columns:
        return "compressed"
    if "messages" in columns or {"instruction", "output"} <= columns:
        return "sft"
    if {source.question_field, source.response_field} <= columns:
        return "cot"
    raise TrainingDataError(f"cannot tell the data format from columns {sorted(columns)}; set `format`")


def _sft_row_messages(row: dict[str, Any], system: str | None) -> list[dict[str, str]]:
    if row.get("messages"):
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    else:
        user = "\n".join(part for part in (row.get("instruction"), row.get("input")) if part)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def source_messages(source: DataSourceConfig, tokenizer: Any, system: str | None = None) -> list[list[dict]]:
    """Chat examples (each ending with the assistant turn that carries the loss) of ``source``."""
    table = read_source_table(source)
    kind = _detect_format(table, source)
    if kind == "compressed":
        mix = (
            source.mix
            if system is None or source.mix.system
            else source.mix.model_copy(update={"system": system})
        )
        table = build_sft_records(table, mix, tokenizer)
        kind = "sft"
    examples: list[list[dict]] = []
    for index, row in enumerate(table.to_pylist()):
        if kind == "sft":
            messages = _sft_row_messages(row, system)
        else:
            question, response = row.get(source.question_field), row.get(source.response_field)
            if not question or not response:
                raise TrainingDataError(
                    f"row {index}: empty {source.question_field!r} or {source.response_field!r}"
                )
            messages = prompts.chat_messages(question, system=system)
            messages.append({"role": "assistant", "content": response})
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
            raise TrainingDataError(f"row {index}: the last message must be a non-empty assistant turn")
        examples.append(messages)
    if not examples:
        raise TrainingDataError("the data source has no examples")
    return examples


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt


def split_prompt_response(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, str]:
    """(prompt text, response text) such that prompt + response is the full chat-formatted example.

    The prompt is the template's generation prompt, exactly what inference renders; the response is
    the assistant content plus the template's end-of-turn tokens, so the model learns to stop.
    """
    context, answer = messages[:-1], messages[-1]["content"]
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt) :]
        # Templates that rewrite earlier turns (e.g. strip reasoning): fall back to appending.
        return prompt, answer + (tokenizer.eos_token or "")
    prompt = "\n\n".join(m["content"] for m in context) + "\n"  # same fallback as prompts.render_prompt
    return prompt, answer + (tokenizer.eos_token or "")


def tokenize_example(
    tokenizer: Any, messages: list[dict[str, str]], cutoff_len: int
) -> TokenizedExample | None:
    """Token ids and labels (loss on the response only); None when the prompt alone fills the cutoff."""
    prompt, response = split_prompt_response(tokenizer, messages)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) >= cutoff_len:
        return None
    response_ids = response_ids[: cutoff_len - len(prompt_ids)]
    return TokenizedExample(prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids)


def tokenize_all(
    tokenizer: Any, examples: list[list[dict]], cutoff_len: int
) -> tuple[list[TokenizedExample], int]:
    """Tokenized examples and the number dropped because their prompt alone exceeds the cutoff."""
    kept = [t for t in (tokenize_example(tokenizer, m, cutoff_len) for m in examples) if t is not None]
    if not kept:
        raise TrainingDataError(f"every example's prompt is longer than cutoff_len={cutoff_len}")
    return kept, len(examples) - len(kept)


def collate(batch: list[TokenizedExample], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask, labels (IGNORE_INDEX on padding)."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class EpochSampler:
    """Seeded shuffling over epochs as one stream: step s takes stream positions [s*B, (s+1)*B).

    Each epoch is a fresh permutation (seed, epoch); batches run across epoch borders, so every step
    has a full global batch. Stateless: the state to checkpoint is just the step.
    """

    def __init__(self, num_examples: int, global_batch: int, seed: int):
        self.num_examples, self.global_batch, self.seed = num_examples, global_batch, seed
        self._perms: dict[int, np.ndarray] = {}

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.num_examples / self.global_batch))

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        return self._perms[epoch]

    def global_batch_at(self, step: int) -> list[int]:
        positions = range(step * self.global_batch, (step + 1) * self.global_batch)
        return [int(self._perm(p // self.num_examples)[p % self.num_examples]) for p in positions]

    def epoch_at(self, step: int) -> float:
        return step * self.global_batch / self.num_examples

    def state(self, step: int) -> dict[str, Any]:
        return {"kind": "epoch", "seed": self.seed, "step": step, "position": step * self.global_batch}


def worker_slice(global_batch: list, rank: int, world_size: int) -> list:
    """This worker's share of a global batch (strided, so every worker gets the same count)."""
    return global_batch[rank::world_size]
