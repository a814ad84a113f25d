"""Deduplication and decontamination against the real eval sets (GSM8K test, MATH-500, AIME)."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys

import pyarrow as pa
import pytest

from tokenskip.dedup import Decontaminator, DedupConfig, dedup_and_decontaminate, question_key, words
from tokenskip.schema import PROBLEM_SCHEMA, REJECT_SCHEMA, problem_id
from tokenskip.sources import SourceConfig, load_problems


def _problems(rows: list[tuple[str, str, str]]) -> pa.Table:
    """(source, question, answer) -> PROBLEM_SCHEMA table."""
    return pa.Table.from_pylist(
        [
            {
                "id": problem_id(s, q),
                "question": q,
                "answer": a,
                "source": s,
                "split": "train",
                "metadata": "{}",
            }
            for s, q, a in rows
        ],
        schema=PROBLEM_SCHEMA,
    )


@pytest.fixture(scope="module")
def eval_config(fixture_data) -> DedupConfig:
    return DedupConfig(
        eval_sets=[
            SourceConfig(path=str(fixture_data / "gsm8k/test.jsonl.gz"), kind="gsm8k", split="test"),
            SourceConfig(path=str(fixture_data / "math500/test.jsonl.gz"), kind="math", split="test"),
            SourceConfig(path=str(fixture_data / "aime/aime_1983_2023.jsonl.gz"), kind="aime", split="test"),
        ]
    )


@pytest.fixture(scope="module")
def decontaminator(eval_config) -> Decontaminator:
    return Decontaminator.from_config(eval_config)


@pytest.fixture(scope="module")
def gsm8k_test(eval_config) -> pa.Table:
    return load_problems(eval_config.eval_sets[0])[0]


@pytest.fixture(scope="module")
def gsm8k_train(fixture_data) -> pa.Table:
    return load_problems(SourceConfig(path=str(fixture_data / "gsm8k/train.jsonl.gz"), kind="gsm8k"))[0]


def test_index_covers_every_eval_problem(decontaminator):
    assert len(decontaminator.docs) == 1319 + 500 + 919
    assert {name for name, _ in decontaminator.docs} == {"gsm8k:test", "math:test", "aime:test"}
    assert decontaminator.size > 100_000  # distinct 13-word n-grams


def test_exact_duplicates_after_whitespace_and_case_changes():
    question = "Tom has 3 apples and buys 5 more. How many apples does he have now?"
    table = _problems(
        [
            ("gsm8k", question, "8"),
            ("gsm8k", "  tom HAS 3 apples and buys 5 more.\n\nHow many   apples does he have NOW?  ", "8"),
            ("other_set", question.upper(), "8"),  # another source: another id, still the same problem
            ("gsm8k", "Tom has 3 apples and buys 6 more. How many apples does he have now?", "9"),
        ]
    )
    kept, rejects = dedup_and_decontaminate(table, DedupConfig())
    first = table["id"][0].as_py()
    assert kept["id"].to_pylist() == [first, table["id"][3].as_py()]
    assert rejects.schema == REJECT_SCHEMA
    assert rejects["reason"].to_pylist() == ["duplicate", "duplicate"]
    assert rejects["problem_id"].to_pylist() == [table["id"][1].as_py(), table["id"][2].as_py()]
    assert all(first in detail for detail in rejects["detail"].to_pylist())
    assert set(rejects["stage"].to_pylist()) == {"dedup"} and rejects["answer"].to_pylist() == ["8", "8"]
    assert kept.schema == PROBLEM_SCHEMA


def test_seen_ids_deduplicate_across_batches():
    seen: set[str] = set()
    batch_1 = _problems([("gsm8k", "What is the sum of 17 and 25 when doubled?", "84")])
    batch_2 = _problems(
        [("custom", "what is the sum of 17 and 25 when doubled?", "84"), ("gsm8k", "New one?", "1")]
    )
    kept_1, rejects_1 = dedup_and_decontaminate(batch_1, DedupConfig(), seen)
    assert (kept_1.num_rows, rejects_1.num_rows) == (1, 0)
    assert seen == {batch_1["id"][0].as_py(), question_key("What is the sum of 17 and 25 when doubled?")}
    kept_2, rejects_2 = dedup_and_decontaminate(batch_2, DedupConfig(), seen)
    assert kept_2["question"].to_pylist() == ["New one?"]
    assert rejects_2["reason"].to_pylist() == ["duplicate"] and "seen_ids" in rejects_2["detail"][0].as_py()
    # A rerun of an already processed problem (its id in seen_ids) is a duplicate too.
    _, rerun = dedup_and_decontaminate(batch_1, DedupConfig(), {batch_1["id"][0].as_py()})
    assert rerun["reason"].to_pylist() == ["duplicate"]


def test_lightly_edited_gsm8k_test_question_is_contaminated(decontaminator, eval_config, gsm8k_test):
    original_id, original = gsm8k_test["id"][0].as_py(), gsm8k_test["question"][0].as_py()
    assert original.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    edited = "Question: " + original.replace("16 eggs", "18 eggs").replace("three", "3")
    table = _problems([("scraped", edited, "24"), ("scraped", "A brand new question about ducks?", "1")])
    kept, rejects = dedup_and_decontaminate(table, eval_config, decontaminator=decontaminator)
    assert kept["question"].to_pylist() == ["A brand new question about ducks?"]
    (reject,) = rejects.to_pylist()
    assert reject["reason"] == "contaminated" and reject["problem_id"] == table["id"][0].as_py()
    assert "gsm8k:test" in reject["detail"] and original_id in reject["detail"]
    found = decontaminator.check(edited)
    assert found is not None and 0.5 <= found.overlap < 1.0
    assert f"{found.overlap:.2f}" in reject["detail"]


def test_math500_and_aime_copies_are_contaminated(decontaminator, eval_config, fixture_data):
    full_math = load_problems(SourceConfig(path=str(fixture_data / "math500/test.jsonl.gz"), kind="math"))[0]
    math = full_math.slice(0, 40)
    aime = load_problems(
        SourceConfig(path=str(fixture_data / "aime/aime_1983_2023.jsonl.gz"), kind="aime", limit=40)
    )[0]
    # Loaded under another name (as a scraped training set would be): different ids, same questions.
    copies = _problems(
        [("scraped", q, "x") for q in math["question"].to_pylist() + aime["question"].to_pylist()]
    )
    kept, rejects = dedup_and_decontaminate(copies, eval_config, decontaminator=decontaminator)
    assert kept.num_rows == 0 and rejects.num_rows == 80
    assert set(rejects["reason"].to_pylist()) == {"contaminated"}
    # Each names an eval problem with the same words: its own, or (AIME 1983 #2 is also in MATH-500) the
    # identical problem indexed first.
    eval_questions = dict(zip(math["id"].to_pylist(), math["question"].to_pylist(), strict=True))
    eval_questions.update(zip(aime["id"].to_pylist(), aime["question"].to_pylist(), strict=True))
    eval_questions.update(zip(full_math["id"].to_pylist(), full_math["question"].to_pylist(), strict=True))
    for question, detail in zip(copies["question"].to_pylist(), rejects["detail"].to_pylist(), strict=True):
        named = re.search(r"eval problem ([0-9a-f]{32})", detail).group(1)
        assert words(eval_questions[named]) == words(question), detail
    assert sum("aime:test" in d for d in rejects["detail"].to_pylist()) == 39


def test_gsm8k_train_is_kept_and_flag_rate_is_measured(decontaminator, eval_config, gsm8k_train):
    first_500 = gsm8k_train.slice(0, 500)
    kept, rejects = dedup_and_decontaminate(first_500, eval_config, decontaminator=decontaminator)
    print(f"\nfirst 500 GSM8K train vs GSM8K test + MATH-500 + AIME: {rejects.num_rows} flagged")
    assert (kept.num_rows, rejects.num_rows) == (500, 0)
    assert kept.equals(first_500)


def test_threshold_decides_on_the_measured_overlap(decontaminator, eval_config, gsm8k_train):
    """The full train set has two templated near-copies of one test problem (overlap 7/13 = 0.54);
    tests/data keeps both (with the first 500 train problems), and no other train problem is flagged."""
    kept, rejects = dedup_and_decontaminate(gsm8k_train, eval_config, decontaminator=decontaminator)
    assert kept.num_rows + rejects.num_rows == gsm8k_train.num_rows
    assert rejects["reason"].to_pylist() == ["contaminated", "contaminated"]
    assert all("overlap 0.54 (7/13" in d for d in rejects["detail"].to_pylist())
    strict = eval_config.model_copy(update={"overlap_threshold": 0.6})
    flagged = gsm8k_train.filter(pa.compute.is_in(gsm8k_train["id"], value_set=rejects["problem_id"]))
    kept_strict, rejects_strict = dedup_and_decontaminate(flagged, strict, decontaminator=decontaminator)
    assert (kept_strict.num_rows, rejects_strict.num_rows) == (2, 0)


def test_short_text_rules(eval_config):
    table = _problems(
        [
            ("x", "Simplify $\\sqrt{242}$.", "11\\sqrt2"),  # a whole MATH-500 problem of 3 words
            ("x", "How many positive whole-number divisors", "1"),  # the start of a short MATH-500 problem
            ("x", "Simplify.", "1"),  # generic: inside many eval problems
            ("x", "Purple elephants dance quietly.", "1"),  # in none
        ]
    )
    ids = table["id"].to_pylist()
    flagged = {}
    for rule in ("exact", "contained", "keep"):
        config = eval_config.model_copy(update={"short_text_rule": rule})
        kept, rejects = dedup_and_decontaminate(table, config)  # builds (and caches) one index per rule
        assert kept.num_rows + rejects.num_rows == 4
        flagged[rule] = rejects["problem_id"].to_pylist()
    assert flagged == {"exact": ids[:1], "contained": ids[:3], "keep": []}


def test_index_is_stable_across_processes(decontaminator, gsm8k_test, tmp_path, eval_config):
    """An index built elsewhere (another hash seed, as on a Ray worker) matches here."""
    script = (
        "import pickle, sys\n"
        "from tokenskip.dedup import Decontaminator\n"
        "from tokenskip.sources import SourceConfig, load_problems\n"
        f"problems, _ = load_problems(SourceConfig(path={eval_config.eval_sets[0].path!r}, kind='gsm8k', split='test'))\n"
        "index = Decontaminator()\n"
        "index.add('gsm8k:test', problems)\n"
        f"open({str(tmp_path / 'index.pkl')!r}, 'wb').write(pickle.dumps(index))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env)
    shipped = pickle.loads((tmp_path / "index.pkl").read_bytes())
    question = gsm8k_test["question"][5].as_py()
    edited = question.replace(".", " .", 1) + " Explain."
    found = shipped.check(edited)
    assert found is not None and found.eval_problem_id == gsm8k_test["id"][5].as_py()
    assert found == decontaminator.check(edited)


def test_disabled_keeps_everything_and_bad_tables_fail_clearly():
    table = _problems([("a", "Same?", "1"), ("a", "same?", "1")])
    kept, rejects = dedup_and_decontaminate(table, DedupConfig(enabled=False))
    assert kept.equals(table) and rejects.num_rows == 0 and rejects.schema == REJECT_SCHEMA
    with pytest.raises(ValueError, match="lacks columns"):
        dedup_and_decontaminate(table.drop_columns(["question"]), DedupConfig())
    nulls = pa.table({"id": ["x"], "question": pa.array([None], pa.string()), "answer": ["1"]})
    with pytest.raises(ValueError, match="null id or question"):
        dedup_and_decontaminate(nulls, DedupConfig())


def test_config_round_trips_through_json(eval_config):
    again = DedupConfig.model_validate(json.loads(eval_config.model_dump_json()))
    assert again == eval_config and again.ngram_size == 13 and again.overlap_threshold == 0.5
