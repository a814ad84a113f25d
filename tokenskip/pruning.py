"""Word selection for a target ratio, from per-word keep probabilities computed once.

A scorer (:mod:`tokenskip.scoring`) turns a text into chunks of words, each word with a keep
probability (forced words already at 1.0) and a weight (how many tokens it counts for in the
ratio). :func:`keep_mask` then picks the words for one ratio; the expensive model pass is never
repeated per ratio.

The selection reproduces LLMLingua-2's ``compress_prompt`` exactly (llmlingua 0.2.2,
``PromptCompressor.__compress``), because TokenSkip's training data was made with it:

* threshold = the ``int(100 * reduce_rate + 1)``-th percentile of the token-weighted probabilities
  (each word repeated once per cl100k token); keep words strictly above it (or equal to it when
  the threshold is 1.0, i.e. only forced words remain);
* ``drop_consecutive``: a force token (e.g. ``Step``) that repeats with no kept word in between
  loses its forced probability, and a kept force token equal to the previous kept word is dropped;
* numeric quirk: llmlingua holds forced probabilities as Python floats and the rest as float32,
  so numpy computes the percentile in float64 when any forced-only word is present and in float32
  otherwise. :attr:`ScoredChunk.python_float` records which, so thresholds match bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ScoredChunk:
    """One scored chunk of a text (a text has one or more chunks, scored independently)."""

    text: str
    """The chunk's text as the scorer saw it (returned unchanged for ratio 1.0)."""
    words: list[str]
    """Words in the scorer's own spelling (e.g. with SentencePiece's ``▁``), used for rendering."""
    probs: np.ndarray
    """float32 keep probability per word; forced words are 1.0."""
    python_float: np.ndarray
    """bool per word: every token of the word was forced (llmlingua's float64-widening quirk)."""
    weights: np.ndarray
    """int per word: tokens it counts for in the percentile (0 = ignored)."""
    force_word: np.ndarray
    """bool per word: the word is one of the force tokens (the drop-consecutive candidates)."""
    word_ids: np.ndarray
    """int per word: equal ids <=> equal words (vectorised equality for drop-consecutive)."""
    _sorted: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    """Sorted probabilities per selection, shared by every ratio (see :meth:`sorted_probs`)."""

    def __post_init__(self) -> None:
        n = len(self.words)
        for name in ("probs", "python_float", "weights", "force_word", "word_ids"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"ScoredChunk.{name} has {len(getattr(self, name))} entries for {n} words")

    @property
    def n_words(self) -> int:
        return len(self.words)

    def sorted_probs(self, token_weighted: bool) -> tuple[np.ndarray, np.ndarray]:
        """:func:`sort_weighted` of the unmodified probabilities (all words with weight 1, or the
        words with a token weight > 0 by that weight), computed once for all ratios."""
        cached = self._sorted.get(token_weighted)
        if cached is None:
            probs = self.probs.astype(np.float32, copy=False)
            if token_weighted:
                weighted = self.weights > 0
                cached = sort_weighted(probs[weighted], self.weights[weighted])
            else:
                cached = sort_weighted(probs, np.ones(self.n_words, dtype=np.int64))
            self._sorted[token_weighted] = cached
        return cached


def word_ids(words: list[str]) -> np.ndarray:
    """Ids for :attr:`ScoredChunk.word_ids`: equal words get equal ids (within one chunk)."""
    ids: dict[str, int] = {}
    return np.fromiter((ids.setdefault(w, len(ids)) for w in words), dtype=np.int64, count=len(words))


def reduce_rate_for(ratio: float) -> float:
    """Fraction to remove for a kept ``ratio``, computed exactly as llmlingua does (float quirks included)."""
    return max(0, 1 - ratio)


