"""Generation stage: problems -> chat-template prompts -> vLLM samples.

Input: problem rows with at least :data:`INPUT_FIELDS` (every column is passed through). Output: the
input columns + :data:`OUTPUT_FIELDS` (:func:`output_schema`). Config: the pipeline's
:class:`~tokenskip.engine.EngineConfig`, :class:`~tokenskip.engine.SamplingConfig` and
:class:`~tokenskip.config.PromptConfig`, with :class:`~tokenskip.config.ResourcesConfig`'s generation
fields (:func:`map_batches_args` maps a :class:`~tokenskip.config.PipelineConfig` onto them).

A callable class for Ray Data's ``map_batches`` (one engine per actor, built once). It keeps the
problem grouping: each output row is one problem with a list of its ``n`` samples, so the grading
stage can apply a per-problem selection policy. A problem the engine cannot serve (prompt too long,
engine error, no sample returned) keeps its row with ``error``/``error_detail`` set and ``stage`` =
:data:`STAGE`; nothing is dropped.

Continuous feeding and admission. A blocking ``LLM.generate`` per batch lets the engine's running set
drain to the batch's longest sample before the next batch enters; reasoning CoT lengths are
long-tailed (R1's reach 30x the median), so the engine would spend much of each batch nearly empty,
and on a GPU (memory-bound decode: throughput grows with the running sequences) that is lost
throughput. So the stage drives vLLM v1's ``AsyncLLM`` (:func:`tokenskip.engine.create_async_llm`)
from an ``async __call__``: each prompt is its own request, Ray Data hands an actor up to
``max_concurrent_batches`` batches at once (its async-UDF support plus the actor's ``max_concurrency``,
see :meth:`GenerateStage.map_batches_options`), and :mod:`tokenskip.admission` decides which of them
enter the engine: by default the next batch, first come first served, while the engine's waiting +
running sequences are below a watermark (``queue_factor x max_num_seqs``), whatever the batches
already in it are doing, so a straggler holds its own sequence and nothing else. The engine's counts
come from its scheduler stats each step (:class:`tokenskip.engine.EngineOccupancy`). A batch's row
goes out when all of its samples are done. ``max_concurrent_batches`` caps what one actor holds:
that many batches' rows and their results, and at most watermark + one batch of sequences in the
engine. ``admission.policy: batch_slots`` is the earlier rule (a batch's slot frees only when its last
sample ends), for comparison; with ``max_concurrent_batches=1`` either rule is one batch at a time.

Memory an actor holds per in-flight problem: its input row, the rendered prompt (its text and token
ids, in the actor and the engine process) and, until its batch returns, its ``n`` samples' text and
token ids: about ``(prompt_tokens + n x output_tokens) x ~50 bytes`` in the actor's Python objects
(``benchmarks/actor_memory.py`` measures the actor's peak RSS). The KV cache is the engine's, sized by
``engine.kv_cache_memory_bytes``/``gpu_memory_utilization``, not by this.

Engine occupancy (mean running sequences / ``max_num_seqs`` over engine steps, see
:class:`tokenskip.engine.EngineOccupancy`) is measured from vLLM's scheduler stats, exported as Ray
metrics and carried on every row (``gen_engine_*`` columns) so a run report can sum it up.

Threads. ``AsyncLLM`` runs its engine core (model, KV cache, scheduler) in a child process, so the
model's torch/OpenMP work happens on that process's main thread (the reason the blocking stage
needed :mod:`tokenskip.torch_thread` does not arise); this actor only renders prompts and detokenizes,
on the event loop Ray Data keeps for async UDFs. The child inherits ``OMP_NUM_THREADS`` from the
actor, which is set before the engine starts.

Why not ``ray.data.llm``: its vLLM stage keeps only ``outputs[0]`` of each request, so ``n > 1``
samples per problem (the point of a correctness filter) are lost; it does run on CPU with
``placement_group_config={"bundles": [{"CPU": 1}]}``. This stage serves CPU and GPU alike through
:mod:`tokenskip.engine`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from tokenskip.admission import AdmissionConfig, AdmissionGate, AdmissionRule
from tokenskip.capacity import LostTasks, actor_pool_args
from tokenskip.engine import (
    EngineConfig,
    EngineDead,
    EngineOccupancy,
    SamplingConfig,
    agenerate_safe,
    create_async_llm,
)
from tokenskip.metrics import StageMetrics
from tokenskip.progress import ProgressBoard, ProgressTally
from tokenskip.progress import post as post_progress
from tokenskip.prompts import render_prompt
from tokenskip.schema import GENERATE_STAGE
from tokenskip.stages.contract import StageContract, check_fields

if TYPE_CHECKING:
    from tokenskip.config import PipelineConfig, PoolSize

__all__ = [
    "CONTRACT",
    "INPUT_FIELDS",
    "OUTPUT_FIELDS",
    "SAMPLE_STRUCT",
    "STAGE",
    "GenerateStage",
    "admission_plan",
    "engine_occupancy",
    "map_batches_args",
    "output_schema",
]

log = logging.getLogger(__name__)

STAGE = GENERATE_STAGE

SAMPLE_STRUCT = pa.struct(
    [
        pa.field("text", pa.string()),
        pa.field("tokens", pa.int64()),
        pa.field("finish_reason", pa.string()),
    ]
)

# What the stage reads; every other input column is passed through untouched.
INPUT_FIELDS = [pa.field("question", pa.string())]

# What the stage appends to each problem row.
OUTPUT_FIELDS = [
    pa.field("samples", pa.list_(SAMPLE_STRUCT)),
    pa.field("prompt_tokens", pa.int64()),
    # Set on a problem the engine could not serve (then ``samples`` is empty), else null.
    pa.field("stage", pa.string(), metadata={"doc": "the stage that made the error: generate"}),
    pa.field("error", pa.string()),
    pa.field("error_detail", pa.string()),
    pa.field("gen_seconds", pa.float64()),
    # Engine steps and running sequences summed over them, each step counted once per actor (in the
    # first batch to finish after it) and spread evenly over that batch's rows, so sums over any set
    # of rows add up: occupancy = sum(gen_engine_running_seqs) / (sum(gen_engine_steps) * max_num_seqs).
    pa.field("gen_engine_steps", pa.float64()),
    pa.field("gen_engine_running_seqs", pa.float64()),
    pa.field("gen_engine_max_num_seqs", pa.int64()),
]


# Checked for the run's whole chain at plan time (tokenskip.pipeline.stage_chain).
CONTRACT = StageContract("generate", pa.schema(INPUT_FIELDS), pa.schema(OUTPUT_FIELDS), passes_through=True)


def output_schema(input_schema: pa.Schema) -> pa.Schema:
    """The stage's output schema for a batch of ``input_schema``: the input columns, then :data:`OUTPUT_FIELDS`."""
    return pa.schema(list(input_schema) + OUTPUT_FIELDS)


