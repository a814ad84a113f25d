"""The Ray Train worker loop: LoRA / full fine-tune of a causal LM (ddp or fsdp), checkpoint and resume.

Model loading and wrapping live in :mod:`tokenskip.train.sharding`, what a checkpoint holds and how
it is written and restored in :mod:`tokenskip.train.checkpoint`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any

from tokenskip.progress import post as post_progress
from tokenskip.train.checkpoint import checkpoint_dir_name, restore_checkpoint, save_checkpoint
from tokenskip.train.config import TrainConfig
from tokenskip.train.data import (
    EpochSampler,
    TokenizedExample,
    collate,
    source_messages,
    tokenize_all,
    worker_slice,
)
from tokenskip.train.sharding import (
    ShardedModel,
    build_optimizer,
    load_model,
    precision_for,
    shard_model,
    state_bytes,
)

log = logging.getLogger(__name__)


class InjectedFailure(RuntimeError):
    """Raised once by ``failure_injection`` (tests of resume)."""


def _scheduler(optimizer, config: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = math.ceil(config.optim.warmup_ratio * total_steps)
    name = {"constant": "constant_with_warmup"}.get(config.optim.scheduler, config.optim.scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _prepare_model(config: TrainConfig, device) -> ShardedModel:
    """The base model loaded, LoRA-wrapped if asked, and wrapped for the run's strategy."""
    strategy = config.scaling.strategy
    precision = precision_for(strategy, config.dtype, config.lora.enabled)
    return shard_model(load_model(config), strategy, precision, device)


def _state_bytes_per_rank(sharded: ShardedModel, optimizer, world: int) -> list[dict[str, int]]:
    """Every rank's measured parameter / gradient / optimiser bytes (rank order), for the log."""
    import torch.distributed as dist

    mine = state_bytes(sharded, optimizer)
    row = {"parameters": mine.parameters, "gradients": mine.gradients, "optimizer": mine.optimizer}
    if world == 1:
        return [row]
    rows: list[Any] = [None] * world
    dist.all_gather_object(rows, row)
    return rows


def _tokenized_domains(config: TrainConfig, tokenizer) -> tuple[list[str], list[list[TokenizedExample]], int]:
    """Domain names, their tokenized examples, and how many examples the cutoff dropped."""
    if config.mode == "tldr":
        sources = [(d.name, d.source) for d in config.tldr.domains]
    else:
        sources = [("data", config.data)]
    names, domains, dropped = [], [], 0
    for name, source in sources:
        examples, n_dropped = tokenize_all(
            tokenizer, source_messages(source, tokenizer, config.system), config.optim.cutoff_len
        )
        names.append(name)
        domains.append(examples)
        dropped += n_dropped
    return names, domains, dropped


