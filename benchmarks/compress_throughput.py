"""Throughput: TokenSkip's compression loop (llmlingua, one call per CoT per ratio) vs our batched scorer.

One run, same tiny LLMLingua-2-style model, same machine, same CoTs (>= 500 from cot_samples, gsm8k
and math500). Prints CoTs/s of each, the speed-up, and the identical-output rate.

    python benchmarks/compress_throughput.py [--n 500] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=500, help="CoTs (half gsm8k, half math500)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both sides")
    parser.add_argument("--batch-size", type=int, default=32, help="our scorer: chunks per forward pass")
    parser.add_argument("--cots-per-call", type=int, default=64, help="our scorer: CoTs per prune() call")
    parser.add_argument(
        "--exact-padding",
        choices=["default", "true", "false"],
        default="default",
        help="our scorer: pad chunks to 512 like llmlingua (true) or to the batch's longest (false)",
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
    model = build_tiny_token_classifier(work / "tiny-xlm-roberta-large")
    texts = load_cots(args.n)
    chars = sum(len(t) for t in texts)

    reference = PromptCompressor(model_name=str(model), use_llmlingua2=True, device_map="cpu")
    options = {} if args.exact_padding == "default" else {"exact_padding": args.exact_padding == "true"}
    scorer_config = ScorerConfig(
        kind="llmlingua2",
        model=str(model),
        batch_size=args.batch_size,
        force_tokens=FORCE_TOKENS,
        force_digits=True,
        drop_consecutive=True,
        **options,
    )
    scorer = build_scorer(scorer_config)

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

    # The machine is shared: alternate the two sides slice by slice so load changes hit both alike.
    expected: list[dict[float, str | None]] = []
    ours: list[dict[float, str]] = []
    wall = {"baseline": 0.0, "ours": 0.0}
    cpu = {"baseline": 0.0, "ours": 0.0}
    for start in range(0, len(texts), args.cots_per_call):
        part = texts[start : start + args.cots_per_call]
        t0, c0 = time.perf_counter(), time.process_time()
        expected += [baseline(t) for t in part]
        t1, c1 = time.perf_counter(), time.process_time()
        ours += scorer.prune(part, RATIOS)
        t2, c2 = time.perf_counter(), time.process_time()
        wall["baseline"] += t1 - t0
        wall["ours"] += t2 - t1
        cpu["baseline"] += c1 - c0
        cpu["ours"] += c2 - c1
    baseline_s, ours_s = wall["baseline"], wall["ours"]
    llmlingua_errors = sum(e[r] is None for e in expected for r in RATIOS)

    compared = [(e[r], o[r]) for e, o in zip(expected, ours, strict=True) for r in RATIOS if e[r] is not None]
    identical = sum(a == b for a, b in compared)
    lines = [
        f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"machine: nproc={os.cpu_count()} loadavg={os.getloadavg()[0]:.1f} torch_threads={args.threads} "
        f"python={platform.python_version()} torch={torch.__version__}",
        f"model: tiny XLM-RoBERTa token classifier (2 layers, hidden 64), folder {model.name}",
        f"data: {len(texts)} CoTs from cot_samples ({len(texts) - len(texts) // 2} gsm8k + {len(texts) // 2} math500), "
        f"{chars} chars; ratios {RATIOS}; force_tokens={FORCE_TOKENS}, force_reserve_digit, drop_consecutive",
        f"baseline (llmlingua compress_prompt per CoT per ratio): {baseline_s:.1f} s wall "
        f"({cpu['baseline']:.1f} s CPU), {len(texts) / baseline_s:.2f} CoTs/s",
        f"ours (batched, one pass for all ratios, batch_size={args.batch_size}, "
        f"exact_padding={getattr(scorer_config, 'exact_padding', None)}, {args.cots_per_call} CoTs per call): "
        f"{ours_s:.1f} s wall ({cpu['ours']:.1f} s CPU), "
        f"{len(texts) / ours_s:.2f} CoTs/s",
        f"speed-up: {baseline_s / ours_s:.1f}x wall, {cpu['baseline'] / cpu['ours']:.1f}x CPU time "
        "(the two sides alternate every slice of CoTs, so load from other processes hits both alike)",
        f"identical outputs: {identical}/{len(compared)} = {identical / max(1, len(compared)):.2%} "
        f"(excluded: {llmlingua_errors} (CoT, ratio) pairs where llmlingua raised IndexError)",
        "caveat: both sides run the same tiny model (2 layers, hidden 64) on the same 512-token chunks, so "
        "forward FLOPs per chunk are equal and one pass instead of five caps that part at 5x; the rest of "
        "the gain is llmlingua's per-call Python work (tokenisation, word merging, tiktoken per word, "
        "percentiles) done once instead of per ratio. The real xlm-roberta-large classifier costs ~1000x "
        "more per token, so there the forward pass dominates and the speed-up tends to 5x (the ratio "
        "count) plus whatever batching chunks of many CoTs buys on the device (mostly on GPU).",
    ]
    print("\n".join(lines))
    return 0 if identical == len(compared) else 1


if __name__ == "__main__":
    sys.exit(main())
