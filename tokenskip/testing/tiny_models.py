"""Tiny, randomly initialised models built locally, for tests and benchmarks.

Nothing here downloads anything: tokenizers are trained with the ``tokenizers`` library on a small
built-in corpus, and weights come from ``from_config`` with a fixed seed, so two builds give the
same files. The shapes respect vLLM's CPU backend (head size >= 32).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Word problems, step-by-step arithmetic and boxed answers, then every printable ASCII character: the
# training text of the tiny tokenizers here and in :mod:`tokenskip.testing.tiny_token_classifier`,
# so their vocabularies have whole pieces for common words and digits and split rarer words.
REASONING_SENTENCES = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Step 1: 48 / 2 = 24 clips in May. Step 2: 48 + 24 = 72 clips in total.",
    "The final answer is: $\\boxed{72}$",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "So, the answer is 10. Let's think: 12 / 60 = 0.2 per minute, 0.2 * 50 = 10 dollars.",
    "What is the value of x if 2x + 3 = 11? Subtract 3 from both sides, then divide by 2, x = 4.",
    "Therefore the total cost is 3 * 4 + 5 = 17. Hence we need 17 apples and oranges.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 +-*/=()[]{}<>$%#.,;:!?'\"\\",
]


def tokenizer_corpus(sentences: list[str], *, numbers: int, per_line: int) -> list[str]:
    """``sentences`` repeated, then the integers below ``numbers`` written out ``per_line`` to a
    line, so a tokenizer trained on it learns pieces for numbers and words alike."""
    return sentences * 20 + [
        " ".join(str(i) for i in range(k, k + per_line)) for k in range(0, numbers, per_line)
    ]


def _corpus() -> list[str]:
    # The chat model's corpus also holds its prompt's instruction, so those words get whole pieces.
    sentences = REASONING_SENTENCES + [
        "Please reason step by step, and put your final answer within \\boxed{}."
    ]
    return tokenizer_corpus(sentences, numbers=1000, per_line=50)


def build_tiny_causal_lm(path: str | os.PathLike, *, vocab_size: int = 512, seed: int = 0) -> Path:
    """Write a tiny Llama-architecture causal LM + BPE tokenizer with a chat template to ``path``.

    Returns the folder. Idempotent: an existing complete folder is reused.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(path)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head size 32: the smallest vLLM's CPU attention accepts
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    return out


def arithmetic_problems(count: int = 12, seed: int = 0) -> list[dict]:
    """Small addition problems with gold answers (the tiny solver's training set)."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(count):
        a, b = rng.randint(10, 60), rng.randint(10, 39)
        out.append(
            {"id": f"tiny-{i}", "question": f"What is {a} + {b}?", "answer": str(a + b), "a": a, "b": b}
        )
    return out


SolverStyle = Literal["short", "long"]


def solver_response(a: int, b: int, style: SolverStyle = "short") -> str:
    """The CoT the tiny solver learns, ending in TokenSkip's answer tail: a few reasoning steps
    ("short", a System-1 answer), or several lines that split, add and check the sum ("long", a
    System-2 answer, about three times as many tokens)."""
    total = a + b
    if style == "short":
        return (
            f"Step 1: We need to add {a} and {b}. Step 2: {a} + {b} = {total}. "
            f"So the total is {total}.\n\nThe final answer is: $\\boxed{{{total}}}$"
        )
    if style != "long":
        raise ValueError(f"solver style must be 'short' or 'long', got {style!r}")
    tens, ones = a // 10 * 10 + b // 10 * 10, a % 10 + b % 10
    return (
        f"Let's think step by step. We need to add {a} and {b}.\n"
        f"Step 1: Split the numbers: {a} = {a // 10 * 10} + {a % 10} and {b} = {b // 10 * 10} + {b % 10}.\n"
        f"Step 2: Add the tens: {a // 10 * 10} + {b // 10 * 10} = {tens}.\n"
        f"Step 3: Add the ones: {a % 10} + {b % 10} = {ones}.\n"
        f"Step 4: Combine them: {tens} + {ones} = {total}.\n"
        f"Step 5: Check: {total} - {b} = {a}, which is right.\n\n"
        f"The final answer is: $\\boxed{{{total}}}$"
    )


def build_tiny_solver_lm(
    path: str | os.PathLike,
    problems: list[dict] | None = None,
    *,
    steps: int = 150,
    seed: int = 0,
    style: SolverStyle = "short",
) -> Path:
    """A tiny causal LM trained (in seconds, on CPU) to answer ``problems`` with a boxed answer, in
    :func:`solver_response`'s ``style``.

    Pipeline tests need a model whose samples are sometimes correct, so kept rows, rejects and the
    compression stage are all exercised for real. Greedy decoding reproduces the memorised CoT;
    sampling at a temperature mixes correct and wrong samples. Deterministic for a given seed. Two
    styles (and seeds) give two different models, e.g. TL;DR's System-1 and System-2 pools.
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tokenskip.prompts import render_prompt

    out = Path(path)
    if (out / "trained.ok").exists():
        return out
    base = build_tiny_causal_lm(out.with_name(out.name + "-base"), seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base)
    problems = problems or arithmetic_problems()
    examples = []
    for p in problems:
        prompt = render_prompt(tokenizer, p["question"])
        response = solver_response(p["a"], p["b"], style) + tokenizer.eos_token
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        examples.append((p_ids + r_ids, [-100] * len(p_ids) + r_ids))
    width = max(len(ids) for ids, _ in examples)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in examples])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in examples])
    attention = (torch.arange(width)[None, :] < torch.tensor([len(i) for i, _ in examples])[:, None]).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "trained.ok").write_text(f"final loss {loss.item():.4f}\n")
    return out


# Qwen2-0.5B's decoder shape (its config.json, minus the vocabulary: the tokenizer given decides it).
QWEN2_0_5B_SHAPE = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)


def build_random_qwen2_lm(
    path: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    *,
    shape: dict | None = None,
    dtype: str = "bfloat16",
    seed: int = 0,
) -> Path:
    """Write a randomly initialised Qwen2 causal LM of a real model's shape, with ``tokenizer_dir``'s
    tokenizer, to ``path``; returns it. For GPU throughput checks without a model hub: the compute and
    KV-cache size per token are the real model's (Qwen2-0.5B unless ``shape`` says otherwise); the text
    is noise. Idempotent (a complete existing folder is reused); deterministic for a given seed.
    """
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    out = Path(path)
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(out)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=32768,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        torch_dtype=dtype,
        **(shape or QWEN2_0_5B_SHAPE),
    )
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    return out
