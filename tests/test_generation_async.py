"""The generation stage's continuous feeding, on a real vLLM CPU engine with the tiny local model.

The stage is driven as Ray Data drives an async callable class: its coroutines run on one event loop
in a thread of their own. Workloads are crafted so the engine's capacity decides the outcome: with
``max_num_seqs=8`` and batches of 2 problems x n=2 (4 sequences), one batch in flight can never
occupy more than half the engine, so an occupancy above one half is only possible when batches
overlap.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pyarrow as pa
import pytest

from tokenskip.engine import EngineConfig, EngineDead, SamplingConfig
from tokenskip.schema import GENERATE_STAGE
from tokenskip.stages.generate import OUTPUT_FIELDS, GenerateStage, engine_occupancy

pytestmark = pytest.mark.slow

MAX_NUM_SEQS = 8
SAMPLING = SamplingConfig(n=2, temperature=1.0, max_tokens=16)
PROMPT = {"instruction": "Please reason step by step."}
TOO_LONG = "What is 12 + 30? " + "Think about it carefully, step by step. " * 60  # > 128 tokens


def _engine(model) -> EngineConfig:
    return EngineConfig(
        model=str(model),
        device="cpu",
        max_model_len=128,
        max_num_seqs=MAX_NUM_SEQS,
        kv_cache_memory_bytes=64 << 20,
        enforce_eager=True,  # start in seconds; these tests are about scheduling, not kernels
        seed=0,
    )


def _batch(start: int, size: int) -> pa.Table:
    ids = [f"p{i}" for i in range(start, start + size)]
    return pa.table({"id": ids, "question": [f"What is {i} + {i}?" for i in range(start, start + size)]})


class _Loop:
    """An event loop on its own thread, as Ray Data runs an actor's async UDF calls."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def _stage_kwargs(model, max_concurrent_batches: int, **extra) -> dict:
    """GenerateStage's constructor arguments as a Ray Data actor stage gets them (one CPU)."""
    return {
        "engine": _engine(model),
        "sampling": SAMPLING,
        "prompt": PROMPT,
        "cpus": 1,
        "max_concurrent_batches": max_concurrent_batches,
        **extra,
    }


def _engine_core_pids() -> set[int]:
    import psutil

    pids = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if "EngineCore" in " ".join(proc.cmdline()) or "EngineCore" in proc.name():
                pids.add(proc.pid)
        except psutil.Error:
            pass
    return pids


@pytest.fixture(scope="module")
def loop():
    lp = _Loop()
    yield lp
    lp.close()


def _stage(tiny_causal_lm, max_concurrent_batches: int) -> tuple[GenerateStage, set[int]]:
    before = _engine_core_pids()
    stage = GenerateStage(
        _engine(tiny_causal_lm), SAMPLING, PROMPT, cpus=2, max_concurrent_batches=max_concurrent_batches
    )
    return stage, _engine_core_pids() - before


@pytest.fixture(scope="module")
def continuous(tiny_causal_lm, loop):
    stage, core_pids = _stage(tiny_causal_lm, max_concurrent_batches=4)
    yield stage
    stage.shutdown()


@pytest.fixture(scope="module")
def one_batch(tiny_causal_lm, loop):
    stage, core_pids = _stage(tiny_causal_lm, max_concurrent_batches=1)
    stage.core_pids = core_pids
    yield stage
    stage.shutdown()


def test_rows_schema_n_samples_and_a_too_long_prompt_isolated(continuous, loop):
    batch = pa.table({"id": ["a", "long", "b"], "question": ["What is 2 + 3?", TOO_LONG, "What is 7 + 1?"]})
    out = loop.run(continuous(batch))

    assert out.schema == pa.schema(list(batch.schema) + OUTPUT_FIELDS)
    rows = out.to_pylist()
    assert [r["id"] for r in rows] == ["a", "long", "b"]  # input order, one row per problem
    for r in (rows[0], rows[2]):
        assert r["error"] is None
        assert len(r["samples"]) == SAMPLING.n
        assert all(1 <= s["tokens"] <= SAMPLING.max_tokens and s["text"] for s in r["samples"])
        assert r["prompt_tokens"] > 0
    long_row = rows[1]
    assert long_row["error"] == "prompt_too_long" and long_row["samples"] == []
    assert long_row["stage"] == GENERATE_STAGE and all(r["stage"] is None for r in rows if r is not long_row)
    assert "max_model_len is 128" in long_row["error_detail"]
    # Occupancy is carried on the rows: 2 prompts x 2 samples in an 8-sequence engine.
    assert out.column("gen_engine_max_num_seqs").to_pylist() == [MAX_NUM_SEQS] * 3
    longest = max(s["tokens"] for r in rows for s in r["samples"])
    # About one engine step per generated token (the last step's stats may land in the next batch).
    assert sum(out.column("gen_engine_steps").to_pylist()) >= longest - 2
    occupancy = engine_occupancy(out)
    assert 0 < occupancy <= 4 / MAX_NUM_SEQS
    totals = continuous.metrics.totals()
    assert totals["engine_steps"]["stage=generate"] > 0
    assert 0 < totals["engine_occupancy"]["stage=generate"] <= 1


