"""Fault injection: the dataset pipeline loses nothing and duplicates nothing when things break.

Faults: a generation actor killed mid-run, the driver killed at stage boundaries and re-run, S3
answering 503/500 (transient, and persistently on the commit), pathological answers for the grader,
a prompt longer than the context and an engine error on one row. Every pipeline run checks that
each expected (problem, sample) key is in the output exactly once and that the counts reconcile.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.s3_fault_proxy import FaultProxy, FaultRule
from tests.tiny_pipeline import (
    DATASET,
    SOURCE,
    expected_keys,
    tiny_compression,
    tiny_pipeline_data,
    tiny_problems,
    tiny_resources,
    write_problems,
)
from tokenskip.config import PipelineConfig
from tokenskip.engine import SamplingConfig, generate_safe
from tokenskip.failpoints import ENV as FAILPOINTS_ENV
from tokenskip.grading import Grader, GradingConfig, Verdict
from tokenskip.pipeline import make_plan, run_pipeline
from tokenskip.schema import ERROR_SCHEMA, problem_id, sample_key
from tokenskip.storage import NotCommitted, RunStore, StorageConfig, read_manifest, read_table


def _config_data(model: Path, problems_path: Path, output: StorageConfig, **overrides) -> dict:
    """A pipeline config as plain data (also written as YAML for the CLI): greedy, one sample per problem."""
    return tiny_pipeline_data(
        model,
        problems_path,
        output,
        sampling={"n": 1, "temperature": 0.0, "max_tokens": 48},
        compression=tiny_compression(model, ratios=[0.9, 0.5]),
        resources=tiny_resources(generation_batch_size=4),
        **overrides,
    )


def _assert_every_key_once(output: StorageConfig, config: PipelineConfig, problems: list[dict]) -> dict:
    """Every (problem, sample) key exactly once over data + rejects + errors; counts reconcile (n = 1)."""
    tables = {kind: read_table(output, DATASET, kind) for kind in ("data", "rejects", "errors")}
    keys = [k for t in tables.values() for k in t.column("key").to_pylist()]
    assert len(keys) == len(set(keys)), "a (problem, sample) key landed twice"
    assert set(keys) == expected_keys(config, problems), "a (problem, sample) key is missing or extra"
    assert config.sampling.n == 1
    assert len(problems) == sum(t.num_rows for t in tables.values())  # input = kept + rejects + errors
    manifest = read_manifest(output, DATASET)
    assert manifest.counts["input_rows"] == len(problems)
    assert manifest.rows == {kind: t.num_rows for kind, t in tables.items()}
    return tables


# ---------------------------------------------------------------------------------------------
# Grader: pathological answers are bounded and graded `timeout` (no engine)
# ---------------------------------------------------------------------------------------------

PATHOLOGICAL = {
    "deeply nested fractions": "\\boxed{" + "\\frac{1}{" * 2000 + "2" + "}" * 2000 + "}",
    "power tower": "The final answer is \\boxed{9^{9^{9^{9}}}}",
    "huge number to a huge power": "\\boxed{" + "7" * 5000 + "^{" + "7" * 5000 + "}}",
}


@pytest.mark.slow  # waits out grading timeouts
def test_pathological_answers_finish_within_the_bound_as_timeouts():
    config = GradingConfig(timeout_s=1.0, wall_timeout_s=30.0, max_workers=2)
    responses = [*PATHOLOGICAL.values(), "\\boxed{\\frac{1}{3}}", "The answer is \\boxed{2}"]
    golds = ["1/3"] * len(PATHOLOGICAL) + ["1/3", "3"]
    box: dict = {}

    def grade():  # off the main thread, as Ray's map_batches runs it (no SIGALRM there)
        with Grader(config) as grader:
            box["results"] = grader.grade_batch(responses, golds)
            box["restarts"] = grader.restarts

    started = time.monotonic()
    thread = threading.Thread(target=grade, daemon=True)
    thread.start()
    thread.join(timeout=120)  # hang guard only
    assert not thread.is_alive(), "grading hung on a pathological answer"
    results = box["results"]
    for name, result in zip(PATHOLOGICAL, results, strict=False):
        assert result.verdict == Verdict.timeout, (name, result)
        # The CPU budget, or the wall cap when a loaded machine starves the worker: both are the bound.
        assert "more than 1s of CPU" in result.detail or "longer than 30s" in result.detail, result
    # Their neighbours are graded all the same: a timeout costs its own answer only.
    assert [r.verdict for r in results[len(PATHOLOGICAL) :]] == [Verdict.correct, Verdict.incorrect]
    assert box["restarts"] >= len(PATHOLOGICAL)  # each overrun killed its worker
    assert time.monotonic() - started < 90  # generous: a hang guard, not a timing claim


# ---------------------------------------------------------------------------------------------
# Engine error on one row (a fake LLM; no engine start)
# ---------------------------------------------------------------------------------------------


class _WordTokenizer:
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(range(len(text.split())))


class _Output:
    def __init__(self, prompt: str, n: int):
        from types import SimpleNamespace

        self.prompt_token_ids = list(range(len(prompt.split())))
        self.outputs = [
            SimpleNamespace(text=f"echo {prompt} #{i}", token_ids=[1, 2, 3], finish_reason="stop")
            for i in range(n)
        ]


class _FaultyLLM:
    """Looks like ``vllm.LLM`` to :func:`generate_safe`; ``generate`` raises whenever ``poison`` is in
    the batch (as an engine does when one request breaks a kernel or the scheduler)."""

    def __init__(self, poison: str, max_model_len: int = 64):
        from types import SimpleNamespace

        self.poison = poison
        self.calls: list[list[str]] = []
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=max_model_len))

    def get_tokenizer(self) -> _WordTokenizer:
        return _WordTokenizer()

    def generate(self, prompts, params, lora_request=None, use_tqdm=False):
        self.calls.append(list(prompts))
        if self.poison in prompts:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return [_Output(p, params.n) for p in prompts]


def test_engine_error_on_one_row_becomes_an_error_row_and_spares_the_others():
    prompts = ["what is 1 + 1", "poisoned prompt", "what is 2 + 2", "word " * 100, ""]
    llm = _FaultyLLM(poison="poisoned prompt")
    results = generate_safe(llm, prompts, SamplingConfig(n=2, temperature=1.0, max_tokens=8))

    assert len(results) == len(prompts)
    fine, poisoned, fine2, too_long, empty = results
    for r, prompt in ((fine, prompts[0]), (fine2, prompts[2])):
        assert r.error is None
        assert [g.text for g in r.generations] == [f"echo {prompt} #0", f"echo {prompt} #1"]
    assert poisoned.error == "engine_error" and poisoned.generations == []
    assert "illegal memory access" in poisoned.error_detail
    assert too_long.error == "prompt_too_long" and "max_model_len is 64" in too_long.error_detail
    assert empty.error == "empty_prompt"
    # One batch call (failed), then each servable prompt alone: the bad row is isolated.
    assert llm.calls[0] == [prompts[0], prompts[1], prompts[2]]
    assert sorted(map(tuple, llm.calls[1:])) == sorted([(prompts[0],), (prompts[1],), (prompts[2],)])


# ---------------------------------------------------------------------------------------------
# S3 faults: transient 500/503 through a proxy, then a commit that keeps failing
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_s3_faults_transient_errors_are_ridden_out_and_a_failed_commit_shows_nothing(
    tmp_path, tiny_solver, ray_local, s3_bucket
):
    endpoint, bucket = s3_bucket
    problems = tiny_problems()
    path = write_problems(tmp_path / "problems.jsonl", problems)
    direct = StorageConfig(root=f"s3://{bucket}/datasets", storage_options={"endpoint_url": endpoint})
    # An earlier committed run: LATEST points at it, and a failed commit must leave it there.
    previous = RunStore(direct, DATASET, "run-previous")
    previous.write_shard("s-prev", {"errors": ERROR_SCHEMA.empty_table()})
    previous.commit({"counts": {"input_rows": 0}})

    manifest_outage = FaultRule("PUT", path_contains="_MANIFEST.json", status=500, code="InternalError")
    transient = [
        FaultRule("PUT", every=3, status=500, code="InternalError", max_faults=12),
        FaultRule("GET", every=4, status=503, code="SlowDown", max_faults=12),
    ]
    with FaultProxy(endpoint, [manifest_outage, *transient], max_seconds=500) as proxy:
        # No botocore retries: the faults reach s3fs and tokenskip's own retry loop (what is tested).
        faulty = StorageConfig(
            root=direct.root,
            storage_options={
                "endpoint_url": proxy.endpoint_url,
                "config_kwargs": {"retries": {"max_attempts": 1}},
            },
            retries=3,
            backoff_s=0.01,
        )
        config = PipelineConfig.model_validate(_config_data(tiny_solver, path, faulty))
        run_id = config.resolved_run_id()

        with pytest.raises(OSError, match="injected by FaultProxy"):
            run_pipeline(config, progress=False)
        assert proxy.injected("PUT", "_MANIFEST.json") >= faulty.retries + 1  # more than the retries
        assert proxy.injected("PUT") > proxy.injected("PUT", "_MANIFEST.json")  # transient PUTs too
        assert proxy.injected("GET") > 0
        assert not proxy.exhausted

        # The failed commit left no visible version: LATEST unchanged, the new run unreadable.
        assert read_manifest(direct, DATASET).run_id == "run-previous"
        with pytest.raises(NotCommitted):
            read_manifest(direct, DATASET, run_id)
        with pytest.raises(NotCommitted):
            read_table(direct, DATASET, "data", run_id=run_id)
        assert read_table(direct, DATASET, "errors").num_rows == 0  # readers still see the previous run
        # ... while every shard's work is committed and waits for the next attempt.
        plan = make_plan(config)
        assert {s.shard_id for s in plan.shards} <= set(RunStore(direct, DATASET, run_id).committed_shard_ids())

        # The outage ends; throttling goes on (503 SlowDown: the report files after the commit are
        # written without tokenskip's retry loop, and s3fs itself retries SlowDown but not 500).
        # The re-run commits without generating anything.
        proxy.rules = [
            FaultRule("PUT", every=3, status=503, code="SlowDown", max_faults=6),
            FaultRule("GET", every=4, status=503, code="SlowDown", max_faults=6),
        ]
        faults_before = proxy.injected()
        report = run_pipeline(config, progress=False)
        assert report.committed is True
        assert report.attempt.problems_generated == 0
        assert report.attempt.shards_resumed == len(plan.shards)
        assert proxy.injected() > faults_before and not proxy.exhausted

    assert read_manifest(direct, DATASET).run_id == run_id  # LATEST moved only now
    _assert_every_key_once(direct, config, problems)


# ---------------------------------------------------------------------------------------------
# A generation actor killed mid-batch; a prompt longer than the context
# ---------------------------------------------------------------------------------------------

GENERATE_TASK_TITLE = "MapWorker(MapBatches(GenerateStage)).submit"  # Ray's title while a batch runs


def _own_processes_titled(title: str) -> list:
    """Descendants of this test process (our Ray's workers, never anyone else's) with ``title``."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if title in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            pass  # exited meanwhile
    return found


