"""Engine occupancy and tokens/s of the generation stage: continuous feeding vs one batch in flight.

One run, the same GSM8K test prompts, model and machine, through the pipeline's generation stage
(Ray Data ``map_batches`` with :class:`tokenskip.stages.generate.GenerateStage` and the options the
pipeline uses), twice:

* ``one_batch``: ``max_concurrent_batches=1`` -- the engine drains to each batch's longest sample
  before the next batch enters (the behaviour before continuous feeding);
* ``continuous``: ``max_concurrent_batches=K`` -- new prompts enter the engine as others finish.

For each it prints engine occupancy (mean running sequences / max_num_seqs over engine steps, from
vLLM's scheduler stats as the stage reports them), generated tokens / seconds of the generation
window (first batch in to last batch out, so the engine start is excluded), the most batches seen
generating at once, and the lengths of the generated samples (p50/p90/max; their spread is what
leaves a one-batch engine empty). Ratios are measured in this one run; nothing here asserts a time.

    python benchmarks/engine_occupancy.py --output benchmarks/results/engine_occupancy.json
    python benchmarks/engine_occupancy.py --device cuda --model /path/to/model \\
        --tokenizer /path/to/tokenizer --problems 1024 --batch-size 64 --max-num-seqs 256 \\
        --kv-cache-bytes 8589934592 --gpus-per-actor 1 --max-tokens 1024     # GPU machine

On CPU decode is compute-bound, so tokens/s barely moves with the running set; occupancy is the
hardware-neutral figure (on a GPU decode is memory-bound and tokens/s follows the running set).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROBLEMS = REPO_ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def _percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _most_overlapping(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant."""
    events = sorted(
        [(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1])
    )
    open_now = most = 0
    for _, delta in events:
        open_now += delta
        most = max(most, open_now)
    return most


def _timed_stage_class():
    """The real stage, plus the wall-clock start/end of each call as columns (benchmark only)."""
    import pyarrow as pa

    from tokenskip.stages.generate import GenerateStage

    class TimedGenerateStage(GenerateStage):
        async def __call__(self, batch: pa.Table) -> pa.Table:
            started = time.time()
            out = await super().__call__(batch)
            finished = time.time()
            # Time in the engine only: the wait for a batch slot is not generation.
            gen_started = finished - out.column("gen_seconds")[0].as_py() * out.num_rows
            n = out.num_rows
            out = out.append_column("bench_called_at", pa.array([started] * n, pa.float64()))
            out = out.append_column("bench_gen_started_at", pa.array([gen_started] * n, pa.float64()))
            return out.append_column("bench_finished_at", pa.array([finished] * n, pa.float64()))

    return TimedGenerateStage


