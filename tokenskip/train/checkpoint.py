"""Training checkpoints: what a checkpoint folder holds, how it is written and restored.

A checkpoint folder (``<storage_path>/<name>/checkpoint_step_<step>``, named by optimiser step so
other configs can point at it) holds everything needed to continue exactly where the run stopped:

* ``trainer_state.json`` - step, sampler state, loss history, resume attempts, each rank's measured
  state bytes and (TL;DR) the domain weights with their history and dev metrics;
* ``train_config.json`` - the run's TrainConfig, so :mod:`tokenskip.train.export` can rebuild the
  model from the folder alone;
* ddp: ``trainable.pt`` (the trainable parameters) and ``optim.pt`` (optimiser + scheduler), written
  by rank 0 (every rank holds the same);
* fsdp: ``sharded/`` - a ``torch.distributed.checkpoint`` folder of the model and optimiser state,
  every rank writing its own shard file (``__<rank>_0.distcp``) and rank 0 the metadata; it loads
  onto another number of ranks too (the export loads it in one process); ``scheduler.pt`` beside it;
* ``adapter/`` - the peft adapter (LoRA runs; loadable by vLLM and transformers), and, in the final
  checkpoint of a full fine-tune, ``model/``: the Hugging Face folder (:func:`export.save_hf_model`).
  Any other kept checkpoint exports to one with ``tokenskip export-model``.

Every rank reports the same folder name to Ray Train, which uploads each rank's files into it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tokenskip.train.config import TrainConfig
from tokenskip.train.sharding import ShardedModel

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "train_config.json"
TRAINABLE_FILE = "trainable.pt"
OPTIM_FILE = "optim.pt"
SCHEDULER_FILE = "scheduler.pt"
SHARDED_DIR = "sharded"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"


class CheckpointMismatch(RuntimeError):
    """A checkpoint that cannot be restored into this run (another strategy, missing weights)."""


def checkpoint_dir_name(step: int) -> str:
    """The folder name of the checkpoint taken after optimiser step ``step``."""
    return f"checkpoint_step_{step:06d}"


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _trainable_state(model) -> dict[str, Any]:
    return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


def _state_dict_options(config: TrainConfig):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # A LoRA run's frozen base is the base model itself: saving it in every checkpoint only costs space,
    # and loading then sets the adapters only (the base came from the model folder).
    lora = config.lora.enabled
    return StateDictOptions(ignore_frozen_params=lora, strict=not lora)


def save_checkpoint(
    directory: str,
    sharded: ShardedModel,
    optimizer,
    scheduler,
    state: dict[str, Any],
    config: TrainConfig,
    tokenizer,
    final: bool,
) -> bool:
    """Write this rank's part of the checkpoint into ``directory`` (a local staging folder). A
    collective under fsdp: every rank calls it. Returns whether this rank wrote files to upload."""
    import torch

    from tokenskip.train.export import save_hf_model

    rank = _rank()
    if sharded.strategy == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(
            sharded.model, optimizer, options=_state_dict_options(config)
        )
        dcp.save(
            {"model": model_state, "optim": optim_state}, checkpoint_id=os.path.join(directory, SHARDED_DIR)
        )
        if rank == 0:
            torch.save(scheduler.state_dict(), os.path.join(directory, SCHEDULER_FILE))
    elif rank == 0:
        torch.save(_trainable_state(sharded.bare), os.path.join(directory, TRAINABLE_FILE))
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
            os.path.join(directory, OPTIM_FILE),
        )
    if config.lora.enabled:
        save_hf_model(sharded.bare, None, os.path.join(directory, ADAPTER_DIR))
    elif final:
        save_hf_model(sharded.bare, tokenizer, os.path.join(directory, MODEL_DIR))
    if rank == 0:
        with open(os.path.join(directory, STATE_FILE), "w", encoding="utf-8") as handle:
            json.dump(state, handle, indent=1)
        with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as handle:
            json.dump(config.model_dump(mode="json"), handle, indent=1)
    return sharded.strategy == "fsdp" or rank == 0


def checkpoint_strategy(directory: str) -> str:
    """Which strategy wrote the checkpoint folder ``directory``."""
    if os.path.isdir(os.path.join(directory, SHARDED_DIR)):
        return "fsdp"
    if os.path.isfile(os.path.join(directory, TRAINABLE_FILE)):
        return "ddp"
    raise CheckpointMismatch(
        f"{directory} holds neither {SHARDED_DIR}/ nor {TRAINABLE_FILE}: not a checkpoint"
    )


def load_sharded_model_state(model, directory: str, config: TrainConfig) -> None:
    """Load an fsdp checkpoint's model weights into ``model`` (sharded on a live group, or a plain
    module in one process: ``torch.distributed.checkpoint`` reshards to whatever it finds)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    options = _state_dict_options(config)
    model_state = get_model_state_dict(model, options=options)
    dcp.load({"model": model_state}, checkpoint_id=os.path.join(directory, SHARDED_DIR))
    set_model_state_dict(model, model_state, options=options)


def load_trainable_state(model, directory: str) -> None:
    """Load a ddp checkpoint's trainable parameters into the unwrapped ``model``."""
    import torch

    trainable = torch.load(os.path.join(directory, TRAINABLE_FILE), map_location="cpu")
    missing = set(_trainable_state(model)) - set(trainable)
    if missing:
        raise CheckpointMismatch(f"checkpoint lacks trainable parameters {sorted(missing)[:5]}...")
    model.load_state_dict(trainable, strict=False)


def restore_checkpoint(
    checkpoint, sharded: ShardedModel, optimizer, scheduler, config: TrainConfig
) -> dict[str, Any]:
    """Restore model, optimiser and scheduler from a Ray Train checkpoint; returns the trainer state.
    A collective under fsdp."""
    import torch

    with checkpoint.as_directory() as directory:
        written_by = checkpoint_strategy(directory)
        if written_by != sharded.strategy:
            raise CheckpointMismatch(
                f"the checkpoint was written with strategy {written_by!r}, this run uses "
                f"{sharded.strategy!r}: keep the strategy, or start under another run name"
            )
        if sharded.strategy == "fsdp":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            options = _state_dict_options(config)
            model_state, optim_state = get_state_dict(sharded.model, optimizer, options=options)
            saved = {"model": model_state, "optim": optim_state}
            dcp.load(saved, checkpoint_id=os.path.join(directory, SHARDED_DIR))
            set_state_dict(
                sharded.model,
                optimizer,
                model_state_dict=saved["model"],
                optim_state_dict=saved["optim"],
                options=options,
            )
            scheduler.load_state_dict(torch.load(os.path.join(directory, SCHEDULER_FILE), weights_only=False))
        else:
            load_trainable_state(sharded.bare, directory)
            optim = torch.load(os.path.join(directory, OPTIM_FILE), map_location="cpu", weights_only=False)
            optimizer.load_state_dict(optim["optimizer"])
            scheduler.load_state_dict(optim["scheduler"])
        with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as handle:
            return json.load(handle)
