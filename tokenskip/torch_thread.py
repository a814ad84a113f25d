"""One OS thread for all of a stage's torch work (model load and every call).

Ray Data runs a callable class's ``__init__`` on the actor's thread and each ``__call__`` on a
worker thread of its own. Torch work on both leaves two OpenMP thread teams alive in one process;
once OpenMP manages more threads than there are cores, libgomp stops spinning between parallel
regions and every one of vLLM's many small decode kernels pays a futex wake-up. Measured on 2 cores
with SmolLM2-135M: generation from a second thread ran at ~75-85% of the tokens/s of the thread
that built the engine, and CPU use fell from ~200% to ~160%. Doing everything on one dedicated
thread avoids the second team whoever calls the stage.

OpenMP's thread count is also per thread (a new thread starts from ``OMP_NUM_THREADS``, which Ray
sets to 1 for fractional-CPU actors), so the dedicated thread sets it before any torch work.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def set_threads(threads: int | None, cpus: float) -> int:
    """Torch/OpenMP threads of the calling thread: ``threads``, else ``max(1, round(cpus))``.

    Ray sets OMP_NUM_THREADS to an actor's CPU count (1 for fractional actors); be explicit.
    """
    n = threads or max(1, round(cpus))
    os.environ["OMP_NUM_THREADS"] = str(n)
    import torch

    # torch's own function, not the ``torch.set_num_threads`` attribute: once a vLLM CPU engine has
    # started anywhere in the process, vLLM replaces that attribute with a no-op (it pins its own
    # threads), which would silently leave this thread at the previous count.
    torch._C.set_num_threads(n)
    return n


class TorchThread:
    """Runs callables one at a time on a single thread that owns the stage's torch state."""

    def __init__(self, threads: int | None, cpus: float, name: str = "torch"):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.threads = self.run(set_threads, threads, cpus)

    def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """``fn(*args, **kwargs)`` on the thread; its exception is raised here."""
        return self._pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
