"""The GPU-shaped lane, on CPU: every shipped recipe in tokenskip/configs/ that requests GPUs.

Ray starts once for the module with logical GPUs (``ray.init(num_gpus=...)``): as many as the most
demanding recipe's stages hold at once, so the recipes' GPU requests are scheduled for real. Each
pipeline recipe then goes through

* plan and graph construction with its own resources (the run's ``map_batches`` calls, and the dry
  run's graph): Ray Data checks every stage's arguments there (item 1 of issue 18 failed exactly
  here: GPUs with ``batch_size=None``);
* a run of a few shards with its own GPUs per actor, the engines and scorers placed on CPU and tiny
  local models substituted (one actor per pool and CPU shares that fit 2 cores): the recipe's Ray
  Data wiring and placement, end to end.

A training recipe builds its ``TorchTrainer`` with its own scaling (GPU workers); it is not fitted
here (nccl needs real GPUs). An evaluation recipe holds one vLLM engine and no Ray stages: the lane has
nothing to schedule for it (tests/test_recipes.py dry-runs every recipe). A recipe the lane cannot
classify fails the lane, so a new GPU recipe is never skipped silently.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

import tokenskip
from tests.conftest import MOTO_CREDENTIALS
from tests.fixture_data import DATA_DIR
from tokenskip.config import PipelineConfig, apply_overrides, cluster_demand
from tokenskip.evaluate import EvaluateConfig
from tokenskip.pipeline import _build_dataset, build_dry_run_graph, make_plan, run_pipeline
from tokenskip.storage import RunStore, read_manifest, read_table
from tokenskip.testing.tiny_models import arithmetic_problems
from tokenskip.train.config import TrainConfig

pytestmark = pytest.mark.slow

CONFIGS = Path(tokenskip.__file__).parent / "configs"


def gpu_requests(node, where: str = "") -> list[str]:
    """Dotted keys of ``node`` that ask for GPUs: a key naming gpu(s) with a true or positive value
    (``generation_gpus: 1``, ``use_gpu: true``, ``resources_per_worker: {GPU: 1}``)."""
    if isinstance(node, dict):
        found = []
        for key, value in node.items():
            path = f"{where}.{key}" if where else str(key)
            if "gpu" in str(key).lower() and not isinstance(value, dict | list) and value:
                if value is True or (isinstance(value, int | float) and value > 0):
                    found.append(path)
            found += gpu_requests(value, path)
        return found
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in gpu_requests(v, f"{where}.{i}")]
    return []


def _load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else {}


GPU_RECIPES = sorted(p for p in CONFIGS.glob("*.yaml") if gpu_requests(_load(p)))


def _kind(data: dict) -> str:
    for kind, model in (("pipeline", PipelineConfig), ("train", TrainConfig), ("evaluate", EvaluateConfig)):
        try:
            model.model_validate(data)
        except ValueError:
            continue
        return kind
    raise AssertionError("not a pipeline, training or evaluation config: the GPU lane has no way to run it")


PIPELINE_RECIPES = [p for p in GPU_RECIPES if _kind(_load(p)) == "pipeline"]
TRAIN_RECIPES = [p for p in GPU_RECIPES if _kind(_load(p)) == "train"]
EVALUATE_RECIPES = [p for p in GPU_RECIPES if _kind(_load(p)) == "evaluate"]
# As many logical GPUs as the most demanding recipe's stages hold at once, at its own resources.
LOGICAL_GPUS = max(cluster_demand(PipelineConfig.model_validate(_load(p))).gpus for p in PIPELINE_RECIPES)


def test_the_lane_finds_every_gpu_recipe():
    names = {p.name for p in GPU_RECIPES}
    # The shipped GPU recipes today; a new one is picked up by the glob above without an edit here.
    assert {"gsm8k_qwen2_5_7b_gpu.yaml", "train_qwen2_5_7b_gsm8k.yaml"} <= names
    assert "demo.yaml" not in names  # the CPU demo requests no GPU
    assert set(GPU_RECIPES) == set(PIPELINE_RECIPES) | set(TRAIN_RECIPES) | set(EVALUATE_RECIPES)
    # The papers' recipes (issue 21): TokenSkip's data and training, TL;DR's two pools and training.
    assert {
        "tokenskip_paper_qwen2_5_7b_gsm8k_data",
        "tldr_system1_qwen2_5_7b_gsm8k_data",
        "tldr_system2_r1_distill_qwen_7b_math_data",
    } <= {p.stem for p in PIPELINE_RECIPES}
    assert {"tokenskip_paper_qwen2_5_7b_gsm8k_train", "tldr_r1_distill_qwen_7b_fsdp"} <= {
        p.stem for p in TRAIN_RECIPES
    }
    assert gpu_requests({"resources": {"generation_gpus": 0, "compression_gpus": 0.5}}) == [
        "resources.compression_gpus"
    ]


@pytest.fixture(scope="module")
def ray_with_gpus():
    import ray

    assert not ray.is_initialized()
    ray.init(
        num_cpus=2,
        num_gpus=math.ceil(LOGICAL_GPUS),
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": MOTO_CREDENTIALS},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_scorer(model_cache) -> Path:
    from tokenskip.testing.tiny_token_classifier import build_tiny_token_classifier

    # llmlingua's word rules follow the folder name: it must contain xlm-roberta-large.
    return build_tiny_token_classifier(model_cache / "tiny-xlm-roberta-large")


# Reference sets for decontamination, by source kind (tests/data, cut to the rows tests use).
EVAL_SETS = {"gsm8k": DATA_DIR / "gsm8k" / "test.jsonl.gz", "math": DATA_DIR / "math500" / "test.jsonl.gz"}


def _tiny_problem_file(path: Path, kind: str, count: int, where: dict | None = None) -> Path:
    """The tiny solver's problems in the layout of source ``kind``, each holding the first value of every
    field the source's ``where`` filter asks for (so the filter keeps them)."""
    rows = []
    for p in arithmetic_problems(count):
        if kind == "gsm8k":
            rows.append(
                {
                    "question": p["question"],
                    "answer": f"{p['a']} + {p['b']} = {p['answer']}\n#### {p['answer']}",
                }
            )
        elif kind == "math":
            rows.append({"problem": p["question"], "solution": f"$\\boxed{{{p['answer']}}}$"})
        else:
            raise AssertionError(f"the GPU lane has no tiny problems for source kind {kind!r}: add a layout")
        rows[-1] |= {field: values[0] for field, values in (where or {}).items()}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _local_recipe(recipe: Path, tmp_path: Path, solver: Path, scorer: Path, problems: int) -> dict:
    """The recipe with its inputs, output and models local and tiny; resources untouched."""
    data = _load(recipe)
    overrides: dict = {"output.root": str(tmp_path / "out"), "output.storage_options": {}}
    for i, source in enumerate(data["sources"]):
        tiny = _tiny_problem_file(
            tmp_path / f"source-{i}.jsonl", source.get("kind", "custom"), problems, source.get("where")
        )
        overrides |= {f"sources.{i}.path": str(tiny), f"sources.{i}.storage_options": {}}
    for i, eval_set in enumerate(data.get("dedup", {}).get("eval_sets") or []):
        if eval_set.get("kind") not in EVAL_SETS:
            raise AssertionError(f"the GPU lane has no reference set for eval kind {eval_set.get('kind')!r}")
        overrides |= {
            f"dedup.eval_sets.{i}.path": str(EVAL_SETS[eval_set["kind"]]),
            f"dedup.eval_sets.{i}.storage_options": {},
        }
    overrides |= {
        # Placed on CPU: the logical GPUs are scheduling tokens, the engines and scorers run on CPU.
        "engine.model": str(solver),
        "engine.device": "cpu",
        "engine.dtype": "auto",
        "engine.max_model_len": 256,
        "engine.kv_cache_memory_bytes": 128 << 20,
        "engine.enforce_eager": True,
    }
    if data.get("compression", {}) is not None:  # `compression: null` pools load no scorer
        scorer_kind = (data.get("compression") or {}).get("scorer", {}).get("kind", "llmlingua2")
        overrides |= {
            "compression.scorer.model": str(scorer if scorer_kind == "llmlingua2" else solver),
            "compression.scorer.device": "cpu",
            "compression.scorer.dtype": "float32",
            "compression.target_tokenizer": str(solver),
        }
    return apply_overrides(data, overrides)


