"""The words `tokenskip show` and the HTML report mark as pruned are exactly those pruning removed: a
word diff of each stored compression (``compressions[].text``) against the CoT it was pruned from."""

from __future__ import annotations

import difflib
import html
import itertools
import random
import re
import unicodedata
from collections import Counter

import pytest

from tokenskip.compress import CompressConfig, Compressor
from tokenskip.examples import Mark, _fewest_runs_embedding, diff_pruned, diff_pruned_ratios, read_examples
from tokenskip.report.page import render_html
from tokenskip.schema import COMPRESSED_SCHEMA, to_table
from tokenskip.scoring import ScorerConfig
from tokenskip.show import mark_dropped, render_examples
from tokenskip.storage import RunStore, StorageConfig

TOKEN = re.compile(r"\w+|[^\w\s]")

# CoTs shaped like the demo's (SmolLM2-135M-Instruct on one-step arithmetic word problems): a
# hyphenated phrase, numbers the scorer must keep, a final answer the answer tail holds.
DEMO_COTS = [
    "Let's solve this step-by-step. Tom has 17 apples and buys 5 more, so he has 17 + 5 = 22 apples.\n\n"
    "The answer is 22.",
    "To find the total, we multiply the number of boxes by the pencils in each box: 6 * 12 = 72.\n"
    "So there are 72 pencils in all. The final answer is $\\boxed{72}$.",
    "First, we need to find how many cookies are left. Sara baked 48 cookies and gave away 19, "
    "so 48 - 19 = 29 cookies are left. Step-by-step, the remaining cookies are 29.\n\nThe answer is 29.",
    "The train travels at 60 miles per hour for 3 hours. Distance = speed x time = 60 x 3 = 180 miles. "
    "The answer is 180.",
]


def _tokens(text: str) -> list[str]:
    """Word tokens in NFKC form (the form the marks carry)."""
    return TOKEN.findall(unicodedata.normalize("NFKC", text))


def _diff_marks(original: str, pruned: str) -> list[tuple[str, bool]]:
    """The reference: difflib's word diff, token by token (True = dropped). Valid as a reference where
    its diff is deletions only (the tests below check that it is)."""
    a, b = _tokens(original), _tokens(pruned)
    opcodes = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    assert {op for op, *_ in opcodes} <= {"equal", "delete"}, opcodes
    return [(a[i], op == "delete") for op, i1, i2, _, _ in opcodes for i in range(i1, i2)]


def _piece_marks(pieces) -> list[tuple[str, bool]]:
    assert all(p.mark is not Mark.ADDED for p in pieces)
    return [(t, p.mark is Mark.DROPPED) for p in pieces for t in _tokens(p.text)]


def test_a_partly_pruned_word_and_kept_digits_are_marked_as_pruning_left_them():
    cot = "Let's solve this step-by-step. Tom has 17 apples and buys 5 more: 17 + 5 = 22."
    pruned = "solve step 17 apples 5: 17 + 5 = 22."
    # the old greedy match lost step after "step-by-step" -> "step" and struck out every later word
    assert mark_dropped(cot, pruned) == (
        "[-Let's-] solve [-this-] step[--by-step.-] [-Tom-] [-has-] 17 apples [-and-] [-buys-] 5 [-more-]: 17 + 5 = 22."
    )
    assert _piece_marks(diff_pruned(cot, pruned)) == _diff_marks(cot, pruned)
    # repeated words: the fewest separate cuts, as a diff shows them
    assert mark_dropped("the cat the dog", "the dog") == "[-the-] [-cat-] the dog"
    # ... unless pruning's nesting says which one went: a lower ratio keeps a subset of a higher one's
    # words, so "step." at 0.7 is the "step" 0.8 kept, not the one it dropped
    at_08, at_07 = diff_pruned_ratios("Solve it step-by-step.", ["Solve it step-.", "Solve step."])
    assert [(p.text, p.mark is Mark.DROPPED) for p in at_08] == [
        ("Solve", False), ("it", False), ("step-", False), ("by-step", True), (".", False)
    ]  # fmt: skip
    assert [(p.text, p.mark is Mark.DROPPED) for p in at_07] == [
        ("Solve", False), ("it", True), ("step", False), ("-by-step", True), (".", False)
    ]  # fmt: skip
    assert mark_dropped("Solve it step-by-step.", "Solve step.") == "Solve [-it-] [-step-by--]step."
    assert mark_dropped("a b", "") == "[-a-] [-b-]" and mark_dropped("", "") == ""
    # LLMLingua-2's tokenizer hands back kept words in NFKC form: still a deletion
    assert mark_dropped("wait … then ½ of it", "… ½") == "[-wait-] ... [-then-] 1⁄2 [-of-] [-it-]"
    # a pruned text that is not a deletion (never from our scorers) shows the extra word, loses none
    assert mark_dropped("a b c", "a x c") == "a [-b-] {+x+} c"


