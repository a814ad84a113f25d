"""Deduplication and decontamination of problems (``PROBLEM_SCHEMA`` tables from :mod:`tokenskip.sources`).

Two checks, in this order, each rejecting with a ``REJECT_SCHEMA`` row (``stage="dedup"``), never a
silent drop, so ``input rows = kept + rejects``:

* ``duplicate`` - the normalised question (:func:`tokenskip.schema.normalise_text`: NFKC, lower case,
  single spaces) was seen before, in this table or in ``seen_ids`` (earlier batches or runs, across
  sources). The first occurrence is kept; ``detail`` names it.
* ``contaminated`` - the question overlaps an evaluation problem (GSM8K test, MATH-500, AIME, ...): at
  least ``overlap_threshold`` of its word n-grams (13 words by default, as in common decontamination
  practice) occur in the eval sets. ``detail`` names the eval set, the closest eval problem id and the
  overlap. Questions shorter than n words follow ``short_text_rule``.

The eval n-gram index is a :class:`Decontaminator`: build it once per job (``Decontaminator.from_config``)
and ship it to workers (it is a plain picklable object; ``ray.put`` it once). Hashes of n-grams are
blake2b, not Python's per-process ``hash()``, so an index built on the driver matches on every worker.
"""

from __future__ import annotations

import hashlib
import logging
import re
from bisect import bisect_right
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from tokenskip.schema import DEDUP_STAGE, REJECT_SCHEMA, config_hash, normalise_text, to_table
from tokenskip.sources import SourceConfig, load_problems

log = logging.getLogger(__name__)

STAGE = DEDUP_STAGE

_WORD = re.compile(r"\w+")

ShortTextRule = Literal["exact", "contained", "keep"]


