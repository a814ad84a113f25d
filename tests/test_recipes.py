"""Every YAML in tokenskip/configs/ goes through its command's ``--dry-run``, and the papers' recipes say
what the papers say (issue 21, item 2), including TokenSkip's prompt byte for byte.

Recipes are found by globbing the folder and classified by which config class accepts them, so a new
recipe is covered without editing this file, and one that no class accepts (or two do) fails here.
Dry runs need no network and no Ray: a pipeline's inputs, reference sets and output become small local
files and models are not resolved (``--skip-model-check``); train and evaluate dry runs validate the
config and print it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from pydantic import ValidationError

import tokenskip
from tests.fixture_data import DATA_DIR
from tests.test_sft import _record
from tokenskip import cli
from tokenskip.config import PipelineConfig
from tokenskip.evaluate import EvaluateConfig, load_evaluate_config, ratio_prompts
from tokenskip.exit_codes import ExitCode
from tokenskip.refresh import RefreshConfig
from tokenskip.schema import COMPRESSED_SCHEMA, to_table
from tokenskip.storage import RunStore, StorageConfig, read_table
from tokenskip.train.config import TrainConfig, load_train_config

CONFIGS = Path(tokenskip.__file__).parent / "configs"
KINDS = {
    "pipeline": PipelineConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "refresh": RefreshConfig,
}
# YAML files in configs/ that are not recipes, and what reads them instead.
NOT_RECIPES = {"ray_data_logging.yaml": "console.py"}  # Ray Data's logging config (RAY_DATA_LOGGING_CONFIG)
RECIPES = sorted(p for p in CONFIGS.glob("*.yaml") if p.name not in NOT_RECIPES)

PAPER = "tokenskip_paper_qwen2_5_7b_gsm8k"
EOT = "<|eot_id|>"


def _load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else {}


def recipe_kind(data: dict, name: str = "recipe") -> str:
    """The one config class that accepts ``data``; anything else is an error naming the file."""
    kinds = []
    for kind, model in KINDS.items():
        try:
            model.model_validate(data)
        except ValidationError:
            continue
        kinds.append(kind)
    if len(kinds) != 1:
        raise AssertionError(
            f"{name}: accepted by {kinds or 'no config class'} of {sorted(KINDS)}; "
            "the recipe test cannot dry-run it (fix the recipe, or name it in NOT_RECIPES)"
        )
    return kinds[0]


def test_every_yaml_is_a_recipe_or_a_named_exception():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == {p.name for p in RECIPES} | set(NOT_RECIPES)
    for name, reader in NOT_RECIPES.items():
        assert name in (CONFIGS.parent / reader).read_text(), f"{name} is not read where NOT_RECIPES says"
    kinds = {p.stem: recipe_kind(_load(p), p.name) for p in RECIPES}
    assert {kinds[f"{PAPER}_data"], kinds[f"{PAPER}_train"], kinds[f"{PAPER}_evaluate"]} == {
        "pipeline",
        "train",
        "evaluate",
    }
    tldr = {stem: kind for stem, kind in kinds.items() if stem.startswith("tldr_")}
    assert sorted(tldr.values()).count("pipeline") == 2 and "train" in tldr.values()
    assert sum(1 for stem in tldr if stem.startswith("tldr_r1_distill_qwen_7b_eval_")) == 4


def test_an_unclassifiable_yaml_fails_the_test():
    with pytest.raises(AssertionError, match="no config class"):
        recipe_kind({"model": "m"}, "odd.yaml")
    with pytest.raises(AssertionError, match="no config class"):
        recipe_kind({}, "empty.yaml")


# --- dry runs -----------------------------------------------------------------------------------------

REFERENCE_SETS = {
    "gsm8k": DATA_DIR / "gsm8k" / "test.jsonl.gz",
    "math": DATA_DIR / "math500" / "test.jsonl.gz",
}


def _problem_file(path: Path, source: dict) -> Path:
    """A few problems in the layout of ``source`` (its kind or field_map), matching its `where` filter."""
    kind = source.get("kind", "custom")
    fields = {
        "gsm8k": {"question": "question", "answer": "answer"},
        "math": {"question": "problem", "answer": "answer"},
        "aime": {"question": "query", "answer": "ref_answer"},
    }.get(kind) or dict(source["field_map"])
    rows = []
    for i in range(6):
        row = {fields["question"]: f"What is {i} + 1?", fields.get("answer") or "answer": str(i + 1)}
        if kind == "gsm8k":
            row[fields["answer"]] = f"{i} + 1 = {i + 1}\n#### {i + 1}"
        for key, values in (source.get("where") or {}).items():
            row[key] = values[0]
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pipeline_local(data: dict, tmp_path: Path, prefix: str = "") -> dict[str, object]:
    """--set overrides that make a pipeline's inputs and output local (builtin: sources stay)."""
    sets: dict[str, object] = {
        f"{prefix}output.root": tmp_path / "out",
        f"{prefix}output.storage_options": {},
    }
    for i, source in enumerate(data["sources"]):
        if not str(source["path"]).startswith("builtin:"):
            sets[f"{prefix}sources.{i}.path"] = _problem_file(tmp_path / f"source-{i}.jsonl", source)
            sets[f"{prefix}sources.{i}.storage_options"] = {}
    for i, eval_set in enumerate((data.get("dedup") or {}).get("eval_sets") or []):
        assert eval_set.get("kind") in REFERENCE_SETS, (
            f"no local reference set of kind {eval_set.get('kind')}"
        )
        sets[f"{prefix}dedup.eval_sets.{i}.path"] = REFERENCE_SETS[eval_set["kind"]]
        sets[f"{prefix}dedup.eval_sets.{i}.storage_options"] = {}
    return sets