def run_mode(args, engine, sampling, questions: list[str], max_concurrent_batches: int) -> dict:
    import pyarrow as pa
    import ray

    from tokenskip.prompts import INSTRUCTION
    from tokenskip.stages.generate import GenerateStage, engine_occupancy

    # Blocks of shard_size problems, as the pipeline feeds the stage (one table per shard).
    tables = [
        pa.table(
            {
                "id": [str(i) for i in range(s, min(s + args.shard_size, len(questions)))],
                "question": questions[s : s + args.shard_size],
            }
        )
        for s in range(0, len(questions), args.shard_size)
    ]
    ds = ray.data.from_arrow(tables).map_batches(
        _timed_stage_class(),
        fn_constructor_kwargs={
            "engine": engine,
            "sampling": sampling,
            "prompt": {"instruction": INSTRUCTION},
            "cpus": args.cpus_per_actor,
            "omp_threads": args.omp_threads,
            "max_concurrent_batches": max_concurrent_batches,
        },
        batch_size=args.batch_size,
        **GenerateStage.map_batches_options(
            actors=1,
            cpus=args.cpus_per_actor,
            gpus=args.gpus_per_actor,
            max_concurrent_batches=max_concurrent_batches,
        ),
    )
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    out = pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))
    wall = time.perf_counter() - started

    rows = out.select(["samples", "gen_error", "bench_gen_started_at", "bench_finished_at"]).to_pylist()
    lengths = [s["tokens"] for r in rows for s in r["samples"] or []]
    finish = {}
    for r in rows:
        for s in r["samples"] or []:
            finish[s["finish_reason"]] = finish.get(s["finish_reason"], 0) + 1
    batches = sorted({(r["bench_gen_started_at"], r["bench_finished_at"]) for r in rows})
    window = max(e for _, e in batches) - min(s for s, _ in batches)
    tokens = sum(lengths)
    occupancy = engine_occupancy(out)
    steps = pa.compute.sum(out.column("gen_engine_steps")).as_py()
    return {
        "max_concurrent_batches": max_concurrent_batches,
        "problems": out.num_rows,
        "errors": sum(1 for r in rows if r["gen_error"]),
        "batches": len(batches),
        "most_batches_generating_at_once": _most_overlapping(batches),
        "engine_occupancy": round(occupancy, 4) if occupancy is not None else None,
        "engine_steps": round(steps),
        "max_num_seqs": pa.compute.max(out.column("gen_engine_max_num_seqs")).as_py(),
        "samples": len(lengths),
        "tokens": tokens,
        "generation_window_s": round(window, 2),
        "tokens_per_s": round(tokens / window, 1),
        "wall_s_incl_engine_start": round(wall, 2),
        "gen_tokens_p50": _percentile(lengths, 0.5),
        "gen_tokens_p90": _percentile(lengths, 0.9),
        "gen_tokens_max": max(lengths),
        "finish_reasons": finish,
        # The machine may be shared: the 1-minute load average before and after this mode ran.
        "loadavg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder if it differs from the model")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--problems-file", default=str(DEFAULT_PROBLEMS))
    parser.add_argument("--problems", type=int, default=128)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-tokens", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=16, help="problems per Ray Data batch")
    parser.add_argument(
        "--shard-size", type=int, default=64, help="problems per input block (the pipeline's shard)"
    )
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--kv-cache-bytes", type=int, default=1 << 30)
    parser.add_argument("--concurrent-batches", type=int, default=4, help="K of the continuous mode")
    parser.add_argument("--modes", default="one_batch,continuous")
    parser.add_argument("--cpus-per-actor", type=float, default=0.9)
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument(
        "--omp-threads", type=int, default=None, help="CPU: engine threads (default: all cores)"
    )
    parser.add_argument(
        "--enforce-eager", action="store_true", help="skip torch.compile/CUDA graphs (faster start)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        help="stop string (repeatable; gives random models a length tail)",
    )
    parser.add_argument("--output", default=None, help="also write the result as JSON here")
    args = parser.parse_args()
    if args.device == "cpu" and args.omp_threads is None:
        args.omp_threads = os.cpu_count() or 1

    import ray

    from tokenskip.engine import EngineConfig, SamplingConfig
    from tokenskip.models import resolve_model
    from tokenskip.ray_runtime import init_ray

    with open(args.problems_file) as f:
        questions = [json.loads(line)["question"] for line in f if line.strip()][: args.problems]
    engine = EngineConfig(
        model=resolve_model(args.model),
        tokenizer=args.tokenizer,
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        kv_cache_memory_bytes=args.kv_cache_bytes,
        enforce_eager=args.enforce_eager,
        seed=args.seed,
    )
    sampling = SamplingConfig(
        n=args.n, temperature=args.temperature, max_tokens=args.max_tokens, stop=args.stop
    )
    result: dict = {
        "benchmark": "engine_occupancy",
        "model": args.model,
        "device": args.device,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "problems_file": os.path.relpath(args.problems_file, REPO_ROOT.parent),
        "problems": len(questions),
        "n": args.n,
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
        "batch_size": args.batch_size,
        "max_num_seqs": args.max_num_seqs,
        "kv_cache_bytes": args.kv_cache_bytes,
        "enforce_eager": args.enforce_eager,
        "stop": args.stop,
        "modes": {},
    }
    init_ray(log_to_driver=False)  # as the pipeline starts a local Ray
    for mode in args.modes.split(","):
        k = {"one_batch": 1, "continuous": args.concurrent_batches}[mode]
        result["modes"][mode] = run_mode(args, engine, sampling, questions, k)
        print(mode, json.dumps(result["modes"][mode]), file=sys.stderr, flush=True)
        time.sleep(5)  # the finished actor pool (and its engine process) goes away before the next
    ray.shutdown()
    modes = result["modes"]
    if "one_batch" in modes and "continuous" in modes:
        a, b = modes["continuous"], modes["one_batch"]
        result["continuous_vs_one_batch"] = {
            "tokens_per_s_ratio": round(a["tokens_per_s"] / b["tokens_per_s"], 3),
            "occupancy": [b["engine_occupancy"], a["engine_occupancy"]],
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
