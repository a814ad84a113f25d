"""Throughput: TokenSkip's compression loop (llmlingua, one call per CoT per ratio) vs our batched scorer.

One run, same tiny LLMLingua-2-style model, same machine, same CoTs (>= 500 from cot_samples, gsm8k
and math500). Prints CoTs/s of each, the speed-up, and the identical-output rate.

    python benchmarks/compress_throughput.py [--n 500] [--threads 1]
    python benchmarks/compress_throughput.py --device cuda --shape xlm-roberta-large   # GPU machine
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TOKENSKIP_SHARED_DATA", REPO.parent / "shared" / "data")) / "cot_samples"
RATIOS = [0.9, 0.8, 0.7, 0.6, 0.5]
FORCE_TOKENS = ["Step", ":"]


def load_cots(n: int) -> list[str]:
    """First n//2 CoTs of each cot_samples file, in file order (deterministic, unselected)."""
    texts = []
    for name, take in (
        ("r1_distill_7b_gsm8k_test.jsonl", n - n // 2),
        ("r1_distill_7b_math500_test.jsonl", n // 2),
    ):
        with open(DATA / name) as f:
            rows = [json.loads(line) for line in f]
        texts += [r["response"] for r in rows[:take]]
    return texts


def _time_forward(model, totals: dict[str, float], name: str) -> None:
    """Add the CPU time of every forward pass of ``model`` to ``totals[name]``.

    Thread CPU time, measured in the thread that runs the pass (our scorer runs it in a worker thread);
    with one torch thread that is all of the pass's compute.
    """
    started: dict[int, float] = {}

    def before(module, args, kwargs):
        started[threading.get_ident()] = time.thread_time()

    def after(module, args, kwargs, output):
        totals[name] += time.thread_time() - started.pop(threading.get_ident())

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=500, help="CoTs (half gsm8k, half math500)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both sides")
    parser.add_argument("--batch-size", type=int, default=32, help="our scorer: chunks per forward pass")
    parser.add_argument("--cots-per-call", type=int, default=64, help="our scorer: CoTs per prune() call")
    parser.add_argument(
        "--padding",
        choices=["both", "exact", "batch"],
        default="both",
        help="our scorer's padding: exact = every chunk to 512 like llmlingua (the default, bit-identical by "
        "construction); batch = to the batch's longest chunk (less compute on short chunks); both = measure each",
    )
    parser.add_argument("--device", default="cpu", help="torch device of both sides, e.g. cuda")
    parser.add_argument(
        "--shape",
        choices=["tiny", "xlm-roberta-large"],
        default="tiny",
        help="random classifier: tiny (2 layers, hidden 32) or xlm-roberta-large's encoder (24 x 1024)",
    )
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    from llmlingua import PromptCompressor

    from tokenskip.scoring import ScorerConfig, build_scorer
    from tokenskip.testing.tiny_token_classifier import build_tiny_token_classifier, offline_tiktoken_cache

    work = Path(tempfile.mkdtemp(prefix="tokenskip-bench-"))
    offline_tiktoken_cache(work / "tiktoken")
    if args.shape == "tiny":
        model = build_tiny_token_classifier(work / "tiny-xlm-roberta-large")
    else:  # the folder name must contain xlm-roberta-large: llmlingua picks its word rules by name
        model = build_tiny_token_classifier(
            work / "random-xlm-roberta-large",
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
        )
    texts = load_cots(args.n)
    chars = sum(len(t) for t in texts)

    reference = PromptCompressor(model_name=str(model), use_llmlingua2=True, device_map=args.device)
    variants = {"exact": True, "batch": False}
    chosen = list(variants) if args.padding == "both" else [args.padding]
    scorers = {
        name: build_scorer(
            ScorerConfig(
                kind="llmlingua2",
                model=str(model),
                batch_size=args.batch_size,
                force_tokens=FORCE_TOKENS,
                force_digits=True,
                drop_consecutive=True,
                exact_padding=variants[name],
                device=args.device,
            )
        )
        for name in chosen
    }
    forward_cpu = dict.fromkeys(["baseline", *scorers], 0.0)
    for name, torch_model in [("baseline", reference.model), *((k, v.model) for k, v in scorers.items())]:
        _time_forward(torch_model, forward_cpu, name)

    def baseline(text: str) -> dict[float, str | None]:
        """TokenSkip's loop: one compress_prompt call per ratio."""
        out: dict[float, str | None] = {}
        for ratio in RATIOS:
            try:
                out[ratio] = reference.compress_prompt(
                    text,
                    rate=ratio,
                    force_tokens=FORCE_TOKENS,
                    force_reserve_digit=True,
                    drop_consecutive=True,
                )["compressed_prompt"]
            except IndexError:  # llmlingua bug: a chunk without words (compared separately, not here)
                out[ratio] = None
        return out

    # The machine is shared: alternate the sides slice by slice so load changes hit them alike.
    expected: list[dict[float, str | None]] = []
    ours: dict[str, list[dict[float, str]]] = {name: [] for name in scorers}
    wall = dict.fromkeys(["baseline", *scorers], 0.0)
    cpu = dict.fromkeys(["baseline", *scorers], 0.0)
    for start in range(0, len(texts), args.cots_per_call):
        part = texts[start : start + args.cots_per_call]
        t0, c0 = time.perf_counter(), time.process_time()
        expected += [baseline(t) for t in part]
        wall["baseline"] += time.perf_counter() - t0
        cpu["baseline"] += time.process_time() - c0
        for name, scorer in scorers.items():
            t0, c0 = time.perf_counter(), time.process_time()
            ours[name] += scorer.prune(part, RATIOS)
            wall[name] += time.perf_counter() - t0
            cpu[name] += time.process_time() - c0
    llmlingua_errors = sum(e[r] is None for e in expected for r in RATIOS)

    n = len(texts)
    lines = [
        f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"machine: nproc={os.cpu_count()} loadavg(1 min, at the end)={os.getloadavg()[0]:.1f} "
        f"torch_threads={args.threads} python={platform.python_version()} torch={torch.__version__}",
        f"model: random XLM-RoBERTa token classifier, shape {args.shape}, folder {model.name}, "
        f"device {args.device}",
        f"data: {n} CoTs from cot_samples ({n - n // 2} gsm8k + {n // 2} math500, first in file order), "
        f"{chars} chars; ratios {RATIOS}; force_tokens={FORCE_TOKENS}, force_reserve_digit, drop_consecutive",
        "timing: baseline and ours alternate every slice of CoTs, so load from other processes hits both alike; "
        "CPU time (this process) is the steadier figure on a shared machine",
        f"baseline (TokenSkip's loop: llmlingua compress_prompt per CoT per ratio): {wall['baseline']:.1f} s wall "
        f"({cpu['baseline']:.1f} s CPU, of which model forward {forward_cpu['baseline']:.1f} s), "
        f"{n / wall['baseline']:.2f} CoTs/s",
    ]
    all_identical = True
    for name in scorers:
        compared = [
            (e[r], o[r])
            for e, o in zip(expected, ours[name], strict=True)
            for r in RATIOS
            if e[r] is not None
        ]
        identical = sum(a == b for a, b in compared)
        all_identical &= identical == len(compared)
        lines += [
            f"ours, padding={name} (batched, one pass for all ratios, batch_size={args.batch_size}, "
            f"{args.cots_per_call} CoTs per call): {wall[name]:.1f} s wall ({cpu[name]:.1f} s CPU, of which "
            f"model forward {forward_cpu[name]:.1f} s), "
            f"{n / wall[name]:.2f} CoTs/s",
            f"  speed-up: {wall['baseline'] / wall[name]:.1f}x wall, {cpu['baseline'] / cpu[name]:.1f}x CPU time; "
            f"model forward {forward_cpu['baseline'] / max(forward_cpu[name], 1e-9):.1f}x less CPU, everything "
            f"else {(cpu['baseline'] - forward_cpu['baseline']) / max(cpu[name] - forward_cpu[name], 1e-9):.1f}x less",
            f"  identical outputs: {identical}/{len(compared)} = {identical / max(1, len(compared)):.2%} "
            f"(excluded: {llmlingua_errors} (CoT, ratio) pairs where llmlingua raised IndexError)",
        ]
    lines.append(
        "caveat: even with this tiny model the forward pass (attention over 512-token chunks) is about half of "
        "llmlingua's CPU time, and one pass instead of five bounds that part near 5x (more where the scorer "
        "skips padded query positions; the 512 padded keys stay, for bit-identical output); the Python work "
        "around it shrinks ~10x or more. Ours runs the model in a second thread, overlapping the Python of "
        "finished chunks, so its wall time is below its CPU time on 2 cores; llmlingua's loop uses one. The "
        "real xlm-roberta-large classifier costs ~1000x more per token, so there the forward pass is nearly "
        "all of the time and the speed-up tends to the forward ratio (~5-6x on CPU) plus what batching many "
        "CoTs' chunks buys on a GPU. Wall-clock figures on a shared machine swing with other jobs; CPU time "
        "is the steadier comparison."
    )
    print("\n".join(lines))
    return 0 if all_identical else 1


if __name__ == "__main__":
    sys.exit(main())
