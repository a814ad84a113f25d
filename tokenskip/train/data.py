"""Training data: read a source, turn it into chat examples, tokenize with the model's chat template,
and stream it to the training workers in an order that is a pure function of (seed, step).

Reading and tokenizing run in Ray Data tasks (:func:`tokenized_dataset`); every worker iterates each
domain's tokenized dataset in its stored order (``preserve_order``), as one infinite stream of epochs
(:class:`DomainStream`). A stream reorders one window of rows at a time: by length, served in
batch-sized chunks whose order is seeded (:func:`length_grouped_order`), so batches carry little
padding; each epoch shifts the window borders by a seeded offset. Step s takes, for each slot of its
global batch, the next row of that slot's domain, so how far each stream has advanced by step s is a
count derived from the seed and the weights' history alone (:func:`stream_positions`): resuming
replays those counts and needs no saved iterator state. A worker keeps only its slots' rows and holds
one window per domain, whatever the dataset's size.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from tokenskip import prompts
from tokenskip.sft import build_sft_records
from tokenskip.train.config import DataSourceConfig, StreamSettings

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)


class TrainingDataError(ValueError):
    """The training data cannot be used (unknown format, missing columns, no examples left)."""


def read_table_file(path: str, storage_options: dict[str, Any]) -> pa.Table:
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
        table = read_table_file(source.path, source.storage_options)
    else:
        from tokenskip.storage import StorageConfig, read_table

        storage = StorageConfig(root=source.storage_root, storage_options=source.storage_options)
        table = read_table(storage, source.dataset, kind="data", run_id=source.run_id)
    if source.limit is not None:
        table = table.slice(0, source.limit)
    return table


def _detect_format(column_names: Sequence[str], source: DataSourceConfig) -> str:
    if source.format != "auto":
        return source.format
    columns = set(column_names)
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


def _row_mix(mix, key: Any, index: int):
    """The mix config for one row: its ratio seed derives from (mix seed, row key), so a row becomes the
    same example however the stream is cut into batches (TokenSkip draws in row order instead; the
    distribution, one uniform ratio per example, is the same)."""
    digest = hashlib.sha256(f"{mix.seed}:{key if key is not None else index}".encode()).digest()
    return mix.model_copy(update={"seed": int.from_bytes(digest[:8], "big")})


def table_messages(
    table: pa.Table, kind: str, source: DataSourceConfig, tokenizer: Any, system: str | None = None
) -> list[list[dict]]:
    """Chat examples (each ending with the assistant turn that carries the loss) of the rows of
    ``table``, whose format ``kind`` is one of 'compressed', 'sft', 'cot'."""
    if kind == "compressed":
        mix = (
            source.mix
            if system is None or source.mix.system
            else source.mix.model_copy(update={"system": system})
        )
        keys = table.column("key").to_pylist() if "key" in table.column_names else [None] * len(table)
        parts = [
            build_sft_records(table.slice(i, 1), _row_mix(mix, key, i), tokenizer)
            for i, key in enumerate(keys)
        ]
        table = pa.concat_tables(parts) if parts else table
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
    return examples


def source_messages(source: DataSourceConfig, tokenizer: Any, system: str | None = None) -> list[list[dict]]:
    """Chat examples of the whole of ``source``, read into memory (small sets, checks and tests; training
    streams through :func:`tokenized_dataset`, which makes the same examples)."""
    table = read_source_table(source)
    examples = table_messages(table, _detect_format(table.column_names, source), source, tokenizer, system)
    if not examples:
        raise TrainingDataError("the data source has no examples")
    return examples


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt

    def __len__(self) -> int:
        return len(self.input_ids)


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


def _prompt_and_response_ids(
    tokenizer: Any, messages: list[dict[str, str]], cutoff_len: int
) -> tuple[list[int], list[int]] | None:
    prompt, response = split_prompt_response(tokenizer, messages)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) >= cutoff_len:
        return None
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return prompt_ids, response_ids[: cutoff_len - len(prompt_ids)]


def tokenize_example(
    tokenizer: Any, messages: list[dict[str, str]], cutoff_len: int
) -> TokenizedExample | None:
    """Token ids and labels (loss on the response only); None when the prompt alone fills the cutoff."""
    parts = _prompt_and_response_ids(tokenizer, messages, cutoff_len)
    if parts is None:
        return None
    prompt_ids, response_ids = parts
    return TokenizedExample(prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids)


def collate(batch: Sequence[Any], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask, labels (IGNORE_INDEX on padding); ``batch`` holds
    :class:`TokenizedExample` or :class:`StreamExample` rows."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.as_tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.as_tensor(example.labels, dtype=torch.long)
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


# --- Ray Data: read and tokenize in Ray Data tasks ---------------------------------------------------

TOKENIZED_SCHEMA = pa.schema(
    [
        pa.field(
            "input_ids", pa.list_(pa.int32()), metadata={"doc": "prompt + response ids; empty = dropped"}
        ),
        pa.field("prompt_len", pa.int32(), metadata={"doc": "leading ids that carry no loss"}),
    ]
)


def source_dataset(source: DataSourceConfig):
    """A :class:`ray.data.Dataset` of the raw rows of ``source`` (lazy: read by Ray Data tasks)."""
    import ray.data

    if source.storage_root:
        from tokenskip.storage import StorageConfig, read_dataset

        storage = StorageConfig(root=source.storage_root, storage_options=source.storage_options)
        ds = read_dataset(storage, source.dataset, kind="data", run_id=source.run_id)
    else:
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, path = fsspec.core.url_to_fs(source.path, **source.storage_options)
        filesystem = PyFileSystem(FSSpecHandler(fs))
        if path.endswith(".parquet"):
            ds = ray.data.read_parquet(path, filesystem=filesystem)
        elif path.endswith((".jsonl", ".json")):
            # pyarrow reads newline-delimited JSON (one object a line) by default.
            ds = ray.data.read_json(path, filesystem=filesystem, file_extensions=None)
        else:
            raise TrainingDataError(f"{source.path}: expected a .jsonl or .parquet file")
    return ds if source.limit is None else ds.limit(source.limit)


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(name: str):
    # One load per Ray worker process: Ray Data reuses its task workers across batches.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def tokenize_rows(
    batch: pa.Table,
    *,
    source: dict[str, Any],
    kind: str,
    tokenizer_name: str,
    system: str | None,
    cutoff_len: int,
) -> pa.Table:
    """Ray Data task body: raw rows -> :data:`TOKENIZED_SCHEMA` rows, one per input row (a row whose
    prompt alone fills the cutoff keeps its place with no ids, so the stream can count it)."""
    tokenizer = _cached_tokenizer(tokenizer_name)
    config = DataSourceConfig.model_validate(source)
    ids: list[list[int]] = []
    prompt_lens: list[int] = []
    for messages in table_messages(batch, kind, config, tokenizer, system):
        parts = _prompt_and_response_ids(tokenizer, messages, cutoff_len)
        prompt_ids, response_ids = parts if parts is not None else ([], [])
        ids.append(prompt_ids + response_ids)
        prompt_lens.append(len(prompt_ids))
    return pa.table(
        {"input_ids": pa.array(ids, pa.list_(pa.int32())), "prompt_len": pa.array(prompt_lens, pa.int32())},
        schema=TOKENIZED_SCHEMA,
    )


def tokenized_dataset(
    source: DataSourceConfig, tokenizer_name: str, system: str | None, cutoff_len: int, stream: StreamSettings
):
    """The tokenized rows of ``source`` as a lazy Ray dataset: read and tokenized in Ray Data tasks when
    a worker iterates it, never in the training worker's own process."""
    raw = source_dataset(source)
    kind = _detect_format(raw.schema().names, source)
    tokenized = raw.map_batches(
        tokenize_rows,
        batch_size=stream.rows_per_task,
        batch_format="pyarrow",
        num_cpus=stream.tokenize_num_cpus,
        fn_kwargs={
            "source": source.model_dump(mode="json"),
            "kind": kind,
            "tokenizer_name": tokenizer_name,
            "system": system,
            "cutoff_len": cutoff_len,
        },
    )
    # Ray Data gathers a task's outputs into blocks of up to target_max_block_size (128 MiB by
    # default), and one task reads and tokenizes a whole source file: a worker then receives blocks
    # whose size grows with the file's rows up to that cap (about 16k R1 CoTs at cutoff 2048), and
    # holds one (plus the next, prefetched) while it takes a few rows from it. A cap of one tokenize
    # call's largest output (int32 ids) keeps every block at one or two calls' rows, whatever the
    # dataset's size.
    tokenized.context.target_max_block_size = stream.rows_per_task * cutoff_len * 4
    return tokenized


