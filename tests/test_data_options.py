"""Dataset-building options: the CoT length filter, plain-CoT pools (no compression), the sources'
field filter, TokenSkip's forcing per model family, and run ids that stay what they were.

No model, engine or Ray here: the stages and the plan are called directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ValidationError

from tests.tiny_pipeline import ANSWER_FIELD_MAP, tiny_pipeline_data, tiny_source, write_problems
from tokenskip.compress import CompressConfig
from tokenskip.config import PipelineConfig, load_pipeline_config
from tokenskip.grading import GradingConfig
from tokenskip.pipeline import _compress_line, make_plan, run_statistics
from tokenskip.preflight import run_problems
from tokenskip.run_report import RunReport
from tokenskip.schema import COMPRESSED_SCHEMA, PROBLEM_SCHEMA
from tokenskip.scoring import (
    TOKENSKIP_LLAMA_FORCING,
    TOKENSKIP_QWEN_FORCING,
    ScorerConfig,
    model_family,
)
from tokenskip.sft import SFTMixConfig, SFTMixError, build_sft_records
from tokenskip.sources import SourceConfig, load_problems, load_source
from tokenskip.stages import compress, generate, grade, write
from tokenskip.storage import StorageConfig
from tokenskip.summary import ShardSummary

DEMO_CONFIG = Path(__file__).parents[1] / "tokenskip" / "configs" / "demo.yaml"
# The demo config's content hash, the same in every checkout (the bundled source hashes as its builtin:
# name, the scorer's cache folder not at all): its run id must not move with new, unset options.
DEMO_CONTENT_HASH = "3248baf896691507b393bcd82d38b4d2"

LONG_CORRECT = (
    "First add 2 and 3 to get 5, then check the sum once more, slowly, to be quite sure of it. "
    "The answer is \\boxed{5}."
)
SHORT_CORRECT = "Two plus three is five. The answer is \\boxed{5}."
LONG_WRONG = "First add 2 and 3 to get 6, which looks right at a glance and on a second, slower and careful look. The answer is \\boxed{6}."
GENERATE_INPUT = PROBLEM_SCHEMA.append(pa.field("shard_id", pa.string()))


def _generated(samples_by_problem: dict[str, list[str]]) -> pa.Table:
    """A batch as the generation stage emits it; a sample's token count is its word count."""
    rows = [
        {
            "id": pid,
            "question": f"What is 2 + 3? ({pid})",
            "answer": "5",
            "source": "test",
            "split": "test",
            "metadata": None,
            "shard_id": "s-test",
            "samples": [{"text": t, "tokens": len(t.split()), "finish_reason": "stop"} for t in samples],
            "prompt_tokens": 12,
            "stage": None,
            "error": None,
            "error_detail": None,
            "gen_seconds": 0.5,
            "gen_engine_steps": 4.0,
            "gen_engine_running_seqs": 8.0,
            "gen_engine_max_num_seqs": 8,
        }
        for pid, samples in samples_by_problem.items()
    ]
    return pa.Table.from_pylist(rows, schema=generate.output_schema(GENERATE_INPUT))


def _outcome(table: pa.Table) -> dict[tuple[str, int], tuple[str, str | None]]:
    return {(r["problem_id"], r["sample_index"]): (r["status"], r["reason"]) for r in table.to_pylist()}


# -------------------------------------------------------------------------------------------------
# The CoT length filter


def test_length_filter_rejects_long_correct_cots_before_the_policy_chooses():
    limit = len(LONG_CORRECT.split()) - 1
    assert len(SHORT_CORRECT.split()) <= limit < len(LONG_WRONG.split())
    stage = grade.GradeSelectStage(
        GradingConfig(), "first-correct", "tiny", "gen-hash", n_samples=2, max_cot_tokens=limit
    )
    out = stage(_generated({"p1": [LONG_CORRECT, SHORT_CORRECT], "p2": [LONG_WRONG, LONG_CORRECT]}))
    # first-correct picks among the CoTs that fit: p1's second sample, although the first is correct.
    assert _outcome(out) == {
        ("p1", 0): ("reject", "too_long"),
        ("p1", 1): ("kept", None),
        ("p2", 0): ("reject", "incorrect"),  # the verdict wins over the length
        ("p2", 1): ("reject", "too_long"),
    }
    detail = out.filter(pa.compute.equal(out["reason"], "too_long"))["detail"][0].as_py()
    assert detail == f"CoT of {len(LONG_CORRECT.split())} tokens, over selection.max_cot_tokens {limit}"
    # The rejects table carries them with their CoT, and the shard summary counts the reason.
    tables = write.split_outcomes(compress.keep_cots_whole(out))
    assert sorted(tables["rejects"]["reason"].to_pylist()) == ["incorrect", "too_long", "too_long"]
    assert ShardSummary.from_tables(tables).reasons("rejects") == {"incorrect": 1, "too_long": 2}

    unlimited = grade.GradeSelectStage(GradingConfig(), "first-correct", "tiny", "gen-hash", n_samples=2)
    assert _outcome(unlimited(_generated({"p1": [LONG_CORRECT, SHORT_CORRECT]})))[("p1", 0)] == ("kept", None)


