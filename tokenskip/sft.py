"""TokenSkip SFT records: compressed CoTs -> ratio-conditioned training examples.

This reproduces TokenSkip's ``get_llamafactory_input.py`` mix exactly: every example draws ONE
ratio from ``{1.0, 0.9, 0.8, 0.7, 0.6, 0.5}`` with a seeded ``random.Random``; ratio 1.0 trains on
the bare question and the original CoT, any other ratio trains on ``question<eos>ratio<eos>`` and
the CoT pruned to that ratio. Prompts come from :mod:`tokenskip.prompts` so training, dataset
building and evaluation can never drift apart.

Answer tail. TokenSkip drops the model's own final-answer sentence and appends
``\\n\\nThe final answer is: $\\boxed{answer}$`` to every output, so all ratios end in one fixed
format the evaluator parses. ``answer_tail="tokenskip"`` (default) does the same: the untouched
tail stored in each compression is cut off again and replaced by :func:`prompts.answer_suffix`.
``answer_tail="keep"`` keeps the model's own tail instead (the CoT exactly as compressed).

The records carry both formats: alpaca-style ``instruction``/``input``/``output`` (what TokenSkip
feeds LLaMA-Factory) and chat ``messages`` (user + assistant) for the target model's chat template.
"""

from __future__ import annotations

import random
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tokenskip import prompts
from tokenskip.pruning import ratio_list

TOKENSKIP_RATIOS: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)

MESSAGE_STRUCT = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])

SFT_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), metadata={"doc": "sample key of the compressed record"}),
        pa.field("problem_id", pa.string()),
        pa.field("instruction", pa.string(), metadata={"doc": "alpaca instruction"}),
        pa.field(
            "input", pa.string(), metadata={"doc": "question, or question<delim>ratio<delim> for ratio < 1"}
        ),
        pa.field("output", pa.string(), metadata={"doc": "(compressed) CoT + answer tail"}),
        pa.field("ratio", pa.float64(), metadata={"doc": "the drawn target ratio (1.0 = original CoT)"}),
        pa.field("output_tokens", pa.int64(), metadata={"doc": "tokens of the CoT in the target tokenizer"}),
        pa.field("messages", pa.list_(MESSAGE_STRUCT), metadata={"doc": "chat form: user + assistant"}),
    ]
)


class SFTMixError(ValueError):
    """A compressed record cannot become a training example (missing ratio, broken tail, ...)."""


class SFTMixConfig(BaseModel):
    """How compressed records become TokenSkip training examples."""

    model_config = ConfigDict(extra="forbid")

    ratios: list[float] = Field(
        default=list(TOKENSKIP_RATIOS),
        description="Ratios drawn uniformly, one per example (1.0 = the original CoT). TokenSkip's mix is "
        "1.0, 0.9 ... 0.5; fewer ratios give more examples per ratio but less control at inference.",
    )
    seed: int = Field(default=42, description="Seed of the random.Random that draws each example's ratio.")
    delimiter: str | None = Field(
        default=None,
        description="Separator in question<delim>ratio<delim>. None = the target tokenizer's eos (TokenSkip); "
        "a plain string avoids needing the tokenizer but must match what evaluation uses.",
    )
    condition_on_ratio: bool = Field(
        default=True,
        description="Put the ratio into the input (TokenSkip). False trains on the bare question whatever "
        "the ratio, e.g. a fixed-ratio short-CoT domain for TL;DR.",
    )
    answer_tail: Literal["tokenskip", "keep"] = Field(
        default="tokenskip",
        description="'tokenskip' replaces the model's own answer sentence by 'The final answer is: "
        "$\\boxed{answer}$' (one format for all ratios, as TokenSkip); 'keep' keeps the model's tail verbatim.",
    )
    answer_source: Literal["extracted", "gold"] = Field(
        default="extracted",
        description="Answer written into the tokenskip tail: the model's extracted answer (TokenSkip; it was "
        "verified equal to the gold) or the gold answer string. Falls back to the other when empty.",
    )
    instruction: str = Field(
        default=prompts.INSTRUCTION, description="Alpaca instruction; TokenSkip's 'reason step by step' line."
    )
    system: str | None = Field(default=None, description="Optional system message for the chat form.")

    @field_validator("ratios")
    @classmethod
    def _check_ratios(cls, ratios: list[float]) -> list[float]:
        # A mix may list a ratio twice to sample it twice as often: duplicates stay allowed here.
        return ratio_list(ratios, distinct=False)


def _strip_tail(text: str, tail: str, *, what: str) -> str:
    """The reasoning part of ``text`` = text without its (untouched) answer tail."""
    if not tail:
        return text
    if not text.endswith(tail):
        raise SFTMixError(f"{what} does not end with its answer tail {tail[:60]!r}")
    return text[: len(text) - len(tail)]


def _answer(row: dict[str, Any], source: str) -> str:
    extracted, gold = (row.get("extracted_answer") or "").strip(), (row.get("answer") or "").strip()
    first, second = (extracted, gold) if source == "extracted" else (gold, extracted)
    answer = first or second
    if not answer:
        raise SFTMixError("record has neither an extracted nor a gold answer")
    return answer


