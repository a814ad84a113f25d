"""Engine occupancy of the generation actor's admission rules at GPU scale, simulated (no vLLM).

Drives :class:`tokenskip.admission.AdmissionRule` through the simulated engine of
:mod:`tokenskip.testing.engine_sim` (one token per running sequence per step, first come first served,
``max_num_seqs`` slots) with output lengths drawn, with replacement and a fixed seed, from
DeepSeek-R1-Distill-7B's reasoning lengths (``../shared/data/cot_samples/*.jsonl``, field
``completion_tokens``), each sample of a problem drawn on its own. For each length set, engine size
(256 and 1,024 slots), n (4 and 1) and length cap (the GPU recipe's ``max_tokens`` 2048, and none) it
prints side by side:

* ``today``: the rule before issue 20 (``batch_slots``) with the recipe's earlier settings: batches of
  64 problems, 4 in flight, a batch's slot freed only when its last sample ends;
* ``new``: ``engine_fullness`` with the recipe's settings (batches of 32 problems, watermark
  2 x max_num_seqs, the actor holding the recommended batches: 4 watermarks of sequences);
* ``ceiling``: every request in the engine's queue at once (nothing an actor could beat).

Two occupancies each (mean running sequences / slots over engine steps): over the whole run, and while
batches were left to admit (``fed``), which is what the rule decides; after the last admission every
rule drains to the run's longest sample (its share shrinks as runs grow). Also printed: how many of
the problems had finished when the first batch (the first shard) did, and the most batches an actor
held admitted.

    python benchmarks/occupancy_sim.py --output benchmarks/results/occupancy_sim.json

A simulation is hardware-neutral: there is no GPU mode to run; ``benchmarks/gpu_check.py`` and
``benchmarks/engine_occupancy.py --device cuda`` measure the real stage on a GPU.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
COT_SAMPLES = REPO_ROOT.parent / "shared" / "data" / "cot_samples"
LENGTH_SETS = {
    "gsm8k": "r1_distill_7b_gsm8k_test.jsonl",
    "math500": "r1_distill_7b_math500_test.jsonl",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths-dir", default=str(COT_SAMPLES), help="folder of the R1 length files")
    parser.add_argument("--problems", type=int, default=8192)
    parser.add_argument("--slots", default="256,1024", help="engine max_num_seqs values")
    parser.add_argument("--n", default="4,1", help="samples per problem")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="problems per batch, new rule (the GPU recipe's)"
    )
    parser.add_argument("--queue-factor", type=float, default=2.0)
    parser.add_argument("--hold-factor", type=float, default=4.0)
    parser.add_argument("--today-batch-size", type=int, default=64)
    parser.add_argument("--today-batches", type=int, default=4)
    parser.add_argument("--max-tokens", default="2048,0", help="length caps (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    from tokenskip.admission import AdmissionConfig, AdmissionRule
    from tokenskip.testing.engine_sim import simulate

    rows = []
    header = (
        f"{'lengths':8} {'slots':>5} {'n':>2} {'cap':>5} | {'today':>5} {'fed':>5} | {'new':>5} {'fed':>5} "
        f"{'held':>4} {'1st%':>5} | {'ceil':>5}"
    )
    print(header)
    for name, filename in LENGTH_SETS.items():
        with open(Path(args.lengths_dir) / filename) as f:
            pool = [json.loads(line)["completion_tokens"] for line in f if line.strip()]
        for slots in (int(x) for x in args.slots.split(",")):
            for n in (int(x) for x in args.n.split(",")):
                for cap in (int(x) for x in args.max_tokens.split(",")):
                    rng = random.Random(args.seed)
                    lengths = [
                        [max(1, min(rng.choice(pool), cap) if cap else rng.choice(pool)) for _ in range(n)]
                        for _ in range(args.problems)
                    ]
                    today = simulate(
                        lengths,
                        args.today_batch_size,
                        AdmissionRule(AdmissionConfig(policy="batch_slots"), slots, args.today_batches),
                    )
                    config = AdmissionConfig(queue_factor=args.queue_factor, hold_factor=args.hold_factor)
                    held = AdmissionRule(config, slots, 1).recommended_max_batches(args.batch_size, n)
                    new = simulate(lengths, args.batch_size, AdmissionRule(config, slots, held))
                    ceiling = simulate(
                        lengths, args.problems, AdmissionRule(AdmissionConfig(policy="batch_slots"), slots, 1)
                    )
                    row = {
                        "lengths": name,
                        "slots": slots,
                        "n": n,
                        "max_tokens": cap or None,
                        "problems": args.problems,
                        "today": {
                            "batch_size": args.today_batch_size,
                            "batches_in_flight": args.today_batches,
                            "occupancy": round(today.occupancy, 3),
                            "fed_occupancy": round(today.fed_occupancy, 3),
                        },
                        "new": {
                            "batch_size": args.batch_size,
                            "queue_factor": args.queue_factor,
                            "max_batches_held": held,
                            "occupancy": round(new.occupancy, 3),
                            "fed_occupancy": round(new.fed_occupancy, 3),
                            "peak_admitted_batches": new.peak_admitted_batches,
                            "peak_engine_sequences": new.peak_engine_sequences,
                            "first_batch_done_fraction": round(new.first_batch_done_fraction, 4),
                        },
                        "ceiling_occupancy": round(ceiling.occupancy, 3),
                    }
                    rows.append(row)
                    print(
                        f"{name:8} {slots:>5} {n:>2} {cap or '-':>5} | {today.occupancy:5.2f} {today.fed_occupancy:5.2f} | "
                        f"{new.occupancy:5.2f} {new.fed_occupancy:5.2f} {held:>4} "
                        f"{100 * new.first_batch_done_fraction:5.1f} | {ceiling.occupancy:5.2f}",
                        flush=True,
                    )
    if args.output:
        Path(args.output).write_text(
            json.dumps({"benchmark": "occupancy_sim", "args": vars(args), "rows": rows}, indent=2) + "\n"
        )
        print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