def test_length_limit_is_a_positive_selection_setting():
    config = PipelineConfig.model_validate(_pipeline_data(Path("/nowhere/problems.jsonl"), Path("/tmp/out")))
    assert config.selection.max_cot_tokens is None
    args = grade.map_batches_args(
        config.model_copy(update={"selection": config.selection.model_copy(update={"max_cot_tokens": 500})})
    )
    assert args["fn_constructor_kwargs"]["max_cot_tokens"] == 500
    with pytest.raises(ValidationError, match="max_cot_tokens"):
        PipelineConfig.model_validate(
            _pipeline_data(Path("/nowhere/problems.jsonl"), Path("/tmp/out"), selection={"max_cot_tokens": 0})
        )


# -------------------------------------------------------------------------------------------------
# Plain-CoT pools: no compression


def test_a_plain_pool_keeps_the_data_schema_with_no_compressions_and_mixes_at_ratio_one():
    graded = grade.GradeSelectStage(GradingConfig(), "all-correct", "tiny", "gen-hash", n_samples=2)(
        _generated({"p1": [SHORT_CORRECT, LONG_WRONG]})
    )
    rows = compress.keep_cots_whole(graded)
    assert rows.schema.equals(compress.OUTPUT_SCHEMA)
    tables = write.split_outcomes(rows)
    assert tables["data"].schema.equals(COMPRESSED_SCHEMA)
    (kept,) = tables["data"].to_pylist()
    assert kept["compressions"] == [] and kept["cot"] == SHORT_CORRECT
    assert kept["reasoning"] + kept["answer_tail"] == SHORT_CORRECT
    assert kept["answer_tail"] == "The answer is \\boxed{5}."
    assert kept["original_tokens"] == len(SHORT_CORRECT.split())  # the generated tokens
    assert [r["reason"] for r in tables["rejects"].to_pylist()] == ["incorrect"]
    summary = ShardSummary.from_tables(tables, samples=rows)
    assert summary.kept_samples == 1 and not summary.distributions.achieved_ratio

    # train's mix reads it at ratio 1.0 (TokenSkip's format, the tail rewritten) ...
    (record,) = build_sft_records(tables["data"], SFTMixConfig(ratios=[1.0])).to_pylist()
    assert record["input"] == kept["question"]
    assert record["output"].startswith("Two plus three is five.")
    assert record["output"].endswith("$\\boxed{5}$") and "The answer is" not in record["output"]
    # ... and a mix that asks for compressions says why there are none.
    with pytest.raises(SFTMixError, match="built without compression"):
        build_sft_records(tables["data"], SFTMixConfig(ratios=[0.5], delimiter="<d>"))


def test_a_run_without_compression_plans_no_compress_stage_and_loads_no_scorer(tmp_path):
    problems = write_problems(tmp_path / "problems.jsonl", [{"question": "What is 1 + 1?", "answer": "2"}])
    data = _pipeline_data(problems, tmp_path / "out", compression=None)
    config = PipelineConfig.model_validate(data)
    assert config.compression is None
    plan_text = make_plan(config).describe()
    assert (
        "compress   none (compression: null): kept CoTs are written whole, no scorer is loaded" in plan_text
    )
    # The stage that replaces compression is a plain task: nothing to load, no actor pool.
    args = compress.map_batches_args(config)
    assert args["fn"] is compress.keep_cots_whole and "compute" not in args
    # Preflight does not look for a scorer model (the data has none).
    assert not any("compression" in p for p in run_problems(config))
    compressed = PipelineConfig.model_validate(_pipeline_data(problems, tmp_path / "out"))
    assert config.content_hash() != compressed.content_hash()


# -------------------------------------------------------------------------------------------------
# The sources' field filter


MATH_ROWS = [
    {"problem": "Hard one", "answer": "1", "level": "Level 5"},
    {"problem": "Easy one", "answer": "2", "level": "Level 1"},
    {"problem": "Harder one", "answer": "3", "level": "Level 4"},
    {"problem": "No level", "answer": "4"},
    {"problem": "Hard but no answer", "level": "Level 5"},  # selected, then an error
    {"problem": "Easy, no answer", "level": "Level 2"},  # not selected: counted, not an error
]


