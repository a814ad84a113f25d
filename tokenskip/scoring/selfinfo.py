"""Self-information scorer: importance = -log p(token | prefix) under any HF causal LM.

A token the LM predicts easily carries little information and can go; a surprising one stays
(Selective Context, Li et al. 2023). The keep probability of a token is ``1 - p(token | prefix)``
(= ``1 - exp(-self_information)``, in [0, 1), so forced words at 1.0 rank above everything), a
word's is the mean over the tokens that overlap it, and a word weighs the number of tokens that end
in it. Pruning then follows :func:`tokenskip.pruning.keep_mask`, with the same force-token,
force-digit and drop-consecutive options as the LLMLingua-2 scorer.

Words are runs of word characters (joined across inner ``.``/``,``/``'``, so ``0.2`` stays whole)
or single punctuation marks (so ``Step 1:`` has a ``:`` word to force); each keeps the whitespace before it, so kept text reads like the original. Long texts are
scored in windows of ``max_length`` tokens cut at word boundaries; each window starts from the BOS
(else EOS) token, and without either its first token is kept (it has no prediction).
"""

from __future__ import annotations

import re

import numpy as np

from tokenskip.pruning import ScoredChunk, word_ids
from tokenskip.scoring import Scorer, ScorerConfig

# A word: letters/digits, joined across inner . , ' (so "0.2", "1,000" and "don't" stay whole), or one
# punctuation mark.
_WORD = re.compile(r"\w+(?:[.,']\w+)*|[^\w\s]")
_DIGIT = re.compile(r"\d")


