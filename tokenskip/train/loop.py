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
    DomainStream,
    EpochSampler,
    WorkerBatches,
    collate,
    iter_stream_examples,
    micro_batches,
    stream_positions,
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


def domain_names(config: TrainConfig) -> list[str]:
    """The training datasets' names, in domain order (the keys of the trainer's ``datasets``)."""
    return [d.name for d in config.tldr.domains] if config.mode == "tldr" else ["data"]


def _open_streams(config: TrainConfig, global_batch: int, rank: int, world: int) -> WorkerBatches:
    """This worker's view of the training data: each domain's tokenized Ray dataset (the trainer's
    ``datasets``, not split: every worker reads each stream in the same order and keeps its own slots)."""
    import ray.train

    stream = config.stream
    streams = []
    for index, name in enumerate(domain_names(config)):
        shard = ray.train.get_dataset_shard(name)

        def open_epoch(_epoch: int, shard=shard):
            batches = shard.iter_batches(
                batch_size=stream.rows_per_task, batch_format="pyarrow", prefetch_batches=1
            )
            return iter_stream_examples(batches)

        streams.append(
            DomainStream(
                open_epoch,
                name=name,
                domain=index,
                seed=config.seed,
                window=stream.window_batches * global_batch,
                # One micro-batch of similar lengths per chunk; a worker's slots are contiguous.
                chunk=config.optim.per_device_batch_size,
                group_by_length=stream.length_grouping,
            )
        )
    return WorkerBatches(streams, rank, world)


def _slot_domains(step: int, global_batch: int, weighted_sampler, tldr_state) -> list[int]:
    """The domain of each slot of step ``step``'s global batch (TL;DR: drawn by that step's weights)."""
    if tldr_state is None:
        return [0] * global_batch
    return weighted_sampler.domains_at(step, tldr_state.weights_at(step))


def _dev_round(
    evaluator, model, tokenizer, config: TrainConfig, key: tuple[int, int], workdir, board, rank, world
):
    """One TL;DR dev evaluation at step ``key[1]``; every rank returns its metrics.

    Backend 'vllm': rank 0 starts the evaluation in the dev actor and every rank waits for the result
    with ``ray.get`` through ``board``, under ``tldr.dev_timeout_s``: no collective is open while the
    actor works, so its length can never trip the collective timeout. A full fine-tune is first
    exported (:func:`~tokenskip.train.tldr.save_dev_checkpoint`, on every rank).
    'transformers': rank 0 generates while the others wait in a broadcast (the config checks that the
    collective timeout exceeds the evaluation's budget)."""
    started = time.perf_counter()
    metrics = _dev_metrics(evaluator, model, tokenizer, config, key, workdir, board, rank, world)
    metrics.seconds = time.perf_counter() - started  # as this rank waited: export, engine, generation
    return metrics


def _dev_metrics(evaluator, model, tokenizer, config: TrainConfig, key, workdir, board, rank, world):
    import ray

    from tokenskip.train.tldr import save_dev_checkpoint

    step = key[1]
    settings = config.tldr
    if settings.backend == "transformers":
        pending = evaluator.submit(model, step, workdir) if rank == 0 else None
        return _broadcast(pending, world).result(settings.dev_timeout_s)
    export_dir = None
    if not config.lora.enabled:
        export_dir = os.path.join(workdir, f"dev-model-step-{step:08d}")
        save_dev_checkpoint(model, tokenizer, export_dir)
    if rank == 0:
        pending = evaluator.submit(model, step, workdir, export_dir)
        if board is None:  # one worker: nothing to hand on
            metrics = pending.result(settings.dev_timeout_s)
            evaluator.finish_round()
            return metrics
        ray.get(board.put.remote(key, [pending.ref]))
    metrics = ray.get(board.result.remote(key, world), timeout=settings.dev_timeout_s)
    if rank == 0:
        evaluator.finish_round()
    return metrics


