"""The stages called directly on Arrow tables, without Ray: their declared fields, the grade stage's
n-rows-per-problem invariant, compression failures as error rows, and the run's tables and counts
(split_outcomes, run_statistics) built from what the stages produced.

The rows flow as in the pipeline: a hand-made generation batch (what vLLM would return) -> the real
grade stage (math-verify) -> the real compress stage (selfinfo scorer on the tiny local model) ->
the write stage into a local run store. The generation stage itself needs a vLLM engine (slow test).
"""

from __future__ import annotations

import asyncio

import pyarrow as pa
import pytest

from tokenskip import schema
from tokenskip.compress import CompressConfig
from tokenskip.fallback import batch_then_rows
from tokenskip.grading import GradingConfig
from tokenskip.pipeline import INPUT_SHARD, Plan, run_statistics
from tokenskip.schema import COMPRESSED_SCHEMA, ERROR_SCHEMA, PROBLEM_SCHEMA, REJECT_SCHEMA
from tokenskip.scoring import ScorerConfig
from tokenskip.stages import compress, generate, grade, write
from tokenskip.stages.contract import RowCountMismatch, StageContractError, check_fields
from tokenskip.storage import RunStore, ShardRecord, StorageConfig, read_table
from tokenskip.summary import ShardSummary

N = 2
SHARD = "s-test"
DATASET = "stages"
CORRECT = "First add 2 and 3 to get 5, then check the sum once more to be sure. The answer is \\boxed{5}."
OTHER_CORRECT = "Adding one and four gives five; counting up from four confirms it. The answer is \\boxed{5}."
WRONG = "First add 2 and 3 to get 6, which looks right at a glance. The answer is \\boxed{6}."
# The test's scorer raises on any batch holding this text (as a real one does on a text it chokes on).
POISON = "BOOM the scorer cannot read this step, yet 1 and 4 make 5. The answer is \\boxed{5}."
TOO_LONG_DETAIL = "prompt has 300 tokens; the engine's max_model_len is 128"


def _problem(pid: str, question: str, answer: str, samples: list[str], error: str | None = None) -> dict:
    return {
        "id": pid,
        "question": question,
        "answer": answer,
        "source": "test",
        "split": "test",
        "metadata": None,
        "shard_id": SHARD,
        "samples": [{"text": t, "tokens": len(t.split()), "finish_reason": "stop"} for t in samples],
        "prompt_tokens": 12,
        "stage": "generate" if error else None,
        "error": error,
        "error_detail": TOO_LONG_DETAIL if error else None,
        "gen_seconds": 0.5,
        "gen_engine_steps": 4.0,
        "gen_engine_running_seqs": 8.0,
        "gen_engine_max_num_seqs": 8,
    }


GENERATE_INPUT = PROBLEM_SCHEMA.append(pa.field("shard_id", pa.string()))


def _generated(problems: list[dict]) -> pa.Table:
    """A batch as the generation stage emits it (its declared output for problem rows + shard id)."""
    return pa.Table.from_pylist(problems, schema=generate.output_schema(GENERATE_INPUT))


PROBLEMS = [
    _problem("p1", "What is 2 + 3?", "5", [CORRECT, WRONG]),
    _problem("p2", "What is 1 + 4?", "5", [POISON, OTHER_CORRECT]),
    _problem("p3", "What is 9 + 9? " * 40, "18", [], error="prompt_too_long"),
]


@pytest.fixture(scope="module")
def grader() -> grade.GradeSelectStage:
    return grade.GradeSelectStage(GradingConfig(), "all-correct", "tiny", "gen-hash", n_samples=N)


@pytest.fixture(scope="module")
def graded(grader) -> pa.Table:
    return grader(_generated(PROBLEMS))


@pytest.fixture(scope="module")
def compressor_stage(tiny_causal_lm) -> compress.CompressKeptStage:
    config = CompressConfig(
        ratios=[0.9, 0.5],
        scorer=ScorerConfig(kind="selfinfo", model=str(tiny_causal_lm), batch_size=4, max_length=128),
    )
    # Chunks of 2 kept rows: the poisoned row shares its chunk with a good one.
    return compress.CompressKeptStage(config, cpus=1, omp_threads=1, batch_size=2)


