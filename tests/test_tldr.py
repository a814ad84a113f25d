"""TL;DR re-weighting: the update against hand-computed values, benefits, the weighted sampler, and TL;DR
mode end to end (two pools from two tiny models, a 2-worker Ray Train run whose weight history survives an
injected failure, then an evaluation of the result)."""

from __future__ import annotations

import collections
import json
import math
import statistics
from pathlib import Path

import pyarrow as pa
import pytest

from tokenskip.train.config import TLDRSettings, TrainConfig
from tokenskip.train.tldr import (
    Reference,
    TLDRState,
    WeightedDomainSampler,
    benefits_by_domain,
    domain_benefits,
    update_domain_weights,
)

REF = Reference(short_tokens=100.0, short_accuracy=0.6, long_tokens=500.0, long_accuracy=0.9)


def test_update_matches_hand_computed_values():
    # softmax(log .5 + 4 * .5, log .5 + 0) = (e^2, 1) / (e^2 + 1) = (0.8807970779778823, 0.1192029220221175)
    # then (1 - 1e-4) w + 1e-4 / 2.
    assert update_domain_weights([0.5, 0.5], [0.5, 0.0]) == pytest.approx(
        [0.8807589982700845, 0.1192410017299153], abs=1e-15
    )
    # Benefits (0.25, 1/3): the logit gap is 4 * (1/3 - 1/4) = 1/3, so w_short = 1 / (1 + e^(1/3))
    # = 1 / 2.3956124250860895 = 0.4174297935376853 -> smoothed 0.4174380505583315.
    assert update_domain_weights([0.5, 0.5], [0.25, 1 / 3]) == pytest.approx(
        [0.4174380505583315, 0.5825619494416685], abs=1e-15
    )
    # Equal benefits leave the softmax unchanged; only the c smoothing moves the weights:
    # 0.9999 * 0.3 + 0.00005 = 0.30002, 0.9999 * 0.7 + 0.00005 = 0.69998.
    assert update_domain_weights([0.3, 0.7], [0.0, 0.0]) == pytest.approx([0.30002, 0.69998], abs=1e-15)
    assert update_domain_weights([0.3, 0.7], [0.5, 0.5]) == pytest.approx([0.30002, 0.69998], abs=1e-15)
    # The c smoothing is a floor: a domain pushed to ~e^-40 still keeps c / k = 0.00005.
    starved = update_domain_weights([0.5, 0.5], [10.0, 0.0])
    assert starved[1] == pytest.approx(0.00005, rel=1e-9)
    assert starved[0] == pytest.approx(0.99995, rel=1e-12)
    # Three domains, c = 0.1, eta = 1: softmax(log(1/3) + (ln 2, 0, 0)) = (2, 1, 1) / 4 -> 0.9 * w + 0.1 / 3.
    assert update_domain_weights([1 / 3] * 3, [math.log(2), 0.0, 0.0], eta=1.0, c=0.1) == pytest.approx(
        [0.9 * 0.5 + 0.1 / 3, 0.9 * 0.25 + 0.1 / 3, 0.9 * 0.25 + 0.1 / 3], abs=1e-15
    )
    with pytest.raises(ValueError):
        update_domain_weights([0.5, 0.0], [0.0, 0.0])
    with pytest.raises(ValueError):
        update_domain_weights([0.5, 0.5], [0.0])