class SelfInfoScorer(Scorer):
    """See the module docstring. ``prune(texts, ratios)`` is the entry point."""

    def __init__(self, config: ScorerConfig):
        super().__init__(config)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_path = config.local_model()
        self.device = torch.device(config.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"selfinfo needs a fast tokenizer (character offsets); {config.model} has none")
        dtype = getattr(torch, config.dtype) if config.dtype != "auto" else "auto"
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        self.model.to(self.device).eval()
        start = self.tokenizer.bos_token_id
        self.start_id = start if start is not None else self.tokenizer.eos_token_id
        positions = getattr(self.model.config, "max_position_embeddings", None) or config.max_length
        self.window = max(2, min(config.max_length, positions) - (1 if self.start_id is not None else 0))
        self.force_set = set(self.config.force_tokens)  # forcing resolved (no "auto" left)

    # -- text -> windows of tokens ------------------------------------------------------------------

    def _windows(self, text: str, offsets: list[tuple[int, int]], ids: list[int]):
        """Split one text's tokens into windows ending at word boundaries.

        Yields (char_start, char_end, token_ids, token_offsets, words) per window, words as
        (start, end) character spans; window character ranges tile the text exactly.
        """
        words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
        if not words:
            return
        word_starts = np.array([s for s, _ in words])
        # The word each token ends in (a whitespace-only token counts with the word before it).
        token_word = []
        for s, e in offsets:
            last = max(s, e - 1)
            token_word.append(max(0, int(np.searchsorted(word_starts, last, side="right")) - 1))
        begin_tok, char_start = 0, 0
        while begin_tok < len(ids):
            end_tok = min(len(ids), begin_tok + self.window)
            if end_tok < len(ids):
                # Back off to the first token of the word that straddles the cut, unless the word
                # alone is longer than a window.
                cut = end_tok
                while cut > begin_tok + 1 and token_word[cut] == token_word[cut - 1]:
                    cut -= 1
                if cut > begin_tok + 1:
                    end_tok = cut
            first_word = token_word[begin_tok]
            last_word = token_word[end_tok - 1]
            # The whitespace after the window's last word starts the next window's first segment.
            char_end = len(text) if end_tok == len(ids) else words[last_word][1]
            window_words = [w for w in words[first_word : last_word + 1] if w[0] >= char_start]
            yield char_start, char_end, ids[begin_tok:end_tok], offsets[begin_tok:end_tok], window_words
            begin_tok, char_start = end_tok, char_end

    # -- model pass -----------------------------------------------------------------------------------

    def _token_keep_probs(self, windows: list[list[int]]) -> list[np.ndarray]:
        """1 - p(token | prefix) for every token of every window (first token: 1.0 without BOS/EOS)."""
        import torch

        out: list[np.ndarray] = []
        prefix = [self.start_id] if self.start_id is not None else []
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else 0
        order = sorted(range(len(windows)), key=lambda i: len(windows[i]))  # less padding per batch
        results: dict[int, np.ndarray] = {}
        bs = self.config.batch_size
        with torch.inference_mode():
            for start in range(0, len(order), bs):
                idx = order[start : start + bs]
                seqs = [prefix + windows[i] for i in idx]
                width = max(len(s) for s in seqs)
                t_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
                t_mask = torch.zeros((len(seqs), width), dtype=torch.long)
                for row, s in enumerate(seqs):
                    t_ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
                    t_mask[row, : len(s)] = 1
                t_ids, t_mask = t_ids.to(self.device), t_mask.to(self.device)
                logits = self.model(input_ids=t_ids, attention_mask=t_mask).logits.float()
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                target_logp = logp.gather(-1, t_ids[:, 1:, None])[..., 0]
                keep = (1.0 - target_logp.exp()).cpu().numpy()
                for row, i in enumerate(idx):
                    n = len(windows[i])
                    if prefix:
                        results[i] = keep[row, :n].astype(np.float32)
                    else:
                        results[i] = np.concatenate([[1.0], keep[row, : n - 1]]).astype(np.float32)
        out = [results[i] for i in range(len(windows))]
        return out

    # -- Scorer interface -----------------------------------------------------------------------------

    def score(self, texts: list[str]) -> list[list[ScoredChunk]]:
        per_text: list[list[tuple]] = []
        all_windows: list[list[int]] = []
        encoded = (
            self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
            if texts
            else None
        )
        for i, text in enumerate(texts):
            windows = []
            if text.strip():
                ids = encoded["input_ids"][i]
                offsets = [tuple(o) for o in encoded["offset_mapping"][i]]
                windows = list(self._windows(text, offsets, ids))
            per_text.append(windows)
            all_windows.extend(w[2] for w in windows)
        probs = self._token_keep_probs(all_windows) if all_windows else []
        out, pos = [], 0
        for text, windows in zip(texts, per_text, strict=True):
            chunks = []
            for char_start, char_end, _ids, offsets, words in windows:
                chunks.append(self._scored_window(text, char_start, char_end, offsets, words, probs[pos]))
                pos += 1
            if not chunks and text:
                chunks.append(self._empty_chunk(text))  # whitespace only: nothing to prune
            out.append(chunks)
        return out

    def _empty_chunk(self, text: str) -> ScoredChunk:
        empty = np.zeros(0)
        return ScoredChunk(text, [], empty.astype(np.float32), empty.astype(bool), empty.astype(np.int64),
                           empty.astype(bool), empty.astype(np.int64))  # fmt: skip

    def _scored_window(self, text, char_start, char_end, offsets, words, token_keep) -> ScoredChunk:
        n = len(words)
        sums = np.zeros(n, dtype=np.float64)
        overlaps = np.zeros(n, dtype=np.int64)
        weights = np.zeros(n, dtype=np.int64)
        starts = np.array([s for s, _ in words])
        ends = np.array([e for _, e in words])
        for (s, e), p in zip(offsets, token_keep, strict=True):
            # Words overlapping this token's characters share its score; the word it ends in counts it.
            lo = int(np.searchsorted(ends, s, side="right"))
            hi = int(np.searchsorted(starts, e, side="left"))
            if hi > lo:
                sums[lo:hi] += p
                overlaps[lo:hi] += 1
                weights[hi - 1] += 1
        probs = np.where(overlaps > 0, sums / np.maximum(overlaps, 1), 0.0).astype(np.float32)
        segments, forced = [], np.zeros(n, dtype=bool)
        prev_end = char_start
        for k, (s, e) in enumerate(words):
            word = text[s:e]
            segments.append(text[prev_end:e])  # the word with the whitespace before it
            prev_end = e
            forced[k] = word in self.force_set or bool(self.config.force_digits and _DIGIT.search(word))
        probs[forced] = 1.0
        return ScoredChunk(
            text=text[char_start:char_end],
            words=segments,
            probs=probs,
            python_float=forced,
            weights=weights,
            force_word=np.fromiter((text[s:e] in self.force_set for s, e in words), dtype=bool, count=n),
            word_ids=word_ids([text[s:e] for s, e in words]),
        )

    def render(self, chunk: ScoredChunk, keep: np.ndarray) -> str:
        parts: list[str] = []
        pending, dropped = "", False
        for segment, kept in zip(chunk.words, keep, strict=True):
            word = segment.lstrip()
            space = segment[: len(segment) - len(word)]
            if not kept:
                pending, dropped = pending or space, True
                continue
            separator = space or (pending if word[:1].isalnum() else "")
            if not separator and dropped and parts and word[:1].isalnum() and parts[-1][-1:].isalnum():
                separator = " "  # "\\frac{42}{14}" losing its braces must not read "4214"
            parts.append(separator + word)
            pending, dropped = "", False
        return "".join(parts)

    def prune_scored(self, chunks: list[ScoredChunk], ratios: list[float]) -> dict[float, str]:
        # A dropped first word would leave the whitespace before the next one at the start.
        return {r: (t if r >= 1.0 else t.strip()) for r, t in super().prune_scored(chunks, ratios).items()}