def sort_weighted(values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``values`` in ascending order (stable) and the cumulative ``weights`` in that order: what
    :func:`percentile_of_sorted` needs, reusable for every percentile of the same values."""
    order = np.argsort(values, kind="stable")
    return values[order], np.cumsum(weights[order])


def percentile_of_sorted(sorted_values: np.ndarray, cumulative: np.ndarray, q: int, widen: bool) -> float:
    """``np.percentile(np.repeat(values, weights), q)`` bit for bit, from :func:`sort_weighted`'s
    output, without building the repeated array.

    ``widen`` picks the array dtype numpy would see (float64, else float32); the arithmetic below is
    numpy's "linear" method step by step in that dtype (``np.lib._function_base_impl._quantile`` and
    ``_lerp``, numpy 2.x): q/100 and the virtual index in the array dtype, then a lerp between the
    two neighbouring order statistics, from the upper one when the fraction is >= 0.5.
    """
    dtype = np.float64 if widen else np.float32
    n = int(cumulative[-1]) if len(cumulative) else 0
    if n <= 0:
        raise ValueError("percentile of no values")
    virtual = (n - 1) * np.true_divide(q, dtype(100))
    if virtual >= n - 1:
        lower = upper = n - 1
        gamma = dtype(0)
    else:
        lower = int(np.floor(virtual))
        upper = lower + 1
        gamma = dtype(virtual - lower)
    # The k-th smallest of the repeated array: the value whose cumulative weight first exceeds k.
    a = dtype(sorted_values[np.searchsorted(cumulative, lower, side="right")])
    b = dtype(sorted_values[np.searchsorted(cumulative, upper, side="right")])
    diff = b - a
    if gamma >= 0.5:
        return float(b - diff * (dtype(1) - gamma))
    return float(a + diff * gamma)


def weighted_percentile(values: np.ndarray, weights: np.ndarray, q: int, widen: bool) -> float:
    """``np.percentile(np.repeat(values, weights), q)`` bit for bit (see :func:`percentile_of_sorted`)."""
    return percentile_of_sorted(*sort_weighted(values, weights), q, widen)


def keep_mask(chunk: ScoredChunk, reduce_rate: float, drop_consecutive: bool) -> np.ndarray:
    """Boolean mask of the words of ``chunk`` kept when removing ``reduce_rate`` (0 < reduce_rate < 1).

    A chunk with no words (llmlingua raises IndexError there) keeps nothing.
    """
    n = chunk.n_words
    if n == 0:
        return np.zeros(0, dtype=bool)
    probs = chunk.probs.astype(np.float32, copy=True)
    python_float = chunk.python_float.copy()

    force_pos = np.flatnonzero(chunk.force_word) if drop_consecutive else np.zeros(0, dtype=np.int64)
    modified = False
    if len(force_pos) > 1:
        prev, cur = force_pos[:-1], force_pos[1:]
        same_word = chunk.word_ids[cur] == chunk.word_ids[prev]
        if same_word.any():  # else the threshold below cannot change anything: skip the percentile
            thr = percentile_of_sorted(
                *chunk.sorted_probs(token_weighted=False), int(100 * reduce_rate), bool(python_float.any())
            )
            # A non-force word counts as content between two force tokens when above the threshold.
            content = (~chunk.force_word) & (probs.astype(np.float64) > float(thr))
            seen = np.cumsum(content)
            dropped = cur[(seen[cur] == seen[prev]) & same_word]
            if len(dropped):
                modified = True
                probs[dropped] = 0.0
                python_float[dropped] = True  # llmlingua writes a Python 0.0 there

    weighted = chunk.weights > 0
    if not weighted.any():
        return np.zeros(n, dtype=bool)
    sorted_weighted = (
        sort_weighted(probs[weighted], chunk.weights[weighted])
        if modified
        else chunk.sorted_probs(token_weighted=True)
    )
    thr = percentile_of_sorted(
        *sorted_weighted, int(100 * reduce_rate + 1), bool(python_float[weighted].any())
    )
    p64 = probs.astype(np.float64)
    keep = (p64 > thr) | ((thr == 1.0) & (p64 == thr))

    if drop_consecutive:
        kept = np.flatnonzero(keep)
        if len(kept) > 1:
            # A kept force token equal to the previously kept word is dropped (a run of them keeps one).
            repeat = chunk.force_word[kept[1:]] & (chunk.word_ids[kept[1:]] == chunk.word_ids[kept[:-1]])
            keep[kept[1:][repeat]] = False
    return keep


def validate_ratios(ratios: list[float]) -> list[float]:
    """Ratios must lie in (0, 1]; returns them as floats (clear error otherwise)."""
    out = []
    for r in ratios:
        r = float(r)
        if r != r or not (0.0 < r <= 1.0):
            raise ValueError(f"compression ratio must be in (0, 1], got {r!r}")
        out.append(r)
    return out


def ratio_list(ratios: list[float], *, distinct: bool) -> list[float]:
    """A config's list of ratios: at least one, each in (0, 1], and (``distinct``) none twice. One rule
    for compression, evaluation and the SFT mix, so a list one accepts the others read the same way."""
    ratios = validate_ratios(ratios)
    if not ratios:
        raise ValueError("at least one ratio is needed")
    if distinct and len(set(ratios)) != len(ratios):
        raise ValueError(f"duplicate ratios: {ratios}")
    return ratios


__all__ = [
    "ScoredChunk",
    "keep_mask",
    "percentile_of_sorted",
    "ratio_list",
    "reduce_rate_for",
    "sort_weighted",
    "validate_ratios",
    "weighted_percentile",
    "word_ids",
]