@pytest.mark.parametrize("recipe", PIPELINE_RECIPES, ids=lambda p: p.stem)
def test_pipeline_recipe_builds_its_graph_with_its_own_resources(
    recipe, tmp_path, tiny_solver, tiny_scorer, ray_with_gpus
):
    config = PipelineConfig.model_validate(_local_recipe(recipe, tmp_path, tiny_solver, tiny_scorer, 8))
    assert config.resources == PipelineConfig.model_validate(_load(recipe)).resources
    plan = make_plan(config)
    assert plan.pending
    demand = cluster_demand(config)
    assert f"hold {demand.cpus:g} CPUs and {demand.gpus:g} GPUs" in plan.describe()
    assert demand.gpus <= ray_with_gpus.cluster_resources()["GPU"]
    build_dry_run_graph(plan)  # what --dry-run builds
    store = RunStore(config.output, config.dataset, plan.run_id)
    expected = {s.shard_id: s.size * config.sampling.n for s in plan.pending}
    graph = _build_dataset(config, plan.pending, store, expected)  # what the run builds, not run
    assert "MapBatches(GenerateStage)" in str(graph)
    assert ("MapBatches(CompressKeptStage)" in str(graph)) == (config.compression is not None)


@pytest.mark.parametrize("recipe", PIPELINE_RECIPES, ids=lambda p: p.stem)
def test_pipeline_recipe_runs_a_few_shards_on_logical_gpus(
    recipe, tmp_path, tiny_solver, tiny_scorer, ray_with_gpus
):
    data = _local_recipe(recipe, tmp_path, tiny_solver, tiny_scorer, 8)
    own = PipelineConfig.model_validate(_load(recipe)).resources
    # Its GPUs per actor, one actor per pool; CPU shares and shards small enough for 2 cores.
    # Two samples per problem, except for greedy recipes (TokenSkip's one CoT): vLLM takes n=1 only there.
    n = 2 if data.get("sampling", {}).get("temperature", 0.0) > 0 else 1
    data = apply_overrides(
        data,
        {
            "sampling.n": n,
            "sampling.max_tokens": 64,
            "resources.generation_actors": 1,
            "resources.compression_actors": 1,
            "resources.generation_cpus": 0.5,
            "resources.compression_cpus": 0.25,
            "resources.grading_cpus": 0.25,
            "resources.write_cpus": 0.25,
            "resources.omp_threads": 1,
            "resources.shard_size": 4,
            "resources.generation_batch_size": 4,
        },
    )
    config = PipelineConfig.model_validate(data)
    assert (config.resources.generation_gpus, config.resources.compression_gpus) == (
        own.generation_gpus,
        own.compression_gpus,
    )
    assert own.generation_gpus > 0 or own.compression_gpus > 0
    report = run_pipeline(config, progress=False)
    assert report.committed is True
    assert report.attempt.shards_committed == 2
    manifest = read_manifest(config.output, config.dataset)
    assert manifest.counts["samples"] == 8 * n
    kept = read_table(config.output, config.dataset, "data")
    assert kept.num_rows == manifest.counts["kept_samples"] > 0
    ratios = config.compression.ratios if config.compression is not None else []  # null: plain CoTs
    for row in kept.to_pylist():  # the scorer actor (on its logical GPU) compressed every kept row
        assert [c["target_ratio"] for c in row["compressions"]] == ratios


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=lambda p: p.stem)
def test_train_recipe_builds_its_trainer_with_its_own_scaling(recipe, tmp_path, ray_with_gpus):
    from tokenskip.train.job import build_trainer

    # The recipes' data lives in a placeholder bucket; building the trainer opens each domain's stream
    # (a row count and a lazy Ray dataset), so every source becomes a small local file here.
    rows = tmp_path / "cots.jsonl"
    rows.write_text("".join(json.dumps({"question": f"q{i}", "response": f"r{i}"}) + "\n" for i in range(8)))
    local = {"path": str(rows), "format": "cot"}
    data = apply_overrides(_load(recipe), {"checkpoint.storage_path": str(tmp_path / "ckpt")})
    if data.get("data"):
        data["data"] = local
    for domain in (data.get("tldr") or {}).get("domains", []):
        domain["source"] = dict(local)
    config = TrainConfig.model_validate(data)
    trainer = build_trainer(config)
    scaling = trainer.scaling_config
    assert scaling.use_gpu and scaling.num_workers == config.scaling.num_workers
    assert scaling._resources_per_worker_not_none.get("GPU", 0) >= 1
