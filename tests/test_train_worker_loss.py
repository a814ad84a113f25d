"""Training survives a lost worker: one of two Ray Train workers is SIGKILLed (by PID, from outside)
after its second checkpoint; the worker group restarts from the latest checkpoint (``checkpoint.max_failures``)
and the run ends with the same final loss as an uninterrupted run of the same config."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.test_train import _compressed_rows
from tokenskip.schema import COMPRESSED_SCHEMA, to_table
from tokenskip.storage import RunStore, StorageConfig
from tokenskip.train.config import TrainConfig

pytestmark = pytest.mark.slow
TRAIN_WORKER_TITLE = "RayTrainWorker"  # in the process title of a Ray Train worker actor
# Both runs do the same arithmetic in the same order (seeded sampler, restored weights, optimizer,
# scheduler and sampler position, gloo's fixed reduction order on CPU), so the losses should agree
# to float32 rounding; the tolerance only allows for that.
LOSS_TOLERANCE = 1e-5


@pytest.fixture()
def ray_two_cpus():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _config(tmp_path: Path, model: Path, name: str) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "name": name,
            "model": str(model),
            "dtype": "float32",
            "data": {"storage_root": str(tmp_path / "datasets"), "dataset": "toy"},
            "lora": {"enabled": False},
            "optim": {
                "learning_rate": 5e-3,
                "max_steps": 12,
                "scheduler": "constant",
                "per_device_batch_size": 2,
                "gradient_accumulation_steps": 1,
                "warmup_ratio": 0.0,
            },
            "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 0.5}, "torch_threads": 1},
            "checkpoint": {"storage_path": str(tmp_path / "checkpoints"), "save_steps": 3, "max_failures": 1},
        }
    )


class _WorkerKiller(threading.Thread):
    """SIGKILLs one Ray Train worker of this test's Ray once the run has checkpointed."""

    def __init__(self, run_dir: Path):
        super().__init__(daemon=True)
        self.run_dir = run_dir
        self.killed: int | None = None
        self.done = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 600
        while not self.done.is_set() and time.monotonic() < deadline:
            # Two checkpoints on disk: the first is surely registered with Ray Train by now (a
            # checkpoint's files land before Ray Train records it as the one to restart from).
            if len(list(self.run_dir.glob("checkpoint_*/trainer_state.json"))) >= 2:
                workers = [
                    p for p in psutil.Process().children(recursive=True) if _titled(p, TRAIN_WORKER_TITLE)
                ]
                if workers:
                    workers[-1].kill()  # SIGKILL by PID
                    self.killed = workers[-1].pid
                    return
            time.sleep(0.02)


def _titled(process: psutil.Process, title: str) -> bool:
    try:
        return title in " ".join(process.cmdline())
    except psutil.Error:
        return False  # exited meanwhile


def _final_state(result) -> dict:
    return json.loads((Path(result.checkpoint_path) / "trainer_state.json").read_text())


def test_a_killed_training_worker_restarts_from_the_checkpoint_with_the_same_final_loss(
    tmp_path, tiny_causal_lm, ray_two_cpus
):
    from tokenskip.train.job import run_training

    store = RunStore(StorageConfig(root=str(tmp_path / "datasets")), "toy", "run-1")
    store.write_shard("0", {"data": to_table(_compressed_rows(8), COMPRESSED_SCHEMA)})
    store.commit({"config": {}})

    uninterrupted = run_training(_config(tmp_path, tiny_causal_lm, "whole"))
    assert uninterrupted.error is None

    killer = _WorkerKiller(tmp_path / "checkpoints" / "killed")
    killer.start()
    try:
        interrupted = run_training(_config(tmp_path, tiny_causal_lm, "killed"))
    finally:
        killer.done.set()
        killer.join(timeout=10)
    assert killer.killed is not None, "no training worker was killed"
    assert interrupted.error is None

    whole, killed = _final_state(uninterrupted), _final_state(interrupted)
    assert [a["start_step"] for a in whole["attempts"]] == [0]
    starts = [a["start_step"] for a in killed["attempts"]]
    # The group restarted once, from a checkpoint (steps 3, 6 or 9), not from step 0.
    assert len(starts) == 2 and starts[0] == 0 and starts[1] in (3, 6, 9), starts
    assert killed["step"] == whole["step"] == 12
    whole_losses, killed_losses = dict(whole["loss_history"]), dict(killed["loss_history"])
    print(
        f"final loss uninterrupted {whole_losses[12]:.8f}, worker killed {killed_losses[12]:.8f}; restarts {starts}"
    )
    for step in range(1, 13):
        assert killed_losses[step] == pytest.approx(
            whole_losses[step], rel=LOSS_TOLERANCE, abs=LOSS_TOLERANCE
        ), step