class DedupConfig(BaseModel):
    """Which problems leave the training set as duplicates or as eval-set contamination."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=True,
        description="Run both checks. Off keeps every problem (duplicates waste generation compute and "
        "contaminated problems inflate eval scores, so turn off only for eval-set runs).",
    )
    eval_sets: list[SourceConfig] = Field(
        default_factory=list,
        description="Eval sets to decontaminate against (e.g. GSM8K test, MATH-500, AIME). Empty: duplicates "
        "only. Each is loaded once per job; bigger sets cost index memory (~100 bytes per n-gram).",
    )
    ngram_size: int = Field(
        default=13,
        ge=1,
        description="Words per n-gram. 13 is common practice (GPT-3, Llama decontamination): long enough that "
        "shared boilerplate ('how many ... does she have') does not match, short enough that a light edit of "
        "an eval problem still leaves most n-grams intact. Smaller flags more (false positives).",
    )
    overlap_threshold: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="Flag a problem when at least this fraction of its distinct n-grams occurs in any eval "
        "problem. Lower catches heavier paraphrases but flags more genuine training problems.",
    )
    short_text_rule: ShortTextRule = Field(
        default="exact",
        description="For questions with fewer words than ngram_size (no n-gram to compare): `exact` flags "
        "only a word-for-word copy of a whole eval problem; `contained` also flags one that appears inside "
        "an eval problem (stricter, flags short generic questions); `keep` never flags them.",
    )


@dataclass(frozen=True)
class Contamination:
    """Why a question counts as contaminated."""

    eval_set: str
    eval_problem_id: str
    match: Literal["ngram", "exact", "contained"]  # n-gram overlap, the same words, or inside (short text)
    overlap: float  # fraction of the question's distinct n-grams found in any eval problem (1.0 if not ngram)
    matched: int = 0
    total: int = 0
    closest_matched: int = 0  # n-grams shared with the closest eval problem

    def detail(self, ngram_size: int) -> str:
        where = f"eval set {self.eval_set}, eval problem {self.eval_problem_id}"
        if self.match == "exact":
            return f"same words as {where} (overlap 1.00)"
        if self.match == "contained":
            return f"short question (< {ngram_size} words) found inside {where} (overlap 1.00)"
        return (
            f"overlap {self.overlap:.2f} ({self.matched}/{self.total} distinct {ngram_size}-word n-grams) with "
            f"the eval sets; closest: {where} ({self.closest_matched} shared)"
        )


def words(text: str) -> list[str]:
    """Words compared by decontamination: normalised text, punctuation and LaTeX symbols dropped."""
    return _WORD.findall(normalise_text(text))


def _ngram_hashes(tokens: list[str], n: int) -> set[int]:
    return {
        int.from_bytes(
            hashlib.blake2b(
                " ".join(tokens[i : i + n]).encode("utf-8", "surrogatepass"), digest_size=8
            ).digest(),
            "big",
        )
        for i in range(len(tokens) - n + 1)
    }


def question_key(question: str) -> str:
    """Deduplication key: hash of the normalised question, independent of the source name."""
    return "q:" + hashlib.sha256(normalise_text(question).encode("utf-8", "surrogatepass")).hexdigest()[:32]


class Decontaminator:
    """N-gram index over eval problems; :meth:`check` says whether a question overlaps them."""

    def __init__(self, ngram_size: int = 13, short_text_rule: ShortTextRule = "exact"):
        self.ngram_size = ngram_size
        self.short_text_rule = short_text_rule
        self.docs: list[tuple[str, str]] = []  # (eval set, eval problem id)
        self._index: dict[int, int | tuple[int, ...]] = {}  # n-gram hash -> eval doc(s)
        self._exact: dict[str, int] = {}  # whole normalised word sequence -> eval doc
        self._texts: list[str] = []  # " w1 w2 ... " per doc, for the `contained` rule
        self._joined: str | None = None
        self._offsets: list[int] = []

    @classmethod
    def from_config(cls, config: DedupConfig) -> Decontaminator:
        """Load every eval set of ``config`` and index it (once per job)."""
        index = cls(config.ngram_size, config.short_text_rule)
        for eval_config in config.eval_sets:
            problems, errors = load_problems(eval_config)
            if errors.num_rows:
                # Unreadable eval rows cannot be indexed: say so loudly, decontamination is weaker for them.
                log.warning(
                    "eval set %s: %d rows could not be loaded and are not in the index (reasons: %s)",
                    eval_config.path,
                    errors.num_rows,
                    sorted(set(errors["error"].to_pylist())),
                )
            index.add(f"{eval_config.source_name}:{eval_config.split}", problems)
        return index

    def add(self, eval_set: str, problems: pa.Table) -> None:
        """Index a table with ``id`` and ``question`` columns as eval set ``eval_set``."""
        for pid, question in zip(problems["id"].to_pylist(), problems["question"].to_pylist(), strict=True):
            if question is None:
                continue
            doc = len(self.docs)
            self.docs.append((eval_set, pid))
            tokens = words(question)
            self._exact.setdefault(" ".join(tokens), doc)
            self._texts.append(" " + " ".join(tokens) + " ")
            for h in _ngram_hashes(tokens, self.ngram_size):
                found = self._index.get(h)
                if found is None:
                    self._index[h] = doc
                elif isinstance(found, int):
                    self._index[h] = (found, doc)
                else:
                    self._index[h] = (*found, doc)
        self._joined = None

    @property
    def size(self) -> int:
        """Distinct n-grams in the index."""
        return len(self._index)

    def _containing_doc(self, tokens: list[str]) -> int | None:
        if self._joined is None:
            self._offsets, position = [], 0
            for text in self._texts:
                self._offsets.append(position)
                position += len(text) + 1
            self._joined = "\n".join(self._texts)
        found = self._joined.find(" " + " ".join(tokens) + " ")
        return None if found < 0 else bisect_right(self._offsets, found) - 1

    def check(self, question: str, overlap_threshold: float = 0.5) -> Contamination | None:
        """The contamination of ``question``, or None when it is clean."""
        tokens = words(question)
        short = len(tokens) < self.ngram_size
        if not tokens or (short and self.short_text_rule == "keep"):
            return None
        exact = self._exact.get(" ".join(tokens))
        if exact is not None:
            total = len(_ngram_hashes(tokens, self.ngram_size))
            return Contamination(*self.docs[exact], "exact", 1.0, total, total, total)
        if short:
            if self.short_text_rule != "contained":
                return None
            doc = self._containing_doc(tokens)
            return None if doc is None else Contamination(*self.docs[doc], "contained", 1.0)
        hashes = _ngram_hashes(tokens, self.ngram_size)
        counts: dict[int, int] = {}
        matched = 0
        for h in hashes:
            found = self._index.get(h)
            if found is None:
                continue
            matched += 1
            for doc in (found,) if isinstance(found, int) else found:
                counts[doc] = counts.get(doc, 0) + 1
        overlap = matched / len(hashes)
        if not counts or overlap < overlap_threshold:
            return None
        closest = max(counts, key=lambda d: (counts[d], -d))
        return Contamination(*self.docs[closest], "ngram", overlap, matched, len(hashes), counts[closest])


_CACHE: dict[str, Decontaminator] = {}


def get_decontaminator(config: DedupConfig) -> Decontaminator:
    """The index for ``config``'s eval sets, built once per process and reused by later batches."""
    key = config_hash(
        {
            "eval_sets": [c.model_dump() for c in config.eval_sets],
            "n": config.ngram_size,
            "short": config.short_text_rule,
        }
    )
    if key not in _CACHE:
        _CACHE[key] = Decontaminator.from_config(config)
    return _CACHE[key]


