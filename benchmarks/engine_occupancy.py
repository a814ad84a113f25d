"""Engine occupancy and tokens/s of the generation stage under its admission rules, and of raw AsyncLLM.

One run, the same prompts, model and machine. Modes (``--modes``, in that order, ``--rounds`` times
over, so a shared machine's load falls on every mode alike):

* ``one_batch``: the stage with one batch in flight -- the engine drains to each batch's longest
  sample before the next batch enters (the behaviour before continuous feeding);
* ``continuous`` (alias ``today``): the stage with the rule before issue 20 (``batch_slots``):
  ``--concurrent-batches`` batches in flight, a batch's slot freed only when its last sample ends;
* ``new``: the stage with ``engine_fullness`` admission: the next batch while the engine's waiting +
  running sequences are below ``--queue-factor`` x max_num_seqs, the actor holding
  ``--held-batches`` batches (default: the rule's recommendation);
* ``raw``: vLLM's ``AsyncLLM`` in this process fed every request at once: the ceiling.

The stage modes run through Ray Data ``map_batches`` with :class:`tokenskip.stages.generate.GenerateStage`
and the options the pipeline uses. For each mode it prints engine occupancy (mean running sequences /
max_num_seqs over engine steps, from vLLM's scheduler stats) over the whole run and while requests
were still waiting to start (``fed``: up to the engine step after which no request waited, in the
actor or the engine; after it every mode drains to the run's longest sample alike), generated tokens /
seconds of the generation window (first request in to last out: the engine start is excluded), the
most batches generating at once, and the generated lengths (p50/p90/max).

``--forced-lengths gsm8k|math500`` forces each problem's output length: drawn (seeded, with
replacement) from DeepSeek-R1-Distill-7B's reasoning lengths (``../shared/data/cot_samples``) and
divided by ``--length-scale`` (8: fits a CPU), with ``min_tokens = max_tokens = L`` and ``ignore_eos``
(n=1: the n samples of one request share its parameters). Without it, lengths are the model's own.

    python benchmarks/engine_occupancy.py --forced-lengths gsm8k --output benchmarks/results/engine_occupancy.json
    python benchmarks/engine_occupancy.py --device cuda --model /path/to/model \\
        --tokenizer /path/to/tokenizer --problems 4096 --max-num-seqs 256 --forced-lengths gsm8k \\
        --length-scale 1 --max-model-len 8192 --kv-cache-bytes 34359738368 --gpus-per-actor 1   # GPU

On CPU decode is compute-bound, so tokens/s barely moves with the running set; occupancy is the
hardware-neutral figure (on a GPU decode is memory-bound and tokens/s follows the running set).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared" / "data"
DEFAULT_PROBLEMS = SHARED / "gsm8k" / "test.jsonl"
LENGTH_FILES = {
    "gsm8k": "cot_samples/r1_distill_7b_gsm8k_test.jsonl",
    "math500": "cot_samples/r1_distill_7b_math500_test.jsonl",
}
STAGE_MODES = {"one_batch", "continuous", "today", "new"}


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


def _forced_params(length: int, temperature: float):
    from vllm import SamplingParams

    return SamplingParams(n=1, temperature=temperature, max_tokens=length, min_tokens=length, ignore_eos=True)


def _fed_occupancy(
    trace: list[tuple[float, int, int]], last_admitted_at: float, capacity: int
) -> float | None:
    """Occupancy over the engine steps up to the last one after which no request waited to start:
    steps at or before ``last_admitted_at`` (requests still in the actor) or with waiting requests."""
    fed = [i for i, (t, _, waiting) in enumerate(trace) if t <= last_admitted_at or waiting > 0]
    if not fed:
        return None
    window = [running for t, running, _ in trace[: fed[-1] + 1] if running > 0]
    return sum(window) / (len(window) * capacity) if window else None


def _timed_stage_class():
    """The real stage, plus (benchmark only) the wall-clock start/end of each call as columns, each
    request's forced output length from the ``forced_tokens`` column, and every engine step's
    (time, running, waiting) appended to the file named by ``trace_path``."""
    import pyarrow as pa

    from tokenskip.stages.generate import GenerateStage

    class TimedGenerateStage(GenerateStage):
        def __init__(self, *args, trace_path: str, temperature: float, **kwargs):
            super().__init__(*args, **kwargs)
            self.trace_path, self.temperature, self.trace = trace_path, temperature, []
            gate_step = self.occupancy.on_step

            def on_step(running: int, waiting: int) -> None:
                self.trace.append((time.time(), running, waiting))
                gate_step(running, waiting)

            self.occupancy.on_step = on_step

        def request_params(self, batch: pa.Table):
            if "forced_tokens" not in batch.column_names:
                return None
            return [_forced_params(n, self.temperature) for n in batch.column("forced_tokens").to_pylist()]

        async def __call__(self, batch: pa.Table) -> pa.Table:
            started = time.time()
            out = await super().__call__(batch)
            finished = time.time()
            # Time in the engine only: the wait for admission is not generation.
            gen_started = finished - out.column("gen_seconds")[0].as_py() * out.num_rows
            with open(self.trace_path, "a") as f:
                f.writelines(f"{t} {r} {w}\n" for t, r, w in self.trace)
            self.trace = []
            n = out.num_rows
            out = out.append_column("bench_called_at", pa.array([started] * n, pa.float64()))
            out = out.append_column("bench_gen_started_at", pa.array([gen_started] * n, pa.float64()))
            return out.append_column("bench_finished_at", pa.array([finished] * n, pa.float64()))

    return TimedGenerateStage


def _summary(lengths, finish, tokens, window, occupancy, fed, steps, max_num_seqs, load_before) -> dict:
    return {
        "engine_occupancy": round(occupancy, 4) if occupancy is not None else None,
        "engine_occupancy_fed": round(fed, 4) if fed is not None else None,
        "engine_steps": steps,
        "max_num_seqs": max_num_seqs,
        "samples": len(lengths),
        "tokens": tokens,
        "generation_window_s": round(window, 2),
        "tokens_per_s": round(tokens / window, 1),
        "gen_tokens_p50": _percentile(lengths, 0.5),
        "gen_tokens_p90": _percentile(lengths, 0.9),
        "gen_tokens_max": max(lengths),
        "finish_reasons": finish,
        # The machine may be shared: the 1-minute load average before and after this mode ran.
        "loadavg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def run_stage_mode(args, mode: str, engine, sampling, questions: list[str], forced: list[int] | None) -> dict:
    import pyarrow as pa
    import ray

    from tokenskip.admission import AdmissionConfig, AdmissionRule
    from tokenskip.prompts import INSTRUCTION
    from tokenskip.stages.generate import GenerateStage, engine_occupancy

    if mode == "new":
        admission = AdmissionConfig(policy="engine_fullness", queue_factor=args.queue_factor)
        held = args.held_batches or AdmissionRule(admission, args.max_num_seqs, 1).recommended_max_batches(
            args.batch_size, sampling.n
        )
    else:
        admission = AdmissionConfig(policy="batch_slots")
        held = 1 if mode == "one_batch" else args.concurrent_batches
    # Blocks of shard_size problems (the pipeline's shards; by default one batch each), in order.
    block = args.shard_size or args.batch_size
    tables = []
    for s in range(0, len(questions), block):
        columns = {
            "id": [str(i) for i in range(s, min(s + block, len(questions)))],
            "question": questions[s : s + block],
        }
        if forced is not None:
            columns["forced_tokens"] = forced[s : s + block]
        tables.append(pa.table(columns))
    trace_path = tempfile.mktemp(prefix="engine-trace-", suffix=".txt")
    ds = ray.data.from_arrow(tables).map_batches(
        _timed_stage_class(),
        fn_constructor_kwargs={
            "engine": engine,
            "sampling": sampling,
            "prompt": {"instruction": INSTRUCTION},
            "cpus": args.cpus_per_actor,
            "omp_threads": args.omp_threads,
            "max_concurrent_batches": held,
            "admission": admission,
            "trace_path": trace_path,
            "temperature": args.temperature,
        },
        batch_size=args.batch_size,
        **GenerateStage.map_batches_options(
            actors=1, cpus=args.cpus_per_actor, gpus=args.gpus_per_actor, max_concurrent_batches=held
        ),
    )
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    out = pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))
    wall = time.perf_counter() - started

    rows = out.select(["samples", "error", "bench_gen_started_at", "bench_finished_at"]).to_pylist()
    lengths = [s["tokens"] for r in rows for s in r["samples"] or []]
    finish: dict[str, int] = {}
    for r in rows:
        for s in r["samples"] or []:
            finish[s["finish_reason"]] = finish.get(s["finish_reason"], 0) + 1
    batches = sorted({(r["bench_gen_started_at"], r["bench_finished_at"]) for r in rows})
    window = max(e for _, e in batches) - min(s for s, _ in batches)
    trace = [tuple(float(x) for x in line.split()) for line in open(trace_path) if line.strip()]
    os.unlink(trace_path)
    last_admitted = max(s for s, _ in batches)
    result = {
        "mode": mode,
        "admission": admission.policy,
        "max_batches_held": held,
        "problems": out.num_rows,
        "errors": sum(1 for r in rows if r["error"]),
        "batches": len(batches),
        "most_batches_generating_at_once": _most_overlapping(batches),
        **_summary(
            lengths,
            finish,
            sum(lengths),
            window,
            engine_occupancy(out),
            _fed_occupancy(trace, last_admitted, args.max_num_seqs),
            round(pa.compute.sum(out.column("gen_engine_steps")).as_py()),
            pa.compute.max(out.column("gen_engine_max_num_seqs")).as_py(),
            load_before,
        ),
        "wall_s_incl_engine_start": round(wall, 2),
    }
    return result


def run_raw_mode(args, engine, sampling, questions: list[str], forced: list[int] | None) -> dict:
    """vLLM's AsyncLLM in this process, every request submitted at once: the ceiling."""
    from tokenskip.engine import EngineOccupancy, agenerate_safe, create_async_llm
    from tokenskip.prompts import INSTRUCTION, render_prompt

    os.environ["OMP_NUM_THREADS"] = str(args.omp_threads or 1)  # as the stage sets it for its engine
    occupancy = EngineOccupancy()
    trace: list[tuple[float, int, int]] = []
    occupancy.on_step = lambda running, waiting: trace.append((time.time(), running, waiting))
    llm = create_async_llm(engine, stat_loggers=[occupancy.stat_logger])
    try:
        tokenizer = llm.get_tokenizer()
        prompts = [render_prompt(tokenizer, q, instruction=INSTRUCTION) for q in questions]
        params = None if forced is None else [_forced_params(n, args.temperature) for n in forced]

        async def go():
            started = time.time()
            results = await agenerate_safe(llm, prompts, sampling, request_params=params)
            return started, time.time(), results

        load_before = os.getloadavg()[0]
        started, finished, results = asyncio.run(go())
    finally:
        llm.shutdown()
    lengths = [g.token_count for r in results for g in r.generations]
    finish: dict[str, int] = {}
    for r in results:
        for g in r.generations:
            finish[g.finish_reason] = finish.get(g.finish_reason, 0) + 1
    return {
        "mode": "raw",
        "problems": len(results),
        "errors": sum(1 for r in results if r.error),
        **_summary(
            lengths,
            finish,
            sum(lengths),
            finished - started,
            occupancy.occupancy(),
            _fed_occupancy(trace, started, occupancy.max_num_seqs),
            occupancy.steps,
            occupancy.max_num_seqs,
            load_before,
        ),
    }


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder if it differs from the model")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--problems-file", default=str(DEFAULT_PROBLEMS))
    parser.add_argument("--problems", type=int, default=128)
    parser.add_argument("--n", type=int, default=2, help="samples per problem (1 with --forced-lengths)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-tokens", type=int, default=384)
    parser.add_argument("--forced-lengths", choices=sorted(LENGTH_FILES), default=None)
    parser.add_argument("--length-scale", type=float, default=8.0, help="forced lengths: R1 length / this")
    parser.add_argument("--lengths-dir", default=str(SHARED), help="folder holding cot_samples/")
    parser.add_argument("--batch-size", type=int, default=16, help="problems per Ray Data batch")
    parser.add_argument(
        "--shard-size", type=int, default=None, help="problems per input block (default: --batch-size)"
    )
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--kv-cache-bytes", type=int, default=1 << 30)
    parser.add_argument("--concurrent-batches", type=int, default=4, help="batches in flight, continuous")
    parser.add_argument("--queue-factor", type=float, default=2.0, help="new: watermark / max_num_seqs")
    parser.add_argument("--held-batches", type=int, default=None, help="new: batches held (default: rule's)")
    parser.add_argument("--modes", default="one_batch,continuous")
    parser.add_argument("--rounds", type=int, default=1, help="run the modes this many times, interleaved")
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
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in STAGE_MODES | {"raw"}]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {sorted(STAGE_MODES | {'raw'})}")

    import ray

    from tokenskip.engine import EngineConfig, SamplingConfig
    from tokenskip.models import resolve_model
    from tokenskip.ray_runtime import init_ray

    with open(args.problems_file) as f:
        questions = [json.loads(line)["question"] for line in f if line.strip()]
    questions = [questions[i % len(questions)] for i in range(args.problems)]  # repeated if asked for more
    forced = None
    if args.forced_lengths:
        args.n = 1
        with open(Path(args.lengths_dir) / LENGTH_FILES[args.forced_lengths]) as f:
            pool = [json.loads(line)["completion_tokens"] for line in f if line.strip()]
        rng = random.Random(args.seed)
        forced = [max(1, round(rng.choice(pool) / args.length_scale)) for _ in questions]
        args.max_tokens = max(forced)
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
        "forced_lengths": args.forced_lengths
        and {
            "from": LENGTH_FILES[args.forced_lengths],
            "scale": f"1/{args.length_scale:g}",
            "p50": _percentile(forced, 0.5),
            "p90": _percentile(forced, 0.9),
            "max": max(forced),
            "mean": round(sum(forced) / len(forced), 1),
        },
        "batch_size": args.batch_size,
        "max_num_seqs": args.max_num_seqs,
        "kv_cache_bytes": args.kv_cache_bytes,
        "enforce_eager": args.enforce_eager,
        "stop": args.stop,
        "rounds": args.rounds,
        "runs": [],
    }
    init_ray(log_to_driver=False)  # as the pipeline starts a local Ray
    for round_index in range(args.rounds):
        for mode in modes:
            if mode == "raw":
                run = run_raw_mode(args, engine, sampling, questions, forced)
            else:
                run = run_stage_mode(
                    args, "continuous" if mode == "today" else mode, engine, sampling, questions, forced
                )
            run["round"] = round_index
            result["runs"].append(run)
            print(mode, json.dumps(run), file=sys.stderr, flush=True)
            time.sleep(5)  # the finished actor pool (and its engine process) goes away before the next
    ray.shutdown()
    by_mode: dict[str, list[dict]] = {}
    for run in result["runs"]:
        by_mode.setdefault(run["mode"], []).append(run)
    result["modes"] = {
        mode: {
            key: _mean([r[key] for r in runs if r[key] is not None])
            for key in ("engine_occupancy", "engine_occupancy_fed", "tokens_per_s")
        }
        for mode, runs in by_mode.items()
    }
    if "raw" in result["modes"]:
        raw = result["modes"]["raw"]["tokens_per_s"]
        for summary in result["modes"].values():
            summary["tokens_per_s_vs_raw"] = round(summary["tokens_per_s"] / raw, 3)
        # Per round too: the runs of one round ran back to back, under about the same load.
        result["tokens_per_s_vs_raw_by_round"] = [
            {
                r["mode"]: round(r["tokens_per_s"] / raw_run["tokens_per_s"], 3)
                for r in result["runs"]
                if r["round"] == raw_run["round"]
            }
            for raw_run in by_mode["raw"]
        ]
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
