"""vLLM engine start-up and decode speed: compiled (fresh cache, then cached) vs eager, in one run.

    python benchmarks/engine_start.py                       # CPU: the demo's SmolLM2-135M engine
    python benchmarks/engine_start.py --model Qwen/Qwen2.5-0.5B-Instruct --device cuda

Each engine is started in a child process of its own (as the generation actor does), so a start is
a cold start of that process. Compile caches (vLLM's, inductor's) live in a temporary folder: the
first compiled start is a fresh machine's, the second is the same engine on the same machine (the
case `make demo` meets the second time). Decode speed: the same prompts, n samples each, a fixed
number of tokens (ignore_eos), through the engine the stage uses (AsyncLLM).

Prints start seconds for each mode, decode tokens/s for compiled and eager, and the ratios;
``--out`` writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import asyncio, json, os, sys, time
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

def main():
    from tokenskip.engine import EngineConfig, create_async_llm
    from tokenskip.models import resolve_model
    args = json.loads(sys.argv[1])
    config = EngineConfig(model=resolve_model(args["model"]), device=args["device"], max_model_len=1024,
                          kv_cache_memory_bytes=1 << 30, seed=0, enforce_eager=args["eager"],
                          max_num_seqs=args["max_num_seqs"])
    started = time.perf_counter()
    llm = create_async_llm(config)
    start_s = time.perf_counter() - started
    decode = None
    if args["prompts"]:
        from vllm import SamplingParams
        params = SamplingParams(n=args["n"], max_tokens=args["tokens"], ignore_eos=True, temperature=0.7)

        async def one(i):
            async for out in llm.generate(f"Question {i}: what is {i} plus {i}?", params, request_id=str(i)):
                last = out
            return sum(len(o.token_ids) for o in last.outputs)

        async def run():
            t = time.perf_counter()
            tokens = sum(await asyncio.gather(*[one(i) for i in range(args["prompts"])]))
            return tokens / (time.perf_counter() - t)

        decode = asyncio.run(run())
    llm.shutdown()
    print("RESULT " + json.dumps({"start_s": start_s, "decode_tok_s": decode}), flush=True)

if __name__ == "__main__":
    main()
"""


def measure(args: argparse.Namespace, cache: Path, *, eager: bool, decode: bool) -> dict:
    env = {
        **os.environ,
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
    }
    payload = {
        "model": args.model,
        "device": args.device,
        "eager": eager,
        "max_num_seqs": args.max_num_seqs,
        "prompts": args.prompts if decode else 0,
        "n": args.n,
        "tokens": args.tokens,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(CHILD)
    try:
        result = subprocess.run(
            [sys.executable, f.name, json.dumps(payload)], env=env, capture_output=True, text=True
        )
    finally:
        os.unlink(f.name)
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise SystemExit(f"engine child failed ({result.returncode}):\n{result.stderr[-4000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tokenskip-engine-start-") as tmp:
        cache = Path(tmp)
        fresh = measure(args, cache, eager=False, decode=False)
        cached = measure(args, cache, eager=False, decode=True)
        eager = measure(args, cache, eager=True, decode=True)
    result = {
        "model": args.model,
        "device": args.device,
        "decode": {"prompts": args.prompts, "n": args.n, "tokens": args.tokens, "max_num_seqs": args.max_num_seqs},
        "start_s": {
            "compiled_fresh": round(fresh["start_s"], 1),
            "compiled_cached": round(cached["start_s"], 1),
            "eager": round(eager["start_s"], 1),
        },
        "decode_tok_s": {"compiled": round(cached["decode_tok_s"], 1), "eager": round(eager["decode_tok_s"], 1)},
    }
    result["ratios"] = {
        "cached_vs_fresh_start": round(cached["start_s"] / fresh["start_s"], 3),
        "eager_vs_fresh_start": round(eager["start_s"] / fresh["start_s"], 3),
        "eager_vs_compiled_decode": round(eager["decode_tok_s"] / cached["decode_tok_s"], 3),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