def _reject(pid: str, reason: str, detail: str, answer: str | None) -> dict:
    return {
        "key": pid,
        "problem_id": pid,
        "stage": STAGE,
        "reason": reason,
        "detail": detail,
        "answer": answer,
    }


def dedup_and_decontaminate(
    problems: pa.Table,
    config: DedupConfig,
    seen_ids: set[str] | None = None,
    *,
    decontaminator: Decontaminator | None = None,
) -> tuple[pa.Table, pa.Table]:
    """(kept problems, rejects with ``REJECT_SCHEMA``); every input row is in exactly one of them.

    ``seen_ids`` holds problem ids and :func:`question_key` values already taken (earlier batches, an
    earlier run); a problem matching either is a ``duplicate``. It is updated in place with the kept
    problems, so passing the same set to consecutive calls deduplicates across batches. Pass a prebuilt
    ``decontaminator`` to skip loading the eval sets (otherwise one is built and cached per process).
    """
    missing = {"id", "question", "answer"} - set(problems.column_names)
    if missing:
        raise ValueError(f"problems table lacks columns {sorted(missing)}; expected PROBLEM_SCHEMA")
    if not config.enabled:
        return problems, REJECT_SCHEMA.empty_table()
    ids = problems["id"].to_pylist()
    questions = problems["question"].to_pylist()
    answers = problems["answer"].to_pylist()
    null_rows = [pid for pid, q in zip(ids, questions, strict=True) if pid is None or q is None]
    if null_rows:
        raise ValueError(f"{len(null_rows)} problems have a null id or question (ids: {null_rows[:5]})")
    if decontaminator is None and config.eval_sets:
        decontaminator = get_decontaminator(config)
    seen = seen_ids if seen_ids is not None else set()
    first_with_key: dict[str, str] = {}
    keep_mask: list[bool] = []
    rejects: list[dict] = []
    for pid, question, answer in zip(ids, questions, answers, strict=True):
        qkey = question_key(question)
        if qkey in first_with_key or pid in first_with_key:
            first = first_with_key.get(qkey) or first_with_key[pid]
            rejects.append(_reject(pid, "duplicate", f"same normalised question as problem {first}", answer))
            keep_mask.append(False)
            continue
        if qkey in seen or pid in seen:
            detail = "same normalised question as a problem in seen_ids (an earlier batch or run)"
            rejects.append(_reject(pid, "duplicate", detail, answer))
            keep_mask.append(False)
            continue
        found = decontaminator.check(question, config.overlap_threshold) if decontaminator else None
        if found is not None:
            rejects.append(_reject(pid, "contaminated", found.detail(decontaminator.ngram_size), answer))
            keep_mask.append(False)
            continue
        first_with_key[qkey] = first_with_key[pid] = pid
        keep_mask.append(True)
    for pid, kept in zip(ids, keep_mask, strict=True):
        if kept:
            seen.add(pid)
    seen.update(k for k, v in first_with_key.items() if k.startswith("q:"))
    return problems.filter(pa.array(keep_mask, pa.bool_())), to_table(rejects, REJECT_SCHEMA)
