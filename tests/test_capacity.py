"""Losing capacity never hangs a run: pool sizes (fixed or min..max), the pools' Ray Data arguments,
the one-line message naming missing resources, and a run whose minimum cannot be placed failing
within ``resources.capacity_wait_s`` (the node-loss run itself is tests/test_node_loss.py)."""

from __future__ import annotations

import time

import pytest

from tests.tiny_pipeline import tiny_pipeline_config, tiny_problems, tiny_resources, write_problems
from tokenskip.capacity import (
    CapacityUnavailable,
    PoolDemand,
    actor_pool_args,
    lost_with_an_actor,
    missing_capacity_text,
    pool_demands,
)
from tokenskip.config import PipelineConfig, PoolSize, ResourcesConfig, apply_overrides, parse_overrides
from tokenskip.exit_codes import ExitCode
from tokenskip.storage import StorageConfig


def test_pool_sizes_are_a_count_or_a_min_max_range():
    r = ResourcesConfig(generation_actors="1..4", compression_actors=2)
    assert r.generation_actors == PoolSize(min=1, max=4) and not r.generation_actors.fixed
    assert r.compression_actors == PoolSize(min=2, max=2) and r.compression_actors.fixed
    assert ResourcesConfig().generation_actors == PoolSize(min=1, max=1)
    # Dumps keep a fixed size an int (as manifests written before ranges), a range its text.
    dumped = r.model_dump(mode="json")
    assert dumped["generation_actors"] == "1..4" and dumped["compression_actors"] == 2
    assert ResourcesConfig.model_validate(dumped) == r
    # --set values are YAML: 3 is an int, 2..3 a string.
    data = apply_overrides({}, parse_overrides(["generation_actors=3", "compression_actors=2..3"]))
    parsed = ResourcesConfig.model_validate(data)
    assert parsed.generation_actors == PoolSize(min=3, max=3)
    assert parsed.compression_actors == PoolSize(min=2, max=3)


@pytest.mark.parametrize("bad", ["4..1", "0", 0, "two", "1..x", True, -1])
def test_bad_pool_sizes_are_one_line_errors(bad):
    with pytest.raises(ValueError) as info:
        ResourcesConfig(generation_actors=bad)
    assert "generation_actors" in str(info.value)


def test_changing_pool_sizes_keeps_the_run_id(tmp_path):
    data = {
        "dataset": "d",
        "sources": [{"path": str(tmp_path / "p.jsonl"), "kind": "gsm8k"}],
        "engine": {"model": "m"},
    }
    fixed = PipelineConfig.model_validate({**data, "resources": {"generation_actors": 2}})
    elastic = PipelineConfig.model_validate({**data, "resources": {"generation_actors": "1..8"}})
    assert fixed.resolved_run_id() == elastic.resolved_run_id()


def test_pools_restart_lost_actors_but_do_not_pin_their_tasks_to_them():
    import ray

    fixed = actor_pool_args(2)  # an int is a fixed size
    assert isinstance(fixed["compute"], ray.data.ActorPoolStrategy)
    assert (fixed["compute"].min_size, fixed["compute"].max_size) == (2, 2)
    assert fixed["max_restarts"] == -1 and fixed["max_task_retries"] == 0

    elastic = actor_pool_args(PoolSize(min=1, max=3), max_concurrent_calls_per_actor=4)["compute"]
    # Starts at max (engines are slow to start), may run on min.
    assert (elastic.min_size, elastic.max_size, elastic.initial_size) == (1, 3, 3)
    assert elastic.max_concurrent_calls_per_actor == 4

    # With no driver pass to redo them, a standalone pipeline keeps a dead actor's tasks for it.
    retried = actor_pool_args(1, lost_tasks="retry")
    assert retried["max_restarts"] == -1 and retried["max_task_retries"] == -1
    with pytest.raises(ValueError, match="lost_tasks"):
        actor_pool_args(1, lost_tasks="wait")


def test_generation_pool_options_retry_standalone_and_redo_in_the_pipeline():
    from tokenskip.stages.generate import GenerateStage, map_batches_args

    standalone = GenerateStage.map_batches_options(actors=1, cpus=1, gpus=0, max_concurrent_batches=2)
    assert standalone["max_task_retries"] == -1
    config = PipelineConfig.model_validate(
        {"dataset": "d", "sources": [{"path": "p.jsonl", "kind": "gsm8k"}], "engine": {"model": "m"}}
    )
    assert map_batches_args(config)["max_task_retries"] == 0


