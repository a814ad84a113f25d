"""TokenSkip SFT mix: ratio draw, exact prompt/response strings, both record formats."""

from __future__ import annotations

import collections

import pyarrow as pa
import pytest

from tokenskip.schema import COMPRESSED_SCHEMA, to_table
from tokenskip.sft import SFT_SCHEMA, SFTMixConfig, SFTMixError, build_sft_records

QUESTION = "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May. Total?"
REASONING = "Step 1: In May she sold 48 / 2 = 24 clips.\nStep 2: In total 48 + 24 = 72 clips.\n\n"
TAIL = "So the answer is $\\boxed{72}$."
COT = REASONING + TAIL
PRUNED_07 = "Step 1: May 48 / 2 = 24.\nStep 2: total 48 + 24 = 72.\n\n"


def _record(key: str = "k0", question: str = QUESTION) -> dict:
    compressions = [
        {
            "target_ratio": r,
            "text": (PRUNED_07 if r == 0.7 else REASONING) + TAIL,
            "tokens": 10,
            "achieved_ratio": r,
        }
        for r in (0.9, 0.8, 0.7, 0.6, 0.5)
    ]
    return {
        "key": key,
        "problem_id": "p-" + key,
        "source": "gsm8k",
        "split": "train",
        "question": question,
        "answer": "72",
        "cot": COT,
        "reasoning": REASONING,
        "answer_tail": TAIL,
        "extracted_answer": "72",
        "verdict": "correct",
        "original_tokens": 30,
        "compressions": compressions,
    }


class _EosTokenizer:
    eos_token = "<|im_end|>"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(range(len(text.split())))


INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def test_exact_strings_at_ratio_1_and_0_7():
    table = to_table([_record()], COMPRESSED_SCHEMA)
    tok = _EosTokenizer()

    full = build_sft_records(table, SFTMixConfig(ratios=[1.0]), tok).to_pylist()[0]
    assert full["ratio"] == 1.0
    assert full["instruction"] == INSTRUCTION
    assert full["input"] == QUESTION
    # TokenSkip's tail replaces the model's own "So the answer is ..." sentence.
    expected_full = (
        "Step 1: In May she sold 48 / 2 = 24 clips.\nStep 2: In total 48 + 24 = 72 clips."
        "\n\nThe final answer is: $\\boxed{72}$"
    )
    assert full["output"] == expected_full
    assert full["messages"] == [
        {"role": "user", "content": INSTRUCTION + "\n" + QUESTION},
        {"role": "assistant", "content": expected_full},
    ]

    pruned = build_sft_records(table, SFTMixConfig(ratios=[0.7]), tok).to_pylist()[0]
    assert pruned["ratio"] == 0.7
    assert pruned["input"] == QUESTION + "<|im_end|>0.7<|im_end|>"
    expected_pruned = (
        "Step 1: May 48 / 2 = 24.\nStep 2: total 48 + 24 = 72.\n\nThe final answer is: $\\boxed{72}$"
    )
    assert pruned["output"] == expected_pruned
    assert pruned["messages"][0]["content"] == INSTRUCTION + "\n" + QUESTION + "<|im_end|>0.7<|im_end|>"
    assert pruned["messages"][1] == {"role": "assistant", "content": expected_pruned}
    assert pruned["output_tokens"] == len(expected_pruned.split())


def test_keep_tail_and_explicit_delimiter_and_unconditioned():
    table = to_table([_record()], COMPRESSED_SCHEMA)
    kept = build_sft_records(
        table, SFTMixConfig(ratios=[0.7], answer_tail="keep", delimiter="<sep>")
    ).to_pylist()[0]
    assert kept["output"] == PRUNED_07 + TAIL
    assert kept["output_tokens"] == 10  # the stored count is still valid: the text is unchanged
    assert kept["input"] == QUESTION + "<sep>0.7<sep>"
    bare = build_sft_records(table, SFTMixConfig(ratios=[0.5], condition_on_ratio=False)).to_pylist()[0]
    assert bare["input"] == QUESTION and bare["ratio"] == 0.5


def test_ratio_draw_is_uniform_and_seeded():
    rows = [_record(f"k{i}", f"{QUESTION} #{i}") for i in range(1200)]
    table = to_table(rows, COMPRESSED_SCHEMA)
    tok = _EosTokenizer()
    first = build_sft_records(table, SFTMixConfig(seed=7), tok)
    again = build_sft_records(table, SFTMixConfig(seed=7), tok)
    other = build_sft_records(table, SFTMixConfig(seed=8), tok)
    assert first.schema == SFT_SCHEMA
    assert first.equals(again)
    assert first.column("ratio").to_pylist() != other.column("ratio").to_pylist()
    counts = collections.Counter(first.column("ratio").to_pylist())
    assert set(counts) == {1.0, 0.9, 0.8, 0.7, 0.6, 0.5}
    # 200 expected per ratio; binomial sd ~ 13, so +-60 is a > 4 sigma band.
    assert all(140 <= n <= 260 for n in counts.values()), counts
    # Each record's input and output agree with its drawn ratio.
    for rec in first.to_pylist():
        if rec["ratio"] == 1.0:
            assert "<|im_end|>" not in rec["input"]
        else:
            assert rec["input"].endswith(f"<|im_end|>{rec['ratio']:.1f}<|im_end|>")
            assert rec["output"].startswith(PRUNED_07 if rec["ratio"] == 0.7 else REASONING.rstrip())


def test_bad_records_raise_clear_errors():
    tok = _EosTokenizer()
    broken = _record()
    broken["compressions"] = [c for c in broken["compressions"] if c["target_ratio"] != 0.7]
    with pytest.raises(SFTMixError, match="no compression at ratio 0.7"):
        build_sft_records(to_table([broken], COMPRESSED_SCHEMA), SFTMixConfig(ratios=[0.7]), tok)
    wrong_tail = _record()
    wrong_tail["answer_tail"] = "The answer is 73."
    with pytest.raises(SFTMixError, match="row 0 .*answer tail"):
        build_sft_records(to_table([wrong_tail], COMPRESSED_SCHEMA), SFTMixConfig(ratios=[1.0]), tok)
    with pytest.raises(SFTMixError, match="tokenizer"):
        build_sft_records(to_table([_record()], COMPRESSED_SCHEMA), SFTMixConfig())
    with pytest.raises(SFTMixError, match="lacks columns"):
        build_sft_records(pa.table({"question": ["q"]}), SFTMixConfig(), tok)
    with pytest.raises(ValueError):
        SFTMixConfig(ratios=[1.5])
