"""Token-importance scorers for CoT compression, behind one interface.

* ``llmlingua2`` (:mod:`tokenskip.scoring.llmlingua2`): an LLMLingua-2 token classifier's keep
  probability, as TokenSkip uses it; output identical to llmlingua's ``compress_prompt``.
* ``selfinfo`` (:mod:`tokenskip.scoring.selfinfo`): self-information -log p(token | prefix) under a
  causal LM (Selective-Context style); no classifier needed, any HF causal LM works.

Both score each text ONCE and derive the kept words for every requested ratio from that pass::

    scorer = build_scorer(ScorerConfig(kind="llmlingua2", model="path/or/hf-id"))
    scorer.prune(["Step 1: 48 / 2 = 24 ..."], [0.9, 0.5])  # -> [{0.9: "...", 0.5: "..."}]

What pruning never drops (``force_tokens``, ``force_digits``, ``drop_consecutive``) defaults to
``auto``: TokenSkip's setting for the family of the model the data is for (:func:`tokenskip_forcing`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tokenskip.models import ModelRef, fetch_folder
from tokenskip.models import cache_dir as tokenskip_cache
from tokenskip.pruning import ScoredChunk, keep_mask, reduce_rate_for, validate_ratios

DEFAULT_LLMLINGUA2_MODEL = "microsoft/llmlingua-2-xlm-roberta-large-meetingbank"

AUTO = "auto"


class Forcing(BaseModel):
    """What pruning always keeps: one of TokenSkip's two settings, or a config's own values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    force_tokens: list[str]
    force_digits: bool
    drop_consecutive: bool


# TokenSkip's LLMLingua.py: `compress_prompt(cot, rate, force_tokens=['Step', ':'],
# force_reserve_digit=True, drop_consecutive=True)` for LLaMA-3 ...
TOKENSKIP_LLAMA_FORCING = Forcing(force_tokens=["Step", ":"], force_digits=True, drop_consecutive=True)
# ... and plain `compress_prompt(cot, rate)` for Qwen (llmlingua's defaults: nothing forced).
TOKENSKIP_QWEN_FORCING = Forcing(force_tokens=[], force_digits=False, drop_consecutive=False)


def model_family(model: str | None) -> Literal["qwen", "other"]:
    """The family that decides TokenSkip's forcing: ``qwen`` when the model's id or folder name says
    Qwen (Qwen/Qwen2.5-7B-Instruct, deepseek-ai/DeepSeek-R1-Distill-Qwen-7B), else ``other``. By name,
    so the run id does not depend on a model's files; a renamed Qwen checkpoint needs explicit values."""
    return "qwen" if model and "qwen" in model.lower() else "other"


def tokenskip_forcing(target_model: str | None) -> Forcing:
    """TokenSkip's forcing for data meant for ``target_model``: its Qwen setting (nothing forced) for
    the Qwen family, its LLaMA-3 setting (``Step``, ``:``, digits, drop-consecutive) for every other
    model and when the target is unknown (the setting this project always used)."""
    return TOKENSKIP_QWEN_FORCING if model_family(target_model) == "qwen" else TOKENSKIP_LLAMA_FORCING


