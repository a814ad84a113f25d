"""The whole TokenSkip loop at a scale one machine runs: does the fine-tuned model follow the ratio?

TokenSkip's main table (arXiv 2502.12067: accuracy and CoT tokens at ratios 1.0 ... 0.5 after a LoRA
SFT on ratio-conditioned pruned CoTs), driven through the project's own commands, each in a
subprocess exactly as a user types it:

1. data: the first ``--train-examples`` GSM8K *train* problems (``../shared/data/gsm8k/train.jsonl``)
   with their reference solutions as the CoTs. The embedded model's own CoTs are rarely correct on
   GSM8K, so a dataset built with ``tokenskip run`` would keep almost nothing; the reference
   solutions are correct by construction. The solutions' calculator annotations (``<<48/2=24>>``)
   are removed first (they are GSM8K's tool markup, not reasoning text).
2. ``tokenskip compress``: prune every CoT to 0.9 ... 0.5 with the ``selfinfo`` scorer (token
   self-information under the embedded model; llmlingua2's classifier weights are not available
   offline), counted in the trained model's tokenizer.
3. ``tokenskip train``: LoRA SFT (r=8, alpha=16, all linear layers, TokenSkip's) of the model on the
   TokenSkip mix: one ratio per example drawn from {1.0, 0.9, ..., 0.5}, prompt
   ``question<eos>ratio<eos>`` (the bare question at 1.0), the compressed CoT + TokenSkip's answer tail.
4. ``tokenskip evaluate``: the first ``--eval-problems`` GSM8K *test* problems, greedy, one pass per
   ratio, with the trained adapter; prints and stores accuracy, mean output tokens and the achieved
   length ratio (mean tokens / mean tokens at ratio 1.0) per ratio.

    python benchmarks/controllability.py                        # CPU: SmolLM2-135M-Instruct, ~20 min on 2 cores
    python benchmarks/controllability.py --device cuda --model Qwen/Qwen2.5-0.5B-Instruct \\
        --train-examples 7473 --epochs 3 --eval-problems 1319 --max-tokens 512   # a GPU (not run here)

Writes ``--output`` (default benchmarks/results/controllability.json): the settings, the data
source and sizes, the compression achieved in the training data, the training summary, the table,
the wall time of every stage and the 1-minute load average around each. It is a measurement, not a
pass/fail: a 135M model trained for a few minutes may not follow the ratio; the paper's effect is
reported for 7B/14B models trained on ~7k examples for 3 epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    """``../shared/data`` beside the checkout; in a git worktree, beside the main checkout."""
    here = REPO.parent / "shared" / "data"
    if here.exists():
        return here
    try:
        common = subprocess.run(
            ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return here
    main = Path(common).parent / ".." / "shared" / "data"
    return main.resolve() if main.exists() else here


SHARED = _shared_data()
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "controllability.json"
RATIOS = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _tokenskip(args: list[str], log: Path, timeout_s: float | None) -> tuple[str, float]:
    """Run ``tokenskip <args>`` (this checkout's code) and return (stdout, wall seconds); the
    command's stdout and stderr go to ``log``. A failure stops the benchmark with the log's tail."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-m", "tokenskip.cli", *args]
    print("$ tokenskip " + " ".join(args), flush=True)
    start = time.monotonic()
    with open(log, "w") as err:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout_s
        )
    wall = time.monotonic() - start
    with open(log, "a") as out:
        out.write("\n--- stdout ---\n" + proc.stdout)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(
            f"tokenskip {args[0]} failed (exit {proc.returncode}) after {wall:.0f} s; log {log}:\n{tail}"
        )
    return proc.stdout, wall