@pytest.fixture(scope="module")
def compressed(compressor_stage, graded) -> tuple[pa.Table, list[int]]:
    """The compress stage's output for ``graded``, its scorer failing on POISON; and the sizes of
    the scorer calls it made."""
    scorer = compressor_stage.compressor.scorer
    real_prune, calls = scorer.prune, []

    def prune(texts, ratios):
        calls.append(len(texts))
        if any("BOOM" in t for t in texts):
            raise RuntimeError("scorer exploded on this text")
        return real_prune(texts, ratios)

    scorer.prune = prune
    try:
        return compressor_stage(graded), calls
    finally:
        scorer.prune = real_prune


def _by_key(table: pa.Table) -> dict[tuple[str, int], dict]:
    return {(r["problem_id"], r["sample_index"]): r for r in table.to_pylist()}


# -------------------------------------------------------------------------------------------------
# The fallback and the field contract


def test_batch_then_rows_retries_alone_and_turns_a_failing_row_into_its_error():
    calls = []

    def square(items: list[int]) -> list[int]:
        calls.append(list(items))
        if 3 in items:
            raise ValueError("three is bad")
        return [i * i for i in items]

    assert batch_then_rows(square, [1, 2], lambda i, e: None, what="squaring") == [1, 4]
    assert calls == [[1, 2]]  # a batch that works is called once
    calls.clear()
    out = batch_then_rows(square, [1, 3, 2], lambda i, e: f"error {i}: {e}", what="squaring")
    assert out == [1, "error 3: three is bad", 4]
    assert calls == [[1, 3, 2], [1], [3], [2]]
    assert batch_then_rows(square, [], lambda i, e: None, what="squaring") == []
    assert calls == [[1, 3, 2], [1], [3], [2]]  # nothing to do: no call
    with pytest.raises(RuntimeError, match="returned 1 results for 2 inputs"):
        batch_then_rows(lambda items: [0], [1, 2], lambda i, e: None, what="counting")


def test_check_fields_names_missing_and_mistyped_fields():
    fields = [pa.field("question", pa.string()), pa.field("n", pa.int64())]
    check_fields(
        pa.schema([("n", pa.int64()), ("question", pa.string()), ("extra", pa.bool_())]), fields, "x"
    )
    with pytest.raises(
        StageContractError, match=r"x stage: .*'question' is missing; 'n' is int32, expected int64"
    ):
        check_fields(pa.schema([("n", pa.int32())]), fields, "x")


# -------------------------------------------------------------------------------------------------
# Grade


def test_grade_emits_its_declared_schema_and_n_rows_per_problem(graded):
    assert graded.schema == grade.OUTPUT_SCHEMA
    assert graded.num_rows == len(PROBLEMS) * N
    rows = _by_key(graded)
    assert set(rows) == {(p["id"], i) for p in PROBLEMS for i in range(N)}
    assert rows["p1", 0]["status"] == "kept" and rows["p1", 0]["verdict"] == "correct"
    assert (rows["p1", 1]["status"], rows["p1", 1]["reason"]) == ("reject", "incorrect")
    assert rows["p2", 0]["status"] == rows["p2", 1]["status"] == "kept"  # all-correct keeps both
    for i in range(N):  # the problem without samples: one error row per expected sample
        assert (rows["p3", i]["status"], rows["p3", i]["error"]) == ("error", "prompt_too_long")
        assert rows["p3", i]["error_detail"] == TOO_LONG_DETAIL and rows["p3", i]["cot"] is None
    assert len({r["key"] for r in rows.values()}) == len(rows)


def test_grade_refuses_a_problem_missing_a_sample_row(grader):
    short = _problem("p-short", "What is 2 + 3?", "5", [CORRECT])  # 1 sample, n = 2
    with pytest.raises(RowCountMismatch, match=r"problem 'p-short' .* has 1 samples, expected n=2"):
        grader(_generated([PROBLEMS[0], short]))
    too_many = _problem("p-long", "What is 2 + 3?", "5", [CORRECT, CORRECT, WRONG])
    with pytest.raises(RowCountMismatch, match="has 3 samples, expected n=2"):
        grader(_generated([too_many]))


def test_grade_refuses_a_batch_without_its_input_fields(grader):
    batch = _generated(PROBLEMS[:1])
    with pytest.raises(StageContractError, match="grade stage: .*'shard_id' is missing"):
        grader(batch.drop_columns(["shard_id"]))
    with pytest.raises(StageContractError, match="'error' is missing"):
        grader(batch.drop_columns(["error"]))


# -------------------------------------------------------------------------------------------------
# Compress


