"""Sharded training (scaling.strategy: fsdp): FSDP2 wrapping, measured state bytes, Hugging Face export,
and, on Ray Train with 2 gloo workers, a resume whose next losses equal the uninterrupted run's and an
intermediate checkpoint exported to a folder transformers loads and generates from."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tokenskip.exit_codes import ExitCode
from tokenskip.train.config import TrainConfig


def _config(model: Path, storage: Path, **overrides) -> TrainConfig:
    raw = {
        "name": "fsdp-run",
        "model": str(model),
        "dtype": "float32",
        "data": {"path": "unused.jsonl"},
        "lora": {"enabled": False},
        "scaling": {"strategy": "fsdp"},
        "checkpoint": {"storage_path": str(storage)},
    }
    for key, value in overrides.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    return TrainConfig.model_validate(raw)


@pytest.fixture
def one_rank_group():
    """A world-size-1 gloo group in this process: FSDP2 runs its full code path on one rank."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_precision_and_gradient_checkpointing_defaults(tmp_path, tiny_causal_lm):
    from tokenskip.train.sharding import Precision, precision_for

    # Trained weights keep fp32 masters; only a ddp LoRA's frozen base is stored in the compute dtype.
    assert precision_for("fsdp", "bfloat16", lora=False) == Precision("float32", "bfloat16")
    assert precision_for("ddp", "bfloat16", lora=False) == Precision("float32", "bfloat16")
    assert precision_for("fsdp", "bfloat16", lora=True) == Precision("float32", "bfloat16")
    assert precision_for("ddp", "bfloat16", lora=True) == Precision("bfloat16", "bfloat16")
    full = _config(tiny_causal_lm, tmp_path)
    assert full.optim.gradient_checkpointing_enabled(full.lora.enabled)
    lora = _config(tiny_causal_lm, tmp_path, lora={"enabled": True})
    assert not lora.optim.gradient_checkpointing_enabled(lora.lora.enabled)
    with pytest.raises(ValueError, match="cannot evaluate an fsdp-sharded model"):
        TrainConfig.model_validate(
            {
                "model": "m",
                "mode": "tldr",
                "scaling": {"strategy": "fsdp"},
                "checkpoint": {"storage_path": "/tmp/x"},
                "tldr": {
                    "domains": [
                        {"name": "s", "role": "short", "source": {"path": "s.jsonl"}},
                        {"name": "l", "role": "long", "source": {"path": "l.jsonl"}},
                    ],
                    "short_reference": {"tokens": 100, "accuracy": 0.5},
                    "long_reference": {"tokens": 400, "accuracy": 0.8},
                    "dev": {"path": "dev.jsonl"},
                    "backend": "transformers",
                },
            }
        )


@pytest.mark.parametrize("lora", [False, True])
def test_fsdp_wraps_layers_trains_and_saves_hf_folder(tmp_path, tiny_causal_lm, one_rank_group, lora):
    import torch
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenskip.train.data import collate, tokenize_example
    from tokenskip.train.export import save_hf_model
    from tokenskip.train.sharding import (
        build_optimizer,
        decoder_layers,
        load_model,
        precision_for,
        shard_model,
        state_bytes,
    )

    config = _config(tiny_causal_lm, tmp_path, lora={"enabled": lora, "r": 4, "alpha": 8})
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    model = load_model(config)
    assert model.is_gradient_checkpointing == (not lora)  # on by default for full fine-tunes only
    assert len(decoder_layers(model)) == 2
    sharded = shard_model(model, "fsdp", precision_for("fsdp", "float32", lora), torch.device("cpu"))
    assert all(isinstance(p, DTensor) for p in sharded.model.parameters())
    assert all(p.dtype == torch.float32 for p in sharded.parameters())  # fp32 masters
    optimizer = build_optimizer(sharded, 1e-2, 0.0)
    messages = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]
    batch = collate([tokenize_example(tokenizer, messages, 64)], tokenizer.pad_token_id)
    sharded.model.train()
    losses = []
    for _ in range(3):
        with sharded.micro_step(sync_gradients=True):
            loss = sharded.model(**batch).loss
            loss.backward()
        losses.append(loss.item())
        measured = state_bytes(sharded, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert losses[-1] < losses[0], losses
    trainable = sum(p.numel() for p in sharded.parameters())
    assert measured.gradients == 4 * trainable
    after = state_bytes(sharded, optimizer)
    assert after.gradients == 0 and after.optimizer >= 2 * 4 * trainable  # exp_avg + exp_avg_sq, fp32

    out = tmp_path / "hf"
    save_hf_model(sharded.bare, None if lora else tokenizer, str(out))
    if lora:
        assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
        return
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert abs(reloaded(**batch).loss.item() - sharded.model(**batch).loss.item()) < 1e-5
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()


# --- On Ray Train: 2 workers, gloo, an uninterrupted run and one resumed after a failure -----------


@pytest.fixture(scope="module")
def ray_two_cpus():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def _sft_rows(path: Path, n: int) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            row = {
                "instruction": f"What is {i} + {i}?",
                "output": f"{i} + {i} = {2 * i}. $\\boxed{{{2 * i}}}$",
            }
            handle.write(json.dumps(row) + "\n")
    return path


def _ray_config(tiny_causal_lm, tmp_path, storage, **extra) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "name": "fsdp-resume",
            "model": str(tiny_causal_lm),
            "dtype": "float32",
            "data": {"path": str(_sft_rows(tmp_path / "sft.jsonl", 8))},
            "lora": {"enabled": False},
            "optim": {
                "learning_rate": 5e-3,
                "max_steps": 4,
                "scheduler": "cosine",  # the restored scheduler must continue the curve, not restart it
                "warmup_ratio": 0.25,
                "per_device_batch_size": 2,
                "gradient_accumulation_steps": 2,
            },
            "scaling": {
                "num_workers": 2,
                "strategy": "fsdp",
                # Half a CPU each: the rest of the 2 runs the Ray Data tasks that tokenize the data
                # (with a whole CPU each the workers waited for their first batch forever).
                "resources_per_worker": {"CPU": 0.5},
                "torch_threads": 1,
            },
            "checkpoint": {
                "storage_path": str(storage),
                "save_steps": 2,
                "num_to_keep": None,
                "max_failures": 1,
            },
            **extra,
        }
    )


