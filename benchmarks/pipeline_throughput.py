"""Generation throughput: the pipeline's Ray Data generation stage vs raw ``vllm.LLM.generate``.

One run, same prompts, same model, same machine. Prints:

* raw vLLM: generated tokens / seconds of ``LLM.generate`` (engine already started);
* pipeline, 1 and 2 generation actors: generated tokens / seconds inside the stage's vLLM calls
  (what the stage adds: prompt rendering, Arrow conversion) and / wall seconds of the whole Ray Data
  execution (adds actor start-up, which a long job amortises);
* the ratios pipeline / raw (target >= 0.9 for the in-stage figure).

    python benchmarks/pipeline_throughput.py                         # CPU, embedded SmolLM2-135M
    python benchmarks/pipeline_throughput.py --device cuda --model Qwen/Qwen2.5-0.5B-Instruct \\
        --problems 512 --n 4 --max-tokens 512 --actors 1,2 --gpus-per-actor 1   # GPU machine

On CPU, two actors share the same two cores, so 2 actors measure overhead, not scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--problems", type=int, default=48)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--actors", default="1,2")
    parser.add_argument("--cpus-per-actor", type=float, default=0.9)
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--output", default=None, help="also write the result as JSON here")
    args = parser.parse_args()

    import ray
    import torch

    from tokenskip.engine import EngineConfig, SamplingConfig, create_llm
    from tokenskip.models import resolve_model
    from tokenskip.prompts import INSTRUCTION, render_prompt
    from tokenskip.ray_runtime import init_ray
    from tokenskip.stages.generate import GenerateStage
    from tokenskip.testing.tiny_models import arithmetic_problems

    model = resolve_model(args.model)
    engine = EngineConfig(model=model, device=args.device, max_model_len=1024, seed=0)
    sampling = SamplingConfig(n=args.n, temperature=0.7, top_p=0.95, max_tokens=args.max_tokens)
    questions = [p["question"] for p in arithmetic_problems(args.problems, seed=1)]
    result: dict = {
        "model": args.model,
        "device": args.device,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "prompts": len(questions),
        "n": args.n,
        "max_tokens": args.max_tokens,
    }

    # Raw vLLM in this process.
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    llm = create_llm(engine)
    tokenizer = llm.get_tokenizer()
    prompts = [render_prompt(tokenizer, q) for q in questions]
    llm.generate(prompts[:2], sampling.to_vllm(max_tokens=8), use_tqdm=False)  # warm-up
    started = time.perf_counter()
    outputs = llm.generate(prompts, sampling.to_vllm(), use_tqdm=False)
    raw_seconds = time.perf_counter() - started
    raw_tokens = sum(len(o.token_ids) for out in outputs for o in out.outputs)
    result["raw"] = {
        "tokens": raw_tokens,
        "seconds": round(raw_seconds, 2),
        "tokens_per_s": round(raw_tokens / raw_seconds, 1),
    }
    del llm, outputs
    import gc

    gc.collect()

    init_ray(log_to_driver=False)  # as the pipeline starts a local Ray
    for actors in [int(a) for a in args.actors.split(",")]:
        ds = ray.data.from_items([{"id": str(i), "question": q} for i, q in enumerate(questions)])
        ds = ds.map_batches(
            GenerateStage,
            fn_constructor_kwargs={
                "engine": engine,
                "sampling": sampling,
                "prompt": {"instruction": INSTRUCTION},
                "cpus": args.cpus_per_actor,
                "omp_threads": max(1, round((os.cpu_count() or 2) / actors)),  # same cores as the raw run
            },
            batch_size=max(1, len(questions) // actors),
            batch_format="pyarrow",
            concurrency=actors,
            num_cpus=args.cpus_per_actor if args.device == "cpu" else 1,
            num_gpus=args.gpus_per_actor,
        )
        started = time.perf_counter()
        tokens, stage_seconds = 0, 0.0
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in batch.select(["samples", "gen_seconds"]).to_pylist():
                tokens += sum(s["tokens"] for s in row["samples"])
                stage_seconds += row["gen_seconds"]
        wall = time.perf_counter() - started
        # gen_seconds is each call's wall time spread over its rows; with k actors in parallel the
        # calls overlap, so the stage's busy time is the sum divided by the actors.
        busy = stage_seconds / actors
        result[f"pipeline_{actors}_actor"] = {
            "tokens": tokens,
            "stage_seconds": round(busy, 2),
            "wall_seconds_incl_startup": round(wall, 2),
            "tokens_per_s_in_stage": round(tokens / busy, 1),
            "tokens_per_s_wall": round(tokens / wall, 1),
            "ratio_vs_raw_in_stage": round((tokens / busy) / (raw_tokens / raw_seconds), 3),
        }
    ray.shutdown()

    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
