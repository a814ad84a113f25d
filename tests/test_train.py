"""SFT training stage: tokenization/masking, sampler, data sources, configs, and a 2-worker Ray Train
run that reads a committed dataset from S3, checkpoints to S3, survives an injected failure and
lowers the loss."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from tokenskip.schema import COMPRESSED_SCHEMA, to_table
from tokenskip.train.config import DataSourceConfig, TrainConfig, load_train_config
from tokenskip.train.data import (
    IGNORE_INDEX,
    EpochSampler,
    TrainingDataError,
    collate,
    source_messages,
    tokenize_example,
    worker_slice,
)

CONFIGS = Path(__file__).resolve().parents[1] / "tokenskip" / "configs"


@pytest.fixture(scope="module")
def tokenizer(tiny_causal_lm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_causal_lm)


def _compressed_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        reasoning = f"Step 1: {i} + {i} = {2 * i}.\nStep 2: so it is {2 * i}.\n\n"
        tail = f"The final answer is: $\\boxed{{{2 * i}}}$"
        rows.append(
            {
                "key": f"k{i}",
                "problem_id": f"p{i}",
                "source": "toy",
                "split": "train",
                "question": f"What is {i} + {i}?",
                "answer": str(2 * i),
                "cot": reasoning + tail,
                "reasoning": reasoning,
                "answer_tail": tail,
                "extracted_answer": str(2 * i),
                "verdict": "correct",
                "original_tokens": 20,
                "compressions": [
                    {
                        "target_ratio": r,
                        "text": f"{i} + {i} = {2 * i}.\n\n" + tail,
                        "tokens": 10,
                        "achieved_ratio": r,
                    }
                    for r in (0.9, 0.8, 0.7, 0.6, 0.5)
                ],
            }
        )
    return rows


def test_tokenize_masks_prompt_and_padding(tokenizer):
    messages = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4. $\\boxed{4}$"},
    ]
    example = tokenize_example(tokenizer, messages, cutoff_len=512)
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
    # The loss covers the answer and the template's end-of-turn, so the model learns to stop.
    assert tokenizer.decode(example.input_ids[n_prompt:]) == "2 + 2 = 4. $\\boxed{4}$<|im_end|>\n"
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)

    short = tokenize_example(tokenizer, messages, cutoff_len=n_prompt + 3)
    assert len(short.input_ids) == n_prompt + 3 and short.labels[n_prompt:] == short.input_ids[n_prompt:]
    assert tokenize_example(tokenizer, messages, cutoff_len=n_prompt) is None  # prompt alone fills it

    batch = collate([example, short], pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, len(example.input_ids))
    assert batch["attention_mask"][1].tolist() == [1] * len(short.input_ids) + [0] * (
        len(example.input_ids) - len(short.input_ids)
    )
    assert set(batch["labels"][1, len(short.input_ids) :].tolist()) == {IGNORE_INDEX}


@pytest.mark.parametrize("lora", [True, False])
def test_model_setup_lora_and_gradient_checkpointing(tiny_causal_lm, tokenizer, lora):
    from tokenskip.train.sharding import load_model as _load_model

    config = TrainConfig.model_validate(
        {
            "model": str(tiny_causal_lm),
            "dtype": "float32",
            "data": {"path": "unused.jsonl"},
            "lora": {"enabled": lora, "r": 4, "alpha": 8},
            "optim": {"gradient_checkpointing": True},
            "checkpoint": {"storage_path": "/tmp/unused"},
        }
    )
    model = _load_model(config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    total = sum(1 for _ in model.named_parameters())
    if lora:  # only the adapters train; every linear layer but the LM head has one
        assert trainable and all("lora_" in n for n in trainable)
        assert {n.split(".")[-4] for n in trainable} == {
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        }
    else:
        assert len(trainable) == total
    messages = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]
    model.train()
    model(**collate([tokenize_example(tokenizer, messages, 64)], tokenizer.pad_token_id)).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)


def test_epoch_sampler_visits_every_example_once_per_epoch():
    sampler = EpochSampler(num_examples=10, global_batch=4, seed=1)
    assert sampler.steps_for_epochs(3) == 8  # ceil(30 / 4)
    stream = [i for step in range(5) for i in sampler.global_batch_at(step)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a fresh permutation per epoch
    assert EpochSampler(10, 4, 1).global_batch_at(3) == sampler.global_batch_at(3)  # stateless
    assert EpochSampler(10, 4, 2).global_batch_at(0) != sampler.global_batch_at(0)
    assert worker_slice([0, 1, 2, 3, 4, 5], rank=1, world_size=2) == [1, 3, 5]


def test_data_sources_all_formats(tmp_path, tokenizer):
    from tokenskip.storage import RunStore, StorageConfig

    store = RunStore(StorageConfig(root=str(tmp_path / "store")), "toy-compressed", "run-1")
    store.write_shard("0", {"data": to_table(_compressed_rows(6), COMPRESSED_SCHEMA)})
    store.commit({"config": {}})
    compressed = source_messages(
        DataSourceConfig(storage_root=str(tmp_path / "store"), dataset="toy-compressed", limit=5), tokenizer
    )
    assert len(compressed) == 5
    for i, messages in enumerate(compressed):
        tail = f"\n\nThe final answer is: $\\boxed{{{2 * i}}}$"
        user, answer = messages[0]["content"], messages[1]["content"]
        if user.endswith("<|im_end|>"):  # ratio < 1: eos-delimited ratio, pruned CoT
            assert user.split("?", 1)[1] in {f"<|im_end|>0.{d}<|im_end|>" for d in range(5, 10)}
            assert answer == f"{i} + {i} = {2 * i}." + tail
        else:
            assert user.endswith(f"What is {i} + {i}?")
            assert answer == f"Step 1: {i} + {i} = {2 * i}.\nStep 2: so it is {2 * i}." + tail
    assert any(m[0]["content"].endswith("<|im_end|>") for m in compressed)

    (tmp_path / "sft.jsonl").write_text(
        json.dumps({"instruction": "Solve.", "input": "1+1?", "output": "2"}) + "\n", encoding="utf-8"
    )
    sft = source_messages(DataSourceConfig(path=str(tmp_path / "sft.jsonl")), tokenizer, system="Be brief.")
    assert sft == [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Solve.\n1+1?"},
            {"role": "assistant", "content": "2"},
        ]
    ]
    pa_table = pa.table({"problem": ["2+2?"], "completion": ["4"]})
    import pyarrow.parquet as pq

    pq.write_table(pa_table, tmp_path / "cot.parquet")
    cot = source_messages(
        DataSourceConfig(
            path=str(tmp_path / "cot.parquet"), question_field="problem", response_field="completion"
        ),
        tokenizer,
    )
    assert cot[0][-1] == {"role": "assistant", "content": "4"}
    assert cot[0][0]["content"].endswith("\n2+2?")  # behind TokenSkip's instruction

    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n{broken\n', encoding="utf-8")
    with pytest.raises(TrainingDataError, match="bad.jsonl:2"):
        source_messages(DataSourceConfig(path=str(tmp_path / "bad.jsonl")), tokenizer)
    (tmp_path / "odd.jsonl").write_text('{"x": 1}\n', encoding="utf-8")
    with pytest.raises(TrainingDataError, match="cannot tell the data format"):
        source_messages(DataSourceConfig(path=str(tmp_path / "odd.jsonl")), tokenizer)
    with pytest.raises(ValueError, match="exactly one"):
        DataSourceConfig(path="a.jsonl", storage_root="s3://b/p", dataset="d")


def test_shipped_configs_validate_and_cli_dry_run(capsys):
    from tokenskip.cli import build_parser

    example = load_train_config(CONFIGS / "train_example.yaml")
    recipe = load_train_config(CONFIGS / "train_qwen2_5_7b_gsm8k.yaml")
    assert example.dtype == "float32" and not example.scaling.use_gpu
    assert recipe.model == "Qwen/Qwen2.5-7B-Instruct" and recipe.scaling.use_gpu
    assert (recipe.lora.r, recipe.lora.alpha, recipe.optim.learning_rate) == (8, 16, 5e-5)
    assert (
        recipe.optim.epochs,
        recipe.optim.scheduler,
        recipe.optim.warmup_ratio,
        recipe.optim.cutoff_len,
    ) == (
        3.0,
        "cosine",
        0.1,
        2048,
    )
    args = build_parser().parse_args(["train", "--config", str(CONFIGS / "train_example.yaml"), "--dry-run"])
    assert args.func(args) == 0
    # The config as dumped: the embedded model by its name, not this machine's folder for it.
    assert json.loads(capsys.readouterr().out)["model"] == example.model_dump(mode="json")["model"]
    with pytest.raises(ValueError, match="needs `data`"):
        TrainConfig.model_validate({"model": "m", "checkpoint": {"storage_path": "/tmp/x"}})


# --- End to end on Ray Train: 2 workers, data + checkpoints on S3 (moto), one injected failure -------


@pytest.fixture(scope="module")
def ray_two_cpus(s3_server):
    """Ray started after the S3 fixture exported its credentials, so workers inherit them."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def _s3_objects(endpoint: str, bucket: str, prefix: str) -> dict[str, bytes]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    keys = [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for o in page.get("Contents", [])
    ]
    return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