# --- The worker side: domain streams in a fixed order ----------------------------------------------


@dataclass(frozen=True)
class StreamExample:
    """One tokenized row as a worker holds it: int32 ids and the prompt's length (labels on demand)."""

    input_ids: np.ndarray
    prompt_len: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def labels(self) -> np.ndarray:
        labels = self.input_ids.astype(np.int64)
        labels[: self.prompt_len] = IGNORE_INDEX
        return labels


def iter_stream_examples(batches: Iterable[pa.Table]) -> Iterator[StreamExample | None]:
    """Rows of tokenized Arrow batches; None for a row the cutoff dropped. Each row's ids are copied
    out, so a worker never pins a whole block for one row it keeps."""
    for batch in batches:
        column = batch.column("input_ids").combine_chunks()
        offsets, values = column.offsets.to_numpy(), column.values.to_numpy(zero_copy_only=False)
        prompt_lens = batch.column("prompt_len").to_numpy()
        for i in range(len(batch)):
            start, end = int(offsets[i]), int(offsets[i + 1])
            yield None if end == start else StreamExample(values[start:end].copy(), int(prompt_lens[i]))


def length_grouped_order(lengths: Sequence[int], chunk: int, rng: np.random.Generator) -> list[int]:
    """Positions of a window, longest first, cut into chunks of ``chunk`` rows served in seeded order:
    consecutive rows (one batch) have similar lengths, while the batches' order stays random (as
    Hugging Face's group_by_length does with its mega-batches)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    chunks = [order[i : i + chunk] for i in range(0, len(order), chunk)]
    return [i for c in rng.permutation(len(chunks)) for i in chunks[c]]


class DomainStream:
    """One domain's examples as an endless, deterministic stream.

    ``open_epoch(e)`` yields the domain's tokenized rows in their stored order (None = a row the cutoff
    dropped); epochs follow each other as one row sequence. The stream serves it one window of
    ``window`` rows at a time, reordered: by length (:func:`length_grouped_order`, chunks of ``chunk``
    rows), or a seeded shuffle when ``group_by_length`` is off. Window k is rows [k*window,
    (k+1)*window) of that sequence, reordered by a generator seeded with (seed, domain, k), so the
    n-th example served is a pure function of (seed, domain, n) and the data; windows run across
    epoch borders (as the global batches of :class:`EpochSampler` do), so every window is full and
    batches stay aligned with its chunks. The stream holds one window; a domain no larger than a
    window is kept after its first epoch and replayed from memory (same bound, and no new Ray Data
    execution per epoch of a small domain).
    """

    def __init__(
        self,
        open_epoch: Callable[[int], Iterable[StreamExample | None]],
        *,
        name: str,
        domain: int,
        seed: int,
        window: int,
        chunk: int,
        group_by_length: bool = True,
    ):
        if window < 1 or chunk < 1 or window % chunk:
            raise ValueError(f"window ({window}) must be a positive multiple of chunk ({chunk})")
        self._open_epoch, self.name, self.domain, self.seed = open_epoch, name, domain, seed
        self.window, self.chunk, self.group_by_length = window, chunk, group_by_length
        self.epoch, self.position, self.dropped = 0, 0, 0  # dropped: rows the cutoff dropped, first epoch
        self.epoch_length: int | None = None  # examples per epoch, known once an epoch has been read
        self._rows: Iterator[StreamExample | None] | None = None
        self._in_epoch = 0  # examples of the current epoch taken so far
        self._pending: list[StreamExample] = []  # the current window, in serving order, reversed
        self._window_index = 0
        self._kept: list[StreamExample] | None = []  # epoch 0's rows while they fit in a window

    def _next_row(self) -> StreamExample:
        while True:
            if self._rows is None:
                small = self.epoch > 0 and self._kept is not None
                self._rows = iter(self._kept if small else self._open_epoch(self.epoch))
                self._in_epoch = 0
            for row in self._rows:
                if row is None:
                    self.dropped += self.epoch == 0
                    continue
                self._in_epoch += 1
                if self.epoch == 0 and self._kept is not None:
                    if len(self._kept) < self.window:
                        self._kept.append(row)
                    else:  # larger than a window: every epoch streams again
                        self._kept = None
                return row
            if self._in_epoch == 0:
                raise TrainingDataError(f"domain {self.name!r} has no example that fits cutoff_len")
            self.epoch_length, self._rows, self.epoch = self._in_epoch, None, self.epoch + 1

    def _skip_rows(self, count: int) -> None:
        """Pass over ``count`` rows; once the epoch length is known, the rest of an epoch and whole
        epochs are passed without reading them."""
        while count > 0:
            length = self.epoch_length
            if length is not None and count >= length - self._in_epoch and count > 0:
                count -= length - self._in_epoch
                self._rows, self._in_epoch, self.epoch = None, 0, self.epoch + 1
                continue
            self._next_row()
            count -= 1

    def _fill_window(self) -> None:
        rows = [self._next_row() for _ in range(self.window)]
        rng = np.random.default_rng([self.seed, self.domain, self._window_index])
        if self.group_by_length:
            order = length_grouped_order([len(r) for r in rows], self.chunk, rng)
        else:
            order = rng.permutation(len(rows)).tolist()
        self._pending = [rows[i] for i in reversed(order)]
        self._window_index += 1

    def next(self) -> StreamExample:
        if not self._pending:
            self._fill_window()
        self.position += 1
        return self._pending.pop()

    def skip(self, count: int) -> None:
        """Advance ``count`` examples (resume): whole windows are passed over row by row without being
        reordered, whole epochs without being read once their length is known (time, not memory)."""
        if count < 0:
            raise ValueError(f"cannot skip back ({count})")
        n = min(count, len(self._pending))
        del self._pending[len(self._pending) - n :]
        count -= n
        self.position += n
        windows, rest = divmod(count, self.window)
        self._skip_rows(windows * self.window)
        self._window_index += windows
        self.position += windows * self.window
        if rest:
            self._fill_window()
            del self._pending[len(self._pending) - rest :]
            self.position += rest


def stream_positions(slot_domains: Callable[[int], Sequence[int]], steps: int, num_domains: int) -> list[int]:
    """How many examples each domain's stream has served after ``steps`` steps, given each step's slot
    domains: the whole of the data order's state, recomputed rather than saved."""
    counts = [0] * num_domains
    for step in range(steps):
        for domain in slot_domains(step):
            counts[domain] += 1
    return counts