async def _several(stage: GenerateStage, batches: list[pa.Table]) -> list[pa.Table]:
    return await asyncio.gather(*(stage(b) for b in batches))


def test_batches_in_flight_overlap_and_fill_the_engine(continuous, one_batch, loop):
    batches = [_batch(2 * i, 2) for i in range(4)]  # 4 batches x 2 problems x n=2 = 16 sequences

    overlapped = loop.run(_several(continuous, batches))
    serial = loop.run(_several(one_batch, batches))

    for outs in (overlapped, serial):
        assert [r["id"] for t in outs for r in t.to_pylist()] == [f"p{i}" for i in range(8)]
        assert all(len(r["samples"]) == 2 and r["error"] is None for t in outs for r in t.to_pylist())
    assert continuous.peak_batches_in_flight >= 2
    assert one_batch.peak_batches_in_flight == 1
    # One batch can never fill more than half of the engine; overlapping ones do.
    assert engine_occupancy(pa.concat_tables(serial)) <= 0.5
    assert engine_occupancy(pa.concat_tables(overlapped)) > 0.75


def test_a_dead_engine_raises_instead_of_becoming_error_rows(one_batch, loop):
    assert len(one_batch.core_pids) == 1
    (pid,) = one_batch.core_pids
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(EngineDead):
        loop.run(one_batch(_batch(0, 2)), timeout=120)


def test_ray_data_runs_batches_concurrently_in_one_actor(tiny_causal_lm, ray_local):
    import ray

    problems = _batch(0, 8)
    ds = ray.data.from_arrow([problems]).map_batches(
        GenerateStage,
        fn_constructor_kwargs=_stage_kwargs(tiny_causal_lm, max_concurrent_batches=4),
        batch_size=2,
        **GenerateStage.map_batches_options(actors=1, cpus=1, gpus=0, max_concurrent_batches=4),
    )
    out = pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))

    assert out.column("id").to_pylist() == problems.column("id").to_pylist()
    assert all(len(s) == 2 for s in out.column("samples").to_pylist())
    # Each batch alone fills at most half the engine: more than that means Ray Data overlapped them.
    assert engine_occupancy(out) > 0.5


class _KillsItsEngineOnce(GenerateStage):
    """The real stage, whose first call anywhere SIGKILLs its own engine-core process first."""

    def __init__(self, *args, marker: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.marker = marker
        with open(marker + ".pids", "a") as f:
            f.write(f"{os.getpid()}\n")

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            for pid in _engine_core_pids():
                os.kill(pid, signal.SIGKILL)
        return await super().__call__(batch)


def test_ray_restarts_the_actor_after_its_engine_dies(tiny_causal_lm, ray_local, tmp_path):
    import sys

    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    marker = str(tmp_path / "killed")
    problems = _batch(0, 4)
    ds = ray.data.from_arrow([problems]).map_batches(
        _KillsItsEngineOnce,
        fn_constructor_kwargs=_stage_kwargs(tiny_causal_lm, max_concurrent_batches=2, marker=marker),
        batch_size=2,
        **GenerateStage.map_batches_options(actors=1, cpus=1, gpus=0, max_concurrent_batches=2),
    )
    out = pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))

    assert os.path.exists(marker)  # the engine was killed ...
    pids = open(marker + ".pids").read().split()
    assert len(set(pids)) >= 2  # ... its actor died and Ray started another
    rows = out.to_pylist()
    assert [r["id"] for r in rows] == problems.column("id").to_pylist()
    assert all(r["error"] is None and len(r["samples"]) == 2 for r in rows)  # no rows lost to it


def test_early_batches_return_first_in_a_run_far_larger_than_the_engine(continuous, loop):
    """80 problems x n=2 = 20 engines' worth, handed over at once: the gate admits them in arrival order
    and the actor never holds more than its 4 batches in the engine, so the first batch (a shard) is
    back before a fifth of the problems have been generated."""
    finished: list[str] = []
    posted = continuous._posted
    continuous._posted = lambda result: (finished.append("p"), posted(result))
    first_back: list[int] = []

    async def run() -> list[pa.Table]:
        tasks = [asyncio.ensure_future(continuous(_batch(2 * i, 2))) for i in range(40)]
        tasks[0].add_done_callback(lambda _: first_back.append(len(finished)))
        return await asyncio.gather(*tasks)

    try:
        outs = loop.run(run())
    finally:
        del continuous._posted
    rows = [r for t in outs for r in t.to_pylist()]
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(80)]
    assert all(len(r["samples"]) == 2 and r["error"] is None for r in rows)
    assert len(finished) == 80
    assert continuous.gate.peak_admitted <= 4
    assert first_back[0] < 0.2 * 80
