"""Grading: answer extraction, answer-tail splitting, verification against gold."""

from __future__ import annotations

import pickle
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from pydantic import ValidationError

from tests.fixture_data import read_jsonl
from tokenskip.grading import (
    Grader,
    GradingConfig,
    Verdict,
    extract_answer,
    grade,
    grade_batch,
    normalise_answer,
    split_answer_tail,
)

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
        ("11,\\! 111,\\! 100", "11111100"),
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
def test_split_answer_tail_round_trip_on_real_cots(fixture_data, name):
    rows = read_jsonl(fixture_data / "cot_samples" / f"r1_distill_7b_{name}_test.jsonl.gz")
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


# ---------------------------------------------------------------------------------------------
# Grading: verdicts
# ---------------------------------------------------------------------------------------------

OK, WRONG, NONE = Verdict.correct, Verdict.incorrect, Verdict.unparsable

GRADING_CASES = [
    # (response, gold, expected verdict) - default config: no last-number fallback
    ("So the total is \\boxed{18}.", "18", OK),
    ("\\boxed{1,000}", "1000", OK),
    ("\\boxed{1{,}000}", "1,000", OK),
    ("\\boxed{1\\,000}", "1000", OK),
    ("\\boxed{11111111100}", "11,\\! 111,\\! 111,\\! 100", OK),
    ("\\boxed{11,111,111,100}", "11111111100", OK),
    ("\\boxed{11, 111}", "11111", WRONG),
    ("The answer is $1,000.", "1000", OK),
    ("48/2 = 24 clips.\n#### 72", "72", OK),
    ("\\boxed{\\$18}", "18", OK),
    ("\\boxed{\\$1,234.50}", "1234.5", OK),
    ("\\boxed{18 \\text{ dollars}}", "18", OK),
    ("The final answer is 18 dollars.", "18", OK),
    ("\\boxed{50\\%}", "50", OK),
    ("\\boxed{50}", "50\\%", OK),
    ("\\boxed{0.5}", "\\frac{1}{2}", OK),
    ("\\boxed{1/2}", "\\frac{1}{2}", OK),
    ("\\boxed{\\dfrac{1}{2}}", "0.5", OK),
    ("\\boxed{\\tfrac12}", "\\frac{1}{2}", OK),
    ("\\boxed{1.5}", "\\frac{3}{2}", OK),
    ("\\boxed{-3}", "-3", OK),
    ("\\boxed{-3.0}", "-3", OK),
    ("\\boxed{-\\frac{3}{4}}", "-0.75", OK),
    ("\\boxed{\\frac{-3}{4}}", "-\\frac{3}{4}", OK),
    ("\\boxed{18.}", "18", OK),
    ("\\boxed{\\boxed{7}}", "7", OK),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", OK),
    ("\\boxed{2\\sqrt{5}}", "\\sqrt{20}", OK),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", OK),
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", OK),
    ("\\boxed{5, 2}", "2, 5", OK),
    ("\\boxed{[1, \\infty)}", "[1,\\infty)", OK),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", OK),
    ("\\boxed{10^\\circ}", "10", OK),
    ("\\boxed{x = 3}", "3", OK),
    ("\\boxed{6 - 5i}", "6-5i", OK),
    ("The final answer is: $\\boxed{\\frac{14}{3}}$", "\\frac{14}{3}", OK),
    ("**Final Answer:** 42", "42", OK),
    ("Answer: \\fbox{7}", "7", OK),
    ("First \\boxed{3}, but correcting that: \\boxed{4}", "4", OK),
    ("\\boxed{5}", "4", WRONG),
    ("\\boxed{-18}", "18", WRONG),
    ("\\boxed{\\frac{1}{3}}", "0.5", WRONG),
    ("\\boxed{1,001}", "1000", WRONG),
    ("\\boxed{0.333}", "\\frac{1}{3}", WRONG),
    ("\\boxed{x^2-1}", "(x+1)^2", WRONG),
    ("\\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)", WRONG),
    ("48/2 = 24 clips.\n#### 73", "72", WRONG),
    ("The final answer is 17.", "18", WRONG),
    ("\\boxed{\\text{(B)}}", "\\text{(C)}", WRONG),
    ("\\boxed{3}, no wait: \\boxed{4}", "3", WRONG),
    ("", "5", NONE),
    ("I am not sure.", "5", NONE),
    ("Thus 5 apples remain.", "5", NONE),
    ("\\boxed{}", "5", NONE),
    ("truncated \\boxed{\\frac{1}{2", "0.5", NONE),
    ("Maybe the answer is 80? Hmm.\n\nWait, let me think again", "80", NONE),
    ("asdf qwer \\\\ }{ ", "1", NONE),
]