@pytest.mark.slow
def test_two_workers_on_s3_resume_after_failure_and_loss_drops(
    tmp_path, tiny_causal_lm, tokenizer, s3_bucket, ray_two_cpus, capsys
):
    from tokenskip.storage import RunStore, StorageConfig
    from tokenskip.train.job import run_training

    endpoint, bucket = s3_bucket
    options = {"endpoint_url": endpoint}
    store = RunStore(StorageConfig(root=f"s3://{bucket}/datasets", storage_options=options), "toy", "run-1")
    store.write_shard("0", {"data": to_table(_compressed_rows(8), COMPRESSED_SCHEMA)})
    store.commit({"config": {}})

    config = TrainConfig.model_validate(
        {
            "name": "s3-run",
            "model": str(tiny_causal_lm),
            "dtype": "float32",
            "data": {"storage_root": f"s3://{bucket}/datasets", "dataset": "toy", "storage_options": options},
            # Full fine-tune: a LoRA on a randomly initialised tiny model barely moves its loss.
            "lora": {"enabled": False},
            "optim": {
                "learning_rate": 5e-3,  # large on purpose: overfit 8 examples in 12 steps
                "max_steps": 12,
                "scheduler": "constant",
                "per_device_batch_size": 2,
                "gradient_accumulation_steps": 2,
                "warmup_ratio": 0.0,
            },
            # Half a CPU each leaves room for the Ray Data tasks that read and tokenize the data.
            "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 0.5}, "torch_threads": 1},
            "checkpoint": {
                "storage_path": f"s3://{bucket}/checkpoints",
                "endpoint_url": endpoint,
                "save_steps": 4,
                "max_failures": 1,
            },
            "failure_injection": {"at_step": 6, "marker_path": str(tmp_path / "failed-once")},
        }
    )
    result = run_training(config, progress=True)
    assert result.error is None
    assert (tmp_path / "failed-once").exists()
    # the live step display (not a TTY here: a line every log_every steps and at the last)
    assert "step 12/12 | loss " in capsys.readouterr().err
    assert result.checkpoint_path.startswith(f"{bucket}/checkpoints/s3-run/")

    objects = _s3_objects(endpoint, bucket, "checkpoints/s3-run/")
    final = result.checkpoint_path[len(bucket) + 1 :]
    for name in ("trainer_state.json", "trainable.pt", "optim.pt", "model/model.safetensors"):
        assert f"{final}/{name}" in objects, sorted(objects)
    state = json.loads(objects[f"{final}/trainer_state.json"])
    assert state["step"] == 12 and state["total_steps"] == 12
    # Crashed after step 6; the restart resumed from the step-4 checkpoint (not from 0, not from 6).
    assert [a["start_step"] for a in state["attempts"]] == [0, 4]
    assert [s for s, _ in state["loss_history"]] == list(range(1, 13))
    losses = [loss for _, loss in state["loss_history"]]
    # Step 5 ran on the restored weights: a fresh model would be back at the step-1 loss.
    assert losses[4] < losses[1] < losses[0], losses
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
    assert state["sampler"] == {"kind": "epoch", "seed": 42, "step": 12, "position": 96}  # 12 x (2 x 2 x 2)
    assert {"loss", "lr", "tokens_per_s", "step", "epoch"} <= set(result.metrics)
    assert 0.0 <= result.metrics["padding_fraction"] < 0.5 and result.metrics["rows_dropped_by_cutoff"] == 0
    assert result.metrics["step"] == 12 and result.metrics["tokens_per_s"] > 0

    # The exported model on S3 is a loadable HF folder that fits the data far better than the base.
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for key, blob in objects.items():
        if key.startswith(f"{final}/model/") and not key.endswith("/"):  # skip folder markers
            (model_dir / key.rsplit("/", 1)[1]).write_bytes(blob)
    messages = source_messages(config.data, tokenizer)
    batch = collate([tokenize_example(tokenizer, m, 512) for m in messages], tokenizer.pad_token_id)
    with torch.no_grad():
        base_loss = AutoModelForCausalLM.from_pretrained(tiny_causal_lm, dtype=torch.float32)(
            **batch
        ).loss.item()
        tuned_loss = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(**batch).loss.item()
    assert tuned_loss < 0.6 * base_loss, (base_loss, tuned_loss)