def prepare_cots(train_file: Path, count: int, out: Path) -> dict:
    """The first ``count`` GSM8K train problems as compress input: question, cot (annotations
    removed), answer, and a key per row."""
    rows = []
    with open(train_file) as f:
        for index, line in enumerate(f):
            if len(rows) == count:
                break
            record = json.loads(line)
            cot = CALCULATOR.sub("", record["cot"]).strip()
            key = f"gsm8k-train-{index}"
            rows.append(
                {
                    "key": key,
                    "problem_id": key,
                    "question": record["question"],
                    "cot": cot,
                    "answer": str(record["answer"]),
                }
            )
    with open(out, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return {"rows": len(rows), "mean_cot_chars": round(sum(len(r["cot"]) for r in rows) / len(rows), 1)}


def compression_stats(compressed: Path) -> dict:
    """Rows compressed and the mean achieved ratio per target ratio in the training data."""
    table = pq.read_table(compressed, columns=["original_tokens", "compressions"]).to_pylist()
    by_target: dict[float, list[float]] = {}
    for row in table:
        for c in row["compressions"] or []:
            if row["original_tokens"]:
                by_target.setdefault(c["target_ratio"], []).append(c["tokens"] / row["original_tokens"])
    originals = [r["original_tokens"] for r in table if r["original_tokens"]]
    return {
        "rows": len(table),
        "mean_original_tokens": round(sum(originals) / len(originals), 1) if originals else None,
        "achieved_ratio_by_target": {
            f"{t:g}": round(sum(v) / len(v), 3) for t, v in sorted(by_target.items(), reverse=True)
        },
    }


def train_config(args: argparse.Namespace, compressed: Path, work: Path) -> dict:
    cuda = args.device == "cuda"
    workers = args.workers
    return {
        "name": "controllability",
        "model": args.model,
        "dtype": "bfloat16" if cuda else "float32",
        "mode": "tokenskip",
        "data": {
            "path": str(compressed),
            "format": "compressed",
            "mix": {"ratios": RATIOS, "seed": 42, "delimiter": None, "answer_tail": "tokenskip"},
        },
        "lora": {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "optim": {
            "learning_rate": args.lr,
            "epochs": args.epochs,
            "scheduler": "cosine",
            "warmup_ratio": 0.1,
            "per_device_batch_size": args.per_device_batch,
            "global_batch_size": args.global_batch,
            "cutoff_len": args.cutoff,
        },
        "scaling": {
            "num_workers": workers,
            "use_gpu": cuda,
            "resources_per_worker": {"CPU": 4, "GPU": 1} if cuda else {"CPU": 1},
            "torch_threads": None if cuda else args.torch_threads,
        },
        "checkpoint": {
            "storage_path": str(work / "train"),
            "save_steps": 100000,  # only the final checkpoint
            "num_to_keep": 1,
            "max_failures": 0,
        },
        "seed": 42,
        "log_every": 5,
    }


def evaluate_config(args: argparse.Namespace, adapter: str, work: Path) -> dict:
    cuda = args.device == "cuda"
    engine = {
        "model": args.model,
        "device": args.device,
        "max_model_len": 1024,
        "enable_lora": True,
        "max_lora_rank": 8,
        "max_num_seqs": args.max_num_seqs,
        "seed": 0,
        "enforce_eager": not cuda,
    }
    if not cuda:
        engine["kv_cache_memory_bytes"] = args.kv_cache_bytes
    else:
        engine["gpu_memory_utilization"] = 0.5
    return {
        "engine": engine,
        "sampling": {"n": 1, "temperature": 0.0, "max_tokens": args.max_tokens},
        "source": {
            "path": str(Path(args.data_dir) / "gsm8k" / "test.jsonl"),
            "kind": "gsm8k",
            "split": "test",
        },
        "ratios": RATIOS,
        "adapter": adapter,
        "delimiter": None,  # the tokenizer's eos, as in training
        "scale_max_tokens_by_ratio": False,
        "grading": {"last_number_fallback": True},
        "output": str(work / "eval"),
        "limit": args.eval_problems,
        "pass_k": [1],
    }


def format_table(rows: list[dict]) -> str:
    lines = ["ratio  accuracy  mean tokens  achieved ratio  truncated"]
    for r in rows:
        achieved = "-" if r["achieved_ratio"] is None else f"{r['achieved_ratio']:.3f}"
        mean = "-" if r["mean_tokens"] is None else f"{r['mean_tokens']:.1f}"
        lines.append(
            f"{r['ratio']:<5g}  {r['accuracy']:>7.3f}   {mean:>10}   {achieved:>13}   {r['n_truncated']:>4}/{r['n']}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="trained model (and scorer)")
    parser.add_argument("--scorer", default="selfinfo", choices=["selfinfo", "llmlingua2"])
    parser.add_argument(
        "--scorer-model", default=None, help="default: --model for selfinfo, llmlingua2's own"
    )
    parser.add_argument("--data-dir", default=str(SHARED), help="folder holding gsm8k/{train,test}.jsonl")
    parser.add_argument("--train-examples", type=int, default=256, help="GSM8K train problems (first N)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument(
        "--lr", type=float, default=4e-4, help="LoRA learning rate (TokenSkip 5e-5 at 7B, ~2.8k steps)"
    )
    parser.add_argument("--global-batch", type=int, default=8, help="TokenSkip's 8")
    parser.add_argument("--per-device-batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    parser.add_argument("--torch-threads", type=int, default=2, help="CPU: threads of each worker")
    parser.add_argument("--cutoff", type=int, default=384, help="tokens per training example")
    parser.add_argument("--eval-problems", type=int, default=48, help="GSM8K test problems (first N)")
    parser.add_argument("--max-tokens", type=int, default=256, help="generation cap at every ratio")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--kv-cache-bytes", type=int, default=1 << 30, help="CPU engine's KV cache")
    parser.add_argument("--stage-timeout-s", type=float, default=1800.0, help="per command")
    parser.add_argument(
        "--workdir", default=None, help="keep the intermediate files here (default: a temp dir)"
    )
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args()

    data_dir = Path(args.data_dir).resolve()
    train_file = data_dir / "gsm8k" / "train.jsonl"
    if not train_file.exists() or not (data_dir / "gsm8k" / "test.jsonl").exists():
        parser.error(f"no GSM8K under {data_dir} (see ../shared/data/README)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tokenskip-controllability-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}", flush=True)
    started = time.monotonic()
    loads = {"start": _load()}
    walls: dict[str, float] = {}

    # 1. the CoTs: GSM8K train reference solutions
    cots = work / "gsm8k_train_cots.jsonl"
    data = prepare_cots(train_file, args.train_examples, cots)

    # 2. tokenskip compress
    compressed = work / "compressed.parquet"
    scorer_args = ["--scorer", args.scorer]
    scorer_model = args.scorer_model or (args.model if args.scorer == "selfinfo" else None)
    if scorer_model:
        scorer_args += ["--model", scorer_model]
    _, walls["compress_s"] = _tokenskip(
        [
            "compress",
            "--input",
            str(cots),
            "--output",
            str(compressed),
            "--ratios",
            "0.9,0.8,0.7,0.6,0.5",
            *scorer_args,
            "--target-tokenizer",
            args.model,
            "--cot-field",
            "cot",
        ],
        work / "compress.log",
        args.stage_timeout_s,
    )
    loads["after_compress"] = _load()
    compression = compression_stats(compressed)
    print(f"compressed: {json.dumps(compression)}", flush=True)

    # 3. tokenskip train (LoRA SFT on the TokenSkip mix)
    tconfig = train_config(args, compressed, work)
    (work / "train.yaml").write_text(yaml.safe_dump(tconfig, sort_keys=False))
    out, walls["train_s"] = _tokenskip(
        ["train", "--config", str(work / "train.yaml"), "--json"], work / "train.log", args.stage_timeout_s
    )
    loads["after_train"] = _load()
    trained = next(json.loads(x) for x in reversed(out.splitlines()) if x.startswith('{"metrics"'))
    if not trained.get("checkpoint"):
        raise SystemExit(f"training saved no checkpoint: {trained}")
    adapter = str(Path(trained["checkpoint"]) / "adapter")
    print(f"trained: {json.dumps(trained['metrics'], default=str)[:400]}", flush=True)

    # 4. tokenskip evaluate (the adapter at every ratio)
    econfig = evaluate_config(args, adapter, work)
    (work / "evaluate.yaml").write_text(yaml.safe_dump(econfig, sort_keys=False))
    _, walls["evaluate_s"] = _tokenskip(
        ["evaluate", "--config", str(work / "evaluate.yaml")], work / "evaluate.log", args.stage_timeout_s
    )
    loads["after_evaluate"] = _load()
    rows = pq.read_table(work / "eval" / "evaluation.parquet").to_pylist()
    walls["total_s"] = time.monotonic() - started
    walls = {k: round(v, 1) for k, v in walls.items()}

    table = format_table(rows)
    print(table)
    print(f"wall: {json.dumps(walls)}; loadavg 1 min: {json.dumps(loads)}")

    result = {
        "benchmark": "controllability",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} nproc={os.cpu_count()}, python {platform.python_version()}",
        "device": args.device,
        "command": "python " + " ".join([str(Path(sys.argv[0]).as_posix()), *sys.argv[1:]]),
        "model": args.model,
        "data": {
            "cot_source": "GSM8K train reference solutions (first N problems in file order; calculator "
            "annotations <<...>> removed), not model generations",
            "train_file": "shared/data/gsm8k/train.jsonl" if data_dir == SHARED else str(train_file),
            "train_problems": data["rows"],
            "mean_cot_chars": data["mean_cot_chars"],
            "eval_file": "shared/data/gsm8k/test.jsonl" if data_dir == SHARED else str(data_dir),
            "eval_problems": args.eval_problems,
            "eval_selection": "first N problems of GSM8K test in file order (held out: test split)",
        },
        "compression": {
            "command": "tokenskip compress",
            "scorer": args.scorer,
            "scorer_model": scorer_model or "default",
            "target_tokenizer": args.model,
            **compression,
        },
        "training": {
            "command": "tokenskip train",
            "config": tconfig,
            "final_metrics": trained["metrics"],
        },
        "evaluation": {
            "command": "tokenskip evaluate",
            "config": {k: v for k, v in econfig.items() if k not in ("adapter", "output")},
            "table": rows,
        },
        "wall_s": walls,
        "loadavg_1m": loads,
    }
    out_path = Path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