def _peak_rss_mb() -> float:
    """This process's peak resident set size so far (what the data stream must keep flat)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _uss_mb() -> float:
    """This process's unique set size now: its private memory, without the shared pages (Ray's object
    store, libraries) that RSS also counts once they are touched."""
    import psutil

    return psutil.Process().memory_full_info().uss / (1 << 20)


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
    """Ray Train entry: ``loop_config = {"config": TrainConfig.model_dump(), "domain_rows": [...],
    "progress": board, "dev_results": board}`` (``domain_rows``: each domain's source rows, for the
    epoch count; ``progress`` optional: a :class:`~tokenskip.progress.ProgressBoard`; ``dev_results``:
    a :class:`~tokenskip.train.tldr.DevResultBoard` for TL;DR's vLLM dev loop on several workers).
    The data arrive as the trainer's datasets, one per domain (:func:`domain_names`)."""
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
    dev_board = loop_config.get("dev_results")
    if config.mode == "tldr" and config.tldr.backend == "vllm" and world > 1 and dev_board is None:
        raise ValueError("TL;DR's vLLM dev loop on several workers needs loop_config['dev_results']")

    optim = config.optim
    accum = optim.accumulation_steps(world)  # from global_batch_size when set: the same on any world size
    global_batch = optim.per_device_batch_size * accum * world
    domain_rows = loop_config["domain_rows"]
    epoch_sampler = EpochSampler(sum(domain_rows), global_batch, config.seed)
    total_steps = optim.max_steps or epoch_sampler.steps_for_epochs(optim.epochs)
    weighted_sampler = WeightedDomainSampler(domain_rows, global_batch, config.seed)
    batches = _open_streams(config, global_batch, rank, world)

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
    # The data order's state is how far each domain's stream has gone: recomputed, never saved.
    batches.fast_forward(
        stream_positions(
            lambda s: _slot_domains(s, global_batch, weighted_sampler, tldr_state),
            state["step"],
            len(batches.streams),
        )
    )
    if rank == 0:
        log.info("training %s from step %d to %d", config.name, state["step"], total_steps)

    evaluator = None
    if tldr_state is not None and rank == 0:
        evaluator = DevEvaluator(config.tldr, config.model, tokenizer, config.lora.enabled, config.lora.r)
    workdir = tempfile.mkdtemp(prefix="tokenskip-train-")
    peak_uss_mb = 0.0
    model.train()

    try:
        for step in range(state["step"], total_steps):
            started = time.perf_counter()
            batch = batches.take(_slot_domains(step, global_batch, weighted_sampler, tldr_state))
            loss_sum, token_count, slot_count = 0.0, 0, 0
            grouped = micro_batches(batch, optim.per_device_batch_size, config.stream.length_grouping)
            for micro, micro_batch in enumerate(grouped):
                tensors = {k: v.to(device) for k, v in collate(micro_batch, tokenizer.pad_token_id).items()}
                # Reduce gradients across ranks on the last micro-step only (before it they accumulate).
                with sharded.micro_step(sync_gradients=micro == accum - 1):
                    loss = model(**tensors).loss / accum
                    loss.backward()
                loss_sum += loss.item()
                token_count += int(tensors["attention_mask"].sum())
                slot_count += tensors["attention_mask"].numel()
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
            total_loss, total_tokens, total_slots, elapsed_sum = _all_reduce_sum(
                [loss_sum, token_count, slot_count, elapsed], device
            )
            state["step"] = step + 1
            peak_uss_mb = max(peak_uss_mb, _uss_mb())
            mean_loss = total_loss / world
            state["loss_history"].append([state["step"], mean_loss])
            metrics: dict[str, Any] = {
                "step": state["step"],
                "epoch": epoch_sampler.epoch_at(state["step"]),
                "loss": mean_loss,
                "lr": scheduler.get_last_lr()[0],
                # Tokens of all workers over the mean worker time of this step.
                "tokens_per_s": total_tokens / max(elapsed_sum / world, 1e-9),
                # Share of the positions processed that were padding (all workers, this step).
                "padding_fraction": 1.0 - total_tokens / max(total_slots, 1),
                # Rows whose prompt alone fills cutoff_len, seen so far in the first epoch (every
                # worker reads every stream, so its own count is the run's).
                "rows_dropped_by_cutoff": batches.dropped,
                "worker_peak_rss_mb": _peak_rss_mb(),  # this worker's (rank 0's in the report)
                # The largest USS seen at a step's end: what the worker itself holds, shared pages apart.
                "worker_peak_uss_mb": peak_uss_mb,
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
                key = (len(state["attempts"]), state["step"])
                dev = _dev_round(evaluator, bare, tokenizer, config, key, workdir, dev_board, rank, world)
                # Every rank applies the same update to the same metrics: the weights agree exactly.
                entry = tldr_state.reweight(state["step"], dev.accuracy, dev.mean_tokens, config.tldr)
                entry["dev_seconds"], entry["dev_backend"] = dev.seconds, dev.backend
                metrics.update(
                    {
                        "dev_accuracy": entry["accuracy"],
                        "dev_mean_tokens": entry["mean_tokens"],
                        "dev_seconds": dev.seconds,
                    }
                )
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