@pytest.mark.slow
def test_fsdp_resumes_exactly_and_intermediate_checkpoint_exports(tmp_path, tiny_causal_lm, ray_two_cpus):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenskip.train.export import export_checkpoint
    from tokenskip.train.job import run_training

    straight = run_training(_ray_config(tiny_causal_lm, tmp_path, tmp_path / "straight"))
    marker = tmp_path / "failed-once"
    resumed = run_training(
        _ray_config(
            tiny_causal_lm,
            tmp_path,
            tmp_path / "resumed",
            failure_injection={"at_step": 3, "marker_path": str(marker)},
        )
    )
    assert straight.error is None and resumed.error is None and marker.exists()
    run = Path(straight.run_path)
    # Folders named by step; every rank's shard is in each one.
    assert sorted(p.name for p in run.glob("checkpoint_step_*")) == [
        "checkpoint_step_000002",
        "checkpoint_step_000004",
    ]
    step2 = run / "checkpoint_step_000002"
    assert {p.name for p in (step2 / "sharded").iterdir()} >= {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert not (step2 / "model").exists() and (run / "checkpoint_step_000004" / "model").is_dir()

    def history(result) -> tuple[dict, dict]:
        state = json.loads((Path(result.checkpoint_path) / "trainer_state.json").read_text())
        return state, dict(state["loss_history"])

    state, losses = history(straight)
    resumed_state, resumed_losses = history(resumed)
    assert [a["start_step"] for a in resumed_state["attempts"]] == [0, 2]
    # Steps 3 and 4 after the resume from step 2 see the same weights, optimiser moments, learning
    # rate and data as the uninterrupted run's: the same losses (same ranks, threads and reduction order).
    assert resumed_losses[3] == pytest.approx(losses[3], rel=1e-6, abs=1e-7), (losses, resumed_losses)
    assert resumed_losses[4] == pytest.approx(losses[4], rel=1e-6, abs=1e-7), (losses, resumed_losses)
    assert losses[4] < losses[1]
    # Each of the 2 ranks holds about half of the fp32 parameters, gradients and Adam moments.
    per_rank = state["state_bytes_per_rank"]
    assert len(per_rank) == 2
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_causal_lm).parameters())
    for row in per_rank:
        assert 0.45 * 4 * n_params <= row["parameters"] <= 0.55 * 4 * n_params, (row, n_params)
        assert row["gradients"] == row["parameters"]

    # The intermediate (step-2) checkpoint of the full fine-tune exports to a folder transformers loads.
    exported = tmp_path / "exported"
    export_checkpoint(str(step2), str(exported))
    assert (exported / "config.json").exists() and list(exported.glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(exported)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert len(changed) == sum(1 for _ in base.parameters())  # every weight trained, and those were saved
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]

    # vLLM loads the same folder and generates from it.
    from tokenskip.engine import EngineConfig, SamplingConfig, create_llm, generate

    llm = create_llm(
        EngineConfig(
            model=str(exported),
            device="cpu",
            dtype="float32",
            max_model_len=128,
            kv_cache_memory_bytes=32 << 20,
            enforce_eager=True,
            seed=0,
        )
    )
    try:
        generated = generate(llm, [prompt], SamplingConfig(temperature=0.0, max_tokens=8))[0][0]
    finally:
        # The in-process engine started a world-size-1 torch.distributed group in this process; later
        # tests make their own, so it goes with the engine.
        from vllm.distributed import destroy_distributed_environment, destroy_model_parallel

        del llm
        destroy_model_parallel()
        destroy_distributed_environment()
    assert generated.token_count >= 1
    assert generated.finish_reason in {"length", "stop"}


