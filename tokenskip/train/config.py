"""Typed configuration of the SFT stage (TokenSkip mode and TL;DR re-weighting), loaded from YAML.

Defaults follow TokenSkip's LLaMA-Factory recipe for Qwen2.5-7B-Instruct: LoRA on all linear layers
with r=8, alpha=16, lr 5e-5, 3 epochs, cosine schedule with 10% warm-up, cutoff 2048 tokens,
batch 1 x 8 accumulation steps per device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tokenskip.engine import EngineConfig, SamplingConfig
from tokenskip.models import ModelRef
from tokenskip.sft import SFTMixConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataSourceConfig(_Strict):
    """Where training examples come from: a committed dataset (through its manifest) or one file."""

    path: str | None = Field(
        default=None,
        description="A single jsonl or parquet file (local path or fsspec URL such as s3://...). Handy for "
        "tests and hand-made sets; production data should come through `storage_root` + `dataset`.",
    )
    storage_root: str | None = Field(
        default=None,
        description="tokenskip.storage root (local folder or s3://bucket/prefix). The table is read through "
        "the run's manifest, so a half-written run can never be trained on.",
    )
    dataset: str | None = Field(default=None, description="Dataset name under storage_root.")
    run_id: str | None = Field(default=None, description="Committed run to read; None follows LATEST.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for storage_root/path, e.g. {'endpoint_url': 'http://127.0.0.1:9000'}.",
    )
    format: Literal["auto", "compressed", "sft", "cot"] = Field(
        default="auto",
        description="'compressed' = COMPRESSED_SCHEMA rows, turned into the TokenSkip mix by `mix`; 'sft' = "
        "rows with `messages` or instruction/input/output; 'cot' = question + full response columns (e.g. a "
        "long-CoT TL;DR domain); 'auto' decides from the columns.",
    )
    mix: SFTMixConfig = Field(
        default_factory=SFTMixConfig, description="TokenSkip ratio mix, used for 'compressed' data only."
    )
    question_field: str = Field(default="question", description="Question column for format 'cot'.")
    response_field: str = Field(default="response", description="Response (CoT) column for format 'cot'.")
    limit: int | None = Field(
        default=None, ge=1, description="Use only the first N examples (smoke runs); None = all of them."
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataSourceConfig:
        if bool(self.path) == bool(self.storage_root):
            raise ValueError("set exactly one of `path` or `storage_root` (+ `dataset`)")
        if self.storage_root and not self.dataset:
            raise ValueError("`dataset` is required with `storage_root`")
        return self


class StreamSettings(_Strict):
    """How training examples reach the workers: read and tokenized in Ray Data tasks, streamed to every
    worker in a fixed order, and grouped by length so that batches carry little padding."""

    length_grouping: bool = Field(
        default=True,
        description="Sort each window of a domain's stream by length and serve it in batch-sized chunks "
        "(the chunks in seeded order), and split each worker's step into micro-batches of similar length: "
        "padding becomes a small fraction of the tokens. False keeps the stream's seeded order.",
    )
    window_batches: int = Field(
        default=16,
        ge=1,
        description="Window of one domain's stream, in global batches, that is reordered at once (by length, "
        "or shuffled when length_grouping is off). Each worker buffers one window per domain: larger = less "
        "padding and a better shuffle, more worker memory (rows x tokens x 4 bytes).",
    )
    rows_per_task: int = Field(
        default=64,
        ge=1,
        description="Rows per Ray Data tokenize call; a block streamed to the workers holds one or two calls' "
        "rows (its size is capped at rows_per_task x cutoff_len int32 ids): small blocks keep what a worker "
        "holds small, whatever the dataset's size.",
    )
    tokenize_num_cpus: float = Field(
        default=0.25,
        gt=0,
        description="CPUs of each Ray Data tokenize task. Leave room for them beside the training workers' "
        "resources_per_worker (on a CPU-only box the workers must not take every CPU).",
    )


class LoraSettings(_Strict):
    """LoRA adapter (peft). Disabled = full fine-tune of every weight."""

    enabled: bool = Field(
        default=True, description="LoRA (small checkpoints, fits one GPU) vs full fine-tune (more capacity)."
    )
    r: int = Field(default=8, ge=1, description="Rank; higher = more capacity and memory. TokenSkip: 8.")
    alpha: int = Field(
        default=16, ge=1, description="Scaling numerator (update scale = alpha / r). TokenSkip: 16."
    )
    dropout: float = Field(
        default=0.0, ge=0, lt=1, description="Dropout on the LoRA input; LLaMA-Factory default 0."
    )
    target_modules: list[str] | str = Field(
        default="all-linear",
        description="Modules that get adapters; 'all-linear' = every linear layer but the LM head "
        "(LLaMA-Factory's lora_target: all, as TokenSkip). Fewer modules = fewer parameters.",
    )


class OptimSettings(_Strict):
    """Optimiser and schedule."""

    learning_rate: float = Field(
        default=5e-5, gt=0, description="Peak learning rate (AdamW). TokenSkip: 5e-5."
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    epochs: float = Field(
        default=3.0, gt=0, description="Passes over the data; sets the step count unless max_steps is given."
    )
    max_steps: int | None = Field(
        default=None,
        ge=1,
        description="Optimiser steps to run; overrides epochs (smoke tests, TL;DR budgets).",
    )
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="LR schedule after warm-up. TokenSkip: cosine."
    )
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1, description="Fraction of steps with linear warm-up.")
    per_device_batch_size: int = Field(
        default=1, ge=1, description="Examples per worker per micro-step; more = faster, more memory."
    )
    gradient_accumulation_steps: int = Field(
        default=8,
        ge=1,
        description="Micro-steps per optimiser step when global_batch_size is unset: the global batch is then "
        "this x per_device_batch_size x workers, so it grows with the worker count.",
    )
    global_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Sequences per optimiser step, whatever the worker count (the papers' recipes state "
        "this: TokenSkip 8, TL;DR 64). Accumulation is derived: global_batch_size / (per_device_batch_size "
        "x workers), which must divide exactly; a gradient_accumulation_steps given too must equal it.",
    )
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm.")
    gradient_checkpointing: bool | None = Field(
        default=None,
        description="Recompute activations in the backward pass: much less memory for long CoTs at ~30% "
        "more compute (LLaMA-Factory, which TokenSkip used, turns it on by default). None = on for full "
        "fine-tunes (activations at 16k tokens dominate a 7B's memory), off for LoRA.",
    )
    cutoff_len: int = Field(
        default=2048,
        ge=8,
        description="Max tokens per example (prompt + response); longer examples are "
        "truncated from the end of the response. TokenSkip: 2048.",
    )

    def accumulation_steps(self, workers: int) -> int:
        """Micro-steps per optimiser step on ``workers`` data-parallel workers: derived from
        global_batch_size when it is set (so the global batch is the same on any worker count), else
        gradient_accumulation_steps."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps
        per_step = self.per_device_batch_size * workers
        if self.global_batch_size % per_step:
            raise ValueError(
                f"optim.global_batch_size={self.global_batch_size} is not a multiple of per_device_batch_size "
                f"x workers = {self.per_device_batch_size} x {workers} = {per_step}"
            )
        return self.global_batch_size // per_step

    def gradient_checkpointing_enabled(self, lora: bool) -> bool:
        """The effective setting: the explicit one, else on for full fine-tunes only."""
        return (not lora) if self.gradient_checkpointing is None else self.gradient_checkpointing