class ScorerConfig(BaseModel):
    """Which importance scorer to use and how to run it."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["llmlingua2", "selfinfo"] = Field(
        "llmlingua2",
        description="llmlingua2: LLMLingua-2 token classifier (TokenSkip's choice, needs the classifier "
        "model). selfinfo: surprisal under a causal LM (any LM works; slower per token, less faithful "
        "to TokenSkip).",
    )
    model: ModelRef = Field(
        DEFAULT_LLMLINGUA2_MODEL,
        description="HF id, local folder or s3:// folder of the scoring model. s3:// folders are copied "
        "to cache_dir first (again when they changed). For llmlingua2 the folder name decides "
        "llmlingua's word rules when word_convention is auto, so keep the original model name in it.",
    )
    batch_size: int = Field(
        32,
        ge=1,
        description="Chunks (llmlingua2: up to 512 tokens; selfinfo: up to max_length) per forward pass. "
        "Larger = faster on GPU (64+), more memory; on CPU 8-16 is fastest (cache-friendly attention). "
        "Results do not depend on it.",
    )
    device: str = Field("cpu", description="torch device, e.g. cpu, cuda, cuda:1.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32",
        description="Model weights/compute dtype. float32 reproduces llmlingua on CPU exactly; half "
        "precision is ~2x faster on GPU but changes near-threshold decisions.",
    )
    force_tokens: list[str] | Literal["auto"] = Field(
        AUTO,
        description="Words always kept, at most 100. More = structure preserved but less room to compress "
        "at low ratios. auto = TokenSkip's choice for the target model's family: ['Step', ':'] (its "
        "LLaMA-3 setting) for every model but Qwen, [] for Qwen (plain compress_prompt).",
    )
    force_digits: bool | Literal["auto"] = Field(
        AUTO,
        description="Always keep words containing a digit (llmlingua force_reserve_digit). Keeps the "
        "arithmetic intact; costs compression on number-heavy CoTs. auto = TokenSkip's choice: true "
        "except for Qwen targets.",
    )
    drop_consecutive: bool | Literal["auto"] = Field(
        AUTO,
        description="Drop a force token repeated with nothing kept in between (e.g. ': :'). Avoids "
        "runs of bare punctuation in pruned text. auto = TokenSkip's choice: true except for Qwen targets.",
    )
    chunk_end_tokens: list[str] = Field(
        default_factory=lambda: [".", "\n"],
        description="llmlingua2: preferred tokens to end a 512-token chunk on (llmlingua default). "
        "Splitting at sentence ends keeps context for the classifier.",
    )
    exact_padding: bool = Field(
        True,
        description="llmlingua2: pad every chunk to 512 tokens like llmlingua, which makes output "
        "bit-identical to it (with trim_padding_queries active this costs nothing). False pads to the "
        "longest chunk in the batch with plain attention: float rounding then differs slightly and can "
        "flip near-threshold words.",
    )
    trim_padding_queries: bool = Field(
        True,
        description="llmlingua2: run the model only up to each batch's longest chunk (chunks batched by "
        "length) while attention still reduces over llmlingua's 512 padded keys. Bit-identical "
        "(verified against plain sdpa at load, else off) and much cheaper for short chunks; False "
        "computes llmlingua's full 512 positions.",
    )
    word_convention: Literal["auto", "sentencepiece", "wordpiece"] = Field(
        "auto",
        description="llmlingua2: how tokens merge into words. auto follows llmlingua (model name "
        "containing xlm-roberta-large / bert-base-multilingual-cased), else the tokenizer's type.",
    )
    max_length: int = Field(
        1024,
        ge=8,
        description="selfinfo: tokens per scoring window. Longer = more context per token, more "
        "memory (quadratic attention); text beyond a window is scored in the next one.",
    )
    cache_dir: str = Field(
        default_factory=lambda: str(tokenskip_cache() / "models"),
        description="Local folder where s3:// models are copied (reused while the remote folder is "
        "unchanged; a changed one is copied again). Default: models/ under the one tokenskip cache "
        "($TOKENSKIP_CACHE, else ~/.cache/tokenskip), beside the embedded model and fetched adapters.",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for s3:// models, e.g. {'endpoint_url': ...}. Empty = the "
        "environment's credentials and endpoint.",
    )

    def local_model(self) -> str:
        """The model as a local folder or hub id, fetched into ``cache_dir`` first when remote."""
        return fetch_folder(self.model, self.storage_options, cache=Path(self.cache_dir))

    def resolve_forcing(self, target_model: str | None) -> ScorerConfig:
        """This config with every ``auto`` forcing field set from :func:`tokenskip_forcing` of
        ``target_model`` (the model the data is for; None = unknown). Explicit values stay."""
        preset = tokenskip_forcing(target_model)
        update = {
            name: getattr(preset, name) for name in Forcing.model_fields if getattr(self, name) == AUTO
        }
        return self.model_copy(update=update) if update else self

    @property
    def forcing(self) -> Forcing:
        """The forcing this config prunes with (``auto`` fields as for an unknown target)."""
        resolved = self.resolve_forcing(None)
        return Forcing(**{name: getattr(resolved, name) for name in Forcing.model_fields})

    @model_validator(mode="after")
    def _selfinfo_needs_a_causal_lm(self) -> ScorerConfig:
        if self.kind == "selfinfo" and self.model == DEFAULT_LLMLINGUA2_MODEL:
            raise ValueError(
                "kind='selfinfo' scores with a causal LM: set scorer.model (e.g. the demo model)"
            )
        return self


class Scorer(ABC):
    """Scores texts once; prunes them to any number of ratios from that one pass."""

    def __init__(self, config: ScorerConfig):
        # Forcing left at auto by a caller that knows no target model: TokenSkip's LLaMA-3 setting.
        self.config = config.resolve_forcing(None)

    @abstractmethod
    def score(self, texts: list[str]) -> list[list[ScoredChunk]]:
        """Per text, its scored chunks (an empty text has none)."""

    def iter_scored(self, texts: list[str]) -> Iterator[list[ScoredChunk]]:
        """Like :meth:`score`, text by text (a scorer may stream: prune one while scoring the next)."""
        yield from self.score(texts)

    def iter_scored_unordered(self, texts: list[str]) -> Iterator[tuple[int, list[ScoredChunk]]]:
        """``(index, chunks)`` for every text, in any order: a scorer that batches chunks by length
        finishes texts out of input order, and pruning a finished text need not wait for those
        before it (that wait would leave the model idle while Python prunes, and vice versa)."""
        yield from enumerate(self.iter_scored(texts))

    @abstractmethod
    def render(self, chunk: ScoredChunk, keep: Any) -> str:
        """The kept words of ``chunk`` (mask ``keep``) as text."""

    def prune_scored(self, chunks: list[ScoredChunk], ratios: list[float]) -> dict[float, str]:
        """Kept text of one scored text at each ratio."""
        out: dict[float, str] = {}
        for ratio in ratios:
            reduce_rate = reduce_rate_for(ratio)
            if reduce_rate <= 0:
                out[ratio] = "".join(c.text for c in chunks)
                continue
            out[ratio] = "".join(
                self.render(c, keep_mask(c, reduce_rate, self.config.drop_consecutive)) for c in chunks
            )
        return out

    def prune(self, texts: list[str], ratios: list[float]) -> list[dict[float, str]]:
        """One dict per text: ratio -> kept text. Ratios in (0, 1]; 1.0 returns the text as scored."""
        ratios = validate_ratios(ratios)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("prune() takes a list of str")
        out: list[dict[float, str] | None] = [None] * len(texts)
        for index, chunks in self.iter_scored_unordered(texts):
            out[index] = self.prune_scored(chunks, ratios)
        missing = [i for i, o in enumerate(out) if o is None]
        if missing:  # a scorer bug, never a silently shorter result
            raise RuntimeError(f"scorer returned no chunks for texts {missing[:5]}")
        return out  # type: ignore[return-value]


def build_scorer(config: ScorerConfig) -> Scorer:
    """The scorer ``config`` describes (loads its model)."""
    if config.kind == "llmlingua2":
        from tokenskip.scoring.llmlingua2 import LLMLingua2Scorer

        return LLMLingua2Scorer(config)
    if config.kind == "selfinfo":
        from tokenskip.scoring.selfinfo import SelfInfoScorer

        return SelfInfoScorer(config)
    raise ValueError(f"unknown scorer kind {config.kind!r}")


__all__ = [
    "DEFAULT_LLMLINGUA2_MODEL",
    "TOKENSKIP_LLAMA_FORCING",
    "TOKENSKIP_QWEN_FORCING",
    "Forcing",
    "model_family",
    "tokenskip_forcing",
    "ScoredChunk",
    "Scorer",
    "ScorerConfig",
    "build_scorer",
]