def _argv(command: list[str], recipe: Path, sets: dict[str, object]) -> list[str]:
    argv = [*command, "--dry-run", "--config", str(recipe)]
    for key, value in sets.items():
        argv += ["--set", f"{key}={json.dumps(value) if isinstance(value, dict) else value}"]
    return argv


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_dry_run(recipe, tmp_path, capsys):
    import ray

    data = _load(recipe)
    kind = recipe_kind(data, recipe.name)
    if kind == "pipeline":
        argv = _argv(["run", "--skip-model-check"], recipe, _pipeline_local(data, tmp_path))
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        assert "stages:" in out and "generate" in out and "cluster: the stages hold" in out
        plain = "compress   none (compression: null)" in out
        assert plain == ("compression" in data and data["compression"] is None)
        assert not (tmp_path / "out").exists()  # a dry run writes nothing
    elif kind == "refresh":
        from ray_jobs.refresh import main as refresh_job

        sets = _pipeline_local(data["pipeline"], tmp_path, prefix="pipeline.")
        assert refresh_job(_argv([], recipe, sets)) == 0
        assert "new" in capsys.readouterr().out
    else:  # train, evaluate: the dry run validates and prints the config
        assert cli.main(_argv([kind], recipe, {})) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed == KINDS[kind].model_validate(data).model_dump(mode="json")
    assert not ray.is_initialized()


# --- the papers' settings -----------------------------------------------------------------------------