def engine_occupancy(table: pa.Table) -> float | None:
    """Mean running sequences / max_num_seqs over the engine steps accounted to ``table``'s rows."""
    steps = pa.compute.sum(table.column("gen_engine_steps")).as_py() or 0.0
    running = pa.compute.sum(table.column("gen_engine_running_seqs")).as_py() or 0.0
    capacity = pa.compute.max(table.column("gen_engine_max_num_seqs")).as_py()
    return running / (steps * capacity) if steps and capacity else None


def _in_ray_actor() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001 - no Ray, no actor
        return False


class GenerateStage:
    """``map_batches`` callable: adds ``samples``/``prompt_tokens``/``stage``/``error``/``gen_engine_*`` columns."""

    def __init__(
        self,
        engine: EngineConfig,
        sampling: SamplingConfig,
        prompt: dict,
        *,
        cpus: float = 1.0,
        omp_threads: int | None = None,
        max_concurrent_batches: int = 16,
        admission: AdmissionConfig | dict | None = None,
        progress: ProgressBoard | None = None,
    ):
        if max_concurrent_batches < 1:
            raise ValueError(f"max_concurrent_batches must be >= 1, got {max_concurrent_batches}")
        # Inherited by the engine-core process (Ray sets 1 for fractional-CPU actors).
        os.environ["OMP_NUM_THREADS"] = str(omp_threads or max(1, round(cpus)))
        self.engine_config = engine  # its model resolved when the config was loaded (ModelRef)
        self.sampling = sampling
        self.prompt = prompt
        self.max_concurrent_batches = max_concurrent_batches
        self.occupancy = EngineOccupancy()
        self._generated = ProgressTally(progress, "generated")
        engine_start = time.perf_counter()
        self.llm = create_async_llm(self.engine_config, stat_loggers=[self.occupancy.stat_logger])
        # The engine reports max_num_seqs once built (vLLM picks a default per device when unset).
        self.admission = AdmissionRule(
            AdmissionConfig.model_validate(admission or {}),
            capacity=self.occupancy.max_num_seqs,
            max_batches=max_concurrent_batches,
        )
        self.gate = AdmissionGate(self.admission)
        self.occupancy.on_step = self.gate.engine_step  # on the event loop that serves the engine
        engine_seconds = time.perf_counter() - engine_start
        log.info("vLLM engine ready in %.1f s", engine_seconds)
        post_progress(progress, "engine_ready", seconds=round(engine_seconds, 1))
        self.tokenizer = self.llm.get_tokenizer()
        self.metrics = StageMetrics()
        self._accounted = self.occupancy.snapshot()  # engine steps already put on some batch's rows
        self.batches_in_flight = 0
        self.peak_batches_in_flight = 0  # how many batches were ever generating at once
        self._serving_loop: asyncio.AbstractEventLoop | None = None  # the loop that ran the batches

    @staticmethod
    def map_batches_options(
        *,
        actors: PoolSize | int,
        cpus: float,
        gpus: float,
        max_concurrent_batches: int,
        lost_tasks: LostTasks = "retry",
    ) -> dict[str, Any]:
        """``map_batches`` arguments (besides the stage and its constructor kwargs) for the generation stage.

        ``max_concurrent_calls_per_actor`` lets Ray run that many of the actor's tasks (blocks) at once;
        their batches all go to the actor's one event loop (Ray Data also runs up to 4 batches of one
        block concurrently there), where the admission rule lets them into the engine. It is what the
        actor holds: the engine_fullness rule needs it well above the batches the watermark takes,
        since batches with a straggler stay held (``AdmissionRule.recommended_max_batches``). Ray Data
        queues more tasks per actor (``max_tasks_in_flight_per_actor``), so the next batch is there.

        ``lost_tasks`` (:data:`tokenskip.capacity.LostTasks`): a standalone Ray Data pipeline keeps the
        default ``retry`` (a dead actor's batches run again once it restarts); the pipeline passes
        ``redo``, since its driver redoes dropped shards on the actors that remain.
        """
        return {
            "batch_format": "pyarrow",
            "num_cpus": cpus,
            "num_gpus": gpus,
            # A dead engine actor restarts when there is room (tokenskip.capacity).
            **actor_pool_args(actors, lost_tasks=lost_tasks, max_concurrent_calls_per_actor=max_concurrent_batches),
        }

    def render(self, question: str) -> str:
        return render_prompt(
            self.tokenizer,
            question,
            ratio=self.prompt.get("ratio"),
            delimiter=self.prompt.get("delimiter"),
            instruction=self.prompt.get("instruction"),
            system=self.prompt.get("system"),
        )

    async def __call__(self, batch: pa.Table) -> pa.Table:
        self._serving_loop = asyncio.get_running_loop()  # where the engine's sockets live (see shutdown)
        sequences = batch.num_rows * self.sampling.n
        await self.gate.enter(sequences)  # first come, first served, as the admission rule allows
        returned = [0]
        try:
            return await self._generate(batch, returned)
        finally:
            self.gate.leave(sequences - returned[0])

    async def _generate(self, batch: pa.Table, returned: list[int]) -> pa.Table:
        """Generate ``batch``'s samples; ``returned[0]`` counts the sequences of its requests back so far."""
        check_fields(batch.schema, INPUT_FIELDS, STAGE)
        started = time.perf_counter()
        prompts = []
        render_errors: dict[int, str] = {}
        for i, question in enumerate(batch.column("question").to_pylist()):
            try:
                prompts.append(self.render(question))
            except Exception as e:  # a template that rejects this input: an error row, not a crash
                render_errors[i] = f"{type(e).__name__}: {e}"
                prompts.append("")
        self.batches_in_flight += 1
        self.peak_batches_in_flight = max(self.peak_batches_in_flight, self.batches_in_flight)
        try:

            def on_result(result) -> None:
                self._posted(result)
                returned[0] += self.sampling.n
                self.gate.returned(self.sampling.n)  # its sequences are out of the engine

            results = await agenerate_safe(
                self.llm,
                prompts,
                self.sampling,
                request_prefix=uuid.uuid4().hex,
                on_result=on_result,
                request_params=self.request_params(batch),
            )
        except EngineDead:
            self._die()
            raise
        finally:
            self.batches_in_flight -= 1
        self._generated.flush()  # the batch's last counts, now rather than with the next request
        elapsed = time.perf_counter() - started
        samples, prompt_tokens, errors, details = [], [], [], []
        for i, r in enumerate(results):
            samples.append(
                [
                    {"text": g.text, "tokens": g.token_count, "finish_reason": g.finish_reason}
                    for g in r.generations
                ]
            )
            prompt_tokens.append(r.prompt_tokens)
            if i in render_errors:
                errors.append("prompt_render_error")
                details.append(render_errors[i])
            elif r.error is None and not r.generations:  # nothing to grade: the problem's n rows are errors
                errors.append("no_output")
                details.append("the engine returned no sample")
            else:
                errors.append(r.error)
                details.append(r.error_detail)
        # The engine steps since the previous batch finished are this batch's to report.
        now = self.occupancy.snapshot()
        steps, running = now[0] - self._accounted[0], now[1] - self._accounted[1]
        self._accounted = now
        rows = batch.num_rows
        tokens = sum(g.token_count for r in results for g in r.generations)
        self.metrics.record_rows(STAGE, rows)
        self.metrics.record_tokens(tokens)
        self.metrics.record_stage_seconds(STAGE, elapsed)
        self.metrics.record_engine_steps(STAGE, steps, running, self.occupancy.max_num_seqs)
        for error in errors:
            if error:
                self.metrics.record_errors(STAGE, error)
        # Wall time of the call, spread over its rows, so per-stage throughput can be reported. With
        # several batches in flight the calls overlap, so these add up to more than the wall time.
        per_row = elapsed / max(1, rows)
        columns = [
            samples,
            prompt_tokens,
            [STAGE if error else None for error in errors],
            errors,
            details,
            [per_row] * rows,
            [steps / max(1, rows)] * rows,
            [running / max(1, rows)] * rows,
            [self.occupancy.max_num_seqs] * rows,
        ]
        new = [pa.array(values, type=f.type) for f, values in zip(OUTPUT_FIELDS, columns, strict=True)]
        return pa.Table.from_arrays(batch.columns + new, schema=output_schema(batch.schema))

    def request_params(self, batch: pa.Table) -> list | None:
        """Per-problem vLLM ``SamplingParams`` for ``batch``, or None for the config's sampling for all
        (the default). A seam for benchmarks that force each request's output length."""
        return None

    def _posted(self, result) -> None:
        """One problem's samples are done: counted for the driver's live display, posted about once a
        second (see :class:`~tokenskip.progress.ProgressTally`)."""
        self._generated.add(
            problems=1, samples=len(result.generations), tokens=sum(g.token_count for g in result.generations)
        )

    def _die(self) -> None:
        """The engine core is gone. In a Ray actor, end the process so Ray restarts the actor (a new
        engine) and retries its batches; an exception would only fail this batch's task, and every
        later batch on this actor would fail the same way."""
        log.critical("vLLM engine core died; ending this generation actor so Ray restarts it")
        if _in_ray_actor():
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(1)

    def shutdown(self) -> None:
        """Stop the engine core and close the client's zmq sockets now.

        vLLM closes an async client's sockets with a callback posted to the event loop that served
        it. When that loop is idle (a caller that drove batches with ``run_until_complete`` and
        stopped), the callback would never run: the sockets stay open and, at some later garbage
        collection, the zmq context's finaliser blocks the whole process in ``term()``. So an idle
        serving loop is run until the posted close has happened."""
        self.llm.shutdown()
        loop = self._serving_loop
        if loop is not None and not loop.is_closed() and not loop.is_running():
            # Two turns: one runs the posted close, the next lets the cancelled output task finish.
            loop.run_until_complete(asyncio.sleep(0))
            loop.run_until_complete(asyncio.sleep(0))


