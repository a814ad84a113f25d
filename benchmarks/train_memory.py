"""Per-rank training state under ddp vs fsdp, and whether the two strategies train the same model.

One random Qwen2-shaped model (67.6M parameters: 8 layers, hidden 768, GQA 12/2 heads, MLP 3072,
the tiny test tokenizer) is fully fine-tuned twice through ``tokenskip train``'s own Ray Train loop
(2 workers, gloo, CPU): once with ``scaling.strategy: ddp`` and once with ``fsdp``, same data (R1
CoTs from ../shared/data/cot_samples), same seed, same 20 optimiser steps. The loop measures, on each
rank after the first optimiser step, the bytes of the parameters, gradients and AdamW state that
rank holds (local shards of DTensors under fsdp: :func:`tokenskip.train.sharding.state_bytes`) and
keeps them in the checkpoint's trainer_state.json, with the loss history. Prints and writes
benchmarks/results/train_memory.json: bytes per rank per strategy, the fsdp/ddp ratio, and the
largest loss difference between the two curves against the stated tolerance.

    python benchmarks/train_memory.py                      # CPU, 2 workers, gloo
    python benchmarks/train_memory.py --gpu --workers 8    # GPU node(s): nccl, bf16 compute
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TOKENSKIP_SHARED_DATA", "/work/shared/data")) / "cot_samples"
if not DATA.is_dir():
    DATA = REPO.parent / "shared" / "data" / "cot_samples"

SHAPE = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=8,
    num_attention_heads=12,
    num_key_value_heads=2,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)
# fp32 on CPU: the two strategies differ only in reduction order (all-reduce of whole gradients vs
# reduce-scatter of shards), a few ulps per step that the optimiser carries forward.
LOSS_TOLERANCE = 1e-3  # relative, every step


def _write_data(path: Path, rows: int) -> Path:
    with open(DATA / "r1_distill_7b_gsm8k_test.jsonl", encoding="utf-8") as handle:
        samples = [json.loads(line) for _, line in zip(range(rows), handle, strict=False)]
    with open(path, "w", encoding="utf-8") as out:
        for sample in samples:
            out.write(json.dumps({"question": sample["problem"], "response": sample["response"]}) + "\n")
    return path


def _run(strategy: str, model: Path, data: Path, storage: Path, args: argparse.Namespace) -> dict:
    from tokenskip.train.config import TrainConfig
    from tokenskip.train.job import run_training

    config = TrainConfig.model_validate(
        {
            "name": f"train-memory-{strategy}",
            "model": str(model),
            "dtype": "bfloat16" if args.gpu else "float32",
            "data": {"path": str(data), "format": "cot"},
            "lora": {"enabled": False},
            "optim": {
                "learning_rate": 1e-4,
                "max_steps": args.steps,
                "scheduler": "constant",
                "warmup_ratio": 0.0,
                "per_device_batch_size": 2,
                "gradient_accumulation_steps": 1,
                "cutoff_len": args.cutoff,
            },
            "scaling": {
                "num_workers": args.workers,
                "strategy": strategy,
                "use_gpu": args.gpu,
                "resources_per_worker": {"GPU": 1} if args.gpu else {"CPU": 1},
                "torch_threads": None if args.gpu else 1,
            },
            "checkpoint": {"storage_path": str(storage), "save_steps": args.steps, "max_failures": 0},
            "seed": 0,
        }
    )
    started = time.perf_counter()
    result = run_training(config)
    if result.error:
        raise RuntimeError(f"{strategy} run failed: {result.error}")
    state = json.loads((Path(result.checkpoint_path) / "trainer_state.json").read_text())
    return {
        "wall_s": round(time.perf_counter() - started, 1),
        "bytes_per_rank": state["state_bytes_per_rank"],
        "losses": [loss for _, loss in state["loss_history"]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, nccl, bf16 compute")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=64, help="training rows (R1 CoTs on GSM8K)")
    parser.add_argument("--cutoff", type=int, default=128, help="tokens per example")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "train_memory.json"))
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from tokenskip.testing.tiny_models import build_random_qwen2_lm, build_tiny_causal_lm

    work = Path(tempfile.mkdtemp(prefix="tokenskip-train-memory-"))
    tokenizer = build_tiny_causal_lm(work / "tiny-tokenizer")
    model = build_random_qwen2_lm(work / "random-qwen2", tokenizer, shape=SHAPE, dtype="float32")
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())
    data = _write_data(work / "train.jsonl", args.rows)

    ray.init(num_cpus=None if args.gpu else 2, include_dashboard=False)
    runs = {s: _run(s, model, data, work / "checkpoints", args) for s in ("ddp", "fsdp")}
    ray.shutdown()

    def total(row: dict) -> int:
        return row["parameters"] + row["gradients"] + row["optimizer"]

    ratios = {
        kind: max(r[kind] for r in runs["fsdp"]["bytes_per_rank"])
        / max(r[kind] for r in runs["ddp"]["bytes_per_rank"])
        for kind in ("parameters", "gradients", "optimizer")
    }
    ratios["total"] = max(total(r) for r in runs["fsdp"]["bytes_per_rank"]) / max(
        total(r) for r in runs["ddp"]["bytes_per_rank"]
    )
    ddp_losses, fsdp_losses = runs["ddp"]["losses"], runs["fsdp"]["losses"]
    relative = [abs(a - b) / abs(a) for a, b in zip(ddp_losses, fsdp_losses, strict=True)]
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"nproc={os.cpu_count()}, loadavg(1 min) at the end={os.getloadavg()[0]:.1f}, torch {torch.__version__}",
        "setup": f"{args.workers} Ray Train workers, {'nccl, bf16 compute' if args.gpu else 'gloo, CPU, fp32'}; "
        f"random Qwen2 {n_params} parameters {SHAPE}; full fine-tune, AdamW, gradient checkpointing; "
        f"{args.rows} R1 CoTs (cutoff {args.cutoff} tokens), batch 2 per worker, {args.steps} steps, seed 0",
        "measured": "per rank, after the first optimiser step: bytes of the parameters, gradients and AdamW "
        "state the rank holds (DTensor local shards under fsdp)",
        "parameters": n_params,
        "runs": runs,
        "fsdp_over_ddp_per_rank": {k: round(v, 4) for k, v in ratios.items()},
        "loss_curves": {
            "tolerance_relative": LOSS_TOLERANCE,
            "max_relative_difference": max(relative),
            "max_absolute_difference": max(abs(a - b) for a, b in zip(ddp_losses, fsdp_losses, strict=True)),
            "within_tolerance": max(relative) <= LOSS_TOLERANCE,
        },
    }
    text = json.dumps(result, indent=1)
    print(text)
    Path(args.output).write_text(text + "\n")
    print(
        f"fsdp/ddp bytes per rank: total {ratios['total']:.3f} (parameters {ratios['parameters']:.3f}, "
        f"gradients {ratios['gradients']:.3f}, optimizer {ratios['optimizer']:.3f}); loss curves differ by at "
        f"most {max(relative):.2e} relative over {args.steps} steps (tolerance {LOSS_TOLERANCE:g})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