def test_compress_emits_its_declared_schema_and_compresses_only_kept_rows(compressed, graded):
    out, _ = compressed
    assert out.schema == compress.OUTPUT_SCHEMA
    assert out.column("key").to_pylist() == graded.column("key").to_pylist()  # same rows, same order
    rows = _by_key(out)
    for key in (("p1", 0), ("p2", 1)):
        row = rows[key]
        assert row["status"] == "kept" and row["reason"] is None
        assert [c["target_ratio"] for c in row["compressions"]] == [0.9, 0.5]
        assert all(c["text"].endswith(row["answer_tail"]) for c in row["compressions"])  # tail kept
        assert row["answer_tail"] and row["original_tokens"] > 0 and row["compress_seconds"] > 0
    for key in (("p1", 1), ("p3", 0), ("p3", 1)):  # not kept: passed through, nothing added
        assert rows[key]["status"] == _by_key(graded)[key]["status"]
        assert rows[key]["compressions"] is None and rows[key]["compress_seconds"] is None


def test_a_row_whose_compression_fails_becomes_an_error_row(compressed):
    out, calls = compressed
    failed = _by_key(out)["p2", 0]
    assert (failed["status"], failed["error"]) == ("error", "scoring_error")
    assert "RuntimeError: scorer exploded on this text" in failed["error_detail"]
    assert failed["compressions"] is None and failed["compress_seconds"] is not None
    assert failed["cot"] == POISON and failed["verdict"] == "correct"  # the sample is kept whole
    # One retry layer: the poisoned chunk of 2 once, then each of its rows alone; the next chunk once.
    assert calls == [2, 1, 1, 1]


def test_compress_refuses_a_batch_without_its_input_fields(compressor_stage, graded):
    with pytest.raises(StageContractError, match="compress stage: .*'status' is missing"):
        compressor_stage(graded.drop_columns(["status"]))


def test_compress_error_rows_and_empty_cots_land_in_the_errors_table(compressor_stage, grader):
    # A kept sample whose CoT is only whitespace: the compressor refuses it (empty_cot); the error
    # is the compress stage's although the row has no usable CoT.
    graded = grader(_generated([_problem("p4", "What is 2 + 3?", "5", [CORRECT, WRONG])]))
    blank = graded.set_column(
        graded.schema.get_field_index("cot"), "cot", pa.array(["   ", graded["cot"][1].as_py()])
    )
    tables = write.split_outcomes(compressor_stage(blank))
    assert tables["data"].num_rows == 0
    assert tables["errors"].select(["problem_id", "stage", "error"]).to_pylist() == [
        {"problem_id": "p4", "stage": "compress", "error": "empty_cot"}
    ]


# -------------------------------------------------------------------------------------------------
# Write: the run's three tables, the shard on disk, the run's counts


def test_split_outcomes_makes_the_runs_three_tables(compressed):
    out, _ = compressed
    tables = write.split_outcomes(out)
    assert tables["data"].schema.equals(COMPRESSED_SCHEMA)
    assert tables["rejects"].schema.equals(REJECT_SCHEMA) and tables["errors"].schema.equals(ERROR_SCHEMA)
    data = tables["data"].to_pylist()
    assert sorted((r["problem_id"], r["sample_index"]) for r in data) == [("p1", 0), ("p2", 1)]
    assert all(r["compressions"] and r["cot"] for r in data)
    assert tables["rejects"].select(["problem_id", "stage", "reason", "cot"]).to_pylist() == [
        {"problem_id": "p1", "stage": "grade", "reason": "incorrect", "cot": WRONG}
    ]
    errors = sorted(tables["errors"].to_pylist(), key=lambda r: r["key"])
    assert sorted((r["problem_id"], r["stage"], r["error"]) for r in errors) == [
        ("p2", "compress", "scoring_error"),
        ("p3", "generate", "prompt_too_long"),
        ("p3", "generate", "prompt_too_long"),
    ]
    assert all(r["error_detail"] and r["raw"] and r["key"] for r in errors)
    with pytest.raises(ValueError, match="unknown status 'lost'"):
        write.split_outcomes(
            out.set_column(out.schema.get_field_index("status"), "status", pa.array(["lost"] * out.num_rows))
        )


def _input_tables() -> dict[str, pa.Table]:
    """The input shard: one load error and one duplicate, as make_plan hands them to the run."""
    errors = pa.Table.from_pylist(
        [{"stage": "sources", "error": "invalid_json", "error_detail": "line 3", "source": "x.jsonl", "raw": "{"}],
        schema=ERROR_SCHEMA,
    )
    rejects = pa.Table.from_pylist(
        [{"key": "p9", "problem_id": "p9", "stage": "dedup", "reason": "duplicate", "detail": "same as p1"}],
        schema=REJECT_SCHEMA,
    )
    return {"rejects": rejects, "errors": errors}