FALLBACK_CASES = [
    # (response, gold, expected verdict) - last_number_fallback=True (TokenSkip-style evaluation)
    ("Thus 5 apples remain.", "5", OK),
    ("We get 1,234 in total", "1234", OK),
    ("We get -7 after all", "-7", OK),
    ("We get -7 after all", "7", WRONG),
    ("It costs 3 dollars, so 2 of them cost 6", "3", WRONG),
    ("\\boxed{4}, though 5 is tempting", "4", OK),
    ("no numbers here", "3", NONE),
]


@pytest.fixture(scope="module")
def grader():
    with Grader(GradingConfig(max_workers=2)) as g:
        yield g


@pytest.fixture(scope="module")
def case_verdicts(grader):
    """All hand-written cases graded in one batch each (one worker pool for the module)."""
    results = grader.grade_batch([r for r, _, _ in GRADING_CASES], [g for _, g, _ in GRADING_CASES])
    with Grader(GradingConfig(last_number_fallback=True, max_workers=1)) as fallback:
        fallback_results = fallback.grade_batch(
            [r for r, _, _ in FALLBACK_CASES], [g for _, g, _ in FALLBACK_CASES]
        )
    return {"default": results, "fallback": fallback_results}


@pytest.mark.parametrize("index", range(len(GRADING_CASES)), ids=[repr(c[0])[:40] for c in GRADING_CASES])
def test_grading_case(case_verdicts, index):
    response, gold, expected = GRADING_CASES[index]
    result = case_verdicts["default"][index]
    assert result.verdict == expected, (response, gold, result)
    assert result.extracted_answer == extract_answer(response)


@pytest.mark.parametrize("index", range(len(FALLBACK_CASES)), ids=[repr(c[0])[:40] for c in FALLBACK_CASES])
def test_grading_case_with_last_number_fallback(case_verdicts, index):
    response, gold, expected = FALLBACK_CASES[index]
    result = case_verdicts["fallback"][index]
    assert result.verdict == expected, (response, gold, result)


@pytest.fixture(scope="module")
def math_verify_grader():
    """Every answer through math-verify (no exact-match shortcut)."""
    with Grader(GradingConfig(fast_path=False, max_workers=2)) as g:
        yield g


@pytest.mark.slow  # every case through math-verify as well
def test_fast_path_agrees_with_math_verify(case_verdicts, math_verify_grader):
    graded = [(r, g, v) for (r, g, _), v in zip(GRADING_CASES, case_verdicts["default"], strict=True)]
    graded = [(r, g, v) for r, g, v in graded if v.verdict != Verdict.unparsable]
    shortcut = [v for _, _, v in graded if v.detail == "identical after normalisation"]
    assert len(shortcut) >= 15  # the shortcut is really taken...
    slow = math_verify_grader.grade_batch([r for r, _, _ in graded], [g for _, g, _ in graded])
    # ...and never disagrees with math-verify.
    assert [v.verdict for _, _, v in graded] == [s.verdict for s in slow]


def _load_golds(fixture_data):
    gsm8k = [row["answer"] for row in read_jsonl(fixture_data / "gsm8k" / "test.jsonl.gz")]
    math500 = [row["answer"] for row in read_jsonl(fixture_data / "math500" / "test.jsonl.gz")]
    assert (len(gsm8k), len(math500)) == (1319, 500)
    return gsm8k + math500


def _boxed_cot(gold: str) -> str:
    return "... so we get it.\n\nThe final answer is: $\\boxed{" + gold + "}$"


