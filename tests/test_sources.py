"""Problem sources: the real reference sets, both GSM8K layouts, MATH boxed extraction, custom field maps,
parquet, S3 (moto), and a file of malformed records where every record must land in the errors."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from tests.fixture_data import read_jsonl, read_text
from tokenskip.schema import ERROR_SCHEMA, PROBLEM_SCHEMA, normalise_text, problem_id, to_table
from tokenskip.sources import (
    ERROR_REASONS,
    FieldMap,
    SourceConfig,
    iter_raw_rows,
    last_boxed,
    load_problems,
    normalise_rows,
    split_gsm8k_answer,
)

REAL_SETS = {
    # (path, kind, rows). AIME: 919 records; `wc -l` says 918 because the last line has no newline.
    "gsm8k_test": ("gsm8k/test.jsonl.gz", "gsm8k", 1319),
    "math500": ("math500/test.jsonl.gz", "math", 500),
    "aime": ("aime/aime_1983_2023.jsonl.gz", "aime", 919),
}


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def real_loads(fixture_data):
    """Each real set loaded twice (stability)."""
    loads = {}
    for name, (rel, kind, _) in REAL_SETS.items():
        config = SourceConfig(path=str(fixture_data / rel), kind=kind, split="test")
        loads[name] = (load_problems(config), load_problems(config))
    return loads


@pytest.mark.parametrize("name", sorted(REAL_SETS))
def test_real_set_loads_every_row_with_stable_unique_ids(real_loads, fixture_data, name):
    rel, kind, expected_rows = REAL_SETS[name]
    (problems, errors), (again, _) = real_loads[name]
    assert problems.schema == PROBLEM_SCHEMA and errors.schema == ERROR_SCHEMA
    assert (problems.num_rows, errors.num_rows) == (expected_rows, 0)
    ids = problems["id"].to_pylist()
    assert len(set(ids)) == len(ids)
    assert ids == again["id"].to_pylist()
    assert set(problems["source"].to_pylist()) == {kind} and set(problems["split"].to_pylist()) == {"test"}
    assert all(answer.strip() for answer in problems["answer"].to_pylist())
    # The gold answer is the set's own answer field, and nothing else of the input is lost.
    raw = read_jsonl(fixture_data / rel)
    answer_field = {"gsm8k": "answer", "math": "answer", "aime": "ref_answer"}[kind]
    assert problems["answer"].to_pylist() == [r[answer_field].strip() for r in raw]
    first_meta = json.loads(problems["metadata"][0].as_py())
    question_field = {"gsm8k": "question", "math": "problem", "aime": "query"}[kind]
    assert problems["question"][0].as_py() == raw[0][question_field]
    assert ids[0] == problem_id(kind, raw[0][question_field])
    if kind == "gsm8k":
        assert first_meta == {"solution": raw[0]["cot"], "source_id": raw[0]["id"]}
    if kind == "math":
        assert first_meta["solution"] == raw[0]["solution"] and first_meta["source_id"] == raw[0]["unique_id"]
        assert first_meta["level"] == raw[0]["level"]


def test_ids_differ_across_sources(real_loads, fixture_data):
    id_sets = [set(first[0]["id"].to_pylist()) for first, _ in real_loads.values()]
    assert sum(len(s) for s in id_sets) == len(set().union(*id_sets))
    # The same questions under another source name get other ids, the same name the same ids.
    path = str(fixture_data / "gsm8k/test.jsonl.gz")
    renamed, _ = load_problems(SourceConfig(path=path, kind="gsm8k", name="gsm8k_copy", limit=50))
    original = real_loads["gsm8k_test"][0][0]["id"].to_pylist()[:50]
    assert not set(renamed["id"].to_pylist()) & set(original)
    assert renamed["source"].to_pylist() == ["gsm8k_copy"] * 50


def test_original_gsm8k_hash_layout_matches_tokenskip_layout(fixture_data, tmp_path):
    """GSM8K with `answer` = "solution #### N": gold = N, solution kept in metadata."""
    samples = read_jsonl(fixture_data / "cot_samples/r1_distill_7b_gsm8k_test.golds.jsonl.gz")
    original = _write_jsonl(
        tmp_path / "gsm8k_original.jsonl",
        [{"question": s["problem"], "answer": s["gold_answer"]} for s in samples],
    )
    problems, errors = load_problems(SourceConfig(path=str(original), kind="gsm8k", split="test"))
    assert (problems.num_rows, errors.num_rows) == (1319, 0)
    reference = {
        normalise_text(r["question"]): r["answer"] for r in read_jsonl(fixture_data / "gsm8k/test.jsonl.gz")
    }
    for row, sample in zip(problems.to_pylist(), samples, strict=True):
        assert row["answer"] == reference[normalise_text(row["question"])]
        solution, _, number = sample["gold_answer"].rpartition("####")
        assert json.loads(row["metadata"])["solution"] == solution.rstrip()
        assert number.strip() == row["answer"]


def test_custom_field_map_with_hash_extraction_and_nested_fields(fixture_data, tmp_path):
    path = str(fixture_data / "cot_samples/r1_distill_7b_gsm8k_test.golds.jsonl.gz")
    fields = FieldMap(
        question="problem", answer="gold_answer", id="id", answer_extraction="gsm8k_hash", metadata=[]
    )
    problems, errors = load_problems(SourceConfig(path=path, field_map=fields, name="r1_gsm8k", limit=25))
    assert (problems.num_rows, errors.num_rows) == (25, 0)
    meta = json.loads(problems["metadata"][0].as_py())
    assert set(meta) == {"solution", "source_id"}  # metadata=[]: the long `response` is left out on purpose
    assert meta["source_id"] == "r1_distill_7b_gsm8k_test-0"

    nested = _write_jsonl(
        tmp_path / "nested.jsonl",
        [{"item": {"prompt": "What is 6 times 7?", "target": 42}, "tags": ["easy"], "uid": 7}],
    )
    fields = FieldMap(question="item.prompt", answer="item.target", id="uid")
    problems, errors = load_problems(SourceConfig(path=str(nested), field_map=fields))
    assert errors.num_rows == 0
    (row,) = problems.to_pylist()
    assert (row["question"], row["answer"], row["source"]) == ("What is 6 times 7?", "42", "custom")
    # metadata=None keeps every other top-level field, the parent of nested question/answer included.
    assert json.loads(row["metadata"]) == {
        "source_id": 7,
        "item": {"prompt": "What is 6 times 7?", "target": 42},
        "tags": ["easy"],
    }


def test_custom_kind_requires_field_map():
    with pytest.raises(ValidationError, match="field_map"):
        SourceConfig(path="x.jsonl", kind="custom")


def test_math_without_answer_field_extracts_last_boxed(fixture_data, tmp_path):
    rows = read_jsonl(fixture_data / "math500/test.jsonl.gz")
    stripped = _write_jsonl(
        tmp_path / "math.jsonl", [{k: v for k, v in r.items() if k != "answer"} for r in rows]
    )
    problems, errors = load_problems(SourceConfig(path=str(stripped), kind="math", split="test"))
    assert errors.num_rows == 0
    # MATH-500's answers are the last \boxed{} of its solutions: extraction must reproduce all 500.
    assert problems["answer"].to_pylist() == [r["answer"] for r in rows]


def test_last_boxed_and_hash_split_edge_cases():
    assert last_boxed(r"so $\boxed{\frac{1}{2}}$ or \boxed{\{1,2\}}.") == r"\{1,2\}"
    assert last_boxed(r"\boxed{a{b{c}}d} text") == "a{b{c}}d"
    assert last_boxed(r"answer: $\boxed 5$") == "5"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed(r"\boxed{never closed") is None
    assert last_boxed("no box here") is None
    assert split_gsm8k_answer("step\n#### 1,234") == ("step", "1,234")
    assert split_gsm8k_answer("a #### b #### -7") == ("a #### b", "-7")
    assert split_gsm8k_answer("18") is None


def test_number_answers_are_stringified_and_rows_map_one_to_one():
    config = SourceConfig(path="unused.jsonl", kind="gsm8k", split="train")
    rows = [
        {"question": "q int", "answer": 42},
        {"question": "q float", "answer": 2.5},
        {"question": "q whole float", "answer": 3.0},
        {"question": "q negative", "answer": -1},
        {"question": "q bool", "answer": True},
        {"question": 12, "answer": "1"},
    ]
    problems, errors = normalise_rows(rows, config)
    assert [p["answer"] for p in problems] == ["42", "2.5", "3", "-1"]
    assert [(e["error"], e["stage"]) for e in errors] == [("wrong_type", "sources")] * 2
    # The bool answer's problem key is computable, the int question's is not.
    assert errors[0]["key"] == problem_id("gsm8k", "q bool") and errors[1]["key"] is None
    assert pa.Table.from_pylist(problems, schema=PROBLEM_SCHEMA).num_rows == 4


def test_parquet_directory_and_limit(fixture_data, tmp_path):
    jsonl = fixture_data / "gsm8k/test.jsonl.gz"
    expected, _ = load_problems(SourceConfig(path=str(jsonl), kind="gsm8k", split="test"))
    rows = read_jsonl(jsonl)
    folder = tmp_path / "parts"
    folder.mkdir()
    # Two parquet parts, named so that sorted order is file order.
    pq.write_table(pa.Table.from_pylist(rows[:700]), folder / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[700:]), folder / "part-1.parquet")
    problems, errors = load_problems(SourceConfig(path=str(folder), kind="gsm8k", split="test"))
    assert errors.num_rows == 0
    assert problems.equals(expected)
    single, _ = load_problems(
        SourceConfig(path=str(folder / "part-1.parquet"), format="parquet", kind="gsm8k", limit=5)
    )
    assert single["id"].to_pylist() == expected["id"].to_pylist()[700:705]
    assert len(list(iter_raw_rows(SourceConfig(path=str(folder), kind="gsm8k", limit=3)))) == 3


def test_json_documents_original_math_layout_and_compression(fixture_data, tmp_path):
    """The original MATH release: one pretty-printed JSON file per problem, in subject folders, no answer."""
    rows = read_jsonl(fixture_data / "math500/test.jsonl.gz")[:30]
    for index, row in enumerate(rows):
        folder = tmp_path / "MATH" / "test" / row["type"].lower().replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        original = {"problem": row["problem"], "level": f"Level {row['level']}", "type": row["type"]}
        (folder / f"{index:03d}.json").write_text(
            json.dumps({**original, "solution": row["solution"]}, indent=4)
        )
    problems, errors = load_problems(SourceConfig(path=str(tmp_path / "MATH"), kind="math", split="test"))
    assert (problems.num_rows, errors.num_rows) == (30, 0)
    assert sorted(problems["answer"].to_pylist()) == sorted(r["answer"] for r in rows)

    # A JSON array file; a ".json" file that is really JSON lines; gzip-compressed JSON lines.
    gsm = read_jsonl(fixture_data / "gsm8k/test.jsonl.gz")[:20]
    expected, _ = load_problems(
        SourceConfig(path=str(fixture_data / "gsm8k/test.jsonl.gz"), kind="gsm8k", limit=20)
    )
    (tmp_path / "array.json").write_text(json.dumps(gsm))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in gsm))
    with gzip.open(tmp_path / "lines.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in gsm))
    for name in ("array.json", "lines.json", "lines.jsonl.gz"):
        problems, errors = load_problems(SourceConfig(path=str(tmp_path / name), kind="gsm8k"))
        assert errors.num_rows == 0 and problems.equals(expected), name
    # Asked for one JSON document explicitly, a JSON-lines file is one invalid document, not a crash.
    problems, errors = load_problems(
        SourceConfig(path=str(tmp_path / "lines.json"), format="json", kind="gsm8k")
    )
    assert (problems.num_rows, errors["error"].to_pylist()) == (0, ["invalid_json"])
    assert json.loads(errors["raw"][0].as_py()) == (tmp_path / "lines.json").read_text()


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no input files"):
        load_problems(SourceConfig(path=str(tmp_path / "nope.jsonl"), kind="gsm8k"))


def test_load_from_s3(s3_bucket, fixture_data):
    import boto3

    endpoint, bucket = s3_bucket
    local = fixture_data / "math500/test.jsonl.gz"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").put_object(
        Bucket=bucket, Key="sets/math500.jsonl", Body=read_text(local).encode("utf-8")
    )
    expected, _ = load_problems(SourceConfig(path=str(local), kind="math", split="test"))
    for options in ({"client_kwargs": {"endpoint_url": endpoint}}, {"endpoint_url": endpoint}):
        config = SourceConfig(
            path=f"s3://{bucket}/sets/math500.jsonl", kind="math", split="test", storage_options=options
        )
        problems, errors = load_problems(config)
        assert errors.num_rows == 0
        assert problems.equals(expected)


# ---------------------------------------------------------------------------------------------------------
# Malformed input: every bad record becomes an error with the expected reason, nothing is lost.


def _bad_input_lines() -> list[tuple[bytes, str | None]]:
    """(line bytes, expected error reason or None for a valid problem)."""
    cases: list[tuple[object, str | None]] = []

    def obj(row, reason):
        cases.append((json.dumps(row).encode(), reason))
        if isinstance(row, dict) and reason is not None:
            # The same defect beside an unrelated extra field must fail the same way.
            cases.append((json.dumps({**row, "origin": "variant"}).encode(), reason))

    def raw(line: bytes, reason):
        cases.append((line, reason))

    ok = {"question": "A valid question?", "answer": "1", "cot": "because"}
    for i, blank in enumerate(["", " ", "   ", "\n", "\t\n ", "\u3000", "\u00a0\u2003", "\r\n"]):
        obj({**ok, "question": blank, "answer": str(i)}, "empty_question")
    for i in range(6):
        obj({"answer": str(i), "cot": "no question"}, "missing_question")
        obj({"question": None, "answer": str(i)}, "missing_question")
    for i in range(6):
        obj({"question": f"no answer {i}?"}, "missing_answer")
        obj({"question": f"null answer {i}?", "answer": None}, "missing_answer")
    raw(b'{"question": "NaN answer?", "answer": NaN}', "missing_answer")
    for value in ["", "   ", "\n", "#### ", "solution text\n####"]:
        obj({"question": f"empty answer {value!r}?", "answer": value}, "empty_answer")
    for value in [
        ["a", "list"],
        [],
        {"nested": {"dict": 1}},
        {},
        7,
        7.5,
        True,
        False,
        [[1], [2]],
        {"q": ["x"]},
    ]:
        obj({"question": value, "answer": "1"}, "wrong_type")
    raw(b'{"question": Infinity, "answer": "1"}', "wrong_type")
    for i, value in enumerate([["1"], {"value": 1}, True, False, [], {}]):
        obj({"question": f"bad answer type {i}?", "answer": value}, "wrong_type")
    raw(b'{"question": "infinite answer?", "answer": Infinity}', "wrong_type")
    raw(b'{"question": "minus infinite answer?", "answer": -Infinity}', "wrong_type")
    obj({"question": "x" * 1_000_000, "answer": "1"}, "question_too_long")
    obj({"question": "y" * 20_001, "answer": "1"}, "question_too_long")
    obj({"question": "z" * 20_000, "answer": "1"}, None)  # exactly at the limit: fine
    for bad in [b"\xff\xfe", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\x80abc", b"\xf8\x88\x80\x80\x80"]:
        raw(b'{"question": "caf' + bad + b'?", "answer": "1"}', "invalid_unicode")
    raw(b'{"question": "ok?", "answer": "1\xff"}', "invalid_unicode")
    raw(b'{"question": "lone \\ud800 surrogate?", "answer": "1"}', "invalid_unicode")
    raw(b'{"question": "fine?", "answer": "\\udfff"}', "invalid_unicode")
    raw(b'{"question": "fine?", "answer": "1", "cot": "\\ud834 lost half"}', "invalid_unicode")
    for line in [
        b'{"question": "truncated',
        b'{"question": "a", "answer": "1",}',
        b"{'question': 'single quotes', 'answer': '1'}",
        b"question: yaml?",
        b"{",
        b"}",
        b'{"question": "a" "answer": "1"}',
        b'{"question": "a", "answer": 01}',
        b'{"question": "a", "answer": "1"} trailing',
        b'{"question": "a\x01control", "answer": "1"}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"question": "a", "answer": tru}',
        b"undefined",
        b'"unterminated',
    ]:
        raw(line, "invalid_json")
    for value in [[1, 2], 42, "just a string", None, True, [{"question": "in a list", "answer": "1"}]]:
        obj(value, "not_an_object")
    # Valid rows in between, including unicode and numeric answers.
    for i in range(10):
        obj(
            {"question": f"Valid problem number {i}: what is {i} + {i}?", "answer": 2 * i, "cot": "add"}, None
        )
    obj({"question": "Ünïcödé ✓ question — 数学?", "answer": "√2"}, None)
    obj({"question": "Original layout?", "answer": "step one\n#### 1,000"}, None)
    return cases


def test_malformed_records_all_become_errors_with_their_reason(tmp_path):
    cases = _bad_input_lines()
    expected_errors = [reason for _, reason in cases if reason is not None]
    assert len(expected_errors) >= 100
    # Blank lines between records are not records: they must not count either way.
    body = b"\n".join(line + (b"\n\n" if i % 17 == 0 else b"") for i, (line, _) in enumerate(cases)) + b"\n"
    path = tmp_path / "bad.jsonl"
    path.write_bytes(body)

    problems, errors = load_problems(SourceConfig(path=str(path), kind="gsm8k", split="train"))
    assert problems.num_rows + errors.num_rows == len(cases)
    assert errors.num_rows == len(expected_errors)
    assert set(errors["error"].to_pylist()) <= set(ERROR_REASONS)
    assert set(errors["stage"].to_pylist()) == {"sources"}

    # Map every error back to its input line through "path:line" in the detail.
    physical = body.split(b"\n")
    by_line = {}
    for error in errors.to_pylist():
        match = re.match(rf"{re.escape(str(path))}:(\d+): ", error["error_detail"])
        assert match, error["error_detail"]
        by_line[int(match.group(1))] = error
    seen_reasons = []
    error_of_case = {}
    for number, line in enumerate(physical, start=1):
        if not line.strip():
            continue
        expected = cases[len(seen_reasons)][1]
        seen_reasons.append(expected)
        if expected is None:
            assert number not in by_line
            continue
        error = error_of_case[len(seen_reasons) - 1] = by_line[number]
        assert error["error"] == expected, (expected, error["error_detail"], line[:80])
        # Nothing dropped: `raw` gives back the input, byte for byte or value for value.
        restored = json.loads(error["raw"])
        if expected in ("invalid_json",) or (expected == "invalid_unicode" and isinstance(restored, str)):
            assert restored.encode("utf-8", "surrogateescape") == line
        else:
            assert restored == json.loads(line.decode())
    assert len(seen_reasons) == len(cases)

    too_long = next(i for i, (_, reason) in enumerate(cases) if reason == "question_too_long")
    assert json.loads(error_of_case[too_long]["raw"])["question"] == "x" * 1_000_000
    valid = {row["question"]: row["answer"] for row in problems.to_pylist()}
    assert valid["Valid problem number 3: what is 3 + 3?"] == "6"
    assert valid["Ünïcödé ✓ question — 数学?"] == "√2"
    assert valid["Original layout?"] == "1,000"
    assert len(valid["z" * 20_000]) == 1


@pytest.mark.slow
def test_normalise_rows_as_a_ray_data_stage(fixture_data):
    """The pipeline reads files with Ray Data and normalises in map_batches: same problems as load_problems."""
    import ray

    config = SourceConfig(path=str(fixture_data / "math500/test.jsonl.gz"), kind="math", split="test")

    def normalise_batch(batch: pa.Table) -> pa.Table:
        problems, errors = normalise_rows(batch.to_pylist(), config)
        assert not errors
        return to_table(problems, PROBLEM_SCHEMA)

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        dataset = ray.data.read_json(config.path).map_batches(normalise_batch, batch_format="pyarrow")
        problems = pa.concat_tables(ray.get(dataset.to_arrow_refs()))
    finally:
        ray.shutdown()
    expected, _ = load_problems(config)
    assert problems.sort_by("id").equals(expected.sort_by("id"))