def test_write_stage_writes_the_shard_and_run_statistics_count_it(compressed, tmp_path):
    out, _ = compressed
    store = RunStore(StorageConfig(root=str(tmp_path)), DATASET, "r1")
    inputs = _input_tables()
    store.write_shard(INPUT_SHARD, inputs, summary=ShardSummary.from_tables(inputs))

    results = write.write_complete_shards(out, store=store, expected_rows={SHARD: len(PROBLEMS) * N})
    assert results.schema == write.OUTPUT_SCHEMA
    (result,) = results.to_pylist()
    store.commit_shard(ShardRecord.model_validate_json(result["record"]))
    with pytest.raises(StageContractError, match="write stage: .*'compress_seconds' is missing"):
        write.write_complete_shards(out.drop_columns(["compress_seconds"]), store=store, expected_rows={})

    plan = Plan(
        config=None,  # run_statistics reads the plan's input figures only
        run_id="r1",
        input_rows=len(PROBLEMS) + 2,
        load_errors=inputs["errors"],
        dedup_rejects=inputs["rejects"],
        problems=pa.table({"id": [p["id"] for p in PROBLEMS]}),
        shards=[],
    )
    counts = run_statistics(plan, store)
    assert counts.input_rows == 5 and counts.load_errors == 1
    assert counts.dedup == {"duplicate": 1, "contaminated": 0}
    assert counts.problems_to_generate == 3
    assert counts.samples == len(PROBLEMS) * N  # every (problem, sample) key counted once
    assert (counts.kept_samples, counts.kept_problems, counts.graded_samples) == (2, 2, 3)
    assert counts.rejects_by_reason == {"incorrect": 1}
    assert counts.errors_by_reason == {"invalid_json": 1, "prompt_too_long": 2, "scoring_error": 1}
    assert counts.acceptance_rate == round(2 / 3, 4)
    assert set(counts.achieved_ratio) == {"0.9", "0.5"}

    # The committed run's errors output holds the compression error beside the others.
    store.commit({"counts": counts.model_dump(mode="json")})
    errors = read_table(store.config, DATASET, "errors")
    assert sorted(zip(errors["stage"].to_pylist(), errors["error"].to_pylist(), strict=True)) == [
        ("compress", "scoring_error"),
        ("generate", "prompt_too_long"),
        ("generate", "prompt_too_long"),
        ("sources", "invalid_json"),
    ]


# -------------------------------------------------------------------------------------------------
# Stage names: each stage writes its own on its rows; the schema docs and the card list the same


def test_every_stage_module_names_itself_from_the_declared_stages():
    from tokenskip import dedup, sources

    modules = [sources, dedup, generate, grade, compress, write]
    assert tuple(m.STAGE for m in modules) == schema.STAGES  # pipeline order, one constant each
    assert set(schema.ERROR_STAGES) | set(schema.REJECT_STAGES) <= set(schema.STAGES)


def test_every_error_row_names_a_declared_stage_its_own(compressed, tmp_path):
    """The error rows each error-making stage produces (bad source records, a prompt the engine could
    not serve, a CoT the scorer could not compress), through the write stage's split, and the reject
    rows (duplicates, graded-out samples): each names the stage that made it, a declared one."""
    from tokenskip.dedup import DedupConfig, dedup_and_decontaminate
    from tokenskip.sources import SourceConfig, load_problems

    source = tmp_path / "bad.jsonl"
    source.write_text('{"question": "What is 1 + 1?"}\n{not json\n{"question": ["a"], "answer": "1"}\n')
    _, load_errors = load_problems(SourceConfig(path=str(source), kind="gsm8k"))
    out, _ = compressed
    tables = write.split_outcomes(out)
    errors = pa.concat_tables([load_errors, tables["errors"]]).to_pylist()
    by_stage = {(e["stage"], e["error"]) for e in errors}
    assert by_stage == {
        (schema.SOURCES_STAGE, "missing_answer"),
        (schema.SOURCES_STAGE, "invalid_json"),
        (schema.SOURCES_STAGE, "wrong_type"),
        (schema.GENERATE_STAGE, "prompt_too_long"),
        (schema.COMPRESS_STAGE, "scoring_error"),
    }
    assert all(e["stage"] in schema.ERROR_STAGES and e["error"] and e["error_detail"] for e in errors)

    twice = pa.Table.from_pylist(
        [{"id": f"d{i}", "question": "What is 2 + 3?", "answer": "5", "source": "test", "split": "test"}
         for i in range(2)],
        schema=PROBLEM_SCHEMA,
    )  # fmt: skip
    _, dedup_rejects = dedup_and_decontaminate(twice, DedupConfig())
    rejects = pa.concat_tables([dedup_rejects, tables["rejects"]]).to_pylist()
    assert {(r["stage"], r["reason"]) for r in rejects} == {
        (schema.DEDUP_STAGE, "duplicate"),
        (schema.GRADE_STAGE, "incorrect"),
    }
    assert all(r["stage"] in schema.REJECT_STAGES for r in rejects)