@pytest.mark.parametrize(
    "path",
    ["default", pytest.param("math_verify", marks=pytest.mark.slow)],  # math-verify on 1,819 golds: ~9 s
)
def test_every_gold_answer_grades_correct_when_boxed(fixture_data, grader, math_verify_grader, path):
    golds = _load_golds(fixture_data)
    g = grader if path == "default" else math_verify_grader
    results = g.grade_batch([_boxed_cot(gold) for gold in golds], golds)
    failures = [(gold, r) for gold, r in zip(golds, results, strict=True) if r.verdict != Verdict.correct]
    assert failures == []
    assert [r.extracted_answer for r in results] == [gold.strip() for gold in golds]


def test_gold_answers_are_not_all_equal(fixture_data, math_verify_grader):
    """The gold check above must be able to fail: a rotated gold list grades mostly incorrect."""
    golds = _load_golds(fixture_data)[1319:1619]  # MATH-500: few repeated answers
    rotated = golds[1:] + golds[:1]
    results = math_verify_grader.grade_batch([_boxed_cot(gold) for gold in golds], rotated)
    incorrect = sum(r.verdict == Verdict.incorrect for r in results)
    assert incorrect >= 0.9 * len(golds)


# ---------------------------------------------------------------------------------------------
# Grading: bounds, threads, failures
# ---------------------------------------------------------------------------------------------

DEEP_FRAC = "\\boxed{" + "\\frac{1}{" * 2000 + "2" + "}" * 2000 + "}"
HUGE_NUMBER = "The final answer is \\boxed{" + "7" * 100_000 + "}"
NEVER_FINISHES = "\\boxed{(10^{100})!}"  # sympy tries to evaluate it


