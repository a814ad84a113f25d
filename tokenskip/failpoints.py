"""Named points where a process can be made to die, to prove that recovery works.

Off unless ``TOKENSKIP_FAILPOINTS`` is set (one environment lookup per point passed), so production
runs never reach them. The value is ``point[:SIGNAL]=token-file[,...]``: the first process that
reaches ``point`` and manages to create ``token-file`` sends itself the signal (SIGKILL unless the
point names another, e.g. ``shard-committed:SIGTERM=...`` for a graceful stop); every later one goes
on. Fault tests set it for Ray workers only (``runtime_env={"env_vars": ...}``), to kill a worker at
an exact step, e.g. after a shard's parts are written and before its commit marker, or for a driver
process, to stop it at a stage boundary.

The points (``failpoint(name)`` calls): ``shard-parts-written`` in :mod:`tokenskip.storage.runs`;
``input-shard-committed`` and ``shard-committed`` in the driver (:mod:`tokenskip.pipeline`), after
the input shard and after each generated shard is committed.

Delay points (:func:`delay`) are their slow sibling: off unless ``TOKENSKIP_DELAYS`` is set, as
``point=seconds[,point=seconds...]``; every process that reaches ``point`` sleeps that long. A test
makes a step provably longer than a timeout that way, whatever the machine's speed, instead of
asserting on how long the step happened to take.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "TOKENSKIP_FAILPOINTS"
DELAY_ENV = "TOKENSKIP_DELAYS"


def failpoint(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        point, _, token = item.partition("=")
        point, _, signal_name = point.strip().partition(":")
        if point != name or not token:
            continue
        signum = signal.Signals[signal_name or "SIGKILL"]  # a misspelt name fails loudly, in the test
        try:
            fd = os.open(token, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return  # fired already: recovery must now succeed
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        os.kill(os.getpid(), signum)
        return


def delay(name: str) -> float:
    """Sleep at point ``name`` for the seconds ``TOKENSKIP_DELAYS`` gives it; returns them (0 = off)."""
    spec = os.environ.get(DELAY_ENV)
    if not spec:
        return 0.0
    for item in spec.split(","):
        point, _, seconds = item.partition("=")
        if point.strip() == name and seconds.strip():
            value = float(seconds)
            time.sleep(value)
            return value
    return 0.0
