"""Self-information scorer on the tiny local causal LM (``tiny_causal_lm`` fixture)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tests.fixture_data import read_jsonl
from tokenskip.pruning import keep_mask, reduce_rate_for
from tokenskip.scoring import ScorerConfig, build_scorer

RATIOS = [0.9, 0.8, 0.7, 0.6, 0.5]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scorer(tiny_causal_lm):
    return build_scorer(
        ScorerConfig(kind="selfinfo", model=str(tiny_causal_lm), batch_size=4, max_length=128)
    )


@pytest.fixture(scope="module")
def plain_scorer(tiny_causal_lm):
    config = ScorerConfig(
        kind="selfinfo",
        model=str(tiny_causal_lm),
        force_tokens=[],
        force_digits=False,
        drop_consecutive=False,
        max_length=128,
    )
    return build_scorer(config)


@pytest.fixture(scope="module")
def cots(fixture_data) -> list[str]:
    rows = read_jsonl(fixture_data / "cot_samples" / "r1_distill_7b_gsm8k_test.jsonl.gz")
    return [row["response"] for _, row in zip(range(12), rows, strict=False)]


def test_keep_probability_is_one_minus_the_lm_probability(scorer, tiny_causal_lm):
    import torch
    from transformers import AutoModelForCausalLM

    ids = scorer.tokenizer("Step 1: 48 / 2 = 24 clips in May.", add_special_tokens=False)["input_ids"]
    ours = scorer._token_keep_probs([ids])[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[scorer.start_id, *ids]])).logits[0]
    expected = 1 - torch.softmax(logits[:-1], -1)[torch.arange(len(ids)), torch.tensor(ids)]
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert ours.shape == (len(ids),)


def test_ratio_one_is_the_text_and_lower_ratios_shrink(scorer, cots):
    out = scorer.prune(cots, [1.0, *RATIOS])
    for text, pruned in zip(cots, out, strict=False):
        assert pruned[1.0] == text
        lengths = [len(pruned[r].split()) for r in RATIOS]
        assert lengths[-1] < lengths[0] <= len(text.split())


def test_kept_tokens_follow_the_target_ratio(plain_scorer, cots):
    for chunks in plain_scorer.score(cots):
        total = sum(int(c.weights.sum()) for c in chunks)
        for ratio in RATIOS:
            kept = sum(int(c.weights[keep_mask(c, reduce_rate_for(ratio), False)].sum()) for c in chunks)
            assert ratio - 0.12 <= kept / total <= ratio + 0.02, (ratio, kept / total)


def test_kept_words_are_nested_across_ratios(plain_scorer, cots):
    # One score per word, thresholds rising as the ratio falls: a word kept at 0.5 is kept at 0.9.
    for chunks in plain_scorer.score(cots[:4]):
        for c in chunks:
            masks = [keep_mask(c, reduce_rate_for(r), False) for r in RATIOS]
            for wider, narrower in zip(masks, masks[1:], strict=False):
                assert not (narrower & ~wider).any()


def test_digits_and_force_tokens_survive(scorer, cots):
    for text, pruned in zip(cots, scorer.prune(cots, [0.5]), strict=False):
        assert re.findall(r"\d+", pruned[0.5]) == re.findall(r"\d+", text)
        assert pruned[0.5].count("Step") == text.count("Step")


def test_long_text_is_scored_in_windows_that_tile_it(tiny_causal_lm, cots):
    small = build_scorer(
        ScorerConfig(kind="selfinfo", model=str(tiny_causal_lm), max_length=16, batch_size=8)
    )
    text = cots[0]
    chunks = small.score([text])[0]
    assert len(chunks) > 5
    assert "".join(c.text for c in chunks) == text
    # Every word is scored exactly once, in order.
    words = [w.strip() for c in chunks for w in c.words]
    assert words == re.findall(r"\w+(?:[.,']\w+)*|[^\w\s]", text)
    assert small.prune([text], [1.0])[0][1.0] == text


def test_empty_blank_and_batch_of_mixed_texts(scorer):
    out = scorer.prune(["", "   ", "Step 1: 2 + 2 = 4.", "\n"], [0.9, 0.5, 1.0])
    assert [o[0.5] for o in out] == ["", "", out[2][0.5], ""]
    assert out[1][1.0] == "   "
    assert "2" in out[2][0.5] and "4" in out[2][0.5]


def test_pruned_text_keeps_spacing_readable(scorer):
    text = "The cost is $5 per hour, and she worked 3 hours: 5 * 3 = 15 dollars in total."
    pruned = scorer.prune([text], [0.5])[0][0.5]
    assert "  " not in pruned and not pruned.startswith(" ")
    # Every kept word appears in the original in the same order.
    position = 0
    for word in re.findall(r"\w+|[^\w\s]", pruned):
        position = text.index(word, position) + len(word)


def test_selfinfo_without_a_model_is_a_config_error():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="causal LM"):
        ScorerConfig(kind="selfinfo")