class WorkerBatches:
    """This worker's rows of each global batch. Every worker reads every domain stream in the same
    order and keeps its own contiguous block of slots (``rank * n : (rank + 1) * n`` of the global
    batch's slots), so the global batch does not depend on how many workers share it, and
    consecutive rows of a stream (one length-grouped chunk) stay on one worker as one micro-batch."""

    def __init__(self, streams: list[DomainStream], rank: int, world_size: int):
        self.streams, self.rank, self.world_size = streams, rank, world_size

    def fast_forward(self, positions: Sequence[int]) -> None:
        for stream, position in zip(self.streams, positions, strict=True):
            stream.skip(position - stream.position)

    def take(self, slot_domains: Sequence[int]) -> list[StreamExample]:
        if len(slot_domains) % self.world_size:
            raise ValueError(f"{len(slot_domains)} slots do not split evenly over {self.world_size} workers")
        per_worker = len(slot_domains) // self.world_size
        mine = []
        for slot, domain in enumerate(slot_domains):
            example = self.streams[domain].next()
            if slot // per_worker == self.rank:
                mine.append(example)
        return mine

    @property
    def dropped(self) -> int:
        return sum(s.dropped for s in self.streams)


def micro_batches(rows: Sequence[Any], size: int, group_by_length: bool) -> list[list[Any]]:
    """A worker's step split into micro-batches of ``size``; with ``group_by_length`` the rows are sorted
    by length first, so each micro-batch pads to a near neighbour, not to the step's longest row (the
    step's gradient is the same rows either way)."""
    ordered = sorted(rows, key=len, reverse=True) if group_by_length else list(rows)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def padding_fraction(batches: Iterable[Sequence[Any]]) -> float:
    """Padded positions / all positions when each batch pads to its longest row."""
    padded = total = 0
    for batch in batches:
        width = max(len(r) for r in batch)
        total += width * len(batch)
        padded += sum(width - len(r) for r in batch)
    return padded / total if total else 0.0
