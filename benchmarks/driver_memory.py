"""Driver memory at the end of a run: statistics + commit + report from shard summaries, and a
streaming read of the committed run (issue 12: "the driver holds only metadata").

For each size it builds a committed-to-be run on local disk: kept rows made of real R1 CoTs
(../shared/data/cot_samples, gsm8k + math500, cycled) with 5 compressions each (words dropped at
each ratio), grade rejects with their CoTs (~40% of graded samples), generation/compression errors
(~2%), an input shard of load errors and dedup rejects; written as shards of --shard-rows kept rows
through RunStore.write_shard WITH summaries, as the pipeline writes them. Then, in a fresh Python
process per measurement (so nothing of the build is resident), it resets the kernel's peak-RSS mark
(/proc/self/clear_refs), runs the real end-of-run code (pipeline.run_statistics, RunStore.commit,
pipeline.write_report: report.json/txt/html) and reports the peak RSS added over the process's
resident size just before. Separately: the peak RSS of iterating the whole largest run with
storage.iter_batches (all columns), and, for reference, of the old way of getting the report's data
(storage.read_table of original_tokens + compressions) on the smallest run.

    python benchmarks/driver_memory.py [--sizes 5000 50000] [--shard-rows 128] [--out FILE]

Acceptance (issue 12): stats+commit+report add < 50 MB peak RSS at 50k kept rows and < 10 MB more
than at 5k; iterating the 50k run peaks below 300 MB RSS. Printed, not asserted.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TOKENSKIP_SHARED_DATA", REPO.parent / "shared" / "data")) / "cot_samples"
RATIOS = [0.9, 0.8, 0.7, 0.6, 0.5]
DATASET = "driver-memory"
RUN_ID = "r-bench"
SAMPLES_PER_PROBLEM = 4
ACCEPTANCE = 0.6  # of graded samples
ERROR_RATE = 0.02  # of samples
LOAD_ERRORS, DUPLICATES, CONTAMINATED = 25, 40, 5


# --------------------------------------------------------------------------------------------------
# Building a run


def load_cots() -> list[dict]:
    out = []
    for name in ("r1_distill_7b_gsm8k_test.jsonl", "r1_distill_7b_math500_test.jsonl"):
        with open(DATA / name) as f:
            for line in f:
                row = json.loads(line)
                out.append(
                    {
                        "question": row["problem"],
                        "cot": row["response"],
                        "tokens": int(row["completion_tokens"]),
                    }
                )
    return out


def pruned(cot: str, ratio: float) -> str:
    """A deterministic stand-in for pruning: keep about ``ratio`` of the words, spread evenly."""
    words = cot.split(" ")
    keep = max(1, round(len(words) * ratio))
    step = len(words) / keep
    return " ".join(words[int(i * step)] for i in range(keep))


def prepare(cots: list[dict]) -> list[dict]:
    """Per source CoT, once: its compressions (texts and token counts) at every ratio."""
    rng = random.Random(0)
    for c in cots:
        tail_at = c["cot"].rfind("\\boxed")
        c["answer_tail"] = c["cot"][tail_at:] if tail_at >= 0 else c["cot"][-40:]
        c["compressions"] = []
        for r in RATIOS:
            tokens = max(1, min(c["tokens"], round(c["tokens"] * r * rng.uniform(0.98, 1.08))))
            c["compressions"].append(
                {"target_ratio": r, "text": pruned(c["cot"], r), "tokens": tokens,
                 "achieved_ratio": tokens / max(1, c["tokens"])}
            )  # fmt: skip
    return cots


def shard_tables(shard: int, kept_rows: int, cots: list[dict], rng: random.Random):
    """One shard: problems with SAMPLES_PER_PROBLEM samples each until ``kept_rows`` are kept."""
    import pyarrow as pa

    from tokenskip.schema import COMPRESSED_SCHEMA, ERROR_SCHEMA, REJECT_SCHEMA, to_table

    data, rejects, errors, samples = [], [], [], []
    p = 0
    while len(data) < kept_rows:
        pid = hashlib.sha256(f"p{shard:05d}-{p:04d}".encode()).hexdigest()[:32]  # ids are digests
        gen_seconds = rng.uniform(2, 20)
        for i in range(SAMPLES_PER_PROBLEM):
            if len(data) >= kept_rows:
                break
            c = cots[(shard * 7919 + p * SAMPLES_PER_PROBLEM + i) % len(cots)]
            key = f"{pid}-{i}"
            samples.append({"problem_id": pid, "gen_tokens": c["tokens"], "gen_seconds": gen_seconds,
                            "compress_seconds": 0.05})  # fmt: skip
            roll = rng.random()
            if roll < ERROR_RATE:
                stage = rng.choice(["generate", "compress"])
                errors.append({"key": key, "problem_id": pid, "stage": stage, "error": f"{stage}_error",
                               "error_detail": "RuntimeError: engine died", "raw": json.dumps({"question": c["question"]})})  # fmt: skip
            elif roll < ERROR_RATE + (1 - ERROR_RATE) * (1 - ACCEPTANCE):
                rejects.append({"key": key, "problem_id": pid, "stage": "grade",
                                "reason": rng.choice(["incorrect"] * 8 + ["unparsable", "timeout"]),
                                "sample_index": i, "cot": c["cot"], "extracted_answer": "7", "answer": "8"})  # fmt: skip
            else:
                data.append({"key": key, "problem_id": pid, "source": "gsm8k", "split": "test",
                             "question": c["question"], "answer": "8", "sample_index": i, "model": "r1-distill-7b",
                             "cot": c["cot"], "reasoning": c["cot"][: len(c["cot"]) - len(c["answer_tail"])],
                             "answer_tail": c["answer_tail"], "extracted_answer": "8", "verdict": "correct",
                             "original_tokens": c["tokens"], "compressions": c["compressions"]})  # fmt: skip
        p += 1
    tables = {
        "data": to_table(data, COMPRESSED_SCHEMA),
        "rejects": to_table(rejects, REJECT_SCHEMA),
        "errors": to_table(errors, ERROR_SCHEMA),
    }
    return tables, pa.Table.from_pylist(samples), p


def input_tables():
    from tokenskip.schema import ERROR_SCHEMA, REJECT_SCHEMA, to_table

    errors = [{"key": None, "problem_id": None, "stage": "sources", "error": "invalid_json", "raw": "{"}
              for _ in range(LOAD_ERRORS)]  # fmt: skip
    rejects = [
        {"key": f"d{i}", "problem_id": f"d{i}", "stage": "dedup", "reason": "duplicate"}
        for i in range(DUPLICATES)
    ]
    rejects += [{"key": f"c{i}", "problem_id": f"c{i}", "stage": "dedup", "reason": "contaminated"}
                for i in range(CONTAMINATED)]  # fmt: skip
    return {"rejects": to_table(rejects, REJECT_SCHEMA), "errors": to_table(errors, ERROR_SCHEMA)}


def build_run(root: Path, kept: int, shard_rows: int) -> dict:
    from tokenskip.pipeline import INPUT_SHARD
    from tokenskip.storage import RunStore, StorageConfig
    from tokenskip.summary import ShardSummary

    cots = prepare(load_cots())
    rng = random.Random(kept)
    store = RunStore(StorageConfig(root=str(root)), DATASET, RUN_ID)
    inputs = input_tables()
    store.write_shard(INPUT_SHARD, inputs, summary=ShardSummary.from_tables(inputs))
    problems = shards = 0
    for shard in range(0, kept, shard_rows):
        tables, samples, n_problems = shard_tables(shards, min(shard_rows, kept - shard), cots, rng)
        store.write_shard(
            f"s-{shards:05d}",
            tables,
            summary=ShardSummary.from_tables(tables, samples=samples),
            problem_ids=set(samples.column("problem_id").to_pylist()),  # the commit checks these
        )
        problems += n_problems
        shards += 1
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    largest = max(f.stat().st_size for f in root.rglob("data/part-*.parquet"))
    return {
        "kept": kept,
        "shards": shards,
        "problems": problems,
        "bytes_on_disk": size,
        "largest_part": largest,
    }


# --------------------------------------------------------------------------------------------------
# Measuring (in a fresh process)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _measure(fn) -> dict:
    gc.collect()
    _reset_peak()
    base = _status_kb("VmRSS")
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    peak = _status_kb("VmHWM")
    return {"base_mb": base / 1024, "peak_mb": peak / 1024, "added_mb": (peak - base) / 1024,
            "seconds": seconds, "result": result}  # fmt: skip


def measure_stats(root: str, problems: int) -> dict:
    import pyarrow as pa

    import tokenskip.report  # noqa: F401  (imported by write_report; not part of the measurement)
    from tokenskip.config import PipelineConfig
    from tokenskip.pipeline import Plan, run_statistics, write_report
    from tokenskip.run_report import AttemptReport, RunReport
    from tokenskip.schema import PROBLEM_SCHEMA
    from tokenskip.storage import RunStore, StorageConfig

    config = PipelineConfig.model_validate(
        {"dataset": DATASET, "run_id": RUN_ID, "sources": [{"kind": "gsm8k", "path": "x.jsonl"}],
         "engine": {"model": "r1-distill-7b"}, "output": StorageConfig(root=root)}
    )  # fmt: skip
    inputs = input_tables()
    ids = [f"p{i}" for i in range(problems)]
    plan = Plan(
        config=config,
        run_id=RUN_ID,
        input_rows=problems + LOAD_ERRORS + DUPLICATES + CONTAMINATED,
        load_errors=inputs["errors"],
        dedup_rejects=inputs["rejects"],
        # The plan's problems table is the lead's (it exists before the run); only its size is read here.
        problems=pa.table({n: ids if n == "id" else [""] * problems for n in PROBLEM_SCHEMA.names}),
        shards=[],
    )
    store = RunStore(config.output, DATASET, RUN_ID)

    def end_of_run():
        counts = run_statistics(plan, store)
        store.commit({"config": config.model_dump(mode="json"), "counts": counts.model_dump(mode="json")})
        report = RunReport(dataset=DATASET, run_id=RUN_ID, model="r1-distill-7b", config_hash="bench",
                           counts=counts, committed=True, attempt=AttemptReport())  # fmt: skip
        write_report(config, store, report)
        html = store.read_file("report.html")
        return {"kept_samples": counts.kept_samples, "kept_problems": counts.kept_problems,
                "charts": html.count(b'<svg class="chart"'), "report_html_bytes": len(html)}  # fmt: skip

    return _measure(end_of_run)


def measure_stream(root: str) -> dict:
    from tokenskip.storage import StorageConfig, iter_batches

    def iterate():
        rows = chars = 0
        for batch in iter_batches(StorageConfig(root=root), DATASET, "data"):
            rows += batch.num_rows
            chars += sum(len(c) for c in batch.column("cot").to_pylist())
        return {"rows": rows, "cot_chars": chars}

    return _measure(iterate)


def measure_read_table(root: str) -> dict:
    from tokenskip.storage import StorageConfig, read_table

    def whole():
        table = read_table(
            StorageConfig(root=root), DATASET, "data", columns=["original_tokens", "compressions"]
        )
        return {"rows": table.num_rows, "table_mb": table.nbytes / 2**20}

    return _measure(whole)


def child(args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        raise RuntimeError(f"measurement {args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000], help="kept rows per run")
    parser.add_argument("--shard-rows", type=int, default=128, help="kept rows per shard")
    parser.add_argument("--workdir", default=None, help="where to build the runs (default: a temp dir)")
    parser.add_argument("--out", default=None, help="also write the printed lines to this file")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, root, *rest = args.child
        result = {"stats": lambda: measure_stats(root, int(rest[0])), "stream": lambda: measure_stream(root),
                  "read_table": lambda: measure_read_table(root)}[kind]()  # fmt: skip
        print(json.dumps(result))
        return

    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="driver-memory-"))
    sizes = sorted(args.sizes)
    say(f"driver memory benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    say(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs; "
        f"shards of {args.shard_rows} kept rows, {SAMPLES_PER_PROBLEM} samples/problem, 5 ratios")  # fmt: skip
    stats = {}
    try:
        for kept in sizes:
            root = workdir / f"kept-{kept}"
            shutil.rmtree(root, ignore_errors=True)
            started = time.perf_counter()
            built = build_run(root, kept, args.shard_rows)
            say(f"built {kept} kept rows: {built['shards']} shards (+ input shard), {built['problems']} problems, "
                f"{built['bytes_on_disk'] / 2**20:.0f} MiB on disk (largest data part {built['largest_part'] / 2**20:.1f} MiB), "
                f"in {time.perf_counter() - started:.0f}s")  # fmt: skip
            m = child(["stats", str(root), str(built["problems"])])
            stats[kept] = m
            r = m["result"]
            say(f"  stats+commit+report: +{m['added_mb']:.1f} MB peak RSS over {m['base_mb']:.0f} MB "
                f"(peak {m['peak_mb']:.0f} MB), {m['seconds']:.2f}s; counts kept={r['kept_samples']} "
                f"problems={r['kept_problems']}, report.html {r['report_html_bytes'] / 1024:.0f} KiB, {r['charts']} charts")  # fmt: skip
            if kept == sizes[0]:
                ref = child(["read_table", str(root)])
                say(f"  for reference, the old report input (read_table of original_tokens+compressions): "
                    f"+{ref['added_mb']:.1f} MB peak RSS ({ref['result']['table_mb']:.0f} MB table), "
                    f"{ref['seconds']:.2f}s")  # fmt: skip
        # Streaming, per size: the peak must not grow with the run (it is a fixed cost: the Parquet
        # library's code and allocator arenas, paged in on the first decode, plus about one part).
        streams = {}
        for kept in sizes:
            s = streams[kept] = child(["stream", str(workdir / f"kept-{kept}")])
            say(f"iter_batches over the {kept}-row run (all columns): peak {s['peak_mb']:.0f} MB RSS "
                f"(+{s['added_mb']:.1f} MB over {s['base_mb']:.0f} MB), {s['result']['rows']} rows, "
                f"{s['result']['cot_chars'] / 2**20:.0f} MiB of CoT text, {s['seconds']:.1f}s")  # fmt: skip
        lo, hi = sizes[0], sizes[-1]
        say()
        say("acceptance (issue 12):")
        say(f"  stats+commit+report at {hi}: +{stats[hi]['added_mb']:.1f} MB (< 50 MB: "
            f"{'yes' if stats[hi]['added_mb'] < 50 else 'NO'})")  # fmt: skip
        growth = stats[hi]["added_mb"] - stats[lo]["added_mb"]
        say(f"  {hi} vs {lo}: {growth:+.1f} MB (< 10 MB: {'yes' if growth < 10 else 'NO'})")
        peak = streams[hi]["peak_mb"]
        say(f"  streaming peak at {hi}: {peak:.0f} MB (< 300 MB: {'yes' if peak < 300 else 'NO'}); "
            f"{peak - streams[lo]['peak_mb']:+.0f} MB vs {lo}")  # fmt: skip
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