def test_where_selects_records_by_field_and_counts_what_it_drops(tmp_path):
    path = write_problems(tmp_path / "math.jsonl", MATH_ROWS, raw_lines=[b"{not json"])
    source = SourceConfig(path=str(path), kind="math", where={"level": ["Level 4", "Level 5"]})
    loaded = load_source(source)
    assert loaded.problems["question"].to_pylist() == ["Hard one", "Harder one"]
    assert loaded.filtered_out == 3
    assert sorted(loaded.errors["error"].to_pylist()) == ["invalid_json", "missing_answer"]
    assert loaded.problems.num_rows + loaded.errors.num_rows + loaded.filtered_out == len(MATH_ROWS) + 1
    assert [t.num_rows for t in load_problems(source)] == [2, 2]
    everything = load_source(source.model_copy(update={"where": None}))
    assert (everything.problems.num_rows, everything.filtered_out) == (4, 0)


def test_where_compares_values_as_json_does_and_reaches_nested_fields(tmp_path):
    rows = [
        {"q": "int level", "a": "1", "level": 4},
        {"q": "float level", "a": "1", "level": 4.0},
        {"q": "string level", "a": "1", "level": "4"},
        {"q": "bool", "a": "1", "level": True},
        {"q": "nested", "a": "1", "meta": {"subject": "Algebra"}},
    ]
    path = write_problems(tmp_path / "rows.jsonl", rows)
    fields = {"question": "q", "answer": "a"}
    by_level = SourceConfig(path=str(path), field_map=fields, where={"level": [4]})
    assert load_source(by_level).problems["question"].to_pylist() == ["int level", "float level"]
    by_subject = SourceConfig(path=str(path), field_map=fields, where={"meta.subject": ["Algebra"]})
    loaded = load_source(by_subject)
    assert (loaded.problems["question"].to_pylist(), loaded.filtered_out) == (["nested"], 4)
    with pytest.raises(ValidationError, match="at least one allowed value"):
        SourceConfig(path=str(path), field_map=fields, where={"level": []})


def test_the_plan_and_report_count_rows_the_where_filter_dropped(tmp_path):
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1), "level": i % 3} for i in range(9)]
    path = write_problems(tmp_path / "problems.jsonl", rows)
    source = tiny_source(path, field_map=ANSWER_FIELD_MAP) | {"where": {"level": [0]}}
    config = PipelineConfig.model_validate(_pipeline_data(path, tmp_path / "out", sources=[source]))
    plan = make_plan(config)
    assert (plan.problems.num_rows, plan.filtered_out, plan.input_rows) == (3, 6, 9)
    assert (
        "input rows 9: 3 problems, 0 load errors, 0 dedup/decontamination rejects, "
        "6 filtered out by sources[].where" in plan.describe()
    )
    counts = run_statistics(plan, None, ShardSummary())  # the counts before any shard is committed
    assert (counts.input_rows, counts.filtered_out, counts.problems_to_generate) == (9, 6, 3)


def test_the_dataset_card_says_what_the_options_did(tmp_path):
    from tokenskip.dataset_card import dataset_card

    path = Path("/nowhere/problems.jsonl")
    source = tiny_source(path, field_map=ANSWER_FIELD_MAP) | {"where": {"level": [0]}}
    data = _pipeline_data(
        path, tmp_path, sources=[source], compression=None, selection={"max_cot_tokens": 500}
    )
    counts = {
        "input_rows": 9, "filtered_out": 6, "problems_to_generate": 3, "samples": 6, "kept_samples": 2,
        "kept_problems": 2, "acceptance_rate": 2 / 6, "rejects_by_reason": {"too_long": 1, "incorrect": 3},
        "errors_by_reason": {}, "achieved_ratio": {},
    }  # fmt: skip
    report = RunReport.model_validate({"dataset": "d", "run_id": "r", "counts": counts})
    card = dataset_card(PipelineConfig.model_validate(data), report)
    assert "the correct ones kept whole (built without compression)" in card
    assert "- selection: `all-correct`, CoTs of <= 500 tokens; no compression (a pool of plain CoTs" in card
    assert "- 9 input rows (6 filtered out by `sources[].where`), 3 problems, 6 generated samples" in card
    assert "too_long" in card


# -------------------------------------------------------------------------------------------------
# Forcing per model family, and run ids


def _forcing(scorer: ScorerConfig) -> tuple:
    return scorer.force_tokens, scorer.force_digits, scorer.drop_consecutive


LLAMA = (["Step", ":"], True, True)
QWEN = ([], False, False)


