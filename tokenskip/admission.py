"""When a generation actor lets its next batch into the engine: admission by engine fullness.

A generation actor receives Ray Data batches of problems and turns each problem into one engine request
of ``n`` sequences. Which of the batches it holds may enter the engine is this module's rule:

* ``engine_fullness`` (the default): the next batch enters while the engine's outstanding sequences
  (waiting + running) are below a *watermark*, ``queue_factor x max_num_seqs``. A straggler holds
  only its own sequence, never a slot of the window, so the engine's queue stays fed whatever the
  batches' completion. ``queue_factor > 1`` keeps a queue of waiting sequences in the engine, so a
  slot that frees is refilled on the next step without waiting for a round trip through the actor.
* ``batch_slots`` (the rule before this module, kept to measure against): at most
  ``max_batches`` batches generate at once, and a batch's slot frees only when its last sample ends;
  a few long samples hold the window shut while the engine drains.

Either way an actor holds at most ``max_batches`` batches (Ray Data hands it no more: the stage's
``max_concurrent_calls_per_actor``), so the rows and requests one actor holds are capped whatever the
run's size: ``max_batches x batch_size`` problems, and at most ``watermark + batch_size x n``
sequences in the engine. Batches are admitted first come, first served, so early shards finish (and
commit) first.

:class:`AdmissionRule` is the decision (pure, no engine); :class:`AdmissionGate` queues the actor's
batches on its event loop and lets them in as the rule allows; :class:`OutstandingSequences` is the
rule's view of the engine: the smaller of what the actor has in flight and what the engine reported
at its last step plus what was sent since. It is exercised against a simulated engine in
``tests/test_admission.py`` and at GPU scale in ``benchmarks/occupancy_sim.py``.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AdmissionConfig", "AdmissionGate", "AdmissionRule", "OutstandingSequences"]


class AdmissionConfig(BaseModel):
    """How a generation actor admits batches into its engine (see :mod:`tokenskip.admission`)."""

    model_config = ConfigDict(extra="forbid")

    policy: Literal["engine_fullness", "batch_slots"] = Field(
        default="engine_fullness",
        description="engine_fullness: the next batch enters while the engine's waiting + running "
        "sequences are below queue_factor x max_num_seqs (stragglers never hold admission shut). "
        "batch_slots: at most generation_max_concurrent_batches batches generate at once, a batch's "
        "slot freeing when its last sample ends (the earlier rule, kept for comparison).",
    )
    queue_factor: float = Field(
        default=2.0,
        ge=1.0,
        description="engine_fullness: the watermark in units of the engine's max_num_seqs. Above 1 the "
        "engine keeps waiting sequences queued, so a freed slot is refilled on its next step.",
    )
    hold_factor: float = Field(
        default=4.0,
        ge=1.0,
        description="How many watermarks of sequences an actor should hold (generation_max_concurrent_batches "
        "x generation_batch_size x n): batches with a straggler stay held until it ends, so the actor "
        "needs batches beyond the watermark's. The plan recommends generation_max_concurrent_batches "
        "from it; benchmarks/occupancy_sim.py measured 4 enough for R1 length tails.",
    )


@dataclass(frozen=True)
class AdmissionRule:
    """The admission decision for one engine of ``capacity`` sequences (``max_num_seqs``)."""

    config: AdmissionConfig
    capacity: int
    max_batches: int  # batches one actor holds at most (Ray Data's concurrency per actor)

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.max_batches < 1:
            raise ValueError(
                f"capacity and max_batches must be >= 1, got {self.capacity}, {self.max_batches}"
            )

    @property
    def watermark(self) -> int:
        """Outstanding sequences below which the next batch enters (``engine_fullness``)."""
        return max(1, math.ceil(self.config.queue_factor * self.capacity))

    def may_admit(self, outstanding_sequences: int, admitted_batches: int) -> bool:
        """Whether the next batch may enter, given the engine's waiting + running sequences and the
        batches already admitted and not yet finished."""
        if admitted_batches >= self.max_batches:
            return False
        if self.config.policy == "batch_slots":
            return True
        return outstanding_sequences < self.watermark

    def max_engine_sequences(self, batch_sequences: int) -> int:
        """The most sequences the engine can hold from this actor: the last batch is admitted just below
        the watermark (``engine_fullness``), or every held batch at once (``batch_slots``)."""
        if self.config.policy == "batch_slots":
            return self.max_batches * batch_sequences
        return min(self.max_batches * batch_sequences, self.watermark - 1 + batch_sequences)

    def recommended_max_batches(self, batch_size: int, n: int) -> int:
        """Batches an actor should be allowed to hold for ``engine_fullness`` to keep the engine fed:
        ``hold_factor`` watermarks of sequences."""
        return max(1, math.ceil(self.config.hold_factor * self.watermark / (batch_size * n)))

    def describe(self, batch_size: int, n: int) -> str:
        """One line for the plan: what the rule will hold."""
        held = f"holds <= {self.max_batches} batches = {self.max_batches * batch_size} problems per actor"
        most = self.max_engine_sequences(batch_size * n)
        if self.config.policy == "batch_slots":
            return f"admission batch_slots: {self.max_batches} batches generate at once; {held}; <= {most} sequences in the engine"
        recommended = self.recommended_max_batches(batch_size, n)
        note = (
            f"\n  note: generation_max_concurrent_batches {self.max_batches} < {recommended} "
            f"({self.config.hold_factor:g} watermarks of sequences): stragglers' batches can leave the engine short"
            if self.max_batches < recommended
            else ""
        )
        return (
            f"admission engine_fullness: next batch while waiting+running < {self.watermark} sequences "
            f"({self.config.queue_factor:g} x max_num_seqs {self.capacity}); {held}; "
            f"<= {most} sequences in the engine{note}"
        )


class OutstandingSequences:
    """The engine's waiting + running sequences as the admission rule sees them.

    Two counts, and the smaller is used:

    * ``in_flight``: the sequences of the actor's requests that have not returned. An upper bound: a
      request returns when all its ``n`` samples have, so its finished samples still count here.
    * the engine's own count of waiting + running sequences at its last step (vLLM's scheduler stats
      count each of the ``n`` samples), plus what was sent since that step. Exact for ``n > 1``, but a
      step behind; it can only be stale-high while requests are in flight, and then ``in_flight``
      bounds it; an idle engine reports no steps, but then ``in_flight`` is 0.
    """

    def __init__(self) -> None:
        self.in_flight = 0
        self._engine_seen = 0  # waiting + running at the engine's last step
        self._sent_since_step = 0

    def sent(self, sequences: int) -> None:
        self.in_flight += sequences
        self._sent_since_step += sequences

    def returned(self, sequences: int) -> None:
        self.in_flight -= sequences

    def engine_step(self, running: int, waiting: int) -> None:
        self._engine_seen = running + waiting
        self._sent_since_step = 0

    @property
    def count(self) -> int:
        return max(0, min(self.in_flight, self._engine_seen + self._sent_since_step))


class AdmissionGate:
    """Batches wait here, first come first served, until :class:`AdmissionRule` lets them into the engine.

    Lives on the actor's event loop (every method is called there). It keeps the rule's view of the
    engine (:class:`OutstandingSequences`): a batch's sequences count from its admission, the engine's
    per-step counts come in through :meth:`engine_step`, returned requests through :meth:`returned`;
    each of these reconsiders the waiting batches.
    """

    def __init__(self, rule: AdmissionRule):
        self.rule = rule
        self.outstanding = OutstandingSequences()
        self._waiting: deque[tuple[asyncio.Future, int]] = deque()
        self.admitted = 0  # admitted batches not yet finished
        self.peak_admitted = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def enter(self, sequences: int) -> None:
        """Wait for this batch's turn (its requests total ``sequences``); on return it is admitted, its
        sequences count as sent, and it must call :meth:`leave` when it is done with the engine."""
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append((turn, sequences))
        self._admit()
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # admitted just as we were cancelled
                self.leave(sequences)
            else:
                self._waiting = deque(w for w in self._waiting if w[0] is not turn)
            raise

    def returned(self, sequences: int) -> None:
        """A request of an admitted batch returned with its ``sequences`` samples."""
        self.outstanding.returned(sequences)
        self._admit()

    def engine_step(self, running: int, waiting: int) -> None:
        """The engine's scheduler stats of one step: its running and waiting sequences."""
        self.outstanding.engine_step(running, waiting)
        self._admit()

    def leave(self, unreturned_sequences: int = 0) -> None:
        """The admitted batch is done with the engine; ``unreturned_sequences``: its sequences no
        :meth:`returned` call accounted for (prompts refused before the engine, failed requests)."""
        self.admitted -= 1
        self.outstanding.returned(unreturned_sequences)
        self._admit()

    def _admit(self) -> None:
        """Admit waiting batches, in arrival order, while the rule allows."""
        while self._waiting and self.rule.may_admit(self.outstanding.count, self.admitted):
            turn, sequences = self._waiting.popleft()
            if turn.done():  # its waiter was cancelled
                continue
            self.admitted += 1
            self.peak_admitted = max(self.peak_admitted, self.admitted)
            self.outstanding.sent(sequences)
            turn.set_result(None)
