"""Examples of what compression did, for people to read: a kept sample's question, its original CoT
and its CoT at every ratio, with the words that pruning dropped flagged.

Built once here and drawn twice: ``tokenskip show`` prints them for a terminal (:mod:`tokenskip.show`)
and the HTML report draws them (:mod:`tokenskip.report.page`). Rows are streamed
(:func:`tokenskip.storage.iter_batches`): the first examples of a huge run read its first part only.

What was dropped is recovered from the stored texts alone (a row keeps no word mask) by a word diff of
the reasoning against the pruned text (:func:`diff_pruned`). Pruning only deletes, so the pruned
text's tokens are a subsequence of the reasoning's, and the diff is an exact embedding of one in the
other, not a best-effort match: ``difflib.SequenceMatcher`` is not an LCS and, on texts with repeated
words, reports some kept words as inserted (about 4% of random deletions over a 3-word alphabet).
Tokens are runs of word characters and single punctuation marks, finer than either scorer's words,
so a partly pruned word (``step-by-step`` -> ``step``) shows its dropped part only.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from tokenskip.storage import StorageConfig, iter_batches

# The diff's unit: a run of word characters or one punctuation mark (whitespace separates, never counts).
_TOKEN = re.compile(r"\w+|[^\w\s]")


class Mark(str, Enum):
    """What pruning did to a piece of the reasoning."""

    KEPT = "kept"
    DROPPED = "dropped"
    ADDED = "added"
    """In the pruned text but not in the reasoning: never from tokenskip's scorers (they only delete),
    shown rather than hidden when a row's texts say otherwise."""


@dataclass(frozen=True)
class Piece:
    """A run of the reasoning's characters with one mark: a whole word, or the part of a partly pruned
    word that was kept or dropped. ``space`` is the whitespace before it in the text ("" inside a word)."""

    text: str
    mark: Mark
    space: str = ""


def diff_pruned(original: str, pruned: str) -> list[Piece]:
    """``original`` as pieces marked kept or dropped by ``pruned`` (the text pruning left of it); see
    :func:`diff_pruned_ratios`."""
    return diff_pruned_ratios(original, [pruned])[0]