def test_benefits_hand_computed_with_clipping_at_zero():
    # |500 - 100| = 400 and |0.9 - 0.6| = 0.3 normalise the two benefits.
    assert domain_benefits(0.8, 200.0, REF) == pytest.approx({"short": 100 / 400, "long": 0.1 / 0.3})
    assert domain_benefits(0.75, 300.0, REF) == pytest.approx({"short": 0.5, "long": 0.5})
    # Shorter than the short reference and more accurate than the long one: both clipped to 0.
    assert domain_benefits(0.95, 80.0, REF) == {"short": 0.0, "long": 0.0}
    # Only one side clipped.
    assert domain_benefits(0.95, 900.0, REF) == pytest.approx({"short": 2.0, "long": 0.0})
    assert domain_benefits(0.3, 50.0, REF) == pytest.approx({"short": 0.0, "long": 2.0})
    assert benefits_by_domain(["short", "other", "long"], {"short": 0.2, "long": 0.7}) == [0.2, 0.0, 0.7]
    with pytest.raises(ValueError):
        Reference(short_tokens=100, short_accuracy=0.5, long_tokens=100, long_accuracy=0.9)


def _settings(tmp_path) -> TLDRSettings:
    return TLDRSettings.model_validate(
        {
            "domains": [
                {"name": "short", "role": "short", "source": {"path": str(tmp_path / "s.jsonl")}},
                {"name": "long", "role": "long", "source": {"path": str(tmp_path / "l.jsonl")}},
            ],
            "short_reference": {"tokens": 100, "accuracy": 0.6},
            "long_reference": {"tokens": 500, "accuracy": 0.9},
            "dev": {"path": str(tmp_path / "dev.jsonl")},
        }
    )


def test_state_reweight_and_round_trip(tmp_path):
    settings = _settings(tmp_path)
    state = TLDRState.initial(settings)
    assert state.weights == [0.5, 0.5]
    entry = state.reweight(10, accuracy=0.8, mean_tokens=200.0, settings=settings)
    assert state.weights == pytest.approx([0.4174380505583315, 0.5825619494416685], abs=1e-15)
    assert entry["benefits"] == pytest.approx({"short": 0.25, "long": 1 / 3})
    restored = TLDRState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert restored == state
    assert [h["step"] for h in restored.history] == [0, 10]


def test_weighted_sampler_follows_weights_and_is_seeded():
    sampler = WeightedDomainSampler([50, 7], global_batch=400, seed=3)
    picks = [p for step in range(10) for p in sampler.global_batch_at(step, [0.9, 0.1])]
    share = collections.Counter(d for d, _ in picks)[0] / len(picks)
    assert 0.88 < share < 0.92  # 4000 draws: sd 0.005
    assert all(0 <= i < (50, 7)[d] for d, i in picks)
    assert sampler.global_batch_at(4, [0.9, 0.1]) == WeightedDomainSampler([50, 7], 400, 3).global_batch_at(
        4, [0.9, 0.1]
    )
    flipped = [p for step in range(10) for p in sampler.global_batch_at(step, [0.1, 0.9])]
    assert collections.Counter(d for d, _ in flipped)[1] / len(flipped) > 0.88
    assert sampler.global_batch_at(4, [0.9, 0.1]) != WeightedDomainSampler([50, 7], 400, 4).global_batch_at(
        4, [0.9, 0.1]
    )


