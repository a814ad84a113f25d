import threading

import pytest

from tokenskip.torch_thread import TorchThread


def test_every_call_runs_on_one_thread_with_its_own_torch_threads():
    import torch

    caller_threads = torch.get_num_threads()
    worker = TorchThread(threads=2 if caller_threads != 2 else 1, cpus=0.5, name="probe")
    try:
        idents = {worker.run(threading.get_ident) for _ in range(5)}
        assert len(idents) == 1 and threading.get_ident() not in idents
        assert worker.run(torch.get_num_threads) == worker.threads != caller_threads
        assert worker.run(lambda a, b=0: a + b, 2, b=3) == 5
    finally:
        worker.close()


def test_threads_default_to_the_rounded_cpu_share():
    worker = TorchThread(threads=None, cpus=0.25)
    try:
        assert worker.threads == 1
    finally:
        worker.close()


def test_an_exception_reaches_the_caller_and_the_thread_survives():
    worker = TorchThread(threads=1, cpus=1)
    try:
        with pytest.raises(ZeroDivisionError):
            worker.run(lambda: 1 / 0)
        assert worker.run(lambda: "still here") == "still here"
    finally:
        worker.close()


def test_thread_count_is_set_even_after_vllm_disabled_torch_set_num_threads(monkeypatch):
    # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process.
    import torch

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    wanted = 2 if torch.get_num_threads() != 2 else 1
    worker = TorchThread(threads=wanted, cpus=1)
    try:
        assert worker.run(torch.get_num_threads) == wanted
    finally:
        worker.close()
