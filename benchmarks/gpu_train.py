"""The fsdp training step on one GPU, without Ray: tokens/s and peak memory.

A randomly initialised model of Qwen2.5-1.5B's shape (28 layers, hidden 1536, GQA 12/2 heads,
vocab 151,936, tied embeddings) is sharded by the training loop's own code
(:func:`tokenskip.train.sharding.shard_model`, FSDP2 per decoder layer then the root) on a world-size-1
process group (nccl, ``torch.distributed`` initialised from environment variables), with fp32 master
weights and AdamW state, bf16 compute (``MixedPrecisionPolicy``) and gradient checkpointing, and
trained on random token sequences of 4,096 tokens. Prints and writes tokens/s over the timed steps,
peak allocated/reserved GPU memory, and the per-rank parameter / gradient / optimiser bytes measured
from the tensors (:func:`tokenskip.train.sharding.state_bytes`).

    python benchmarks/gpu_train.py                 # CUDA; writes benchmarks/results/gpu_train.json
    python benchmarks/gpu_train.py --dry-run       # CPU, gloo, a small Qwen2 shape, fp32: checks the path

World size 1 measures the step's compute and the memory of an unsharded fp32-master model; on N GPUs
FSDP divides the parameter, gradient and optimiser bytes by N (benchmarks/train_memory.py measures
that split on CPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the device machine runs this from a copy of the tree, uninstalled

QWEN2_5_1_5B_SHAPE = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
DRY_RUN_SHAPE = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def _init_process_group(backend: str) -> None:
    """World size 1 from environment variables, as torchrun would set them."""
    import torch.distributed as dist

    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group(backend)


def run(args: argparse.Namespace) -> dict:
    import torch
    import torch.distributed as dist
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tokenskip.train.sharding import build_optimizer, precision_for, shard_model, state_bytes

    cuda = not args.dry_run
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --dry-run on CPU)")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    _init_process_group("nccl" if cuda else "gloo")
    shape = QWEN2_5_1_5B_SHAPE if cuda else DRY_RUN_SHAPE
    seq_len = args.seq_len or (4096 if cuda else 256)
    compute = "bfloat16" if cuda else "float32"

    torch.manual_seed(0)
    started = time.perf_counter()
    with device:  # initialise on the device: a 1.5B model's random init on the CPU takes minutes
        model = Qwen2ForCausalLM(Qwen2Config(**shape, torch_dtype="float32"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    n_params = sum(p.numel() for p in model.parameters())
    sharded = shard_model(model, "fsdp", precision_for("fsdp", compute, lora=False), device)
    optimizer = build_optimizer(sharded, learning_rate=1e-5, weight_decay=0.0)
    built_s = time.perf_counter() - started

    generator = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, shape["vocab_size"], (args.batch_size, seq_len), generator=generator)
        for _ in range(args.warmup + args.steps)
    ]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    sharded.model.train()
    losses, step_s, measured = [], [], None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for index, tokens in enumerate(batches):
        tokens = tokens.to(device)
        sync()
        t0 = time.perf_counter()
        with sharded.micro_step(sync_gradients=True):
            loss = sharded.model(input_ids=tokens, labels=tokens).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(sharded.parameters(), 1.0)
        optimizer.step()
        if measured is None:
            measured = state_bytes(sharded, optimizer)
        optimizer.zero_grad(set_to_none=True)
        sync()
        if index >= args.warmup:
            step_s.append(time.perf_counter() - t0)
        losses.append(loss.item())

    tokens_per_step = args.batch_size * seq_len
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "cuda" if cuda else "cpu dry run",
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "strategy": "fsdp (FSDP2 fully_shard per decoder layer then root), world size 1, "
        + ("nccl" if cuda else "gloo"),
        "model": "random Qwen2, Qwen2.5-1.5B shape" if cuda else "random Qwen2, small shape (dry run)",
        "shape": shape,
        "parameters": n_params,
        "precision": f"fp32 master weights and AdamW state, {compute} compute",
        "gradient_checkpointing": True,
        "sequence_tokens": seq_len,
        "batch_size": args.batch_size,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "step_s": [round(s, 4) for s in step_s],
        "tokens_per_s": round(tokens_per_step * len(step_s) / sum(step_s), 1),
        "model_build_s": round(built_s, 1),
        "state_bytes": {
            "parameters": measured.parameters,
            "gradients": measured.gradients,
            "optimizer": measured.optimizer,
        },
        "losses": [round(x, 4) for x in losses],
    }
    if cuda:
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        result["peak_allocated_gib"] = round(result["peak_allocated_bytes"] / 2**30, 2)
    dist.destroy_process_group()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, gloo, small shape: check the path only")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (4096 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--output", default=None, help="JSON path (default benchmarks/results/gpu_train.json)"
    )
    args = parser.parse_args()
    result = run(args)
    text = json.dumps(result, indent=1)
    print(text)
    output = args.output or (
        None if args.dry_run else str(REPO / "benchmarks" / "results" / "gpu_train.json")
    )
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
