"""Verification: a :class:`Verdict` per response against its gold answer, with math-verify run in
worker processes that bound its time and memory.

* :func:`grade` / :func:`grade_batch` / :class:`Grader` - a :class:`Verdict` per response:
  the answer is extracted (:mod:`tokenskip.grading.extract`) and normalised
  (:mod:`tokenskip.grading.normalise`) in the caller; equal answers are settled there (the fast
  path), the rest go to math-verify in worker processes, each answer under a CPU/wall/memory budget.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from multiprocessing import connection as mp_connection

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tokenskip.grading.extract import extract_answer
from tokenskip.grading.normalise import normalise_answer, same_answer

# The directory holding the ``tokenskip`` package (tokenskip/grading/verify.py -> three levels up),
# put on the workers' PYTHONPATH so they import this very tree.
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# ---------------------------------------------------------------------------------------------
# Verdicts and configuration
# ---------------------------------------------------------------------------------------------


class Verdict(str, Enum):
    """How a response compares with the gold answer (values match ``REJECT_SCHEMA.reason``)."""

    correct = "correct"
    incorrect = "incorrect"
    # No explicit final answer (or one math-verify cannot read): the sample never committed to one.
    unparsable = "unparsable"
    # Verification overran its CPU/wall/memory budget (or its worker died on it).
    timeout = "timeout"


@dataclass(frozen=True, slots=True)
class GradeResult:
    """One graded response: the verdict, the answer it stated (None if none) and why."""

    verdict: Verdict
    extracted_answer: str | None
    detail: str

    def to_dict(self) -> dict[str, str | None]:
        """Plain columns (``verdict`` as its string value), as the Arrow schemas name them."""
        return {
            "verdict": self.verdict.value,
            "extracted_answer": self.extracted_answer,
            "detail": self.detail,
        }


class GradingConfig(BaseModel):
    """How responses are graded; hashable, so one worker pool is shared per distinct config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    timeout_s: float = Field(
        default=5.0,
        gt=0,
        description=(
            "CPU seconds math-verify may spend on one answer (parse + verify), enforced by killing its worker "
            "process. CPU time, not wall time, so a busy machine does not turn slow-but-legitimate answers "
            "into `timeout` (verdicts stay reproducible). Lower bounds the cost of pathological answers "
            "(each costs this plus a worker restart); too low times out hard-but-legitimate comparisons."
        ),
    )
    wall_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "Wall-clock cap per answer even when its worker is starved of CPU (or CPU time cannot be read "
            "on this platform, where `timeout_s` applies to wall time instead). Must be >= timeout_s; "
            "higher tolerates heavier CPU contention, lower bounds a batch's latency more tightly."
        ),
    )
    last_number_fallback: bool = Field(
        default=False,
        description=(
            "Take the last number as the answer when none is stated explicitly. Off for training data (a "
            "response that never states its answer is `unparsable`); on for TokenSkip-compatible evaluation."
        ),
    )
    max_workers: int = Field(
        default=2,
        ge=1,
        description=(
            "Worker processes running math-verify. More grade faster on many cores but each costs ~100 MB "
            "and competes with the rest of the pipeline; workers start only when an answer needs math-verify."
        ),
    )
    chunk_size: int = Field(
        default=32,
        ge=1,
        description=(
            "Answers sent to a worker per message. Larger amortises inter-process overhead; smaller "
            "spreads a small batch over more workers. Timeouts stay per answer either way."
        ),
    )
    fast_path: bool = Field(
        default=True,
        description=(
            "Grade `correct` without math-verify when the normalised answer and gold are identical text or the "
            "same plain number (certain equality, most GSM8K answers). Off sends everything to math-verify."
        ),
    )
    float_rounding: int = Field(
        default=6,
        ge=0,
        description="Decimal places math-verify rounds floats to before comparing: fewer is more lenient.",
    )
    memory_limit_mb: int | None = Field(
        default=4096,
        ge=512,
        description=(
            "Address-space cap per worker process (RLIMIT_AS); an answer that needs more is graded `timeout`. "
            "Protects the node from answers like 9^{9^{9^9}}; too low fails legitimate big symbolic work. "
            "None: no cap."
        ),
    )
    worker_start_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="How long a worker may take to start (import sympy/math-verify) before grading fails loudly.",
    )

    @model_validator(mode="after")
    def _wall_cap_covers_cpu_budget(self) -> GradingConfig:
        if self.wall_timeout_s < self.timeout_s:
            raise ValueError(
                f"wall_timeout_s ({self.wall_timeout_s}) must be >= timeout_s ({self.timeout_s})"
            )
        return self


