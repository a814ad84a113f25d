"""Examples of what compression did, for people to read: a kept sample's question, its original CoT
and its CoT at every ratio, word by word, with the words that pruning dropped flagged.

Built once here and drawn twice: ``tokenskip show`` prints them for a terminal (:mod:`tokenskip.show`)
and the HTML report draws them (:mod:`tokenskip.report.page`). Rows are streamed
(:func:`tokenskip.storage.iter_batches`): the first examples of a huge run read its first part only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenskip.storage import StorageConfig, iter_batches


def dropped_words(original: str, kept: str) -> list[tuple[str, bool]]:
    """``original``'s words, each with whether ``kept`` dropped it. Pruning keeps words in order, so a
    left-to-right match of whitespace-separated words finds what was dropped."""
    kept_words = kept.split()
    out, j = [], 0
    for word in original.split():
        if j < len(kept_words) and kept_words[j] == word:
            out.append((word, False))
            j += 1
        else:
            out.append((word, True))
    return out


@dataclass(frozen=True)
class CompressedCoT:
    """One ratio's CoT: the original reasoning's words with the pruned ones flagged, then the answer
    tail, which compression never prunes."""

    target_ratio: float
    achieved_ratio: float | None
    tokens: int | None
    reasoning: list[tuple[str, bool]]
    answer_tail: str


@dataclass(frozen=True)
class Example:
    """A kept sample as the examples show it."""

    key: str
    problem_id: str
    question: str
    answer: str | None
    cot: str
    original_tokens: int | None
    compressions: list[CompressedCoT]


def example_from_row(row: dict[str, Any]) -> Example:
    """The example of one data row (``COMPRESSED_SCHEMA``)."""
    reasoning, tail = row.get("reasoning") or "", row.get("answer_tail") or ""
    compressions = []
    for c in row.get("compressions") or []:
        text = c.get("text") or ""
        # The compressed text is the pruned reasoning followed by the untouched answer tail.
        pruned = text[: len(text) - len(tail)] if tail and text.endswith(tail) else text
        compressions.append(
            CompressedCoT(
                target_ratio=c["target_ratio"],
                achieved_ratio=c.get("achieved_ratio"),
                tokens=c.get("tokens"),
                reasoning=dropped_words(reasoning, pruned),
                answer_tail=tail,
            )
        )
    return Example(
        key=row["key"],
        problem_id=row["problem_id"],
        question=row.get("question") or "",
        answer=row.get("answer"),
        cot=row.get("cot") or "",
        original_tokens=row.get("original_tokens"),
        compressions=compressions,
    )


def read_examples(config: StorageConfig, dataset: str, run_id: str, count: int) -> list[Example]:
    """The first ``count`` kept samples of committed run ``run_id``, as examples."""
    rows: list[dict[str, Any]] = []
    if count > 0:
        for batch in iter_batches(config, dataset, "data", run_id, batch_size=count):
            rows += batch.to_pylist()[: count - len(rows)]
            if len(rows) >= count:
                break
    return [example_from_row(row) for row in rows]