def map_batches_args(config: PipelineConfig, progress: ProgressBoard | None = None) -> dict[str, Any]:
    """``Dataset.map_batches`` arguments that run this stage as ``config`` says; ``progress``: the
    board its actors post engine starts and each finished problem to (the driver's live display)."""
    r = config.resources
    return {
        "fn": GenerateStage,
        "fn_constructor_kwargs": {
            "engine": config.engine,
            "sampling": config.sampling,
            "prompt": config.prompt.model_dump(),
            "cpus": r.generation_cpus,
            "omp_threads": r.omp_threads,
            "max_concurrent_batches": r.generation_max_concurrent_batches,
            "admission": r.generation_admission,
            "progress": progress,
        },
        "batch_size": r.generation_batch_size,
        # Batches in flight per actor; a dead actor's batches fail at once and the driver redoes
        # their shards on the actors that remain (a lost node must not hold them).
        **GenerateStage.map_batches_options(
            actors=r.generation_actors,
            cpus=r.generation_cpus,
            gpus=r.generation_gpus,
            max_concurrent_batches=r.generation_max_concurrent_batches,
            lost_tasks="redo",
        ),
    }


def admission_plan(config: PipelineConfig) -> str:
    """The plan's line on admission: what the rule lets into each engine and what an actor holds."""
    r, engine = config.resources, config.engine
    config_rule = r.generation_admission
    if engine.max_num_seqs is None:
        return (
            f"  admission  {config_rule.policy}: watermark {config_rule.queue_factor:g} x the engine's max_num_seqs "
            f"(vLLM's default; set engine.max_num_seqs to plan it); holds <= {r.generation_max_concurrent_batches} "
            f"batches = {r.generation_max_concurrent_batches * r.generation_batch_size} problems per actor"
        )
    rule = AdmissionRule(config_rule, engine.max_num_seqs, r.generation_max_concurrent_batches)
    return "  " + rule.describe(r.generation_batch_size, config.sampling.n)