def _output_for(row: dict[str, Any], ratio: float, config: SFTMixConfig) -> tuple[str, int | None]:
    """(output text, its token count if known) for ``row`` at ``ratio``."""
    tail = row.get("answer_tail") or ""
    if ratio >= 1.0:
        full, tokens = row.get("cot") or "", row.get("original_tokens")
        what = "cot"
    else:
        match = [c for c in (row.get("compressions") or []) if abs(c["target_ratio"] - ratio) < 1e-9]
        if not match:
            have = sorted(c["target_ratio"] for c in row.get("compressions") or [])
            if not have:  # a pool built with `compression: null`
                raise SFTMixError(
                    f"no compression at ratio {ratio}: the record has none (built without compression); "
                    "mix it with ratios [1.0]"
                )
            raise SFTMixError(f"no compression at ratio {ratio} (have {have})")
        full, tokens = match[0]["text"] or "", match[0]["tokens"]
        what = f"compression {ratio}"
    if not full.strip():
        raise SFTMixError(f"{what} is empty")
    if config.answer_tail == "keep":
        return full, tokens
    reasoning = _strip_tail(full, tail, what=what).rstrip()
    # The token count of the stored text no longer matches once the tail changes.
    return reasoning + prompts.answer_suffix(_answer(row, config.answer_source)), None


class SFTMixer:
    """TokenSkip's mix over a stream of compressed tables: one ratio per row, drawn in row order.

    The ratio draw is one ``random.Random(config.seed)`` carried from table to table, so mixing a
    run batch by batch (``tokenskip export`` streams it) gives exactly the examples that one call on
    the whole table gives (``build_sft_records``, what ``train`` builds), in any batch sizes.
    """

    def __init__(self, config: SFTMixConfig | None = None, tokenizer: Any = None):
        self.config = config or SFTMixConfig()
        self.tokenizer = tokenizer
        self.delimiter = self.config.delimiter
        wants_delimiter = self.config.condition_on_ratio and any(r < 1.0 for r in self.config.ratios)
        if self.delimiter is None and wants_delimiter:
            if tokenizer is None:
                raise SFTMixError(
                    "pass the target tokenizer (its eos is TokenSkip's delimiter) or set config.delimiter"
                )
            self.delimiter = prompts.default_delimiter(tokenizer)
        self._rng = random.Random(self.config.seed)
        self._rows_seen = 0  # row numbers in errors count from the stream's first row

    def mix(self, compressed: pa.Table) -> pa.Table:
        """The next rows of the stream as SFT examples (``SFT_SCHEMA``), in the same order."""
        config = self.config
        needed = {"question", "cot", "compressions"}
        missing = needed - set(compressed.column_names)
        if missing:
            raise SFTMixError(f"compressed table lacks columns {sorted(missing)}")
        records: list[dict[str, Any]] = []
        for row in compressed.to_pylist():
            index = self._rows_seen
            self._rows_seen += 1
            ratio = self._rng.choice(config.ratios)
            question = row.get("question")
            if not question:
                raise SFTMixError(f"row {index} (key {row.get('key')}): empty question")
            try:
                output, tokens = _output_for(row, ratio, config)
            except SFTMixError as err:
                raise SFTMixError(f"row {index} (key {row.get('key')}): {err}") from err
            if self.tokenizer is not None and tokens is None:
                tokens = len(self.tokenizer.encode(output, add_special_tokens=False))
            prompt_ratio = ratio if config.condition_on_ratio else None
            input_text = prompts.tokenskip_input(question, prompt_ratio, self.delimiter or "")
            messages = prompts.chat_messages(
                question,
                ratio=prompt_ratio,
                delimiter=self.delimiter or "",
                instruction=config.instruction,
                system=config.system,
            )
            messages.append({"role": "assistant", "content": output})
            records.append(
                {
                    "key": row.get("key"),
                    "problem_id": row.get("problem_id"),
                    "instruction": config.instruction,
                    "input": input_text,
                    "output": output,
                    "ratio": float(ratio),
                    "output_tokens": tokens,
                    "messages": messages,
                }
            )
        return pa.Table.from_pylist(records, schema=SFT_SCHEMA)


def build_sft_records(
    compressed: pa.Table, config: SFTMixConfig | None = None, tokenizer: Any = None
) -> pa.Table:
    """Turn compressed records (``schema.COMPRESSED_SCHEMA``) into TokenSkip SFT examples (``SFT_SCHEMA``).

    One ratio is drawn per row, in row order, from ``random.Random(config.seed)``, so the same table
    and config always give the same examples. ``tokenizer`` supplies the default delimiter (its eos)
    and the output token counts; it may be omitted when ``config.delimiter`` is set. A row that
    cannot be converted raises :class:`SFTMixError` naming the row (nothing is silently dropped).
    """
    return SFTMixer(config, tokenizer).mix(compressed)