def test_tokenskip_paper_recipes_are_the_papers_settings():
    data = PipelineConfig.model_validate(_load(CONFIGS / f"{PAPER}_data.yaml"))
    assert (data.sampling.n, data.sampling.temperature, data.sampling.max_tokens) == (1, 0.0, 512)
    assert data.selection.max_cot_tokens == 500
    scorer = data.compression.scorer
    assert (
        scorer.kind == "llmlingua2" and scorer.model == "microsoft/llmlingua-2-xlm-roberta-large-meetingbank"
    )
    assert (scorer.force_tokens, scorer.force_digits, scorer.drop_consecutive) == ([], False, False)  # Qwen
    assert data.compression.ratios == [0.9, 0.8, 0.7, 0.6, 0.5]

    train = load_train_config(CONFIGS / f"{PAPER}_train.yaml")
    assert train.data.dataset == data.dataset and train.model == data.engine.model
    assert (train.lora.enabled, train.lora.r, train.lora.alpha, train.lora.target_modules) == (
        True,
        8,
        16,
        "all-linear",
    )
    optim = train.optim
    assert (optim.learning_rate, optim.epochs, optim.scheduler, optim.cutoff_len) == (
        5e-5,
        3.0,
        "cosine",
        2048,
    )
    assert optim.global_batch_size == 8 and train.data.mix.delimiter == EOT
    for workers in (1, 2, 4, 8):  # the same global batch on any worker count
        assert optim.per_device_batch_size * optim.accumulation_steps(workers) * workers == 8

    evaluation = load_evaluate_config(CONFIGS / f"{PAPER}_evaluate.yaml")
    assert (evaluation.sampling.n, evaluation.sampling.temperature, evaluation.sampling.max_tokens) == (
        1,
        0.0,
        512,
    )
    assert evaluation.ratios == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5] and evaluation.delimiter == EOT
    assert (
        evaluation.engine.max_lora_rank >= train.lora.r
        and evaluation.instruction == train.data.mix.instruction
    )


def test_tldr_recipes_are_the_papers_settings():
    system1 = PipelineConfig.model_validate(_load(CONFIGS / "tldr_system1_qwen2_5_7b_gsm8k_data.yaml"))
    system2 = PipelineConfig.model_validate(_load(CONFIGS / "tldr_system2_r1_distill_qwen_7b_math_data.yaml"))
    assert system1.compression is None and system2.compression is None
    assert system2.engine.model == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    assert system2.selection.policy == "shortest-correct"
    assert system2.sources[0].where == {"level": ["Level 3", "Level 4", "Level 5"]}
    train = load_train_config(CONFIGS / "tldr_r1_distill_qwen_7b_fsdp.yaml")
    pools = {d.role: d.source.dataset for d in train.tldr.domains}
    assert pools == {"short": system1.dataset, "long": system2.dataset}
    assert (
        train.model == system2.engine.model and not train.lora.enabled and train.optim.global_batch_size == 64
    )
    for name, n, temperature in (
        ("aime24", 8, 0.7),
        ("amc23", 8, 0.7),
        ("gsm8k", 1, 0.0),
        ("math500", 1, 0.0),
    ):
        evaluation = load_evaluate_config(CONFIGS / f"tldr_r1_distill_qwen_7b_eval_{name}.yaml")
        sampling = evaluation.sampling
        assert (sampling.n, sampling.temperature, sampling.max_tokens) == (n, temperature, 8192), name
        assert evaluation.pass_k == sorted({1, n}) and evaluation.ratios == [1.0]
    for role in ("short", "long"):
        [path] = CONFIGS.glob(f"tldr_reference_{role}_*.yaml")
        assert load_evaluate_config(path).reference == role


# --- TokenSkip's prompt, byte for byte ------------------------------------------------------------------

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def _expected_prompt(user_input: str) -> str:
    """TokenSkip's alpaca prompt (instruction, newline, input) in the tiny model's chat template,
    written out by hand: not built with tokenskip.prompts."""
    return f"<|im_start|>user\n{INSTRUCTION}\n{user_input}<|im_end|>\n<|im_start|>assistant\n"


def _compressed_rows(count: int) -> pa.Table:
    ratios = [0.9, 0.8, 0.7, 0.6, 0.5]
    rows = []
    for i in range(count):
        tail = "\n\nSo the answer is 7."
        rows.append(
            {
                "key": f"k{i}",
                "problem_id": f"p{i}",
                "question": QUESTION,
                "answer": "7",
                "extracted_answer": "7",
                "cot": f"3 + 4 = 7 apples in all (row {i}).{tail}",
                "original_tokens": 12,
                "answer_tail": tail,
                "compressions": [
                    {"target_ratio": r, "text": f"ratio {r} 3+4=7{tail}", "tokens": 5} for r in ratios
                ],
            }
        )
    return pa.Table.from_pylist(rows)