class _ActorKiller(threading.Thread):
    """SIGKILLs the first GenerateStage actor caught running a batch; then notes any later one."""

    def __init__(self, deadline_s: float = 500.0):
        super().__init__(daemon=True)
        self.killed_pid: int | None = None
        self.later_pids: set[int] = set()
        self.done = threading.Event()
        self.deadline = time.monotonic() + deadline_s

    def run(self) -> None:
        while not self.done.is_set() and time.monotonic() < self.deadline:
            procs = _own_processes_titled(GENERATE_TASK_TITLE)
            if self.killed_pid is None and procs:
                procs[0].kill()
                self.killed_pid = procs[0].pid
            self.later_pids |= {p.pid for p in procs if p.pid != self.killed_pid}
            time.sleep(0.05)


@pytest.mark.slow
def test_generation_actor_killed_mid_batch_and_a_too_long_prompt(tmp_path, tiny_solver, ray_local):
    problems = tiny_problems()
    # Under the source's max_question_chars (20k) but far over the engine's 256-token context.
    long_question = "What is 12 + 30? " + "Think about it carefully, step by step. " * 120
    problems.append({"id": "too-long", "question": long_question, "answer": "42"})
    path = write_problems(tmp_path / "problems.jsonl", problems)
    output = StorageConfig(root=str(tmp_path / "out"))
    data = _config_data(tiny_solver, path, output)
    data["resources"] = {**data["resources"], "generation_batch_size": 2}  # several batches to interrupt
    config = PipelineConfig.model_validate(data)

    killer = _ActorKiller()
    killer.start()
    try:
        report = run_pipeline(config, progress=False)
    finally:
        killer.done.set()
        killer.join(timeout=10)
    assert killer.killed_pid is not None, "no GenerateStage batch was caught running"
    assert report.committed is True
    assert report.attempt.problems_generated == len(problems)
    # Ray restarted the actor (max_restarts=-1); its dropped batch ran again in the driver's next pass.
    assert killer.later_pids, "no generation actor ran a batch after the kill"

    tables = _assert_every_key_once(output, config, problems)
    errors = tables["errors"].to_pylist()
    too_long_key = sample_key(problem_id(SOURCE, long_question), config.generation_hash(), 0)
    assert [(e["key"], e["error"], e["stage"]) for e in errors] == [
        (too_long_key, "prompt_too_long", "generate")
    ]
    assert "max_model_len is 256" in errors[0]["error_detail"]
    assert report.counts.errors_by_reason == {"prompt_too_long": 1}


