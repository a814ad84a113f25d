"""The generation actor at 2x and 8x the problems it holds: its peak RSS, and how early shards commit.

Runs the whole pipeline (``tokenskip.pipeline.run_pipeline``: generate, grade, compress, workers
write, the driver commits each shard) on arithmetic problems with a tiny random model (built locally,
so the run is about scheduling and memory, not model quality), twice: with ``--multiples`` (2 and 8)
times the problems one generation actor holds (``generation_max_concurrent_batches`` x
``generation_batch_size``, the admission rule's hard cap). The generation stage is the real one, with
a sampler thread in its actor that records the peak RSS of the actor process and of its vLLM engine
core process, and the time each problem's samples came back. Prints, per run:

* peak RSS of the generation actor and of its engine core (MiB): bounded by what the actor holds, so
  the same at 2x and 8x, not growing with the run;
* the fraction of the problems generated when the first shard was committed (admission is first come,
  first served, so early shards finish first; the engine holds ``max_num_seqs / n`` problems at once,
  a tiny fraction of these runs).

    python benchmarks/actor_memory.py --output benchmarks/results/actor_memory.json
    python benchmarks/actor_memory.py --device cuda --gpus-per-actor 1 --max-num-seqs 256 --batch-size 32 \\
        --max-tokens 512                                    # GPU machine: the same at a GPU's scale
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path


def _sampling_stage_class():
    """The real generation stage, plus a thread sampling its process's and engine core's RSS (peaks
    written, with each finished problem's time, to the file named by ``trace_path``)."""
    import psutil

    from tokenskip.stages.generate import GenerateStage

    class SampledGenerateStage(GenerateStage):
        def __init__(self, *args, trace_path: str, **kwargs):
            self.trace_path = trace_path
            self.peaks = {"actor": 0, "engine_core": 0}
            self.finished_at: list[float] = []
            threading.Thread(target=self._sample, daemon=True).start()
            super().__init__(*args, **kwargs)

        def _sample(self) -> None:
            me = psutil.Process()
            while True:
                try:
                    self.peaks["actor"] = max(self.peaks["actor"], me.memory_info().rss)
                    children = sum(c.memory_info().rss for c in me.children(recursive=True))
                    self.peaks["engine_core"] = max(self.peaks["engine_core"], children)
                except psutil.Error:
                    pass
                time.sleep(0.05)

        def _posted(self, result) -> None:
            self.finished_at.append(time.time())
            super()._posted(result)

        async def __call__(self, batch):
            out = await super().__call__(batch)
            with open(self.trace_path, "a") as f:
                f.writelines(f"done {t}\n" for t in self.finished_at)
                f.write(f"peaks {self.peaks['actor']} {self.peaks['engine_core']}\n")
            self.finished_at = []
            return out

    return SampledGenerateStage


def run_once(args, model: str, problems: int, workdir: Path) -> dict:
    from tokenskip import pipeline
    from tokenskip.config import PipelineConfig
    from tokenskip.stages import generate
    from tokenskip.storage import RunStore
    from tokenskip.testing.tiny_models import arithmetic_problems

    path = workdir / f"problems-{problems}.jsonl"
    unique = {p["question"]: p for p in arithmetic_problems(4 * problems, seed=problems)}  # no duplicates
    with open(path, "w") as f:
        for p in list(unique.values())[:problems]:
            f.write(json.dumps({"id": p["id"], "question": p["question"], "answer": p["answer"]}) + "\n")
    trace_path = str(workdir / f"trace-{problems}.txt")
    config = PipelineConfig.model_validate(
        {
            "dataset": f"actor-memory-{problems}",
            "sources": [
                {
                    "path": str(path),
                    "kind": "custom",
                    "name": "arith",
                    "field_map": {"question": "question", "answer": "answer", "id": "id", "metadata": []},
                }
            ],
            "dedup": {"enabled": False},  # the problems are distinct: the run's size is theirs
            "engine": {
                "model": model,
                "device": args.device,
                "max_model_len": 256,
                "max_num_seqs": args.max_num_seqs,
                "kv_cache_memory_bytes": args.kv_cache_bytes,
                "enforce_eager": True,
            },
            "sampling": {"n": args.n, "temperature": 1.0, "max_tokens": args.max_tokens},
            "compression": {
                "ratios": [0.9, 0.5],
                "scorer": {"kind": "selfinfo", "model": model},
                "target_tokenizer": model,
            },
            "output": {"root": str(workdir / "out"), "allow_empty": True},
            "resources": {
                "generation_cpus": args.cpus_per_actor,
                "generation_gpus": args.gpus_per_actor,
                "compression_cpus": 0.25,
                "grading_cpus": 0.25,
                "shard_size": args.batch_size,
                "generation_batch_size": args.batch_size,
                "generation_max_concurrent_batches": args.held_batches,
                "omp_threads": args.omp_threads,
            },
        }
    )
    stage = _sampling_stage_class()
    original_args = generate.map_batches_args

    def map_batches_args(cfg, progress=None):
        kwargs = original_args(cfg, progress)
        kwargs["fn"] = stage
        kwargs["fn_constructor_kwargs"] = {**kwargs["fn_constructor_kwargs"], "trace_path": trace_path}
        return kwargs

    generate.map_batches_args = map_batches_args
    try:
        started = time.perf_counter()
        report = pipeline.run_pipeline(config, progress=False)
        wall = time.perf_counter() - started
    finally:
        generate.map_batches_args = original_args
    # When each generated shard's record was made: its parts written, its commit right after.
    store = RunStore(config.output, config.dataset, report["run_id"])
    commits = [
        datetime.fromisoformat(r.created_at).timestamp()
        for r in store.iter_committed_shards()
        if r.shard_id != pipeline.INPUT_SHARD
    ]
    done, peaks = [], (0, 0)
    for line in open(trace_path):
        kind, *values = line.split()
        if kind == "done":
            done.append(float(values[0]))
        else:
            peaks = (max(peaks[0], int(values[0])), max(peaks[1], int(values[1])))
    first_commit = min(commits)
    return {
        "problems": problems,
        "problems_generated": len(done),
        "shards_committed": report.attempt.shards_committed,
        "actor_peak_rss_mib": round(peaks[0] / 2**20, 1),
        "engine_core_peak_rss_mib": round(peaks[1] / 2**20, 1),
        "generated_when_first_shard_committed": sum(1 for t in done if t <= first_commit),
        "fraction_generated_when_first_shard_committed": round(
            sum(1 for t in done if t <= first_commit) / len(done), 4
        ),
        "wall_s": round(wall, 1),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="default: a tiny random model built locally")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-num-seqs", type=int, default=4)
    parser.add_argument("--kv-cache-bytes", type=int, default=64 << 20)
    parser.add_argument("--batch-size", type=int, default=2, help="problems per batch = per shard")
    parser.add_argument("--held-batches", type=int, default=None, help="default: the rule's recommendation")
    parser.add_argument("--multiples", default="2,8", help="runs of these multiples of the held problems")
    parser.add_argument("--cpus-per-actor", type=float, default=0.5)
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--omp-threads", type=int, default=1)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    from tokenskip.admission import AdmissionConfig, AdmissionRule
    from tokenskip.ray_runtime import init_ray

    if args.held_batches is None:
        rule = AdmissionRule(AdmissionConfig(), args.max_num_seqs, 1)
        args.held_batches = rule.recommended_max_batches(args.batch_size, args.n)
    held_problems = args.held_batches * args.batch_size
    workdir = Path(tempfile.mkdtemp(prefix="actor-memory-"))
    model = args.model
    if model is None:
        from tokenskip.testing.tiny_models import build_tiny_causal_lm

        model = str(build_tiny_causal_lm(workdir / "tiny-llama"))
    init_ray(log_to_driver=False)
    runs = []
    for multiple in (int(x) for x in args.multiples.split(",")):
        run = run_once(args, model, multiple * held_problems, workdir)
        run["multiple_of_held"] = multiple
        runs.append(run)
        print(json.dumps(run), flush=True)
    result = {
        "benchmark": "actor_memory",
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "model": args.model or "tiny random llama (tokenskip.testing.tiny_models)",
        "device": args.device,
        "n": args.n,
        "max_tokens": args.max_tokens,
        "max_num_seqs": args.max_num_seqs,
        "engine_holds_problems": args.max_num_seqs // args.n,
        "batch_size": args.batch_size,
        "held_batches": args.held_batches,
        "held_problems": held_problems,
        "runs": runs,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