@pytest.mark.slow
def test_dev_eval_vllm_lora_matches_transformers_fallback(tmp_path, tiny_causal_lm, ray_two_cpus):
    """The vLLM path (adapter per request) and the transformers fallback agree on a LoRA model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenskip.train.tldr import DevEvaluator

    _write_jsonl(
        tmp_path / "dev.jsonl", [{"question": f"What is {i} + 3?", "answer": str(i + 3)} for i in range(4)]
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm, dtype=torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    with torch.no_grad():  # a non-zero adapter, so a vLLM run that ignored it would differ
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    raw = _settings(tmp_path).model_dump()
    raw["dev"]["path"] = str(tmp_path / "dev.jsonl")
    raw["sampling"] = {"max_tokens": 12}
    raw["engine"] = {"model": "unused", "kv_cache_memory_bytes": 1 << 28, "max_model_len": 256}
    results = {}
    for backend in ("transformers", "vllm"):
        settings = TLDRSettings.model_validate({**raw, "backend": backend})
        evaluator = DevEvaluator(settings, str(tiny_causal_lm), tokenizer, lora=True, lora_rank=4)
        try:
            results[backend] = evaluator.evaluate(model, step=1, workdir=str(tmp_path))
        finally:
            evaluator.close()  # the vLLM actor's CPU is needed by the next test
    hf, vllm = results["transformers"], results["vllm"]
    assert (tmp_path / "dev-adapter-step-00000001" / "adapter_config.json").exists()
    assert vllm.responses == hf.responses and vllm.count == hf.count == 4
    assert (vllm.accuracy, vllm.mean_tokens) == (hf.accuracy, hf.mean_tokens)
    # The adapter matters: without it the base model answers differently.
    settings = TLDRSettings.model_validate({**raw, "backend": "transformers"})
    with model.disable_adapter():
        base_only = DevEvaluator(settings, str(tiny_causal_lm), tokenizer, lora=True, lora_rank=4)
        assert base_only.evaluate(model, step=2, workdir=str(tmp_path)).responses != hf.responses


# --- End to end: 2 Ray Train workers, re-weighting every 2 steps, crash after step 5 -----------------


@pytest.fixture()
def ray_two_cpus():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


DEV_DELAY_S = 20.0  # the dev evaluation's injected sleep: twice the collective timeout below


@pytest.fixture()
def ray_with_slow_dev_evaluation():
    """Ray whose processes all sleep DEV_DELAY_S inside each dev evaluation (a delay point: the
    evaluation outlasts the collective timeout however fast the machine is)."""
    import ray

    from tokenskip.failpoints import DELAY_ENV

    ray.shutdown()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {DELAY_ENV: f"tldr.dev_evaluate={DEV_DELAY_S}"}},
    )
    yield
    ray.shutdown()


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _build_pool(model: Path, problems_path: Path, storage_root: Path, dataset: str, **sections) -> pa.Table:
    """One TL;DR pool, built as the recipes build theirs: a pipeline run of ``model``'s greedy CoTs,
    kept whole (``compression: null``), committed under ``storage_root``; returns its data table."""
    from tests.tiny_pipeline import tiny_pipeline_config, tiny_resources
    from tokenskip.pipeline import run_pipeline
    from tokenskip.storage import StorageConfig, read_table

    output = StorageConfig(root=str(storage_root))
    config = tiny_pipeline_config(
        model,
        problems_path,
        output,
        dataset=dataset,
        compression=None,
        resources=tiny_resources(shard_size=POOL_PROBLEMS),  # one shard: one generation pass
        **sections,
    )
    assert run_pipeline(config, progress=False).committed is True
    return read_table(output, dataset, "data")


POOL_PROBLEMS = 8  # per pool: few, since the sampler draws with replacement
HELD_OUT_PROBLEMS = 4


@pytest.mark.slow
def test_tldr_pools_train_reweight_resume_and_evaluate(
    tmp_path, tiny_solver, tiny_long_solver, ray_two_cpus, capsys
):
    """TL;DR mode end to end on CPU: a System-1 pool from the short tiny solver and a System-2 pool from
    the long one (two pipeline runs, no compression), LoRA training of the System-2 model on both pools as
    committed (2 Ray Train workers, vLLM dev actor, re-weighting every 2 steps, a crash after step 5 and a
    resume), then `tokenskip evaluate` of the trained adapter on held-out problems. One Ray for all."""
    import pyarrow.parquet as pq
    import yaml

    from tests.tiny_pipeline import tiny_problems, write_problems
    from tokenskip.cli import main
    from tokenskip.evaluate import SAMPLES_SCHEMA, TABLE_SCHEMA
    from tokenskip.testing.tiny_models import arithmetic_problems
    from tokenskip.train.job import run_training

    # --- The two pools, each from its own model and run, as the tldr_system{1,2}_* recipes build them.
    pool_problems = tiny_problems(POOL_PROBLEMS)
    problems_path = write_problems(tmp_path / "problems.jsonl", pool_problems)
    pools = tmp_path / "datasets"
    short_pool = _build_pool(
        tiny_solver, problems_path, pools, "tldr-system1", sampling={"n": 1, "temperature": 0.0, "max_tokens": 64}
    )
    long_pool = _build_pool(
        tiny_long_solver,
        problems_path,
        pools,
        "tldr-system2",
        sampling={"n": 1, "temperature": 0.0, "max_tokens": 192},
        selection={"policy": "shortest-correct"},
    )
    for pool in (short_pool, long_pool):  # greedy solvers: every problem's one CoT is right and kept whole
        assert pool.num_rows == POOL_PROBLEMS
        assert all(r["verdict"] == "correct" and r["compressions"] == [] for r in pool.to_pylist())
    short_tokens = statistics.mean(short_pool["original_tokens"].to_pylist())
    long_tokens = statistics.mean(long_pool["original_tokens"].to_pylist())
    # The two models really answer differently: System-2's CoTs are the long ones.
    assert long_tokens > 2 * short_tokens, (short_tokens, long_tokens)
    assert all("Step 5: Check" in cot for cot in long_pool["cot"].to_pylist())
    assert not any("Step 5" in cot for cot in short_pool["cot"].to_pylist())

    _write_jsonl(
        tmp_path / "dev.jsonl", [{"question": f"What is {i} + 3?", "answer": str(i + 3)} for i in range(3)]
    )

    def pool_source(dataset: str) -> dict:
        # The recipe's domain source: the committed run through its manifest, the bare question and the
        # model's own response (mix ratio 1.0, answer tail kept).
        return {
            "storage_root": str(pools),
            "dataset": dataset,
            "format": "compressed",
            "mix": {"ratios": [1.0], "answer_tail": "keep"},
        }

    config = TrainConfig.model_validate(
        {
            "name": "tldr-run",
            # TL;DR fine-tunes the long-CoT model on both pools.
            "model": str(tiny_long_solver),
            "dtype": "float32",
            "mode": "tldr",
            "tldr": {
                "domains": [
                    {"name": "short", "role": "short", "source": pool_source("tldr-system1")},
                    {"name": "long", "role": "long", "source": pool_source("tldr-system2")},
                ],
                # Cut at 12 tokens, the long model's dev answers are wrong and long-winded, so both
                # benefits are positive.
                "short_reference": {"tokens": 4, "accuracy": 0.5},
                "long_reference": {"tokens": 20, "accuracy": 0.9},
                "eval_steps": 2,
                "eta": 1.0,
                "dev": {"path": str(tmp_path / "dev.jsonl")},
                # The production path: a vLLM actor that gets the LoRA adapter per evaluation.
                "backend": "vllm",
                "engine": {"model": "unused", "kv_cache_memory_bytes": 1 << 28, "max_model_len": 256},
                "engine_resources": {"CPU": 1},
                "sampling": {"max_tokens": 12},
            },
            "lora": {"r": 4, "alpha": 8},
            "optim": {
                "learning_rate": 1e-3,
                "max_steps": 8,
                "per_device_batch_size": 2,
                "gradient_accumulation_steps": 1,
                "warmup_ratio": 0.0,
            },
            # A quarter CPU per worker leaves one for the dev-engine actor and room for the Ray Data
            # tasks that read and tokenize the domains.
            "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 0.25}, "torch_threads": 1},
            "checkpoint": {"storage_path": str(tmp_path / "runs"), "save_steps": 2, "max_failures": 1},
            "failure_injection": {"at_step": 5, "marker_path": str(tmp_path / "failed-once")},
        }
    )
    result = run_training(config)
    assert result.error is None
    assert (tmp_path / "failed-once").exists()  # the failure really happened
    with open(f"{result.checkpoint_path}/trainer_state.json", encoding="utf-8") as handle:
        state = json.load(handle)
    assert state["step"] == 8
    adapter = Path(result.checkpoint_path, "adapter")
    assert (adapter / "adapter_model.safetensors").exists()  # LoRA run
    # The second attempt started from the step-4 checkpoint, not from 0.
    assert [a["start_step"] for a in state["attempts"]] == [0, 4]
    history = state["tldr"]["history"]
    # Steps 0-4 come from the restored checkpoint, 6 and 8 from the resumed attempt; no step twice.
    assert [h["step"] for h in history] == [0, 2, 4, 6, 8]
    for before, after in zip(history, history[1:], strict=False):
        # Each update starts from the previous weights: recompute it from the history alone.
        benefits = [after["benefits"]["short"], after["benefits"]["long"]]
        previous = [before["weights"]["short"], before["weights"]["long"]]
        expected = update_domain_weights(previous, benefits, eta=1.0, c=1e-4)
        assert [after["weights"]["short"], after["weights"]["long"]] == pytest.approx(expected, abs=1e-12)
        assert 0.0 <= after["accuracy"] <= 1.0 and 1 <= after["mean_tokens"] <= 12
    assert history[-1]["weights"] != history[0]["weights"]
    assert state["tldr"]["weights"] == pytest.approx(list(history[-1]["weights"].values()))
    assert state["sampler"] == {
        "kind": "weighted",
        "seed": 42,
        "step": 8,
        "weights": state["tldr"]["weights"],
    }
    assert set(result.metrics) >= {
        "loss",
        "lr",
        "tokens_per_s",
        "weight_short",
        "weight_long",
        "dev_accuracy",
    }

    # --- `tokenskip evaluate` of the trained adapter on problems neither pool holds.
    held_out = [
        {"id": f"held-{i}", "question": p["question"], "answer": p["answer"]}
        for i, p in enumerate(arithmetic_problems(HELD_OUT_PROBLEMS, seed=1))
    ]
    assert not {p["question"] for p in held_out} & {p["question"] for p in pool_problems}
    write_problems(tmp_path / "held_out.jsonl", held_out)
    max_tokens = 192
    evaluation = {
        "engine": {
            "model": str(tiny_long_solver),
            "max_model_len": 256,
            "kv_cache_memory_bytes": 128 << 20,
            "enable_lora": True,
            "max_lora_rank": 8,
        },
        "sampling": {"max_tokens": max_tokens},
        "source": {
            "path": str(tmp_path / "held_out.jsonl"),
            "kind": "custom",
            "name": "held-out",
            "split": "test",
            "field_map": {"question": "question", "answer": "answer", "id": "id"},
        },
        "ratios": [1.0],
        "adapter": str(adapter),
        "output": str(tmp_path / "eval"),
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(evaluation))
    capsys.readouterr()
    assert main(["evaluate", "--config", str(tmp_path / "eval.yaml")]) == 0
    assert "ratio" in capsys.readouterr().out  # the table was printed
    table = pq.read_table(tmp_path / "eval" / "evaluation.parquet")
    assert table.schema == TABLE_SCHEMA
    (row,) = table.to_pylist()
    assert row["ratio"] == 1.0 and row["n"] == HELD_OUT_PROBLEMS and row["n_errors"] == 0
    assert 0.0 <= row["accuracy"] <= 1.0 and 0 < row["mean_tokens"] <= max_tokens
    assert row["n_correct"] + row["n_incorrect"] + row["n_unparsable"] + row["n_timeout"] == HELD_OUT_PROBLEMS
    samples = pq.read_table(tmp_path / "eval" / "samples.parquet")
    assert samples.schema == SAMPLES_SCHEMA
    assert sorted(samples["question"].to_pylist()) == sorted(p["question"] for p in held_out)
    assert len(set(samples["problem_id"].to_pylist())) == HELD_OUT_PROBLEMS
    for sample in samples.to_pylist():  # one graded row per held-out problem
        assert sample["response"] and 0 < sample["tokens"] <= max_tokens and sample["verdict"]
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["status"] == "complete" and report["adapter"] == str(adapter)
    assert report["table"] == table.to_pylist()


@pytest.mark.slow
def test_full_finetune_dev_loop_runs_in_vllm_actor_longer_than_the_collective_timeout(
    tmp_path, tiny_causal_lm, ray_with_slow_dev_evaluation
):
    """A full fine-tune's dev evaluation runs in a vLLM actor on the exported checkpoint; each one
    sleeps twice the workers' collective timeout (a delay point inside the evaluation), yet the run
    ends well: the ranks wait for it with ray.get, not in a collective."""
    from tokenskip.train.job import run_training

    # Small, so the evaluation's injected sleep is surely longer; large enough for training's own
    # collectives (ranks a few seconds apart while loading on a busy 2-core box).
    collective_timeout_s = DEV_DELAY_S / 2
    _write_jsonl(
        tmp_path / "short.jsonl",
        [{"question": f"What is {i} + 1?", "response": f"$\\boxed{{{i + 1}}}$"} for i in range(4)],
    )
    _write_jsonl(
        tmp_path / "long.jsonl",
        [
            {"question": f"What is {i} * 2?", "response": f"{i} + {i} = {2 * i}. $\\boxed{{{2 * i}}}$"}
            for i in range(4)
        ],
    )
    _write_jsonl(
        tmp_path / "dev.jsonl", [{"question": f"What is {i} + 3?", "answer": str(i + 3)} for i in range(64)]
    )
    config = TrainConfig.model_validate(
        {
            "name": "tldr-full",
            "model": str(tiny_causal_lm),
            "dtype": "float32",
            "mode": "tldr",
            "tldr": {
                "domains": [
                    {"name": "short", "role": "short", "source": {"path": str(tmp_path / "short.jsonl")}},
                    {"name": "long", "role": "long", "source": {"path": str(tmp_path / "long.jsonl")}},
                ],
                "short_reference": {"tokens": 4, "accuracy": 0.5},
                "long_reference": {"tokens": 20, "accuracy": 0.9},
                "eval_steps": 2,
                "dev": {"path": str(tmp_path / "dev.jsonl")},
                "backend": "vllm",
                "engine": {"model": "unused", "kv_cache_memory_bytes": 1 << 28, "max_model_len": 512},
                "engine_resources": {"CPU": 1},
                "sampling": {"max_tokens": 200},
                "dev_timeout_s": 900,
            },
            "lora": {"enabled": False},
            "optim": {
                "learning_rate": 1e-3,
                "max_steps": 4,
                "per_device_batch_size": 1,
                "gradient_accumulation_steps": 1,
                "warmup_ratio": 0.0,
            },
            "scaling": {
                "num_workers": 2,
                "resources_per_worker": {"CPU": 0.25},
                "torch_threads": 1,
                "collective_timeout_s": collective_timeout_s,
            },
            "checkpoint": {"storage_path": str(tmp_path / "runs"), "save_steps": 4, "max_failures": 0},
        }
    )
    result = run_training(config)
    assert result.error is None, result.error
    with open(f"{result.checkpoint_path}/trainer_state.json", encoding="utf-8") as handle:
        state = json.load(handle)
    assert Path(result.checkpoint_path, "model", "model.safetensors").exists()  # a full fine-tune
    history = state["tldr"]["history"]
    assert [h["step"] for h in history] == [0, 2, 4]
    for entry in history[1:]:
        assert entry["dev_backend"] == "vllm"
        # Every rank waited out the injected sleep (a lower bound, not a timing): longer than the
        # collective timeout, which a rank waiting in a collective would have failed on.
        assert entry["dev_seconds"] >= DEV_DELAY_S > collective_timeout_s, entry
        assert 0.0 <= entry["accuracy"] <= 1.0 and 1 <= entry["mean_tokens"] <= 200
    assert [a["start_step"] for a in state["attempts"]] == [0]