def _broadcast(obj: Any, world_size: int) -> Any:
    """Rank 0's ``obj`` on every rank (TL;DR weights are decided on rank 0 only)."""
    if world_size == 1:
        return obj
    import torch.distributed as dist

    payload = [obj]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def _all_reduce_sum(values: list[float], device) -> list[float]:
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry: ``loop_config = {"config": TrainConfig.model_dump(), "progress": board}``
    (``progress`` optional: a :class:`~tokenskip.progress.ProgressBoard`)."""
    import ray.train
    import ray.train.torch
    import torch
    from transformers import AutoTokenizer

    from tokenskip.train.tldr import DevEvaluator, TLDRState, WeightedDomainSampler

    config = TrainConfig.model_validate(loop_config["config"])
    progress = loop_config.get("progress")  # the driver's live display, when it asked for one
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if config.scaling.torch_threads:
        torch.set_num_threads(config.scaling.torch_threads)
    torch.manual_seed(config.seed)  # identical LoRA init on every rank

    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    names, domains, dropped = _tokenized_domains(config, tokenizer)

    optim = config.optim
    accum = optim.accumulation_steps(world)  # from global_batch_size when set: the same on any world size
    global_batch = optim.per_device_batch_size * accum * world
    epoch_sampler = EpochSampler(sum(len(d) for d in domains), global_batch, config.seed)
    total_steps = optim.max_steps or epoch_sampler.steps_for_epochs(optim.epochs)
    flat = [example for domain in domains for example in domain]
    weighted_sampler = WeightedDomainSampler([len(d) for d in domains], global_batch, config.seed)

    device = ray.train.torch.get_device()
    sharded = _prepare_model(config, device)
    model, bare = sharded.model, sharded.bare
    params = sharded.parameters()
    optimizer = build_optimizer(sharded, optim.learning_rate, optim.weight_decay)
    scheduler = _scheduler(optimizer, config, total_steps)

    tldr_state = TLDRState.initial(config.tldr) if config.mode == "tldr" else None
    state: dict[str, Any] = {"step": 0, "total_steps": total_steps, "attempts": [], "loss_history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = restore_checkpoint(checkpoint, sharded, optimizer, scheduler, config)
        if tldr_state is not None:
            tldr_state = TLDRState.from_dict(state["tldr"])
    state["attempts"].append({"start_step": state["step"], "world_size": world})
    if rank == 0:
        log.info(
            "training %s from step %d to %d (%d examples dropped by the cutoff)",
            config.name,
            state["step"],
            total_steps,
            dropped,
        )

    evaluator = None
    if tldr_state is not None and rank == 0:
        evaluator = DevEvaluator(config.tldr, config.model, tokenizer, config.lora.enabled, config.lora.r)
    workdir = tempfile.mkdtemp(prefix="tokenskip-train-")
    model.train()

    try:
        for step in range(state["step"], total_steps):
            started = time.perf_counter()
            if tldr_state is not None:
                picks = weighted_sampler.global_batch_at(step, tldr_state.weights)
                batch = [domains[d][i] for d, i in worker_slice(picks, rank, world)]
            else:
                batch = [flat[i] for i in worker_slice(epoch_sampler.global_batch_at(step), rank, world)]
            loss_sum, token_count = 0.0, 0
            for micro in range(accum):
                micro_batch = batch[
                    micro * optim.per_device_batch_size : (micro + 1) * optim.per_device_batch_size
                ]
                tensors = {k: v.to(device) for k, v in collate(micro_batch, tokenizer.pad_token_id).items()}
                # Reduce gradients across ranks on the last micro-step only (before it they accumulate).
                with sharded.micro_step(sync_gradients=micro == accum - 1):
                    loss = model(**tensors).loss / accum
                    loss.backward()
                loss_sum += loss.item()
                token_count += int(tensors["attention_mask"].sum())
            torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
            optimizer.step()
            if "state_bytes_per_rank" not in state:  # once per run, while gradients and Adam state exist
                state["state_bytes_per_rank"] = _state_bytes_per_rank(sharded, optimizer, world)
                if rank == 0:
                    log.info(
                        "%s: training state per rank (bytes) %s",
                        config.scaling.strategy,
                        state["state_bytes_per_rank"],
                    )
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            elapsed = time.perf_counter() - started
            total_loss, total_tokens, elapsed_sum = _all_reduce_sum([loss_sum, token_count, elapsed], device)
            state["step"] = step + 1
            mean_loss = total_loss / world
            state["loss_history"].append([state["step"], mean_loss])
            metrics: dict[str, Any] = {
                "step": state["step"],
                "epoch": epoch_sampler.epoch_at(state["step"]),
                "loss": mean_loss,
                "lr": scheduler.get_last_lr()[0],
                # Tokens of all workers over the mean worker time of this step.
                "tokens_per_s": total_tokens / max(elapsed_sum / world, 1e-9),
            }

            if rank == 0:
                post_progress(
                    progress,
                    "train_step",
                    step=state["step"],
                    total=total_steps,
                    loss=mean_loss,
                    tokens_per_s=metrics["tokens_per_s"],
                )

            if tldr_state is not None and state["step"] % config.tldr.eval_steps == 0:
                if rank == 0:  # the others wait in the broadcast for rank 0's new weights
                    dev = evaluator.evaluate(bare, state["step"], workdir)
                    tldr_state.reweight(state["step"], dev.accuracy, dev.mean_tokens, config.tldr)
                tldr_state = _broadcast(tldr_state, world)
                entry = tldr_state.history[-1]
                metrics.update({"dev_accuracy": entry["accuracy"], "dev_mean_tokens": entry["mean_tokens"]})
            if tldr_state is not None:
                metrics.update(
                    {f"weight_{n}": w for n, w in zip(tldr_state.names, tldr_state.weights, strict=True)}
                )
                state["tldr"] = tldr_state.to_dict()
                state["sampler"] = weighted_sampler.state(state["step"], tldr_state.weights)
            else:
                state["sampler"] = epoch_sampler.state(state["step"])

            final = state["step"] == total_steps
            if final or state["step"] % config.checkpoint.save_steps == 0:
                # Every rank reports (Ray Train V2 expects it) under the same folder name; the ranks
                # that wrote files (rank 0 under ddp, every rank's shard under fsdp) upload them there.
                with tempfile.TemporaryDirectory(dir=workdir) as directory:
                    wrote = save_checkpoint(
                        directory, sharded, optimizer, scheduler, state, config, tokenizer, final
                    )
                    ray.train.report(
                        metrics,
                        checkpoint=ray.train.Checkpoint.from_directory(directory) if wrote else None,
                        checkpoint_dir_name=checkpoint_dir_name(state["step"]),
                    )
            elif state["step"] % config.log_every == 0:
                ray.train.report(metrics)

            injection = config.failure_injection
            if (
                injection
                and rank == 0
                and state["step"] == injection.at_step
                and not os.path.exists(injection.marker_path)
            ):
                with open(injection.marker_path, "w", encoding="utf-8") as handle:
                    handle.write(f"failed after step {state['step']}\n")
                raise InjectedFailure(f"injected failure after step {state['step']}")
    finally:
        if evaluator is not None:
            evaluator.close()
        # Dev adapters and checkpoint staging; the checkpoints themselves are in Ray's storage.
        shutil.rmtree(workdir, ignore_errors=True)