class ScalingSettings(_Strict):
    """Ray Train workers."""

    num_workers: int = Field(default=1, ge=1, description="Data-parallel workers (one process each).")
    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="'ddp': every worker holds the whole model, gradients and optimiser state (fine for "
        "LoRA and small models). 'fsdp': PyTorch FSDP2, one shard unit per decoder layer: each worker "
        "holds 1/num_workers of them (full fine-tunes of 7B-14B). Both keep fp32 master weights and "
        "optimiser state for trained weights and compute in `dtype`.",
    )
    use_gpu: bool = Field(default=False, description="One GPU per worker (nccl); CPU workers use gloo.")
    resources_per_worker: dict[str, float] | None = Field(
        default=None, description="Ray resources per worker, e.g. {'CPU': 8, 'GPU': 1}. None = Ray's default."
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch.set_num_threads in each worker; set 1 on small CPU machines so "
        "workers do not oversubscribe cores.",
    )
    collective_timeout_s: float = Field(
        default=1800.0,
        gt=0,
        description="Timeout of the workers' torch.distributed collectives (TorchConfig.timeout_s; Ray's "
        "default 1800). A TL;DR run whose dev evaluation blocks other ranks in a collective (backend "
        "'transformers' on several workers) must set it above tldr.dev_timeout_s.",
    )


class CheckpointSettings(_Strict):
    """Where and how often the run is checkpointed (local folder or S3)."""

    storage_path: str = Field(
        description="Ray Train storage: a local folder or s3://bucket/prefix. Checkpoints (adapter, optimiser, "
        "scheduler, sampler, step, TL;DR state) land under <storage_path>/<name>/."
    )
    endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint (MinIO, moto, ...). None = AWS. Credentials come from the usual "
        "AWS environment variables.",
    )
    region: str = Field(default="us-east-1", description="S3 region for storage_path.")
    save_steps: int = Field(
        default=300,
        ge=1,
        description="Checkpoint every N optimiser steps (and at the end). Lower = less work "
        "lost on failure, more upload traffic.",
    )
    num_to_keep: int | None = Field(
        default=2,
        ge=1,
        description="Checkpoints kept (newest); None keeps all. Resume needs only the latest.",
    )
    max_failures: int = Field(
        default=3,
        ge=-1,
        description="Worker-group restarts from the latest checkpoint before giving up (-1 = unlimited).",
    )