# ---------------------------------------------------------------------------------------------
# The driver killed (SIGKILL) at stage boundaries, then re-run
# ---------------------------------------------------------------------------------------------


def test_a_failpoint_fires_once_with_its_signal(tmp_path):
    """``point=token`` SIGKILLs the first process to reach the point, ``point:SIGTERM=token`` sends
    SIGTERM instead; once the token exists, later processes go on. Other points are untouched."""
    import os
    import subprocess
    import sys

    script = "from tokenskip.failpoints import failpoint; failpoint('other'); failpoint('here'); print('on')"

    def reach(spec: str) -> subprocess.CompletedProcess:
        env = os.environ | {FAILPOINTS_ENV: spec}
        return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)

    killed = tmp_path / "killed.token"
    assert reach(f"here={killed}").returncode == -9 and killed.read_text() != ""
    assert (reach(f"here={killed}").returncode, reach(f"here={killed}").stdout) == (0, "on\n")
    terminated = tmp_path / "terminated.token"
    assert reach(f"nowhere={killed},here:SIGTERM={terminated}").returncode == -15
    assert reach(f"here:SIGTERM={terminated}").returncode == 0


# The CLI driver. A failpoint (tokenskip.failpoints) SIGKILLs it right after the input shard's
# commit or after its first generated shard's (workers write those, the driver learns of each from
# its record): an exact stage boundary, with no race against a watcher.
_CLI_DRIVER = "import sys; from tokenskip import cli; sys.exit(cli.main(sys.argv[1:]))"


