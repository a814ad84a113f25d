"""Export a kept training checkpoint (ddp or fsdp, full or LoRA) as a Hugging Face model folder
(safetensors shards, config, tokenizer) that vLLM and transformers load.

Hugging Face folders from training: the one writer (:func:`save_hf_model`) and the export of a kept
checkpoint (:func:`export_checkpoint`, ``tokenskip export-model``).

:func:`save_hf_model` is the seam for anything that needs the current weights as files (the final
checkpoint's ``model/``, a LoRA checkpoint's ``adapter/``, a dev evaluation loading a just-saved
folder into vLLM): a collective every rank calls; the full state dict is gathered to rank 0's CPU
(``get_model_state_dict(full_state_dict=True, cpu_offload=True)``, so it works alike for a plain,
DDP-unwrapped or FSDP2-sharded model) and rank 0 writes it with ``save_pretrained`` (safetensors
shards with their index, config, generation config, tokenizer). A peft model writes its adapter.

:func:`export_checkpoint` turns any kept checkpoint folder (ddp or fsdp, full or LoRA) into a plain
model folder that vLLM and transformers load: it rebuilds the model from the checkpoint's
``train_config.json``, loads the checkpoint's weights (resharding an fsdp checkpoint onto one
process), merges LoRA adapters into the base, and writes the folder with :func:`save_hf_model`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from typing import Any

from tokenskip.commands import json_object

log = logging.getLogger(__name__)

MAX_SHARD_SIZE = "5GB"  # safetensors shard size: what the hub's 7B-14B models use


def _dist_rank() -> tuple[int, bool]:
    import torch.distributed as dist

    live = dist.is_available() and dist.is_initialized()
    return (dist.get_rank() if live else 0), live


def save_hf_model(model, tokenizer, out_dir: str, *, max_shard_size: str = MAX_SHARD_SIZE) -> None:
    """Write ``model`` (the unwrapped HF or peft module; sharded or not) as a Hugging Face folder.

    Every rank of a live process group must call it (the weights are gathered); rank 0 writes, and
    all ranks return once the folder is complete. ``tokenizer`` may be None (a LoRA adapter).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    rank, live = _dist_rank()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(
            out_dir, state_dict=full, safe_serialization=True, max_shard_size=max_shard_size
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    del full
    if live:
        import torch.distributed as dist

        dist.barrier()  # the folder is complete for every rank that goes on to read it


def _local_copy(checkpoint: str, storage_options: dict[str, Any], workdir: str) -> str:
    """A local folder holding ``checkpoint`` (a local path, or an fsspec URL such as s3://...)."""
    if "://" not in checkpoint:
        return checkpoint
    import fsspec

    fs, path = fsspec.core.url_to_fs(checkpoint, **storage_options)
    target = os.path.join(workdir, "checkpoint")
    fs.get(path.rstrip("/") + "/", target, recursive=True)
    return target


def export_checkpoint(
    checkpoint: str,
    out_dir: str,
    *,
    storage_options: dict[str, Any] | None = None,
    model: str | None = None,
) -> str:
    """Write kept checkpoint ``checkpoint`` (folder or URL) as a Hugging Face model folder at
    ``out_dir`` (local) and return it. ``model``: the base model when the one recorded in the
    checkpoint's config has moved. One process, on CPU; needs the base model's memory in fp32."""
    import torch.distributed as dist

    had_group = dist.is_available() and dist.is_initialized()
    try:
        return _export(checkpoint, out_dir, storage_options, model)
    finally:
        # Loading a sharded checkpoint may start a world-size-1 default group (torch.distributed
        # checkpoint / device mesh); one that this call started must not outlive it in the caller.
        if not had_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _export(checkpoint: str, out_dir: str, storage_options: dict[str, Any] | None, model: str | None) -> str:
    import torch
    from transformers import AutoTokenizer

    from tokenskip.train.checkpoint import (
        CONFIG_FILE,
        checkpoint_strategy,
        load_sharded_model_state,
        load_trainable_state,
    )
    from tokenskip.train.config import TrainConfig
    from tokenskip.train.sharding import load_model

    with tempfile.TemporaryDirectory(prefix="tokenskip-export-") as workdir:
        local = _local_copy(checkpoint, storage_options or {}, workdir)
        config_path = os.path.join(local, CONFIG_FILE)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{checkpoint} has no {CONFIG_FILE}: not a tokenskip training checkpoint")
        strategy = checkpoint_strategy(local)  # before any model loads: a folder without weights fails at once
        with open(config_path, encoding="utf-8") as handle:
            config = TrainConfig.model_validate(json.load(handle))
        if model:
            config = config.model_copy(update={"model": model})
        # Rebuild the model as it was trained (fp32 masters, the same LoRA wrapping), without
        # gradient checkpointing: nothing runs backward here.
        optim = config.optim.model_copy(update={"gradient_checkpointing": False})
        config = config.model_copy(update={"optim": optim})
        rebuilt = load_model(config)
        if strategy == "fsdp":
            load_sharded_model_state(rebuilt, local, config)
        else:
            load_trainable_state(rebuilt, local)
        if config.lora.enabled:
            rebuilt = rebuilt.merge_and_unload()  # a plain model: W + (alpha/r) BA in every adapted layer
        rebuilt = rebuilt.to(getattr(torch, config.dtype))  # ship in the compute dtype (bf16 on GPUs)
        rebuilt.config.use_cache = True
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
        save_hf_model(rebuilt, tokenizer, out_dir)
    return out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", help="checkpoint folder, local or URL (…/<run name>/checkpoint_step_000128)"
    )
    parser.add_argument("out_dir", help="local folder to write the model to")
    parser.add_argument(
        "--model", default=None, help="base model, when the checkpoint's recorded one has moved"
    )
    parser.add_argument(
        "--storage-options",
        default="{}",
        type=json_object,
        help="fsspec options for a URL as JSON, e.g. '{\"endpoint_url\": …}'",
    )


def run_command(args: argparse.Namespace) -> int:
    """``tokenskip export-model``: prints the folder written. A folder that is not a kept checkpoint,
    or one of another strategy, is a user error (exit 2) and writes nothing."""
    from tokenskip.errors import UserError
    from tokenskip.train.checkpoint import CheckpointMismatch

    try:
        out = export_checkpoint(
            args.checkpoint, args.out_dir, storage_options=args.storage_options, model=args.model
        )
    except CheckpointMismatch as error:
        raise UserError(str(error)) from error
    print(out)
    return 0
