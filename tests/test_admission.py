"""The admission rule against a simulated engine (no vLLM): stragglers never hold admission shut, the
actor's hold is capped, batches enter first come first served."""

from __future__ import annotations

import asyncio

import pytest

from tokenskip.admission import AdmissionConfig, AdmissionGate, AdmissionRule, OutstandingSequences
from tokenskip.testing.engine_sim import simulate

FULLNESS = AdmissionConfig()  # engine_fullness, watermark 2 x slots
SLOTS = AdmissionConfig(policy="batch_slots")


def _straggler_lengths(
    problems: int, n: int, every: int = 8, short: int = 10, long: int = 400
) -> list[list[int]]:
    """Short samples, and one long one in the last of every ``every`` problems (a reasoning-length tail)."""
    return [
        [long if (p % every == every - 1 and s == 0) else short for s in range(n)] for p in range(problems)
    ]


def test_rule_decisions_and_what_it_holds():
    rule = AdmissionRule(FULLNESS, capacity=8, max_batches=4)
    assert rule.watermark == 16
    assert rule.may_admit(outstanding_sequences=15, admitted_batches=3)
    assert not rule.may_admit(outstanding_sequences=16, admitted_batches=0)  # engine full enough
    assert not rule.may_admit(outstanding_sequences=0, admitted_batches=4)  # the hard cap
    slots = AdmissionRule(SLOTS, capacity=8, max_batches=4)
    assert slots.may_admit(outstanding_sequences=1000, admitted_batches=3)
    assert not slots.may_admit(outstanding_sequences=0, admitted_batches=4)
    # Sequences in the engine: the last batch enters just below the watermark.
    assert AdmissionRule(FULLNESS, 8, 16).max_engine_sequences(batch_sequences=4) == 15 + 4
    assert rule.max_engine_sequences(batch_sequences=4) == 4 * 4  # the held batches' sequences
    assert slots.max_engine_sequences(batch_sequences=4) == 16
    # 4 watermarks of sequences: 64 / (2 problems x n=2) = 16 batches.
    assert rule.recommended_max_batches(batch_size=2, n=2) == 16
    text = rule.describe(batch_size=2, n=2)
    assert "< 16 sequences" in text and "8 problems per actor" in text and "< 16 (4 watermarks" in text
    assert "note" not in AdmissionRule(FULLNESS, 8, 16).describe(batch_size=2, n=2)
    with pytest.raises(ValueError):
        AdmissionRule(FULLNESS, capacity=0, max_batches=1)


def test_a_straggler_holds_todays_window_shut_but_not_the_engine_fullness_rule():
    lengths = _straggler_lengths(problems=256, n=2)
    today = simulate(lengths, batch_size=4, rule=AdmissionRule(SLOTS, capacity=16, max_batches=4))
    fullness_rule = AdmissionRule(FULLNESS, capacity=16, max_batches=16)
    new = simulate(lengths, batch_size=4, rule=fullness_rule)
    ceiling = simulate(lengths, batch_size=256, rule=AdmissionRule(SLOTS, capacity=16, max_batches=1))

    # Every 2nd batch holds a 400-token sample: 4 batches of 8 sequences cannot keep 16 slots busy.
    assert today.fed_occupancy < 0.5
    assert new.fed_occupancy > 0.98
    assert new.occupancy == pytest.approx(ceiling.occupancy, abs=0.02)
    assert new.steps < 0.5 * today.steps
    # The hold stays capped, and the engine's queue stays below watermark + one batch.
    assert new.peak_admitted_batches <= 16
    assert new.peak_engine_sequences <= fullness_rule.max_engine_sequences(4 * 2)
    # First come, first served: the first batch (shard; no straggler in it) is back long before most
    # problems are done, though admission never waits for it.
    assert new.first_batch_done_fraction < 0.2


def test_a_held_cap_below_the_recommendation_starves_the_engine():
    lengths = _straggler_lengths(problems=256, n=2)
    small = simulate(lengths, batch_size=4, rule=AdmissionRule(FULLNESS, capacity=16, max_batches=4))
    assert small.peak_admitted_batches == 4
    assert small.fed_occupancy < 0.6


def test_outstanding_sequences_is_the_smaller_of_the_actor_and_engine_counts():
    seen = OutstandingSequences()
    seen.sent(8)  # 2 requests x n=4
    assert seen.count == 8  # nothing from the engine yet: what was sent counts
    seen.engine_step(running=3, waiting=0)  # 5 samples done, their requests not yet returned
    assert seen.count == 3
    seen.sent(4)
    assert seen.count == 7
    seen.engine_step(running=1, waiting=0)
    seen.returned(12)  # every request back; the engine's last count (1) is stale
    assert seen.count == 0


def test_gate_admits_in_arrival_order_under_the_watermark_and_the_cap():
    async def scenario() -> list[str]:
        gate = AdmissionGate(AdmissionRule(FULLNESS, capacity=4, max_batches=3))  # watermark 8
        order: list[str] = []

        async def batch(name: str, sequences: int) -> None:
            await gate.enter(sequences)
            order.append(name)

        tasks = [asyncio.create_task(batch(f"b{i}", 6)) for i in range(4)]
        await asyncio.sleep(0)
        assert order == ["b0", "b1"] and gate.waiting == 2  # 12 sequences >= watermark 8
        gate.engine_step(running=4, waiting=0)  # the engine holds fewer than were sent
        await asyncio.sleep(0)
        assert order == ["b0", "b1", "b2"] and gate.admitted == 3
        gate.engine_step(running=0, waiting=0)
        await asyncio.sleep(0)
        assert gate.waiting == 1  # under the watermark, but 3 batches is the cap
        gate.returned(6)
        gate.leave()
        await asyncio.gather(*tasks)
        assert gate.peak_admitted == 3
        return order

    assert asyncio.run(scenario()) == ["b0", "b1", "b2", "b3"]


def test_a_cancelled_waiter_leaves_the_queue():
    async def scenario() -> None:
        gate = AdmissionGate(AdmissionRule(FULLNESS, capacity=1, max_batches=1))
        await gate.enter(1)
        waiter = asyncio.create_task(gate.enter(1))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert gate.waiting == 0
        gate.leave(1)
        assert gate.admitted == 0 and gate.outstanding.count == 0

    asyncio.run(scenario())


def test_the_gpu_recipe_holds_what_the_rule_recommends_and_the_plan_says_so():
    from pathlib import Path

    from tokenskip.config import PipelineConfig, load_config
    from tokenskip.stages.generate import admission_plan

    configs = Path(__file__).resolve().parents[1] / "tokenskip" / "configs"
    gpu = load_config(PipelineConfig, configs / "gsm8k_qwen2_5_7b_gpu.yaml")
    r = gpu.resources
    rule = AdmissionRule(r.generation_admission, gpu.engine.max_num_seqs, r.generation_max_concurrent_batches)
    assert r.generation_admission.policy == "engine_fullness"
    assert r.generation_max_concurrent_batches == rule.recommended_max_batches(
        r.generation_batch_size, gpu.sampling.n
    )
    plan = admission_plan(gpu)
    assert "< 512 sequences" in plan and "16 batches = 512 problems per actor" in plan
    assert "note" not in plan
    small = gpu.model_copy(
        update={"resources": r.model_copy(update={"generation_max_concurrent_batches": 4})}
    )
    assert "note: generation_max_concurrent_batches 4 < 16" in admission_plan(small)
    demo = load_config(PipelineConfig, configs / "demo.yaml")
    assert "vLLM's default" in admission_plan(demo)
