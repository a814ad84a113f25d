"""A training worker's peak RSS over the first 20 steps at 10k vs 100k training rows (issue 19,
item 3: "worker memory flat in dataset size").

The rows are the real R1-Distill-7B CoTs of ../shared/data/cot_samples (GSM8K test + MATH-500,
question + full response), cycled to each size and written as one parquet file (row groups of 1,000).
Each size is one `tokenskip.train.job.run_training` on local Ray: a tiny Llama (the test suite's,
built locally; CPU, fp32) fully fine-tuned for 20 steps by 2 Ray Train workers, batch 2 x 2
accumulation per worker, cutoff 2,048 tokens, the data read and tokenized by Ray Data tasks and
streamed (the default `stream` settings). The figures are rank 0's peak RSS (ru_maxrss, which the
loop reports every step as `worker_peak_rss_mb`) and its largest USS at a step's end
(`worker_peak_uss_mb`: private memory, without the shared pages of Ray's object store that RSS counts
once touched) at step 20; the worker processes are new for each run.

    python benchmarks/train_data_memory.py [--sizes 10000 100000] [--out benchmarks/results/train_data_memory.txt]
    python benchmarks/train_data_memory.py --gpu   # the same on GPU workers (bf16 weights)

Acceptance: the two peaks differ by less than 50 MB. Printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("TOKENSKIP_SHARED_DATA", REPO.parent / "shared" / "data")) / "cot_samples"
FILES = ("r1_distill_7b_gsm8k_test.jsonl", "r1_distill_7b_math500_test.jsonl")
STEPS = 20


def write_rows(path: Path, size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cots = []
    for name in FILES:
        with open(DATA / name, encoding="utf-8") as handle:
            cots += [json.loads(line) for line in handle if line.strip()]
    schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("response", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, size, 1000):
            rows = [cots[i % len(cots)] for i in range(start, min(start + 1000, size))]
            writer.write_table(
                pa.table(
                    {
                        "id": [f"{r['id']}-{start + k}" for k, r in enumerate(rows)],
                        "question": [r["problem"] for r in rows],
                        "response": [r["response"] for r in rows],
                    },
                    schema=schema,
                )
            )


def run_one(model: Path, data: Path, workdir: Path, size: int, gpu: bool) -> dict:
    from tokenskip.train.config import TrainConfig
    from tokenskip.train.job import run_training

    config = TrainConfig.model_validate(
        {
            "name": f"train-data-memory-{size}",
            "model": str(model),
            "dtype": "bfloat16" if gpu else "float32",
            "data": {"path": str(data), "format": "cot"},
            "lora": {"enabled": False},
            "optim": {
                "learning_rate": 1e-4,
                "max_steps": STEPS,
                "per_device_batch_size": 2,
                "gradient_accumulation_steps": 2,
                "cutoff_len": 2048,
                "warmup_ratio": 0.0,
            },
            "scaling": {
                "num_workers": 2,
                "use_gpu": gpu,
                "resources_per_worker": {"CPU": 1, "GPU": 1} if gpu else {"CPU": 0.5},
                "torch_threads": 1,
            },
            "checkpoint": {"storage_path": str(workdir / "runs"), "save_steps": 1000, "max_failures": 0},
        }
    )
    started = time.perf_counter()
    result = run_training(config)
    if result.error:
        raise RuntimeError(result.error)
    metrics = result.metrics
    return {
        "rows": size,
        "peak_rss_mb": metrics["worker_peak_rss_mb"],
        "peak_uss_mb": metrics["worker_peak_uss_mb"],
        "padding_fraction_last_step": metrics["padding_fraction"],
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--gpu", action="store_true", help="GPU workers (one GPU each), bf16")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_data_memory.txt"))
    args = parser.parse_args(argv)

    import ray

    from tokenskip.testing.tiny_models import build_tiny_causal_lm

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ray.init(num_cpus=None if args.gpu else 2, include_dashboard=False, log_to_driver=False)
    lines = []
    with tempfile.TemporaryDirectory(prefix="train-data-memory-") as tmp:
        workdir = Path(tmp)
        model = build_tiny_causal_lm(workdir / "tiny-llama")
        results = []
        for size in args.sizes:
            data = workdir / f"rows-{size}.parquet"
            write_rows(data, size)
            load_before = os.getloadavg()[0]
            result = run_one(model, data, workdir, size, args.gpu)
            result["load_avg_1m"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
            results.append(result)
            line = (
                f"{size:>7} rows: worker peak RSS {result['peak_rss_mb']:.1f} MB, peak USS "
                f"{result['peak_uss_mb']:.1f} MB over the first {STEPS} steps "
                f"({result['seconds']:.0f} s; 1-min load average {result['load_avg_1m'][0]} before, "
                f"{result['load_avg_1m'][1]} after)"
            )
            print(line, flush=True)
            lines.append(line)
    ray.shutdown()
    delta = results[-1]["peak_rss_mb"] - results[0]["peak_rss_mb"]
    delta_uss = results[-1]["peak_uss_mb"] - results[0]["peak_uss_mb"]
    summary = (
        f"difference {args.sizes[-1]} vs {args.sizes[0]} rows: RSS {delta:+.1f} MB (acceptance: "
        f"|difference| < 50 MB), USS {delta_uss:+.1f} MB"
    )
    print(summary)
    header = [
        "# benchmarks/train_data_memory.py: rank 0's peak RSS (ru_maxrss) and peak USS (at step ends) over",
        "# the first 20 steps of a full fine-tune of a tiny Llama, 2 Ray Train workers, batch 2 x 2 per",
        "# worker, cutoff 2048, on real R1 CoTs (cot_samples, cycled) streamed through Ray Data;",
        f"# {'GPU' if args.gpu else 'CPU'}, 2-core box shared with other work (load averages below).",
    ]
    Path(args.out).write_text("\n".join(header + lines + [summary]) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