class DomainSettings(_Strict):
    """One TL;DR data domain (e.g. short CoTs, long CoTs)."""

    name: str = Field(description="Domain name used in metrics and the weight history.")
    role: Literal["short", "long", "other"] = Field(
        description="'short' gains weight while outputs are longer than the short reference; 'long' gains "
        "weight while accuracy is below the long reference; 'other' keeps zero benefit."
    )
    source: DataSourceConfig = Field(description="Where this domain's examples come from.")
    initial_weight: float = Field(default=1.0, gt=0, description="Starting weight (normalised over domains).")


class ReferencePoint(_Strict):
    tokens: float = Field(description="Mean generated tokens on the dev set.")
    accuracy: float = Field(ge=0, le=1, description="Dev accuracy in [0, 1].")


class DevSetSettings(_Strict):
    path: str = Field(description="jsonl/parquet of dev problems (local or fsspec URL).")
    question_field: str = Field(default="question", description="Question column.")
    answer_field: str = Field(default="answer", description="Gold answer column.")
    limit: int | None = Field(
        default=None, ge=1, description="First N problems only; smaller = faster evals."
    )
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for path.")


class TLDRSettings(_Strict):
    """TL;DR dynamic re-weighting (arXiv 2506.02678) between short- and long-CoT domains."""

    domains: list[DomainSettings] = Field(min_length=2, description="Two or more domains to mix.")
    short_reference: ReferencePoint = Field(
        description="(tokens, accuracy) of the short-CoT reference model on the dev set."
    )
    long_reference: ReferencePoint = Field(
        description="(tokens, accuracy) of the long-CoT reference model on the dev set."
    )
    eval_steps: int = Field(
        default=50,
        ge=1,
        description="Re-weight every N optimiser steps; fewer = faster reaction, more dev cost.",
    )
    eta: float = Field(
        default=4.0, gt=0, description="Step size of the exponentiated-gradient weight update."
    )
    smoothing: float = Field(
        default=1e-4, ge=0, lt=1, description="c in (1-c)w + c/k: keeps every domain sampled with p >= c/k."
    )
    dev: DevSetSettings = Field(description="Dev problems the current model answers at each re-weighting.")
    backend: Literal["vllm", "transformers"] = Field(
        default="vllm",
        description="Dev generation: vLLM in its own Ray actor, outside the training workers' placement group "
        "(LoRA: the adapter per request on one engine kept for the run; full fine-tune: an engine started "
        "on the just-exported HF checkpoint at each evaluation), or transformers generate on rank 0 (slow, "
        "greedy; small CPU runs).",
    )
    engine: EngineConfig | None = Field(
        default=None,
        description="vLLM engine for backend 'vllm' (model is filled in from the run; enable_lora is forced). "
        "Sharing a GPU with training needs kv_cache_memory_bytes / a low gpu_memory_utilization.",
    )
    engine_resources: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1.0},
        description="Ray resources of the vLLM dev-engine actor (its own process: vLLM cannot start inside a "
        "training worker whose torch.distributed group is live). On GPUs e.g. {'GPU': 1} for a spare GPU, "
        "or fractions shared with the training workers' resources_per_worker.",
    )
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.7, max_tokens=16384),
        description="Dev sampling. Default: TL;DR's (temperature 0.7, up to 16,384 tokens), so R1-length "
        "answers (about 7.4k tokens on average) are not cut off, which would change the pool the "
        "re-weighting favours. Backend 'transformers' always decodes greedily.",
    )
    dev_timeout_s: float = Field(
        default=4 * 3600.0,
        gt=0,
        description="Budget of one dev evaluation (export, engine start, generation, grading). With backend "
        "'vllm' every rank waits for the dev actor's result with ray.get under this timeout, no collective "
        "open; with 'transformers' the other ranks wait in a collective, so scaling.collective_timeout_s "
        "must exceed it (checked when the config is loaded).",
    )
    last_number_fallback: bool = Field(
        default=True, description="Grade with the last-number fallback (TokenSkip-compatible evaluation)."
    )


class FailureInjection(_Strict):
    """Testing only: crash once to exercise resume. Never set in production configs."""

    at_step: int = Field(ge=1, description="Raise on rank 0 right after finishing this optimiser step.")
    marker_path: str = Field(description="Local file created before raising, so the crash happens only once.")