def test_forcing_defaults_follow_tokenskip_for_the_target_models_family(tmp_path):
    assert model_family("Qwen/Qwen2.5-7B-Instruct") == "qwen"
    assert model_family("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B") == "qwen"
    assert model_family("meta-llama/Meta-Llama-3-8B-Instruct") == model_family(None) == "other"
    assert _forcing(TOKENSKIP_LLAMA_FORCING) == LLAMA and _forcing(TOKENSKIP_QWEN_FORCING) == QWEN

    # Standalone: auto until a target is known; a scorer built without one prunes as before (LLaMA-3).
    assert _forcing(ScorerConfig()) == ("auto", "auto", "auto")
    assert _forcing(ScorerConfig().forcing) == LLAMA
    assert _forcing(CompressConfig(target_tokenizer="Qwen/Qwen2.5-7B-Instruct").scorer) == QWEN
    # Explicit values are kept whatever the family.
    explicit = CompressConfig(target_tokenizer="Qwen/Qwen2.5-7B", scorer={"force_digits": True})
    assert _forcing(explicit.scorer) == ([], True, False)

    # In a run config the target is compression.target_tokenizer, else the generating model.
    problems, no_target = Path("/nowhere/problems.jsonl"), {"target_tokenizer": None}
    qwen_run = PipelineConfig.model_validate(
        _pipeline_data(
            problems, tmp_path, engine={"model": "Qwen/Qwen2.5-7B-Instruct"}, compression=no_target
        )
    )
    assert _forcing(qwen_run.compression.scorer) == QWEN
    assert "forced=nothing" in _compress_line(qwen_run)
    llama_run = _pipeline_data(
        problems, tmp_path, engine={"model": "meta-llama/Meta-Llama-3-8B-Instruct"}, compression=no_target
    )
    assert _forcing(PipelineConfig.model_validate(llama_run).compression.scorer) == LLAMA
    assert "forced=Step, :, digits" in _compress_line(PipelineConfig.model_validate(llama_run))
    to_qwen = llama_run | {"compression": {"target_tokenizer": "Qwen/Qwen2.5-1.5B"}}
    assert _forcing(PipelineConfig.model_validate(to_qwen).compression.scorer) == QWEN


def test_run_ids_of_existing_configs_do_not_change():
    demo = load_pipeline_config(DEMO_CONFIG)
    # The demo (SmolLM2, a LLaMA-architecture model) resolves auto forcing to the old defaults, and the
    # unset new fields (selection.max_cot_tokens, sources[].where) stay out of the hash.
    assert demo.content_hash() == DEMO_CONTENT_HASH, "a change that moves existing run ids must say so"
    dumped = demo.model_dump(mode="json")
    assert "max_cot_tokens" not in dumped["selection"] and "where" not in dumped["sources"][0]
    assert _forcing(demo.compression.scorer) == LLAMA
    # The manifest's config (concrete values) validates back to the same hash.
    assert PipelineConfig.model_validate(dumped).content_hash() == DEMO_CONTENT_HASH
    # Setting a new option makes a new run.
    limited = load_pipeline_config(DEMO_CONFIG, {"selection.max_cot_tokens": 500})
    filtered = load_pipeline_config(DEMO_CONFIG, {"sources.0.where": {"level": [5]}})
    assert len({DEMO_CONTENT_HASH, limited.content_hash(), filtered.content_hash()}) == 3


# -------------------------------------------------------------------------------------------------


def _pipeline_data(problems: Path, output: Path, **sections) -> dict:
    data = tiny_pipeline_data(Path("/models/tiny"), problems, StorageConfig(root=str(output)))
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name] = data[name] | value
        else:
            data[name] = value
    return json.loads(json.dumps(data, default=lambda o: o.model_dump(mode="json")))


@pytest.mark.slow
def test_without_compression_ray_data_runs_the_plain_stage_on_whole_blocks(tmp_path, ray_local):
    """The stage arguments the pipeline hands Ray Data for a run without compression: a task, no scorer."""
    import ray

    problems = write_problems(tmp_path / "problems.jsonl", [{"question": "What is 1 + 1?", "answer": "2"}])
    config = PipelineConfig.model_validate(_pipeline_data(problems, tmp_path / "out", compression=None))
    graded = grade.GradeSelectStage(GradingConfig(), "all-correct", "tiny", "gen-hash", n_samples=2)(
        _generated({"p1": [SHORT_CORRECT, LONG_WRONG], "p2": [LONG_WRONG, SHORT_CORRECT]})
    )
    rows = ray.data.from_arrow(graded).map_batches(**compress.map_batches_args(config)).take_all()
    kept = sorted((r["problem_id"], r["sample_index"]) for r in rows if r["status"] == "kept")
    assert kept == [("p1", 0), ("p2", 1)]
    assert all(list(r["compressions"]) == [] and r["answer_tail"] for r in rows if r["status"] == "kept")
    assert all(r["compressions"] is None for r in rows if r["status"] != "kept")