def test_the_embedding_keeps_every_pruned_token_in_the_fewest_blocks():
    """Against brute force over every embedding, on short texts with many repeated words (where a
    plain diff, difflib's included, reports some kept words as inserted)."""
    rng = random.Random(7)
    for _ in range(3000):
        original = [rng.choice("abc") for _ in range(rng.randint(0, 8))]
        kept = [t for t in original if rng.random() < 0.5]
        positions = _fewest_runs_embedding(original, kept)
        assert positions is not None and [original[i] for i in positions] == kept
        assert all(x < y for x, y in itertools.pairwise(positions))
        blocks = lambda p: sum(y != x + 1 for x, y in itertools.pairwise(p))  # noqa: E731
        fewest = min(
            blocks(c)
            for c in itertools.combinations(range(len(original)), len(kept))
            if [original[i] for i in c] == kept
        )
        assert blocks(positions) == fewest
        assert _fewest_runs_embedding(original, kept + ["z"]) is None


@pytest.mark.usefixtures("one_torch_thread")
def test_show_and_report_mark_what_the_demo_scorer_pruned(tmp_path, tiny_causal_lm):
    """Demo-shaped rows (the demo's self-information scorer config, here over the tiny local LM) are
    compressed, committed and read back: in every ratio of every row, `show`'s and the report's marks
    are the word diff of the stored compression against the CoT."""
    scorer = ScorerConfig(kind="selfinfo", model=str(tiny_causal_lm), max_length=128)
    compressed = Compressor(CompressConfig(scorer=scorer, target_tokenizer=str(tiny_causal_lm)))(
        {"cot": DEMO_COTS}
    )
    rows = [
        {"key": f"k{i}", "problem_id": f"p{i}", "question": f"Question {i}?", "answer": "1"}
        | {name: values[i] for name, values in compressed.items()}
        for i in range(len(DEMO_COTS))
    ]
    assert not any(compressed["error"])
    store = RunStore(StorageConfig(root=str(tmp_path)), "demo-arithmetic", "r1")
    store.write_shard(
        "s-1", {"data": to_table(rows, COMPRESSED_SCHEMA)}, problem_ids=[r["problem_id"] for r in rows]
    )
    store.commit({"counts": {}})
    examples = read_examples(StorageConfig(root=str(tmp_path)), "demo-arithmetic", "r1", len(rows))

    partly_pruned = kept_digits = 0
    for example in examples:
        ratios_seen: dict[float, set[int]] = {}
        for c, stored in zip(example.compressions, rows[int(example.key[1:])]["compressions"], strict=True):
            tail = example.compressions[0].answer_tail
            assert stored["text"].endswith(tail)
            original, pruned = example.cot[: len(example.cot) - len(tail)], stored["text"][: -len(tail)]
            reference = _diff_marks(original, pruned)
            marks = _piece_marks(c.reasoning)
            # a deletion diff of the stored texts: every token of the CoT once, the unmarked ones are
            # exactly the stored compression's ...
            assert [t for t, _ in marks] == _tokens(original)
            assert [t for t, dropped in marks if not dropped] == _tokens(pruned)
            # ... dropping the same words as difflib's word diff (which occurrence of a repeated word
            # went can differ: the marks follow pruning's nesting across ratios, difflib cannot know it)
            assert Counter(t for t, d in marks if d) == Counter(t for t, d in reference if d)
            ratios_seen[c.target_ratio] = {i for i, (_, dropped) in enumerate(marks) if not dropped}
            partly_pruned += sum(
                p.mark is Mark.DROPPED and not p.space and i and c.reasoning[i - 1].mark is Mark.KEPT
                for i, p in enumerate(c.reasoning)
            )
            kept_digits += sum(t.isdigit() and not dropped for t, dropped in marks)
            assert not any(t.isdigit() and dropped for t, dropped in marks)  # digits are forced
        kept = [ratios_seen[r] for r in sorted(ratios_seen, reverse=True)]
        assert all(low <= high for high, low in itertools.pairwise(kept))  # nested, as pruning is
    assert partly_pruned and kept_digits  # the rows hold what the old display got wrong

    # show prints the same marks; the report strikes through the same pieces
    printed = "\n".join(render_examples(examples, width=10_000))
    page = render_html({"dataset": "demo", "run_id": "r", "counts": {}}, None, examples=examples)
    for example in examples:
        for c in example.compressions:
            dropped = [p.text for p in c.reasoning if p.mark is Mark.DROPPED]
            marked = "".join(
                (" " if p.space else "") + (f"[-{p.text}-]" if p.mark is Mark.DROPPED else p.text)
                for p in c.reasoning
            )
            assert marked in printed
            column = "".join(
                html.escape(p.space)
                + (
                    f'<del class="dropped">{html.escape(p.text)}</del>'
                    if p.mark is Mark.DROPPED
                    else html.escape(p.text)
                )
                for p in c.reasoning
            )
            assert column in page and all(
                f'<del class="dropped">{html.escape(t)}</del>' in page for t in dropped
            )
