"""Model loading, wrapping (DDP or FSDP2), precision and the optimiser of a training worker.

Two strategies (``scaling.strategy``):

* ``ddp``: every rank holds the whole model, its gradients and the optimiser state; gradients are
  all-reduced (Ray Train's ``prepare_model``).
* ``fsdp``: PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``), one FSDP unit per decoder layer
  then the root: every rank holds 1/world of the parameters, gradients and optimiser state, and
  gathers one layer's parameters at a time for its forward and backward.

Precision: a full fine-tune keeps fp32 master weights and fp32 AdamW state under both strategies
(bf16 AdamW at lr 1e-5 rounds small updates away); the forward/backward computes in ``dtype``
(FSDP2's ``MixedPrecisionPolicy`` under fsdp, ``torch.autocast`` under ddp). LoRA under ddp keeps
the frozen base in ``dtype`` (peft keeps the adapters in fp32); under fsdp the base is fp32 too and
sharded, and computes in ``dtype``.

The fsdp path needs no Ray (``benchmarks/gpu_train.py`` runs it with plain torch.distributed), so
this module takes plain values, not the pydantic config, at its seams.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

    from tokenskip.train.config import TrainConfig

Strategy = Literal["ddp", "fsdp"]


@dataclass(frozen=True)
class Precision:
    """Storage dtype of the weights (master copy) and dtype of the forward/backward maths."""

    master: str  # "float32" for every trainable weight of a full fine-tune
    compute: str


def precision_for(strategy: Strategy, dtype: str, lora: bool) -> Precision:
    """fp32 masters wherever weights train; a LoRA base under ddp stays in ``dtype`` (it never updates,
    and unsharded it is the largest thing a rank holds)."""
    if lora and strategy == "ddp":
        return Precision(master=dtype, compute=dtype)
    return Precision(master="float32", compute=dtype)


def load_model(config: TrainConfig):
    """The base model (weights in the strategy's master dtype), gradient checkpointing per the config,
    and the LoRA adapters when ``lora.enabled``. Not yet wrapped for distribution."""
    import torch
    from transformers import AutoModelForCausalLM

    precision = precision_for(config.scaling.strategy, config.dtype, config.lora.enabled)
    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=getattr(torch, precision.master))
    if config.optim.gradient_checkpointing_enabled(config.lora.enabled):
        # Non-reentrant checkpointing works with DDP, FSDP2 and frozen (LoRA) base weights.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if config.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=config.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model


def decoder_layers(model) -> list:
    """The modules FSDP shards one by one: those of the classes the model declares unsplittable
    (``_no_split_modules``, e.g. ``Qwen2DecoderLayer``; accelerate's rule for the same job)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(base).__name__} declares no decoder-layer class (_no_split_modules)")
    return layers


@dataclass
class ShardedModel:
    """The model as the training step uses it.

    ``model`` runs forward/backward (the DDP wrapper, or the FSDP-sharded module itself); ``bare`` is
    the Hugging Face / peft module under it, for state dicts and ``save_pretrained``.
    """

    model: Any
    bare: Any
    strategy: Strategy
    precision: Precision
    device: Any

    def parameters(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def micro_step(self, sync_gradients: bool) -> Iterator[None]:
        """One micro-batch's forward+backward: gradients are reduced across ranks only when
        ``sync_gradients`` (the last micro-step of an optimiser step); before that they accumulate
        locally. Under ddp with a non-fp32 compute dtype the maths runs under ``torch.autocast``."""
        import torch

        if self.strategy == "fsdp":
            self.model.set_requires_gradient_sync(sync_gradients)
            sync = contextlib.nullcontext()
        elif sync_gradients or not hasattr(self.model, "no_sync"):
            sync = contextlib.nullcontext()
        else:
            sync = self.model.no_sync()
        autocast = contextlib.nullcontext()
        if self.strategy == "ddp" and self.precision.compute != self.precision.master:
            autocast = torch.autocast(self.device.type, dtype=getattr(torch, self.precision.compute))
        with sync, autocast:
            yield


def shard_model(model, strategy: Strategy, precision: Precision, device) -> ShardedModel:
    """Wrap ``model`` for data-parallel training on the live process group.

    ddp goes through Ray Train's ``prepare_model`` (a Ray Train worker only); fsdp needs only an
    initialised ``torch.distributed`` group (any launcher)."""
    if strategy == "ddp":
        import ray.train.torch

        wrapped = ray.train.torch.prepare_model(model)
        bare = wrapped.module if hasattr(wrapped, "module") else wrapped
        return ShardedModel(wrapped, bare, strategy, precision, device)

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy()
    if precision.compute != precision.master:
        # Gather and compute in bf16; reduce gradients in fp32 into the fp32 sharded masters.
        policy = MixedPrecisionPolicy(
            param_dtype=getattr(torch, precision.compute), reduce_dtype=torch.float32
        )
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # The root unit holds what is left: embeddings, final norm, LM head (tied weights stay one).
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return ShardedModel(model, model, strategy, precision, device)


def build_optimizer(sharded: ShardedModel, learning_rate: float, weight_decay: float):
    """AdamW over the trainable parameters (each rank's shards under fsdp): its state is created in
    the parameters' dtype, fp32 wherever weights train."""
    import torch

    return torch.optim.AdamW(sharded.parameters(), lr=learning_rate, weight_decay=weight_decay)


def _local(tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank holds (the local shard of a DTensor)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _nbytes(tensor) -> int:
    local = _local(tensor)
    return local.numel() * local.element_size()


@dataclass(frozen=True)
class StateBytes:
    """Bytes of training state one rank holds, counted from its tensors (local shards under fsdp)."""

    parameters: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer


def state_bytes(sharded: ShardedModel, optimizer) -> StateBytes:
    """Measured, not estimated: every parameter (frozen ones too), every gradient present, every
    tensor in the optimiser's state. Call between backward and ``zero_grad`` to see gradients."""
    params = list(sharded.model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    optim = [v for s in optimizer.state.values() for v in s.values() if hasattr(v, "element_size")]
    return StateBytes(
        parameters=sum(_nbytes(p) for p in params),
        gradients=sum(_nbytes(g) for g in grads),
        optimizer=sum(_nbytes(v) for v in optim),
    )