class TrainConfig(_Strict):
    """One fine-tuning run (``tokenskip train --config train.yaml``)."""

    name: str = Field(
        default="tokenskip-sft", description="Run name: the folder under checkpoint.storage_path."
    )
    model: ModelRef = Field(description="HF id or local folder of the base causal LM.")
    tokenizer: ModelRef | None = Field(default=None, description="Tokenizer if it differs from the model.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="bfloat16",
        description="Compute dtype of the forward/backward: bfloat16 on GPUs (TokenSkip, TL;DR: bf16); float32 "
        "on CPU. Trained weights and their AdamW state stay fp32 (master weights); only a LoRA base under "
        "ddp is stored in this dtype.",
    )
    mode: Literal["tokenskip", "tldr"] = Field(
        default="tokenskip", description="'tokenskip' trains on one data source; 'tldr' re-weights domains."
    )
    data: DataSourceConfig | None = Field(default=None, description="Training data for mode 'tokenskip'.")
    tldr: TLDRSettings | None = Field(default=None, description="Domains, references and dev set for 'tldr'.")
    stream: StreamSettings = Field(
        default_factory=StreamSettings, description="How training data is tokenized and streamed to workers."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA or full fine-tune.")
    optim: OptimSettings = Field(default_factory=OptimSettings, description="Optimiser and schedule.")
    scaling: ScalingSettings = Field(default_factory=ScalingSettings, description="Ray Train workers.")
    checkpoint: CheckpointSettings = Field(description="Checkpoint storage and cadence.")
    system: str | None = Field(
        default=None, description="System message for examples that carry none (keeps chat templates honest)."
    )
    seed: int = Field(default=42, description="Seed of data order, domain sampling and model init (LoRA).")
    log_every: int = Field(default=1, ge=1, description="Report metrics every N optimiser steps.")
    failure_injection: FailureInjection | None = Field(
        default=None, description="Testing only: crash once at a step to exercise resume."
    )

    @model_validator(mode="after")
    def _global_batch(self) -> TrainConfig:
        """With global_batch_size set, gradient_accumulation_steps becomes the derived value for
        scaling.num_workers (a dumped and re-read config stays valid; code that reads the field gets
        the right number); an explicit, different value is an error rather than silently ignored."""
        optim = self.optim
        if optim.global_batch_size is not None:
            derived = optim.accumulation_steps(self.scaling.num_workers)  # a clear error now, not in workers
            explicit = "gradient_accumulation_steps" in optim.model_fields_set
            if explicit and optim.gradient_accumulation_steps != derived:
                raise ValueError(
                    f"optim.gradient_accumulation_steps={optim.gradient_accumulation_steps} contradicts "
                    f"optim.global_batch_size={optim.global_batch_size} ({derived} on "
                    f"{self.scaling.num_workers} workers); set only global_batch_size"
                )
            optim.gradient_accumulation_steps = derived
        return self

    @model_validator(mode="after")
    def _mode_inputs(self) -> TrainConfig:
        if self.mode == "tokenskip" and self.data is None:
            raise ValueError("mode 'tokenskip' needs `data`")
        if self.mode == "tldr":
            if self.tldr is None:
                raise ValueError("mode 'tldr' needs `tldr`")
            names = [d.name for d in self.tldr.domains]
            if len(set(names)) != len(names):
                raise ValueError(f"domain names must be unique: {names}")
            if self.scaling.strategy == "fsdp" and self.tldr.backend == "transformers":
                # Rank 0 alone cannot run a forward pass of a model whose layers are sharded over all ranks.
                raise ValueError(
                    "TL;DR backend 'transformers' cannot evaluate an fsdp-sharded model; use 'vllm'"
                )
            self._check_dev_budget()
        return self

    def _check_dev_budget(self) -> None:
        """No rank may wait in a collective whose timeout the dev evaluation can exceed, and the dev
        engine must fit the answers it is asked for."""
        tldr = self.tldr
        if (
            tldr.backend == "transformers"
            and self.scaling.num_workers > 1
            and self.scaling.collective_timeout_s <= tldr.dev_timeout_s
        ):
            raise ValueError(
                f"TL;DR backend 'transformers' generates on rank 0 while the other ranks wait in a "
                f"collective: scaling.collective_timeout_s ({self.scaling.collective_timeout_s:g}) must "
                f"exceed tldr.dev_timeout_s ({tldr.dev_timeout_s:g}), or use backend 'vllm'"
            )
        max_len = tldr.engine.max_model_len if tldr.engine else None
        if tldr.backend == "vllm" and max_len is not None and max_len <= tldr.sampling.max_tokens:
            raise ValueError(
                f"tldr.engine.max_model_len ({max_len}) leaves no room for a prompt and "
                f"tldr.sampling.max_tokens ({tldr.sampling.max_tokens}) generated tokens"
            )


def load_train_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read and validate a YAML training config (unknown keys are an error, not silently ignored);
    ``overrides`` maps dotted keys to values (``--set``)."""
    from tokenskip.config import load_config

    return load_config(TrainConfig, path, overrides)
