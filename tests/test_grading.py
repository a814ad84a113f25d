"""Grading: answer extraction, answer-tail splitting, verification against gold."""

from __future__ import annotations

import json

import pytest

from tokenskip.grading import extract_answer, normalise_answer, split_answer_tail

# ---------------------------------------------------------------------------------------------
# extract_answer
# ---------------------------------------------------------------------------------------------

EXTRACTION_CASES = [
    # (text, expected without fallback, expected with last-number fallback)
    ("So the total is \\boxed{18}.", "18", "18"),
    ("First \\boxed{3}, then corrected: \\boxed{4}.", "4", "4"),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}", "\\frac{1}{\\sqrt{2}}"),
    ("The set is $\\boxed{\\{1, 2\\}}$.", "\\{1, 2\\}", "\\{1, 2\\}"),
    ("\\boxed{\\left\\{ x \\right.}", "\\left\\{ x \\right.", "\\left\\{ x \\right."),
    ("Answer: \\fbox{7}", "7", "7"),
    ("so \\boxed 5$ done", "5", "5"),
    ("The final answer is: $\\boxed{\\dfrac{2}{21}}$", "\\dfrac{2}{21}", "\\dfrac{2}{21}"),
    ("The final answer is $18$. I hope it is correct.", "18", "18"),
    ("The final answer is 3.5.", "3.5", "3.5"),
    ("**Final Answer:** 42", "42", "42"),
    ("Final answer:\n\n$$ x^2 + 1 $$", "x^2 + 1", "x^2 + 1"),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72", "72"),
    ("#### Step 1: add\n3 + 4 = 7", None, "7"),  # a markdown heading is not GSM8K's answer marker
    ("Work...\nThe answer is 18 dollars.", "18 dollars", "18 dollars"),
    ("Maybe the answer is 80? Hmm.\n\nWait, let me redo this: 85 it is", None, "85"),
    ("Everything adds up to 1,234 apples in the end", None, "1234"),
    ("It is -5 then -3.25 degrees.", None, "-3.25"),
    ("\\boxed{} is where the answer goes; it is 9", None, "9"),
    ("truncated \\boxed{\\frac{1}{2", None, "2"),
    ("", None, None),
    ("no numbers here at all", None, None),
]


@pytest.mark.parametrize(("text", "expected", "expected_fallback"), EXTRACTION_CASES)
def test_extract_answer(text, expected, expected_fallback):
    assert extract_answer(text) == expected
    assert extract_answer(text, last_number_fallback=True) == expected_fallback


def test_extract_answer_rejects_non_strings():
    with pytest.raises(TypeError, match="expects a str"):
        extract_answer(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("$18$", "18"),
        ("\\$1,000.", "1000"),
        ("18 dollars", "18"),
        ("3 \\text{ cm}", "3"),
        ("2x", "2x"),
        ("3 i", "3 i"),
        ("10{,}080", "10080"),
        ("1\\,000", "1000"),
        ("-$5", "-5"),
        ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}"),
        ("(1,000)", "(1,000)"),
    ],
)
def test_normalise_answer(raw, normalised):
    assert normalise_answer(raw) == normalised


# ---------------------------------------------------------------------------------------------
# split_answer_tail
# ---------------------------------------------------------------------------------------------

SPLIT_CASES = [
    ("3 + 4 = 7.\nSo the sum is \\boxed{7}.", "So the sum is \\boxed{7}."),
    ("We add. Therefore, it is \\(\\boxed{7}\\).\n", "Therefore, it is \\(\\boxed{7}\\).\n"),
    (
        "Add them up.\nThus, the total is:\n\\[\n\\boxed{40}\n\\]",
        "Thus, the total is:\n\\[\n\\boxed{40}\n\\]",
    ),
    ("Reasoning here.\n\n**Final Answer**\n\\boxed{5}", "**Final Answer**\n\\boxed{5}"),
    ("Reasoning.\n\nThe final answer is: $\\boxed{3}$", "The final answer is: $\\boxed{3}$"),
    ("48/2 = 24\n48+24 = 72\n#### 72", "#### 72"),
    ("Adding 2 and 2 gives four. So the answer is 4.", "So the answer is 4."),
    ("I think \\boxed{3}. Then \\boxed{4} wins. The end.", "Then \\boxed{4} wins. The end."),
    ("no final answer, just 42", ""),
    ("", ""),
]


@pytest.mark.parametrize(("cot", "tail"), SPLIT_CASES)
def test_split_answer_tail(cot, tail):
    reasoning, answer_tail = split_answer_tail(cot)
    assert answer_tail == tail
    assert reasoning + answer_tail == cot


def test_split_answer_tail_bounds_a_long_lead_in():
    cot = "x" * 1000 + " so we get \\boxed{5}"
    reasoning, tail = split_answer_tail(cot)
    assert tail == "\\boxed{5}"
    assert reasoning + tail == cot


@pytest.mark.parametrize("name", ["gsm8k", "math500"])
def test_split_answer_tail_round_trip_on_real_cots(shared_data, name):
    rows = [
        json.loads(line) for line in (shared_data / "cot_samples" / f"r1_distill_7b_{name}_test.jsonl").open()
    ]
    with_tail = 0
    for row in rows:
        cot = row["response"]
        reasoning, tail = split_answer_tail(cot)
        assert reasoning + tail == cot
        answer = extract_answer(cot)
        if answer is None:
            assert tail == ""
        else:
            with_tail += 1
            # The tail states the same answer, so pruning the reasoning can never lose it.
            assert extract_answer(tail) == answer
    # Nearly every real CoT states a final answer (the rest were cut off mid-thought).
    assert with_tail >= 0.9 * len(rows)