def test_only_errors_of_dead_actors_count_as_lost_work():
    from ray.exceptions import ActorDiedError, RayActorError

    assert lost_with_an_actor([ActorDiedError(), RayActorError()])
    assert not lost_with_an_actor([])  # nothing dropped is not lost work
    assert not lost_with_an_actor([ActorDiedError(), ValueError("a bug in a stage")])


def test_the_missing_capacity_line_names_the_pool_and_the_free_resources():
    demands = [PoolDemand("generation", 2, 3.0), PoolDemand("scorer", 1, 0.5), PoolDemand("grading", 1, 0.25)]
    text = missing_capacity_text(demands, [{"CPU": 4.25, "memory": 1e9}, {"CPU": 1.0}], 30)
    assert "\n" not in text
    assert "within 30 s (resources.capacity_wait_s)" in text
    assert "missing generation: 1 of its minimum 2 x {CPU: 3}" in text
    assert "scorer" not in text.split("; needed")[0]  # the scorer and grader fit beside one engine
    assert "free per node: {CPU: 4.25} | {CPU: 1}" in text
    assert "re-run resumes" in text

    gpus = missing_capacity_text([PoolDemand("generation", 1, 1.0, 1.0)], [{"CPU": 8.0}], 5)
    assert "missing generation: 1 of its minimum 1 x {CPU: 1, GPU: 1}" in gpus


def test_pool_demands_are_each_pools_minimum(tmp_path):
    config = PipelineConfig.model_validate(
        {
            "dataset": "d",
            "sources": [{"path": str(tmp_path / "p.jsonl"), "kind": "gsm8k"}],
            "engine": {"model": "m"},
            "resources": {"generation_actors": "2..4", "generation_gpus": 1, "compression_actors": "1..2"},
        }
    )
    assert [(d.name, d.actors, d.gpus) for d in pool_demands(config)] == [
        ("generation", 2, 1.0),
        ("scorer", 1, 0.0),
        ("grading", 1, 0.0),
    ]
    plain = config.model_copy(update={"compression": None})  # plain CoTs: no scorer pool
    assert [d.name for d in pool_demands(plain)] == ["generation", "grading"]


def test_the_cli_maps_missing_capacity_to_its_exit_code_and_one_line(capsys):
    import argparse

    from tokenskip import cli

    def no_capacity(args):
        raise CapacityUnavailable("the cluster cannot place the run's actor pools within 3 s")

    args = argparse.Namespace(command="run", verbose=False, func=no_capacity)
    assert cli._dispatch(args) == ExitCode.NO_CAPACITY == 7
    err = capsys.readouterr().err
    assert err.strip() == "tokenskip run: error: the cluster cannot place the run's actor pools within 3 s"


@pytest.mark.slow
def test_a_pool_whose_minimum_cannot_be_placed_fails_within_the_wait(tmp_path, tiny_solver, ray_local):
    from tokenskip.pipeline import run_pipeline

    path = write_problems(tmp_path / "problems.jsonl", tiny_problems(4))
    output = StorageConfig(root=str(tmp_path / "out"))
    # 3 CPUs per engine on a 2-CPU Ray: never placeable.
    resources = tiny_resources(generation_cpus=3, capacity_wait_s=3)
    config = tiny_pipeline_config(tiny_solver, path, output, resources=resources)
    started = time.monotonic()
    with pytest.raises(CapacityUnavailable) as info:
        run_pipeline(config, progress=False)
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert "\n" not in message
    assert "within 3 s" in message and "missing generation: 1 of its minimum 1 x {CPU: 3}" in message
    assert "free per node: {CPU: 2}" in message
    print(f"failed after {elapsed:.1f} s: {message}")
    assert elapsed < 3 + 20, elapsed  # the wait, plus planning and the input shard's commit
    # The lease is released: the run can be taken up again at once.
    locks = tmp_path / "out" / config.dataset / "_locks"
    assert not list(locks.glob("*.json"))