# ---------------------------------------------------------------------------------------------
# math-verify worker processes
# ---------------------------------------------------------------------------------------------

# math-verify's own timeouts use SIGALRM, which only works on the main thread (Ray runs callable
# classes' map_batches in threads): they are disabled and the worker process is the time bound.


def _math_verify_one(pred: str, gold: str, parse_answer, parse_gold, float_rounding: int) -> tuple[str, str]:
    """(verdict value, detail) for one normalised answer against its normalised gold; in a worker."""
    from math_verify import verify

    gold_parsed = parse_gold(gold)
    if not gold_parsed:
        return Verdict.incorrect.value, f"math-verify could not parse the gold answer {gold[:200]!r}"
    pred_parsed = parse_answer(pred)
    if not pred_parsed:
        return Verdict.unparsable.value, "math-verify could not parse the stated answer"
    same = verify(gold_parsed, pred_parsed, float_rounding=float_rounding, timeout_seconds=None)
    relation = "==" if same else "!="
    detail = f"math-verify: {str(pred_parsed[0])[:200]} {relation} {str(gold_parsed[0])[:200]}"
    return (Verdict.correct if same else Verdict.incorrect).value, detail


def _worker_main(read_fd: int, write_fd: int, float_rounding: int, memory_limit_mb: int) -> None:
    """Worker process loop: receive [(id, pred, gold), ...], send one (id, verdict, detail) per item.

    Runs as ``python -c`` in a plain subprocess (see :class:`_Worker`), talking over two pipes.
    """
    import logging

    conn_in = mp_connection.Connection(read_fd, writable=False)
    conn = mp_connection.Connection(write_fd, readable=False)
    parent_pid = os.getppid()

    def exit_when_orphaned() -> None:
        # A worker stuck in a pathological answer never reads its pipe again: without this it would
        # outlive a parent that died (or was SIGKILLed) until the computation ends, maybe never.
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=exit_when_orphaned, daemon=True).start()

    # A 10^5-digit answer must get a verdict, not a ValueError from int()'s conversion guard.
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)
    if memory_limit_mb:
        # "9^{9^{9^9}}" allocates as fast as it computes: cap the address space so one answer
        # cannot take the machine's memory before its CPU budget runs out.
        import resource

        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # math-verify warns that its timeouts are off (on purpose) and logs each unparsable string;
    # the verdicts carry that information, so keep the workers quiet.
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # Answers arrive already extracted and normalised: wrapping them in \boxed{} with boxed first
    # makes math-verify read the whole answer instead of searching it for a sub-expression.
    extraction = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

    def parse_answer(answer: str):
        return parse(f"\\boxed{{{answer}}}", extraction_config=extraction, parsing_timeout=None)

    parse_gold = lru_cache(maxsize=4096)(parse_answer)  # one gold serves many samples of a problem

    conn.send(("ready", os.getpid()))
    while True:
        try:
            chunk = conn_in.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if chunk is None:
            return
        for item_id, pred, gold in chunk:
            try:
                verdict, detail = _math_verify_one(pred, gold, parse_answer, parse_gold, float_rounding)
            except RecursionError:
                verdict, detail = Verdict.unparsable.value, "math-verify: answer nested too deeply to parse"
            except MemoryError:
                verdict, detail = (
                    Verdict.timeout.value,
                    f"math-verify exceeded {memory_limit_mb} MB; answer not graded",
                )
            except Exception as exc:  # sympy raises many kinds; one answer must not stop the batch
                verdict, detail = (
                    Verdict.unparsable.value,
                    f"math-verify error: {type(exc).__name__}: {exc}"[:300],
                )
            conn.send((item_id, verdict, detail))