def test_tldr_fsdp_recipe_and_checkpoint_names_in_examples():
    import re

    import yaml

    from tokenskip.train.checkpoint import checkpoint_dir_name
    from tokenskip.train.config import load_train_config

    configs = Path(__file__).resolve().parents[1] / "tokenskip" / "configs"
    recipe = load_train_config(configs / "tldr_r1_distill_qwen_7b_fsdp.yaml")
    assert (recipe.mode, recipe.scaling.strategy, recipe.scaling.num_workers, recipe.lora.enabled) == (
        "tldr",
        "fsdp",
        8,
        False,
    )
    assert (recipe.optim.learning_rate, recipe.optim.scheduler, recipe.optim.cutoff_len) == (
        1e-5,
        "constant",
        16384,
    )
    assert recipe.dtype == "bfloat16" and recipe.optim.gradient_checkpointing_enabled(recipe.lora.enabled)
    assert recipe.tldr.eval_steps == 32 and recipe.checkpoint.save_steps == 32
    assert (recipe.tldr.sampling.temperature, recipe.tldr.sampling.max_tokens) == (0.7, 16384)
    # The evaluation example points at a folder the training run names that way.
    adapter = yaml.safe_load((configs / "evaluate_example.yaml").read_text())["adapter"]
    folder = adapter.rstrip("/").split("/")[-2]
    step = int(re.fullmatch(r"checkpoint_step_(\d{6})", folder).group(1))
    assert checkpoint_dir_name(step) == folder
    assert step % load_train_config(configs / "train_qwen2_5_7b_gsm8k.yaml").checkpoint.save_steps == 0


def test_export_and_restore_refuse_what_is_not_their_checkpoint(tmp_path, capsys):
    from tokenskip.cli import main
    from tokenskip.train.checkpoint import CheckpointMismatch, checkpoint_strategy

    assert main(["export-model", str(tmp_path / "missing"), str(tmp_path / "out")]) == ExitCode.USER_ERROR
    err = capsys.readouterr().err.strip()
    assert "not a tokenskip training checkpoint" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
    # A folder with a training config but no weights is refused the same way, before any model loads.
    (tmp_path / "weightless").mkdir()
    (tmp_path / "weightless" / "train_config.json").write_text("{}")
    assert main(["export-model", str(tmp_path / "weightless"), str(tmp_path / "out")]) == ExitCode.USER_ERROR
    assert "neither sharded/ nor trainable.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --storage-options must be a JSON object
        main(["export-model", str(tmp_path / "weightless"), str(tmp_path / "out"), "--storage-options", "[1]"])
    assert "expects a JSON object" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "ckpt" / "sharded").mkdir(parents=True)
    assert checkpoint_strategy(str(tmp_path / "ckpt")) == "fsdp"
    (tmp_path / "other").mkdir()
    with pytest.raises(CheckpointMismatch, match="neither sharded/ nor trainable.pt"):
        checkpoint_strategy(str(tmp_path / "other"))


class _LocalCheckpoint:
    """Ray Train's Checkpoint as restore_checkpoint uses it: a folder to read."""

    def __init__(self, path: Path):
        self.path = path

    def as_directory(self):
        import contextlib

        return contextlib.nullcontext(str(self.path))


@pytest.mark.parametrize("lora", [False, True])
def test_fsdp_checkpoint_round_trip_continues_identically(tmp_path, tiny_causal_lm, one_rank_group, lora):
    import torch
    from transformers import AutoTokenizer

    from tokenskip.train.checkpoint import restore_checkpoint, save_checkpoint
    from tokenskip.train.data import collate, tokenize_example
    from tokenskip.train.loop import _prepare_model, _scheduler

    config = _config(tiny_causal_lm, tmp_path, lora={"enabled": lora, "r": 4, "alpha": 8})
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    messages = [{"role": "user", "content": "7 + 5?"}, {"role": "assistant", "content": "12"}]
    batch = collate([tokenize_example(tokenizer, messages, 64)], tokenizer.pad_token_id)

    def fresh():
        torch.manual_seed(0)  # the same LoRA init, as every rank of a run gets
        sharded = _prepare_model(config, torch.device("cpu"))
        optimizer = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
        return sharded, optimizer, _scheduler(optimizer, config, total_steps=10)

    def step(sharded, optimizer, scheduler) -> float:
        loss = sharded.model(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    sharded, optimizer, scheduler = fresh()
    for _ in range(2):
        step(sharded, optimizer, scheduler)
    state = {"step": 2}
    assert save_checkpoint(
        str(tmp_path), sharded, optimizer, scheduler, state, config, tokenizer, final=False
    )
    expected = [step(sharded, optimizer, scheduler) for _ in range(2)]

    restored, optimizer2, scheduler2 = fresh()
    assert restore_checkpoint(_LocalCheckpoint(tmp_path), restored, optimizer2, scheduler2, config) == state
    assert scheduler2.last_epoch == 2
    assert [step(restored, optimizer2, scheduler2) for _ in range(2)] == expected
