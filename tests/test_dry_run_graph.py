"""``tokenskip run --dry-run`` builds the run's Ray Data graph (without Ray and without running it), so
it fails where the run would: the GPU recipe's dry run used to pass while its run died building the
graph (issue 18, item 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tokenskip
from tests.fixture_data import DATA_DIR
from tokenskip import cli
from tokenskip.stages import compress
from tokenskip.testing.tiny_models import arithmetic_problems

GPU_RECIPE = Path(tokenskip.__file__).parent / "configs" / "gsm8k_qwen2_5_7b_gpu.yaml"


def _gpu_recipe_argv(tmp_path: Path, model: Path) -> list[str]:
    """The GPU recipe's dry run with local inputs, output and a tiny model (its resources as shipped)."""
    problems = tmp_path / "train.jsonl"
    problems.write_text(
        "".join(
            json.dumps({"question": p["question"], "answer": f"#### {p['answer']}"}) + "\n"
            for p in arithmetic_problems(6)
        )
    )
    sets = {
        "output.root": tmp_path / "out",
        "sources.0.path": problems,
        "dedup.eval_sets.0.path": DATA_DIR / "gsm8k" / "test.jsonl.gz",
        "dedup.eval_sets.1.path": DATA_DIR / "math500" / "test.jsonl.gz",
        "engine.model": model,
        "compression.scorer.model": model,
        "compression.target_tokenizer": model,
    }
    argv = ["run", "--dry-run", "--config", str(GPU_RECIPE)]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    return argv


def test_gpu_recipe_dry_run_builds_its_graph_without_starting_ray(tmp_path, tiny_causal_lm, capsys):
    import ray

    assert cli.main(_gpu_recipe_argv(tmp_path, tiny_causal_lm)) == 0
    out = capsys.readouterr().out
    assert "cluster: the stages hold 21.25 CPUs and 5 GPUs at once" in out
    assert not ray.is_initialized()
    assert not (tmp_path / "out").exists()


def test_dry_run_fails_where_the_run_would_build_its_graph(tmp_path, tiny_causal_lm, monkeypatch):
    """The compress stage's arguments as they were before the fix (whole blocks with GPUs): Ray Data
    refuses them while the graph is built, and so does the dry run now."""
    original = compress.map_batches_args
    monkeypatch.setattr(compress, "map_batches_args", lambda config: original(config) | {"batch_size": None})
    with pytest.raises(ValueError, match="batch_size"):
        cli.main(_gpu_recipe_argv(tmp_path, tiny_causal_lm))


def test_compress_stage_takes_one_generation_batch_of_rows_per_call(tmp_path, tiny_causal_lm):
    from tokenskip.config import load_pipeline_config

    config = load_pipeline_config(GPU_RECIPE, {"engine.model": str(tiny_causal_lm)})
    args = compress.map_batches_args(config)
    assert args["num_gpus"] == 1
    assert args["batch_size"] == config.resources.generation_batch_size * config.sampling.n == 128  # 32 x 4


def _no_engine_may_start(monkeypatch) -> None:
    """Fail the test if anything starts Ray or a vLLM engine."""
    from tokenskip import engine, pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("an engine or Ray was started before the stage chain was checked")

    monkeypatch.setattr(engine, "create_async_llm", refuse)
    monkeypatch.setattr(engine, "create_llm", refuse)
    monkeypatch.setattr(pipeline, "init_ray", refuse)


def _generate_renames_samples(monkeypatch) -> None:
    """The generate stage's declared outputs with ``samples`` renamed: grade's input no longer fits."""
    import dataclasses

    import pyarrow as pa

    from tokenskip.stages import generate

    renamed = pa.schema([f.with_name("completions") if f.name == "samples" else f for f in generate.CONTRACT.outputs])
    monkeypatch.setattr(generate, "CONTRACT", dataclasses.replace(generate.CONTRACT, outputs=renamed))


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_a_stage_chain_mismatch_stops_the_plan_before_any_engine_starts(
    tmp_path, tiny_causal_lm, monkeypatch, capsys, dry_run
):
    import ray

    from tokenskip.stages.contract import StageChainError

    _no_engine_may_start(monkeypatch)
    _generate_renames_samples(monkeypatch)
    argv = _gpu_recipe_argv(tmp_path, tiny_causal_lm)
    if not dry_run:
        argv.remove("--dry-run")
    with pytest.raises(StageChainError) as raised:
        cli.main(argv)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("stage chain: grade needs what generate does not hand on: 'samples' is missing")
    assert "completions" in message  # what generate does hand on
    assert not ray.is_initialized()
    assert not (tmp_path / "out").exists()
    assert "stage chain" not in capsys.readouterr().out  # no plan was printed


def test_a_field_of_another_type_breaks_the_chain():
    import pyarrow as pa

    from tokenskip.pipeline import SHARD_ROWS_SCHEMA, stage_chain
    from tokenskip.stages.contract import StageChainError, StageContract, check_chain

    counts_as_text = StageContract("count", pa.schema([pa.field("prompt_tokens", pa.string())]), pa.schema([]), True)
    chain = stage_chain()
    with pytest.raises(StageChainError, match="count needs what generate does not hand on: 'prompt_tokens' is int64"):
        check_chain("the input shards", SHARD_ROWS_SCHEMA, [chain[0], counts_as_text, *chain[1:]])


def test_dry_run_prints_the_checked_stage_chain(tmp_path, tiny_causal_lm, capsys):
    assert cli.main(_gpu_recipe_argv(tmp_path, tiny_causal_lm)) == 0
    out = capsys.readouterr().out
    chain = out[out.index("stage chain (declared fields, checked before any engine starts):") :].splitlines()[1:5]
    assert [line.split()[0] for line in chain] == ["generate", "grade", "compress", "write"]
    assert chain[0].split(None, 1)[1].startswith("reads question -> adds samples, prompt_tokens")
    assert chain[-1].split(None, 1)[1] == "reads all 30 fields -> hands on shard_id, record, rows"