_WORKER_COMMAND = (
    "import sys; from tokenskip.grading.verify import _worker_main; _worker_main(*map(int, sys.argv[1:5]))"
)


class _Worker:
    """One math-verify worker process, the items it holds and the budget of the one it is on.

    A plain subprocess (not multiprocessing): multiprocessing's spawn re-imports the parent's
    ``__main__`` in the child, which breaks under ``python -`` and re-runs unguarded scripts, and
    fork is unsafe in the threaded processes (Ray, vLLM) that grade.
    """

    def __init__(self, config: GradingConfig):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        # The child must import this very package, installed or not.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_PARENT, env.get("PYTHONPATH")]))
        try:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _WORKER_COMMAND,
                    str(to_child_r),
                    str(from_child_w),
                    str(config.float_rounding),
                    str(config.memory_limit_mb or 0),
                ],
                pass_fds=(to_child_r, from_child_w),
                stdin=subprocess.DEVNULL,
                env=env,
                close_fds=True,
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.send_conn = mp_connection.Connection(to_child_w, readable=False)
        self.conn = mp_connection.Connection(from_child_r, writable=False)
        self.ready = False
        self.items: deque[tuple[int, str, str]] = deque()
        # Bookkeeping for the item at the head of ``items`` (or for start-up while not ready).
        self.started_wall = time.monotonic()
        self.started_cpu: float | None = None
        self.next_check = self.started_wall + config.worker_start_timeout_s

    def cpu_seconds(self) -> float | None:
        """CPU time the worker has used so far (Linux /proc); None where it cannot be read."""
        try:
            with open(f"/proc/{self.process.pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime + stime
        except (OSError, IndexError, ValueError):
            return None

    def start_item(self, timeout_s: float) -> None:
        """The worker moves on to the next item: restart its budget."""
        self.started_wall = time.monotonic()
        self.started_cpu = self.cpu_seconds()
        self.next_check = self.started_wall + timeout_s

    def overran(self, config: GradingConfig) -> str | None:
        """Why the current item is over budget, or None (then ``next_check`` says when to look again).

        Called once ``next_check`` has passed, i.e. after at least ``timeout_s`` of wall time: only
        then is the CPU time read, so the common path costs one /proc read per item.
        """
        now = time.monotonic()
        wall = now - self.started_wall
        if wall >= config.wall_timeout_s:
            return f"took longer than {config.wall_timeout_s:g}s (wall clock)"
        cpu_now = self.cpu_seconds()
        if cpu_now is None or self.started_cpu is None:
            used = wall  # no CPU accounting here: fall back to wall time
        else:
            used = cpu_now - self.started_cpu
        if used >= config.timeout_s:
            return f"used more than {config.timeout_s:g}s of CPU"
        # Starved of CPU, not stuck: look again when the budget could first run out.
        self.next_check = min(
            now + max(config.timeout_s - used, 0.05), self.started_wall + config.wall_timeout_s
        )
        return None

    def send(self, chunk) -> None:
        self.send_conn.send(chunk)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.send_conn.close()
        self.conn.close()

    def request_stop(self) -> None:
        try:
            self.send_conn.send(None)
        except (OSError, ValueError):
            pass  # already gone

    def stop(self, grace_s: float = 2.0) -> None:
        """Let the worker exit on its own (after :meth:`request_stop`), else kill it."""
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


class Grader:
    """Grades responses against gold answers; holds math-verify worker processes.

    Use as a context manager (or call :meth:`close`); one per Ray actor. Thread-safe: concurrent
    :meth:`grade_batch` calls take turns on the workers. Each answer that needs math-verify gets at
    most ``config.timeout_s`` of a worker's CPU time (and ``config.wall_timeout_s`` of wall time);
    a worker that overruns is killed, its answer graded ``timeout`` and a fresh worker started, so
    one pathological answer costs the batch its budget plus a restart (~0.5 s) and nothing else.
    Extraction and normalisation run in the caller (linear-time regexes), so ``extracted_answer``
    is known even for a timed-out answer. Answers the fast path settles never reach a worker, and
    workers start only when the first answer needs one.
    """

    def __init__(self, config: GradingConfig | None = None):
        self.config = config or GradingConfig()
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self.restarts = 0  # workers replaced after a timeout or crash (observability, tests)

    def __getstate__(self) -> dict:
        # Pickles as its config (e.g. into a Ray actor): the copy starts its own workers when needed.
        return {"config": self.config}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["config"])

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes; the grader can not be used afterwards."""
        with self._lock:
            self._closed = True
            workers, self._workers = self._workers, []
        for worker in workers:  # all at once: each takes a moment to exit
            worker.request_stop()
        for worker in workers:
            worker.stop()

    def grade(self, response: str, gold: str) -> GradeResult:
        return self.grade_batch([response], [gold])[0]

    def grade_batch(self, responses: Sequence[str], golds: Sequence[str]) -> list[GradeResult]:
        """One :class:`GradeResult` per response, in order. ``golds[i]`` is ``responses[i]``'s gold.

        Raises ValueError (before grading anything) on mismatched lengths or an empty gold answer,
        TypeError on a non-string: those are bugs upstream, not verdicts about a response.
        """
        if self._closed:
            raise RuntimeError("this Grader is closed")
        if len(responses) != len(golds):
            raise ValueError(f"grade_batch got {len(responses)} responses but {len(golds)} gold answers")
        for i, (response, gold) in enumerate(zip(responses, golds, strict=True)):
            if not isinstance(response, str) or not isinstance(gold, str):
                raise TypeError(
                    f"row {i}: response and gold must be str, got {type(response).__name__}, {type(gold).__name__}"
                )
            if not gold.strip():
                raise ValueError(f"row {i}: empty gold answer; nothing to grade against")
        config = self.config
        results: list[GradeResult | None] = [None] * len(responses)
        extracted: list[str | None] = [None] * len(responses)
        # Identical (answer, gold) pairs - common among samples of one problem - are verified once.
        pending: dict[tuple[str, str], list[int]] = {}
        for i, (response, gold) in enumerate(zip(responses, golds, strict=True)):
            answer = extract_answer(response, last_number_fallback=config.last_number_fallback)
            extracted[i] = answer
            if answer is None:
                results[i] = GradeResult(Verdict.unparsable, None, "no final answer stated")
                continue
            pred_n, gold_n = normalise_answer(answer), normalise_answer(gold)
            if not pred_n:
                results[i] = GradeResult(Verdict.unparsable, answer, "the stated answer is empty")
            elif config.fast_path and same_answer(pred_n, gold_n):
                results[i] = GradeResult(Verdict.correct, answer, "identical after normalisation")
            else:
                pending.setdefault((pred_n, gold_n), []).append(i)
        if pending:
            pairs = list(pending)
            outcomes = self._verify([(k, pred, gold) for k, (pred, gold) in enumerate(pairs)])
            for k, pair in enumerate(pairs):
                verdict, detail = outcomes[k]
                for i in pending[pair]:
                    results[i] = GradeResult(Verdict(verdict), extracted[i], detail)
        return results  # type: ignore[return-value]  # every slot is filled above

    # -- worker pool ---------------------------------------------------------------------------

    def _verify(self, items: list[tuple[int, str, str]]) -> dict[int, tuple[str, str]]:
        """Run math-verify on ``items`` across the workers with a per-item deadline."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this Grader is closed")
            try:
                return self._run(items)
            except BaseException:
                self._reset()
                raise

    def _run(self, items: list[tuple[int, str, str]]) -> dict[int, tuple[str, str]]:
        config = self.config
        while len(self._workers) < min(config.max_workers, len(items)):
            self._workers.append(_Worker(config))
        queue = deque(items)
        outcomes: dict[int, tuple[str, str]] = {}
        while len(outcomes) < len(items):
            for index, worker in enumerate(self._workers):
                if worker.ready and not worker.items and queue:
                    share = -(-len(queue) // len(self._workers))  # spread a small batch over the workers
                    chunk = [queue.popleft() for _ in range(min(config.chunk_size, share))]
                    worker.items.extend(chunk)
                    worker.start_item(config.timeout_s)
                    try:
                        worker.send(chunk)
                    except OSError:  # it died while idle: nothing was graded, so nothing is charged
                        self._replace(index, queue, outcomes, None)
            busy = [w for w in self._workers if w.items or not w.ready]
            wait_s = max(0.0, min(w.next_check for w in busy) - time.monotonic())
            answered = set(mp_connection.wait([w.conn for w in busy], timeout=wait_s))
            for index, worker in enumerate(self._workers):
                if worker.conn in answered:
                    if self._drain(worker, outcomes):
                        continue
                    if not worker.ready:  # it cannot even start: replacing it would loop forever
                        raise RuntimeError(
                            f"a grading worker exited at start-up (code {worker.process.wait()}); "
                            "its stderr is above"
                        )
                    self._replace(index, queue, outcomes, "crashed its worker process")
                elif (worker.items or not worker.ready) and time.monotonic() >= worker.next_check:
                    if not worker.ready:
                        raise RuntimeError(
                            f"a grading worker did not start within {config.worker_start_timeout_s:g}s"
                        )
                    if worker.conn.poll():  # its answer arrived after wait() returned: not late
                        continue
                    why = worker.overran(config)
                    if why is not None:
                        self._replace(index, queue, outcomes, why)
        return outcomes

    def _drain(self, worker: _Worker, outcomes: dict[int, tuple[str, str]]) -> bool:
        """Read every message the worker has sent; False if it died."""
        try:
            while worker.conn.poll():
                message = worker.conn.recv()
                if message[0] == "ready":
                    worker.ready = True
                else:
                    item_id, verdict, detail = message
                    head = worker.items.popleft()
                    if head[0] != item_id:
                        raise RuntimeError(f"grading worker answered item {item_id}, expected {head[0]}")
                    outcomes[item_id] = (verdict, detail)
        except (EOFError, OSError):
            return False
        if worker.items:
            worker.start_item(self.config.timeout_s)
        return True

    def _replace(
        self, index: int, queue: deque, outcomes: dict[int, tuple[str, str]], why: str | None
    ) -> None:
        """Kill worker ``index`` and start a fresh one.

        With a reason, the item it was on is graded ``timeout`` (it overran or crashed the worker);
        the items it had not reached go back to the front of the queue either way.
        """
        worker = self._workers[index]
        worker.kill()
        if worker.items and why is not None:
            item_id = worker.items.popleft()[0]
            outcomes[item_id] = (Verdict.timeout.value, f"math-verify {why}; answer not graded")
        queue.extendleft(reversed(worker.items))
        worker.items.clear()
        self.restarts += 1
        self._workers[index] = _Worker(self.config)

    def _reset(self) -> None:
        """Kill every worker: after an error mid-batch their pipes may hold stale answers."""
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.kill()


# ---------------------------------------------------------------------------------------------
# Module-level entry points (one shared Grader per config)
# ---------------------------------------------------------------------------------------------

_SHARED_GRADERS: dict[GradingConfig, Grader] = {}
_SHARED_LOCK = threading.Lock()


def _shared_grader(config: GradingConfig) -> Grader:
    with _SHARED_LOCK:
        grader = _SHARED_GRADERS.get(config)
        if grader is None:
            grader = _SHARED_GRADERS[config] = Grader(config)
        return grader


@atexit.register
def _close_shared_graders() -> None:
    with _SHARED_LOCK:
        graders = list(_SHARED_GRADERS.values())
        _SHARED_GRADERS.clear()
    for grader in graders:
        grader.close()


def grade(response: str, gold: str, config: GradingConfig | None = None) -> GradeResult:
    """Grade one response against its gold answer (a shared :class:`Grader` per config)."""
    return _shared_grader(config or GradingConfig()).grade(response, gold)


def grade_batch(
    responses: Sequence[str], golds: Sequence[str], config: GradingConfig | None = None
) -> list[GradeResult]:
    """Grade many responses (the hot path); see :meth:`Grader.grade_batch`."""
    return _shared_grader(config or GradingConfig()).grade_batch(responses, golds)