def _in_thread(fn):
    """Run ``fn`` on a non-main thread (as Ray's map_batches does); fail rather than hang."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "grading hung"
    if "error" in box:
        raise box["error"]
    return box["value"]


ADVERSARIAL_TEXTS = {
    # Each of these made an earlier draft quadratic (minutes to hours at this size).
    "unclosed boxes": "\\boxed{" * 100_000,
    "blank run after an answer": "The answer is x" + " " * 200_000 + "y",
    "bold markers after an answer": "The answer is 5" + " **" * 100_000,
    "repeated markers": "final answer is" * 50_000 + "the answer is\n" * 50_000,
    "deep braces": "\\boxed{" + "\\frac{1}{" * 100_000 + "2" + "}" * 100_000 + "}",
    "long number": "7" * 500_000,
}


@pytest.mark.parametrize("name", list(ADVERSARIAL_TEXTS))
def test_adversarial_text_is_processed_in_linear_time(name):
    text = ADVERSARIAL_TEXTS[name]

    def process():
        answer = extract_answer(text)
        reasoning, tail = split_answer_tail(text)
        assert reasoning + tail == text
        fallback = extract_answer(text, last_number_fallback=True)
        return answer, fallback, normalise_answer(answer) if answer else None

    answer, fallback, _ = _in_thread(process)  # a quadratic regression hangs here instead of passing
    if name == "unclosed boxes":
        assert answer is None and fallback is None
    if name == "long number":
        assert answer is None and fallback == text


@pytest.mark.slow  # waits out grading timeouts
def test_pathological_answers_get_a_verdict_off_the_main_thread():
    config = GradingConfig(timeout_s=0.5, max_workers=2)
    with Grader(config) as g:
        responses = [DEEP_FRAC, HUGE_NUMBER, NEVER_FINISHES, "\\boxed{\\frac{1}{2}}", "#### 3"]
        golds = ["1", "5", "1", "0.5", "3"]
        results = _in_thread(lambda: g.grade_batch(responses, golds))
        deep, huge, never, half, three = results
        assert deep.verdict in {Verdict.timeout, Verdict.unparsable, Verdict.incorrect}
        assert huge.verdict in {Verdict.timeout, Verdict.incorrect}
        assert huge.extracted_answer == "7" * 100_000
        assert never.verdict == Verdict.timeout
        assert "more than 0.5s of CPU" in never.detail
        assert never.extracted_answer == "(10^{100})!"
        # The answers behind a killed worker are graded all the same, and the grader goes on working.
        assert (half.verdict, three.verdict) == (Verdict.correct, Verdict.correct)
        assert g.restarts >= 1
        assert g.grade("\\boxed{2/4}", "\\frac{1}{2}").verdict == Verdict.correct


def test_a_dead_worker_is_replaced_and_loses_nothing():
    with Grader(GradingConfig(max_workers=1)) as g:
        assert g.grade("\\boxed{0.25}", "\\frac14").verdict == Verdict.correct
        g._workers[0].process.kill()  # e.g. the OOM killer
        g._workers[0].process.wait()
        results = g.grade_batch(["\\boxed{0.75}", "\\boxed{2}"], ["\\frac34", "3"])
        assert [r.verdict for r in results] == [Verdict.correct, Verdict.incorrect]
        assert g.restarts == 1


def test_concurrent_batches_share_one_grader(grader):
    responses = [f"\\boxed{{\\frac{{{n}}}{{2}}}}" for n in range(40)]
    golds = [str(n / 2) for n in range(40)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        batches = list(pool.map(lambda _: grader.grade_batch(responses, golds), range(4)))
    for results in batches:
        assert [r.verdict for r in results] == [Verdict.correct] * 40


def test_module_level_grade_functions():
    assert grade("So \\boxed{\\dfrac{3}{6}}.", "0.5").verdict == Verdict.correct
    results = grade_batch(["#### 1,200", "#### 12"], ["1200", "13"])
    assert [r.verdict for r in results] == [Verdict.correct, Verdict.incorrect]
    fallback = grade("it is 12", "12", GradingConfig(last_number_fallback=True))
    assert (fallback.verdict, fallback.extracted_answer) == (Verdict.correct, "12")


def test_bad_input_raises_before_grading(grader):
    with pytest.raises(ValueError, match="2 responses but 1 gold"):
        grader.grade_batch(["\\boxed{1}", "\\boxed{2}"], ["1"])
    with pytest.raises(ValueError, match="row 1: empty gold"):
        grader.grade_batch(["\\boxed{1}", "\\boxed{2}"], ["1", "  "])
    with pytest.raises(TypeError, match="row 0"):
        grader.grade_batch([None], ["1"])  # type: ignore[list-item]
    assert grader.grade_batch([], []) == []


def test_config_is_validated_and_hashable():
    with pytest.raises(ValidationError):
        GradingConfig(timeout_s=0)
    with pytest.raises(ValidationError, match="wall_timeout_s"):
        GradingConfig(timeout_s=10, wall_timeout_s=5)
    with pytest.raises(ValidationError):
        GradingConfig(max_wrokers=3)  # type: ignore[call-arg]
    assert hash(GradingConfig()) == hash(GradingConfig())
    assert GradingConfig.model_fields["timeout_s"].description


def test_grader_pickles_as_its_config_and_results_become_rows(grader):
    copy = pickle.loads(pickle.dumps(grader))
    try:
        assert copy.config == grader.config
        result = copy.grade("\\boxed{\\frac{2}{4}}", "0.5")
    finally:
        copy.close()
    assert result.to_dict() == {
        "verdict": "correct",
        "extracted_answer": "\\frac{2}{4}",
        "detail": result.detail,
    }


def test_closed_grader_refuses_work():
    g = Grader()
    g.close()
    with pytest.raises(RuntimeError, match="closed"):
        g.grade("\\boxed{x}", "y")


@pytest.mark.slow  # grades 5,476 responses
def test_gsm8k_golds_match_however_the_number_is_written(fixture_data, grader):
    """Thousands separators, currency, units and trailing zeros never cost a correct answer."""
    golds = [row["answer"] for row in read_jsonl(fixture_data / "gsm8k" / "test.jsonl.gz")]
    responses, expected_golds = [], []
    for gold in golds:
        value = int(gold.replace(",", ""))
        for written in (f"\\${value:,}", f"{value:,} dollars", f"{value}.00", f"{value:,}\\text{{ apples}}"):
            responses.append(f"So in total it is \\boxed{{{written}}}.")
            expected_golds.append(gold)
    results = grader.grade_batch(responses, expected_golds)
    assert [r for r in results if r.verdict != Verdict.correct] == []
    # ...and a different number written the same way is still wrong.
    off_by_one = grader.grade_batch(
        [f"\\boxed{{\\${int(g.replace(',', '')) + 1:,}}}" for g in golds[:200]], golds[:200]
    )
    assert {r.verdict for r in off_by_one} == {Verdict.incorrect}