def _run_cli(config_path: Path, log_path: Path, failpoint: str | None = None, timeout_s: float = 480.0) -> int:
    """Run ``tokenskip run`` as a driver process, with ``failpoint`` (``point=token-file``) set for
    it; returns its exit status (-9: it was SIGKILLed)."""
    import os
    import subprocess
    import sys

    import psutil

    # Its own local Ray (no RAY_ADDRESS), as a fresh driver on a machine would start.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", FAILPOINTS_ENV)} | {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0"
    }
    if failpoint:
        env[FAILPOINTS_ENV] = failpoint
    argv = ["run", "--config", str(config_path), "--no-progress"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CLI_DRIVER, *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    started: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while proc.poll() is None:
            assert time.monotonic() < deadline, "the driver did not finish in time"
            try:  # remember what the driver started, to reap it should it outlive the driver
                started |= {p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)}
            except psutil.Error:
                pass
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        # Ray's own processes die with their driver; anything left over of ours is killed by PID.
        _, alive = psutil.wait_procs(list(started.values()), timeout=20)
        for leftover in alive:
            try:
                leftover.kill()
            except psutil.Error:
                pass
    return proc.returncode


@pytest.mark.slow
def test_driver_killed_at_stage_boundaries_resumes_without_regenerating(tmp_path, tiny_solver):
    import yaml

    problems = tiny_problems(16)
    path = write_problems(tmp_path / "problems.jsonl", problems)
    output = StorageConfig(root=str(tmp_path / "out"))
    data = _config_data(tiny_solver, path, output)
    config = PipelineConfig.model_validate(data)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "out" / DATASET / "runs" / config.resolved_run_id()
    shards_dir = run_dir / "_shards"
    n_shards = len(make_plan(config).shards)
    assert n_shards == 4

    def problem_shards() -> set[str]:
        return {p.stem for p in shards_dir.glob("*.json")} - {"input"}

    log_path = tmp_path / "runs.log"
    # (a) killed right after the input shard is written, before any generation shard.
    assert _run_cli(config_path, log_path, f"input-shard-committed={tmp_path / 'a.token'}") == -9
    assert (shards_dir / "input.json").exists() and problem_shards() == set()
    assert not (run_dir / "_MANIFEST.json").exists()

    # (b) killed right after the first generation shard commit (the input shard is rewritten first,
    # idempotently: same content, nothing new).
    assert _run_cli(config_path, log_path, f"shard-committed={tmp_path / 'b.token'}") == -9
    committed = problem_shards()
    assert len(committed) == 1
    assert not (run_dir / "_MANIFEST.json").exists()
    with pytest.raises(NotCommitted):
        read_manifest(output, DATASET)

    # The re-run generates only the uncommitted shards' problems and commits the run.
    assert _run_cli(config_path, log_path) == 0, log_path.read_text()[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["committed"] is True
    assert report["attempt"]["shards_resumed"] == len(committed)
    assert report["attempt"]["problems_generated"] == 4 * (n_shards - len(committed))
    _assert_every_key_once(output, config, problems)
    # The killed attempts' shard parts were not rewritten with different content (markers unchanged).
    assert committed <= problem_shards()
