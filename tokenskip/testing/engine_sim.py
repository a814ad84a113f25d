"""A simulated engine and actor for the admission rule (no vLLM): discrete steps, one token per running
sequence per step, first come first served, at most ``capacity`` sequences running.

The actor holds at most ``rule.max_batches`` batches (Ray Data hands it a new batch the moment one
returns, as with its queued tasks); the rule decides which held batches enter the engine, seeing the
engine's waiting + running sequences exactly. A problem's request returns when its ``n`` samples
have; a batch returns when its requests have. Used by ``tests/test_admission.py`` and, at GPU scale,
``benchmarks/occupancy_sim.py``.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from tokenskip.admission import AdmissionRule

__all__ = ["SimResult", "simulate"]


@dataclass
class SimResult:
    occupancy: float  # mean running / capacity over the steps with a running sequence
    steps: int  # engine steps with a running sequence
    # The same over the steps while the actor still had batches to admit: what the admission rule
    # decides. After the last admission the engine drains to the run's longest sample whatever the
    # rule (the final drain: long when the run is a few engine-fulls and lengths have a long tail).
    fed_occupancy: float
    fed_steps: int
    problems: int
    peak_admitted_batches: int
    peak_engine_sequences: int  # the most waiting + running sequences at once
    # Problems whose samples had all returned when the first batch (the first shard) returned, as a
    # fraction of all problems: how early a run's first shard can commit.
    first_batch_done_fraction: float


def simulate(lengths: list[list[int]], batch_size: int, rule: AdmissionRule) -> SimResult:
    """Run problems whose samples have ``lengths`` (one list of ``n`` output lengths per problem, each
    >= 1) through an engine of ``rule.capacity`` slots, fed in batches of ``batch_size`` problems."""
    if batch_size < 1 or not lengths:
        raise ValueError("need problems and batch_size >= 1")
    batches = [list(range(s, min(s + batch_size, len(lengths)))) for s in range(0, len(lengths), batch_size)]
    next_batch = 0  # the next batch Ray Data hands the actor
    held: deque[int] = deque()  # batches the actor holds, not admitted, in arrival order
    admitted = 0
    samples_left = [len(x) for x in lengths]  # per problem
    problems_left = [len(b) for b in batches]  # per batch
    batch_of = {p: b for b, members in enumerate(batches) for p in members}
    waiting: deque[tuple[int, int]] = deque()  # (problem, length) sequences not yet running
    running: list[tuple[int, int]] = []  # heap of (finish step, problem)
    now = 0
    steps = busy = 0  # steps with a running sequence; sum of running sequences over them
    fed_steps = fed_busy = 0  # the same while batches were left to admit
    problems_done = 0
    first_batch_fraction: float | None = None
    peak_admitted = peak_engine = 0

    while True:
        # Ray Data keeps the actor holding max_batches batches.
        while next_batch < len(batches) and admitted + len(held) < rule.max_batches:
            held.append(next_batch)
            next_batch += 1
        while held and rule.may_admit(len(waiting) + len(running), admitted):
            for p in batches[held.popleft()]:
                waiting.extend((p, n) for n in lengths[p])
            admitted += 1
        peak_admitted = max(peak_admitted, admitted)
        peak_engine = max(peak_engine, len(waiting) + len(running))
        while waiting and len(running) < rule.capacity:
            p, length = waiting.popleft()
            heapq.heappush(running, (now + length, p))
        if not running:
            break
        until = running[0][0]
        steps += until - now
        busy += len(running) * (until - now)
        if held or next_batch < len(batches):
            fed_steps += until - now
            fed_busy += len(running) * (until - now)
        now = until
        while running and running[0][0] == now:
            _, p = heapq.heappop(running)
            samples_left[p] -= 1
            if samples_left[p]:
                continue
            problems_done += 1
            b = batch_of[p]
            problems_left[b] -= 1
            if problems_left[b] == 0:
                admitted -= 1
                if b == 0:
                    first_batch_fraction = problems_done / len(lengths)
    if problems_done != len(lengths):
        raise RuntimeError(f"simulation stalled with {len(lengths) - problems_done} problems left")
    return SimResult(
        occupancy=busy / (steps * rule.capacity),
        steps=steps,
        fed_occupancy=fed_busy / (fed_steps * rule.capacity) if fed_steps else 1.0,
        fed_steps=fed_steps,
        problems=len(lengths),
        peak_admitted_batches=peak_admitted,
        peak_engine_sequences=peak_engine,
        first_batch_done_fraction=first_batch_fraction or 1.0,
    )
