"""Padding in training batches on real R1 CoT lengths: padded batches in shuffled order vs the
length-grouped stream the training loop uses (issue 19, item 2).

The lengths are the `completion_tokens` of the R1-Distill-7B CoTs in ../shared/data/cot_samples
(GSM8K test + MATH-500, 1,819 rows, used as one domain, epochs laid end to end). For each
micro-batch size it lays out a run of 8 workers, global batch 64 (TL;DR's), over 1,000 steps, and
splits each worker's step into micro-batches with the real code (tokenskip.train.data:
DomainStream, WorkerBatches, micro_batches), in three ways:

* padded: the stream in a seeded shuffle (windows of 16 global batches), micro-batches as they come
  (what the loop did before: a seeded permutation, each batch padded to its longest row);
* step-sorted: the same rows, each worker's step sorted by length before it is cut into micro-batches;
* length-grouped: the stream's windows sorted by length and served in micro-batch-sized chunks in
  seeded order (each worker takes a contiguous block of its step's slots), plus the step sort
  (`stream.length_grouping: true`, the default).

The figure is padding / all positions processed (rows padded to the longest of their micro-batch).
It is token arithmetic: no model runs, so there is no device to choose; the same figures hold on GPUs.

    python benchmarks/train_padding.py [--steps 1000] [--out benchmarks/results/train_padding.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("TOKENSKIP_SHARED_DATA", REPO.parent / "shared" / "data")) / "cot_samples"
FILES = ("r1_distill_7b_gsm8k_test.jsonl", "r1_distill_7b_math500_test.jsonl")


def load_lengths() -> list[int]:
    lengths = []
    for name in FILES:
        with open(DATA / name, encoding="utf-8") as handle:
            lengths += [int(json.loads(line)["completion_tokens"]) for line in handle if line.strip()]
    return lengths


def padding(lengths: list[int], *, micro: int, grouped_stream: bool, sort_step: bool, steps: int) -> float:
    from tokenskip.train.data import (
        DomainStream,
        StreamExample,
        WorkerBatches,
        micro_batches,
        padding_fraction,
    )

    world, global_batch, window_batches, seed = 8, 64, 16, 42
    rows = [StreamExample(np.zeros(n, dtype=np.int32), 0) for n in lengths]
    batches = []
    for rank in range(world):
        stream = DomainStream(
            lambda _epoch: iter(rows),
            name="r1",
            domain=0,
            seed=seed,
            window=window_batches * global_batch,
            chunk=micro,
            group_by_length=grouped_stream,
        )
        worker = WorkerBatches([stream], rank, world)
        for _ in range(steps):
            batches += micro_batches(worker.take([0] * global_batch), micro, sort_step)
    return padding_fraction(batches)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_padding.json"))
    args = parser.parse_args(argv)

    lengths = load_lengths()
    result = {
        "data": f"{len(lengths)} R1-Distill-7B CoTs ({', '.join(FILES)}), completion_tokens",
        "lengths": {
            "mean": float(np.mean(lengths)),
            "p50": float(np.percentile(lengths, 50)),
            "p90": float(np.percentile(lengths, 90)),
            "max": int(max(lengths)),
        },
        "layout": {"workers": 8, "global_batch": 64, "window_batches": 16, "steps": args.steps},
        "padding_fraction": {},
    }
    print(
        f"{result['data']}: mean {result['lengths']['mean']:.0f}, p50 {result['lengths']['p50']:.0f}, "
        f"p90 {result['lengths']['p90']:.0f}, max {result['lengths']['max']}"
    )
    print(f"{'micro-batch':>11} | {'padded':>7} | {'step-sorted':>11} | {'length-grouped':>14}")
    for micro in (2, 4, 8):
        row = {
            "padded": padding(lengths, micro=micro, grouped_stream=False, sort_step=False, steps=args.steps),
            "step_sorted": padding(
                lengths, micro=micro, grouped_stream=False, sort_step=True, steps=args.steps
            ),
            "length_grouped": padding(
                lengths, micro=micro, grouped_stream=True, sort_step=True, steps=args.steps
            ),
        }
        result["padding_fraction"][str(micro)] = row
        print(
            f"{micro:>11} | {row['padded']:>7.3f} | {row['step_sorted']:>11.3f} | {row['length_grouped']:>14.3f}"
        )
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
