"""optim.global_batch_size: the global batch is a setting, the same on any worker count, and gradient
accumulation is derived from it (issue 21, item 4)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tokenskip.train.config import OptimSettings, TrainConfig


def _config(optim: dict, workers: int = 4) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "model": "m",
            "data": {"path": "d.jsonl"},
            "optim": optim,
            "scaling": {"num_workers": workers},
            "checkpoint": {"storage_path": "/tmp/ckpt"},
        }
    )


def test_accumulation_is_derived_from_the_global_batch():
    optim = OptimSettings(per_device_batch_size=2, global_batch_size=32)
    assert [optim.accumulation_steps(w) for w in (1, 2, 4, 8, 16)] == [16, 8, 4, 2, 1]
    for workers in (1, 2, 4, 8, 16):
        assert optim.per_device_batch_size * optim.accumulation_steps(workers) * workers == 32
    with pytest.raises(ValueError, match=r"global_batch_size=32 is not a multiple of .* 2 x 3 = 6"):
        optim.accumulation_steps(3)
    with pytest.raises(ValueError, match="not a multiple"):
        optim.accumulation_steps(32)  # 2 x 32 = 64 > 32: less than one micro-batch per worker


def test_without_a_global_batch_the_old_field_holds():
    optim = OptimSettings(per_device_batch_size=2, gradient_accumulation_steps=3)
    assert [optim.accumulation_steps(w) for w in (1, 4)] == [3, 3]  # the global batch grows with workers
    assert _config({"gradient_accumulation_steps": 3}).optim.accumulation_steps(4) == 3


def test_train_config_checks_and_fills_the_derived_accumulation():
    config = _config({"per_device_batch_size": 1, "global_batch_size": 8}, workers=4)
    assert config.optim.gradient_accumulation_steps == 2  # what code reading the field gets
    again = TrainConfig.model_validate(config.model_dump())  # the workers re-read the dumped config
    assert again.optim.gradient_accumulation_steps == 2 and again.optim.accumulation_steps(2) == 4
    assert _config({"global_batch_size": 8, "gradient_accumulation_steps": 2}).optim.global_batch_size == 8
    with pytest.raises(ValidationError, match="gradient_accumulation_steps=8 contradicts"):
        _config({"global_batch_size": 8, "gradient_accumulation_steps": 8}, workers=4)
    with pytest.raises(ValidationError, match=r"not a multiple of per_device_batch_size x workers = 1 x 3"):
        _config({"global_batch_size": 8}, workers=3)
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        _config({"global_batch_size": 0})


@pytest.mark.slow
def test_training_steps_take_the_global_batch_on_one_worker(tmp_path, tiny_causal_lm, ray_local):
    """The loop reads the derived accumulation: 8 sequences per step on one worker of batch 2 (4
    micro-steps), where the default gradient_accumulation_steps (8) would have taken 16."""
    import json
    from pathlib import Path

    from tokenskip.train.job import run_training

    rows = tmp_path / "cots.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"question": f"What is {i} + 1?", "response": f"{i + 1}."}) + "\n" for i in range(12)
        )
    )
    config = TrainConfig.model_validate(
        {
            "name": "global-batch",
            "model": str(tiny_causal_lm),
            "dtype": "float32",
            "data": {"path": str(rows), "format": "cot"},
            "optim": {"max_steps": 2, "per_device_batch_size": 2, "global_batch_size": 8, "cutoff_len": 128},
            "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": 1}, "torch_threads": 1},
            "checkpoint": {"storage_path": str(tmp_path / "ckpt"), "save_steps": 2, "max_failures": 0},
        }
    )
    result = run_training(config)
    assert result.error is None
    state = json.loads((Path(result.checkpoint_path) / "trainer_state.json").read_text())
    assert state["step"] == 2 and [a["world_size"] for a in state["attempts"]] == [1]
    assert state["sampler"]["position"] == 2 * 8  # two steps of the global batch