def test_the_write_stage_refuses_an_error_row_that_no_stage_claimed(compressed):
    out, _ = compressed
    unclaimed = out.set_column(out.schema.get_field_index("stage"), "stage", pa.nulls(out.num_rows, pa.string()))
    with pytest.raises(ValueError, match=r"\(error\) has stage None, expected one of sources, generate, compress"):
        write.split_outcomes(unclaimed.filter(pa.compute.equal(unclaimed["status"], "error")))
    with pytest.raises(ValueError, match=r"\(reject\) has stage None, expected one of dedup, grade"):
        write.split_outcomes(unclaimed.filter(pa.compute.equal(unclaimed["status"], "reject")))


def test_the_dataset_card_lists_the_declared_stages():
    import re

    from tokenskip.config import PipelineConfig
    from tokenskip.dataset_card import dataset_card
    from tokenskip.run_report import RunReport

    config = PipelineConfig.model_validate(
        {"dataset": "d", "sources": [{"path": "x.jsonl", "kind": "gsm8k"}], "engine": {"model": "m"}}
    )
    counts = {
        "input_rows": 1, "problems_to_generate": 1, "samples": 1, "kept_samples": 1, "kept_problems": 1,
        "acceptance_rate": 1.0, "rejects_by_reason": {}, "errors_by_reason": {}, "achieved_ratio": {},
    }  # fmt: skip
    card = dataset_card(config, RunReport.model_validate({"dataset": "d", "run_id": "r", "counts": counts}))
    tables = {m.group(1): m.group(2) for m in re.finditer(r"### (\w+): .*?\n(.*?)\n\n", card, re.S)}
    stage_lists = {
        kind: re.search(r"\| `stage` \| string \| [^:|]*: ([^|]*) \|", tables[kind]).group(1).split(", ")
        for kind in ("errors", "rejects")
    }
    assert stage_lists == {"errors": list(schema.ERROR_STAGES), "rejects": list(schema.REJECT_STAGES)}


# -------------------------------------------------------------------------------------------------
# Generate (a real vLLM CPU engine on the tiny model)


@pytest.mark.slow
def test_generate_emits_its_declared_schema_and_refuses_a_batch_without_questions(tiny_causal_lm):
    from tokenskip.engine import EngineConfig, SamplingConfig

    engine = EngineConfig(
        model=str(tiny_causal_lm),
        device="cpu",
        max_model_len=128,
        max_num_seqs=4,
        kv_cache_memory_bytes=32 << 20,
        enforce_eager=True,
    )
    stage = generate.GenerateStage(
        engine, SamplingConfig(n=N, temperature=1.0, max_tokens=8), {"instruction": "Think."}, cpus=1
    )
    loop = asyncio.new_event_loop()
    try:
        batch = pa.Table.from_pylist(
            [{k: p[k] for k in GENERATE_INPUT.names} for p in PROBLEMS[:2]], schema=GENERATE_INPUT
        )
        out = loop.run_until_complete(stage(batch))
        assert out.schema == generate.output_schema(GENERATE_INPUT)
        assert [len(s) for s in out.column("samples").to_pylist()] == [N, N]
        # What it produced is what the grade stage takes.
        check_fields(out.schema, grade.INPUT_FIELDS, "grade")
        with pytest.raises(StageContractError, match="generate stage: .*'question' is missing"):
            loop.run_until_complete(stage(batch.drop_columns(["question"])))
    finally:
        stage.shutdown()
        loop.close()
    # Shutdown closed the engine client's zmq sockets even though no loop was running: left open,
    # a later garbage collection blocks the whole process in the zmq context's term().
    resources = stage.llm.engine_core.resources
    assert resources.output_socket.closed and resources.input_socket.closed
