"""Prompts: the model family's chat template, and TokenSkip's ratio-conditioned prompt.

TokenSkip trains on ``question<delim>ratio<delim>`` (delim = the tokenizer's eos by default) for
ratio < 1 and on the bare question for ratio 1.0, always behind the same instruction; at inference
the ratio in the prompt controls CoT length. Training (``tokenskip.sft``), dataset building and
evaluation all build prompts here so the three can never drift apart.
"""

from __future__ import annotations

from typing import Any

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
ANSWER_TEMPLATE = "\n\nThe final answer is: $\\boxed{{{answer}}}$"


def format_ratio(ratio: float) -> str:
    """TokenSkip writes ratios with one decimal (0.5 ... 0.9)."""
    return f"{ratio:g}" if round(ratio, 1) != ratio else f"{ratio:.1f}"


def tokenskip_input(question: str, ratio: float | None, delimiter: str) -> str:
    """``question<delim>ratio<delim>`` for ratio < 1; the bare question otherwise."""
    if ratio is None or ratio >= 1.0:
        return question
    return f"{question}{delimiter}{format_ratio(ratio)}{delimiter}"


def user_message(
    question: str, *, ratio: float | None = None, delimiter: str = "", instruction: str = INSTRUCTION
) -> str:
    """The user turn: instruction, newline, then the (ratio-conditioned) question.

    This is the alpaca-style ``instruction + "\\n" + input`` that TokenSkip's training data uses.
    """
    body = tokenskip_input(question, ratio, delimiter)
    return f"{instruction}\n{body}" if instruction else body


def chat_messages(
    question: str,
    *,
    ratio: float | None = None,
    delimiter: str = "",
    instruction: str = INSTRUCTION,
    system: str | None = None,
) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append(
        {
            "role": "user",
            "content": user_message(question, ratio=ratio, delimiter=delimiter, instruction=instruction),
        }
    )
    return messages


def default_delimiter(tokenizer: Any) -> str:
    """TokenSkip's delimiter: the target tokenizer's eos token."""
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise ValueError("tokenizer has no eos_token; set the ratio delimiter explicitly")
    return eos


def render_prompt(
    tokenizer: Any,
    question: str,
    *,
    ratio: float | None = None,
    delimiter: str | None = None,
    instruction: str = INSTRUCTION,
    system: str | None = None,
) -> str:
    """The full generation prompt in the model family's chat template.

    Falls back to the plain user message when the tokenizer has no chat template (base models).
    """
    if delimiter is None:
        delimiter = default_delimiter(tokenizer) if ratio is not None and ratio < 1.0 else ""
    messages = chat_messages(
        question, ratio=ratio, delimiter=delimiter, instruction=instruction, system=system
    )
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages) + "\n"


def answer_suffix(answer: str) -> str:
    """The answer tail TokenSkip appends to every training response."""
    return ANSWER_TEMPLATE.format(answer=answer)