def diff_pruned_ratios(original: str, pruned_texts: Sequence[str]) -> list[list[Piece]]:
    """``original`` as pieces marked kept or dropped, once per text in ``pruned_texts`` (the texts
    pruning left of it at decreasing ratios: least pruned first).

    Both texts are compared in NFKC form, the form LLMLingua-2's tokenizer hands back its kept words
    in, and the pieces carry that form. Repeated words can make several embeddings of a pruned text in
    the original possible; two things pruning guarantees pick the one it made: the kept words of a
    lower ratio are among those of the higher one (one threshold per text, raised as the ratio falls),
    so each text is embedded in the previous one's kept tokens, and among what is left the embedding
    with the fewest contiguous blocks is shown, as a diff would show it (``the cat the dog`` ->
    ``the dog`` drops ``the cat``). A text not nested in the previous one is embedded in the whole
    original; one that is not a deletion of the original at all (never from tokenskip's scorers) falls
    back to a plain diff, with its extra tokens marked added.
    """
    original = unicodedata.normalize("NFKC", original)
    tokens = [(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(original)]
    words = [t for t, _, _ in tokens]

    def space(i: int) -> str:
        return original[tokens[i - 1][2] if i else 0 : tokens[i][1]] if i < len(tokens) else ""

    out: list[list[Piece]] = []
    allowed = list(range(len(words)))  # the previous text's kept positions
    for text in pruned_texts:
        pruned = unicodedata.normalize("NFKC", text)
        kept_tokens = [(m.group(), m.start()) for m in _TOKEN.finditer(pruned)]
        kept_words = [t for t, _ in kept_tokens]
        nested = _fewest_runs_embedding([words[i] for i in allowed], kept_words)
        positions = (
            [allowed[k] for k in nested] if nested is not None else _fewest_runs_embedding(words, kept_words)
        )
        marked: list[tuple[str, Mark, str]] = []  # (token, mark, whitespace before it)
        if positions is not None:
            kept = set(positions)
            marked = [(t, Mark.KEPT if i in kept else Mark.DROPPED, space(i)) for i, t in enumerate(words)]
            allowed = positions
        else:
            matcher = difflib.SequenceMatcher(None, words, kept_words, autojunk=False)
            for op, i1, i2, j1, j2 in matcher.get_opcodes():
                mark = Mark.KEPT if op == "equal" else Mark.DROPPED
                marked += [(words[i], mark, space(i)) for i in range(i1, i2)]
                if op in ("replace", "insert"):
                    for j in range(j1, j2):
                        gap = " " if pruned[: kept_tokens[j][1]][-1:].isspace() else ""
                        marked.append((kept_words[j], Mark.ADDED, gap))
            allowed = list(range(len(words)))
        out.append(_pieces(marked))
    return out


def _pieces(marked: list[tuple[str, Mark, str]]) -> list[Piece]:
    """Tokens with their marks -> pieces: neighbours with the same mark and no space between join."""
    if marked:
        marked[0] = (marked[0][0], marked[0][1], "")  # leading whitespace is not part of the text
    pieces: list[Piece] = []
    for token, mark, gap in marked:
        if pieces and not gap and pieces[-1].mark == mark:
            pieces[-1] = Piece(pieces[-1].text + token, mark, pieces[-1].space)
        else:
            pieces.append(Piece(token, mark, gap))
    return pieces


def _fewest_runs_embedding(original: list[str], kept: list[str]) -> list[int] | None:
    """Increasing positions in ``original`` holding ``kept`` in order, in the fewest contiguous
    blocks (ties: kept tokens as early as possible); None when ``kept`` is not a subsequence of
    ``original``.

    Each kept token can only sit between its earliest (greedy from the left) and latest (greedy from
    the right) possible position; a dynamic programme over those candidates counts the gaps. Time is
    the number of candidates, near linear on prose (a token's window spans only the slack pruning made).
    """
    n, m = len(original), len(kept)
    earliest, i = [], 0
    for token in kept:
        while i < n and original[i] != token:
            i += 1
        if i == n:
            return None
        earliest.append(i)
        i += 1
    latest, i = [0] * m, n - 1
    for j in range(m - 1, -1, -1):
        while original[i] != kept[j]:
            i -= 1
        latest[j], i = i, i - 1
    where: dict[str, list[int]] = defaultdict(list)
    for i, token in enumerate(original):
        where[token].append(i)

    candidates: list[list[int]] = []
    back: list[list[int]] = []  # per candidate: the index of the previous token's candidate
    gaps: list[int] = []  # per candidate of the latest token: fewest gaps between the kept tokens up to it
    for j, token in enumerate(kept):
        spots = where[token]
        here = spots[bisect_left(spots, earliest[j]) : bisect_right(spots, latest[j])]
        if j == 0:
            here_gaps, here_back = [0] * len(here), [-1] * len(here)
        else:
            previous = candidates[-1]
            at = {p: k for k, p in enumerate(previous)}
            here_gaps, here_back = [], []
            best, best_k, q = m + n, -1, 0
            for p in here:  # best: the fewest gaps over previous candidates left of p (the earliest)
                while q < len(previous) and previous[q] < p:
                    if gaps[q] < best:
                        best, best_k = gaps[q], q
                    q += 1
                adjacent = at.get(p - 1)
                if adjacent is not None and gaps[adjacent] <= best + 1:
                    here_gaps.append(gaps[adjacent])
                    here_back.append(adjacent)
                else:
                    here_gaps.append(best + 1)
                    here_back.append(best_k)
        candidates.append(here)
        back.append(here_back)
        gaps = here_gaps
    if not m:
        return []
    k = min(range(len(gaps)), key=lambda k: (gaps[k], k))
    positions = [0] * m
    for j in range(m - 1, -1, -1):
        positions[j] = candidates[j][k]
        k = back[j][k]
    return positions


@dataclass(frozen=True)
class CompressedCoT:
    """One ratio's CoT: the original reasoning's pieces with the pruned ones flagged
    (:func:`diff_pruned`), then the answer tail, which compression never prunes."""

    target_ratio: float
    achieved_ratio: float | None
    tokens: int | None
    reasoning: list[Piece]
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
    stored = row.get("compressions") or []
    # The compressed text is the pruned reasoning followed by the untouched answer tail.
    texts = [c.get("text") or "" for c in stored]
    pruned = [t[: len(t) - len(tail)] if tail and t.endswith(tail) else t for t in texts]
    by_ratio = sorted(range(len(stored)), key=lambda k: -stored[k]["target_ratio"])  # least pruned first
    marked = dict(zip(by_ratio, diff_pruned_ratios(reasoning, [pruned[k] for k in by_ratio]), strict=True))
    compressions = [
        CompressedCoT(
            target_ratio=c["target_ratio"],
            achieved_ratio=c.get("achieved_ratio"),
            tokens=c.get("tokens"),
            reasoning=marked[k],
            answer_tail=tail,
        )
        for k, c in enumerate(stored)
    ]
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