def test_tokenskip_paper_prompt_is_tokenskips_byte_for_byte(tmp_path, tiny_causal_lm):
    """question<|eot_id|>0.6<|eot_id|> inside the chat template, no marker at ratio 1.0: in the training
    examples (the recipe's data source read as training reads it), in the export records (the same
    mix), and in the evaluation prompts, for a model whose eos is not <|eot_id|>."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from tokenskip.sft import build_sft_records
    from tokenskip.train.data import source_messages, split_prompt_response

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template  # the delimiter is not the eos
    marked = _expected_prompt(f"{QUESTION}{EOT}0.6{EOT}")
    bare = _expected_prompt(QUESTION)

    # Training: the recipe's data source (its mix as shipped), pointed at a local compressed table.
    table = _compressed_rows(40)
    pq.write_table(table, tmp_path / "compressed.parquet")
    train = load_train_config(
        CONFIGS / f"{PAPER}_train.yaml",
        {"data.storage_root": None, "data.dataset": None, "data.path": str(tmp_path / "compressed.parquet")},
    )
    seen: dict[float, str] = {}
    for messages in source_messages(train.data, tokenizer, train.system):
        answer = messages[-1]["content"]
        ratio = float(answer.split()[1]) if answer.startswith("ratio ") else 1.0
        prompt, _ = split_prompt_response(tokenizer, messages)
        seen.setdefault(ratio, prompt)
        expected = bare if ratio == 1.0 else _expected_prompt(f"{QUESTION}{EOT}{ratio:.1f}{EOT}")
        assert prompt == expected, ratio
    assert seen[0.6] == marked and seen[1.0] == bare  # both drawn among 40 rows (seeded)

    # Export: `tokenskip export --train-config` writes the recipe's mix (its dataset moved to a local store).
    store = StorageConfig(root=str(tmp_path / "store"))
    dataset = _load(CONFIGS / f"{PAPER}_train.yaml")["data"]["dataset"]
    run = RunStore(store, dataset, "r1")
    run.write_shard(
        "s-00", {"data": to_table([_record(f"k{i}", QUESTION) for i in range(40)], COMPRESSED_SCHEMA)}
    )
    run.commit({"counts": {}})
    out = tmp_path / "export"
    argv = ["export", "--train-config", str(CONFIGS / f"{PAPER}_train.yaml"), "--root", store.root]
    argv += ["--storage-options", "{}", "--tokenizer", str(tiny_causal_lm), "--out", str(out)]
    assert cli.main(argv) == 0
    exported = out / f"{dataset}_tokenskip.json"
    rows = json.loads(exported.read_text())
    assert len(rows) == 40 and {r["instruction"] for r in rows} == {INSTRUCTION}
    inputs = {r["input"] for r in rows}
    assert f"{QUESTION}{EOT}0.6{EOT}" in inputs and QUESTION in inputs
    assert inputs <= {QUESTION} | {f"{QUESTION}{EOT}{r}{EOT}" for r in ("0.9", "0.8", "0.7", "0.6", "0.5")}
    expected = build_sft_records(read_table(store, dataset, "data"), train.data.mix, tokenizer)
    assert [r["input"] for r in rows] == expected.column("input").to_pylist()  # what training builds

    # Evaluation: the recipe's prompts at every ratio.
    evaluation = load_evaluate_config(CONFIGS / f"{PAPER}_evaluate.yaml")
    prompts = ratio_prompts(evaluation, tokenizer, [QUESTION])
    assert prompts[0.6] == [marked] and prompts[1.0] == [bare]
    assert prompts[0.5] == [_expected_prompt(f"{QUESTION}{EOT}0.5{EOT}")]


def test_export_from_a_train_config_needs_a_committed_dataset(tmp_path, capsys):
    out = str(tmp_path / "out")
    tldr = str(CONFIGS / "tldr_r1_distill_qwen_7b_fsdp.yaml")
    assert cli.main(["export", "--train-config", tldr, "--out", out]) == ExitCode.USER_ERROR
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "export each pool with --root/--dataset" in err
    assert cli.main(["export", "--out", out]) == ExitCode.USER_ERROR
    assert "give --root and --dataset, or --train-config" in capsys.readouterr().err
