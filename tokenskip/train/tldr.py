"""TL;DR dynamic re-weighting (arXiv 2506.02678) of short- and long-CoT training domains.

Every ``eval_steps`` the current model answers a dev set; its accuracy and mean output tokens are
compared with two reference points (a short-CoT and a long-CoT model):

* short benefit = max((tokens - ref_short_tokens) / |ref_long_tokens - ref_short_tokens|, 0):
  outputs still longer than the short reference -> more short-CoT data (compress harder);
* long benefit = max((ref_long_acc - acc) / |ref_long_acc - ref_short_acc|, 0):
  accuracy below the long reference -> more long-CoT data (recover accuracy).

The weights then follow an exponentiated-gradient step, ``softmax(log w + eta * benefit)``, mixed
with the uniform distribution, ``(1 - c) w + c / k``, so no domain is ever starved. A seeded sampler
draws each global batch's domains from the current weights.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tokenskip.train.config import TLDRSettings


def update_domain_weights(
    weights: list[float], benefits: list[float], eta: float = 4.0, c: float = 1e-4
) -> list[float]:
    """One TL;DR update: ``w' = softmax(log w + eta * b)``, then ``(1 - c) w' + c / k``.

    ``weights`` need not be normalised (log of the unnormalised weight only shifts every logit
    equally); every weight must be > 0.
    """
    if len(weights) != len(benefits) or not weights:
        raise ValueError(f"{len(weights)} weights vs {len(benefits)} benefits")
    if any(w <= 0 for w in weights):
        raise ValueError(f"weights must be positive: {weights}")
    logits = [math.log(w) + eta * b for w, b in zip(weights, benefits, strict=True)]
    top = max(logits)  # subtract the max so exp never overflows
    exps = [math.exp(z - top) for z in logits]
    total = sum(exps)
    k = len(weights)
    return [(1.0 - c) * e / total + c / k for e in exps]


@dataclass(frozen=True)
class Reference:
    """Dev-set (mean tokens, accuracy) of the short-CoT and long-CoT reference models."""

    short_tokens: float
    short_accuracy: float
    long_tokens: float
    long_accuracy: float

    def __post_init__(self) -> None:
        if self.long_tokens == self.short_tokens:
            raise ValueError("short and long reference token counts must differ (they normalise the benefit)")
        if self.long_accuracy == self.short_accuracy:
            raise ValueError("short and long reference accuracies must differ (they normalise the benefit)")

    @classmethod
    def from_settings(cls, settings: TLDRSettings) -> Reference:
        return cls(
            short_tokens=settings.short_reference.tokens,
            short_accuracy=settings.short_reference.accuracy,
            long_tokens=settings.long_reference.tokens,
            long_accuracy=settings.long_reference.accuracy,
        )


def domain_benefits(acc: float, tokens: float, ref: Reference) -> dict[str, float]:
    """Benefit of adding short- and long-CoT data, given the current dev accuracy and mean tokens."""
    short = max((tokens - ref.short_tokens) / abs(ref.long_tokens - ref.short_tokens), 0.0)
    long = max((ref.long_accuracy - acc) / abs(ref.long_accuracy - ref.short_accuracy), 0.0)
    return {"short": short, "long": long}


def benefits_by_domain(roles: list[str], role_benefits: dict[str, float]) -> list[float]:
    """Per-domain benefit in domain order: a domain gets its role's benefit ('other' gets 0)."""
    return [role_benefits.get(role, 0.0) for role in roles]


def normalise(weights: list[float]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights]


class WeightedDomainSampler:
    """Seeded sampler of (domain, example) pairs that follows the current domain weights.

    Step s draws its global batch from ``numpy.random.default_rng([seed, s])``: a domain per slot
    from the weights, then an example of that domain uniformly (with replacement: domains differ
    in size and the weights, not the sizes, set the mix). The batch is a pure function of
    (seed, step, weights), so resume needs only the step and the restored weights.
    """

    def __init__(self, domain_sizes: list[int], global_batch: int, seed: int):
        if not domain_sizes or any(n <= 0 for n in domain_sizes):
            raise ValueError(f"every domain needs examples: sizes {domain_sizes}")
        self.domain_sizes, self.global_batch, self.seed = list(domain_sizes), global_batch, seed

    def domains_at(self, step: int, weights: list[float]) -> list[int]:
        """The domain of each slot of step ``step``'s global batch: the draw :meth:`global_batch_at`
        makes first, from ``default_rng([seed, step])``. The streamed loop takes each slot's example
        from that domain's stream (:class:`tokenskip.train.data.DomainStream`) instead of by index."""
        rng = np.random.default_rng([self.seed, step])
        domains = rng.choice(len(self.domain_sizes), size=self.global_batch, p=np.asarray(normalise(weights)))
        return [int(d) for d in domains]

    def global_batch_at(self, step: int, weights: list[float]) -> list[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, step])
        domains = rng.choice(len(self.domain_sizes), size=self.global_batch, p=np.asarray(normalise(weights)))
        return [(int(d), int(rng.integers(self.domain_sizes[d]))) for d in domains]

    def state(self, step: int, weights: list[float]) -> dict[str, Any]:
        return {"kind": "weighted", "seed": self.seed, "step": step, "weights": list(weights)}


@dataclass
class TLDRState:
    """Current domain weights and the history of every re-weighting; saved with each checkpoint."""

    names: list[str]
    weights: list[float]
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def initial(cls, settings: TLDRSettings) -> TLDRState:
        names = [d.name for d in settings.domains]
        weights = normalise([d.initial_weight for d in settings.domains])
        return cls(names, weights, [{"step": 0, "weights": dict(zip(names, weights, strict=True))}])

    def to_dict(self) -> dict[str, Any]:
        return {"names": self.names, "weights": self.weights, "history": self.history}

    def weights_at(self, step: int) -> list[float]:
        """The weights step ``step`` (0-based) drew its batch with: those of the last re-weighting at or
        before it. With the seed this fixes every past batch, so a resume recomputes how far each
        domain's stream has gone from this history instead of saving it."""
        entry = [h for h in self.history if h["step"] <= step][-1]
        return [float(entry["weights"][name]) for name in self.names]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TLDRState:
        return cls(list(raw["names"]), [float(w) for w in raw["weights"]], list(raw["history"]))

    def reweight(
        self, step: int, accuracy: float, mean_tokens: float, settings: TLDRSettings
    ) -> dict[str, Any]:
        """Apply one update from dev metrics; returns the history entry it appended."""
        role_benefits = domain_benefits(accuracy, mean_tokens, Reference.from_settings(settings))
        roles = [d.role for d in settings.domains]
        benefits = benefits_by_domain(roles, role_benefits)
        self.weights = update_domain_weights(self.weights, benefits, eta=settings.eta, c=settings.smoothing)
        entry = {
            "step": step,
            "accuracy": accuracy,
            "mean_tokens": mean_tokens,
            "benefits": dict(zip(self.names, benefits, strict=True)),
            "weights": dict(zip(self.names, self.weights, strict=True)),
        }
        self.history.append(entry)
        return entry


@dataclass
class DevMetrics:
    accuracy: float
    mean_tokens: float
    count: int
    backend: str
    responses: list[str] = field(default_factory=list, repr=False)
    seconds: float = 0.0  # generation and grading time


def load_dev_set(settings: TLDRSettings) -> tuple[list[str], list[str]]:
    """(questions, gold answers) of the dev set."""
    from tokenskip.train.data import read_table_file

    table = read_table_file(settings.dev.path, settings.dev.storage_options)
    if settings.dev.limit is not None:
        table = table.slice(0, settings.dev.limit)
    for column in (settings.dev.question_field, settings.dev.answer_field):
        if column not in table.column_names:
            raise ValueError(f"dev set {settings.dev.path} has no column {column!r}")
    questions = [str(q) for q in table.column(settings.dev.question_field).to_pylist()]
    answers = [str(a) for a in table.column(settings.dev.answer_field).to_pylist()]
    if not questions:
        raise ValueError(f"dev set {settings.dev.path} is empty")
    return questions, answers


def _generate_transformers(model: Any, tokenizer: Any, prompts_: list[str], max_tokens: int, batch: int = 8):
    """Greedy generation with transformers: (texts, generated token counts incl. the stop token)."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models generate after the last real token
    texts, counts = [], []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts_), batch):
            enc = tokenizer(
                prompts_[start : start + batch], return_tensors="pt", padding=True, add_special_tokens=False
            )
            enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            for row in out[:, enc["input_ids"].shape[1] :].tolist():
                n = len(row)
                if tokenizer.eos_token_id in row:
                    n = row.index(tokenizer.eos_token_id) + 1
                counts.append(n)
                texts.append(tokenizer.decode(row[:n], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        if was_training:
            model.train()
    return texts, counts


def save_dev_checkpoint(model: Any, tokenizer: Any, out_dir: str) -> None:
    """Write a full fine-tune's current weights as a Hugging Face folder (config, safetensors,
    tokenizer) that the dev engine loads. A collective every rank calls: the sharded export
    (:func:`tokenskip.train.export.save_hf_model`) gathers the weights to rank 0, which writes them,
    so ddp and fsdp runs hand the dev engine the same kind of folder."""
    from tokenskip.train.export import save_hf_model

    save_hf_model(model, tokenizer, out_dir)


def _grade(texts: list[str], counts: list[int], golds: list[str], backend: str, fallback: bool) -> DevMetrics:
    from tokenskip.grading import GradingConfig, Verdict, grade_batch

    grades = grade_batch(texts, golds, GradingConfig(last_number_fallback=fallback))
    accuracy = sum(g.verdict == Verdict.correct for g in grades) / len(grades)
    return DevMetrics(accuracy, statistics.fmean(counts), len(texts), backend, texts)


class DevEngine:
    """Ray actor body: one vLLM engine, in its own process outside the training placement group.

    It lives in its own process: vLLM initialises its own torch.distributed state, which hangs inside
    a Ray Train worker whose process group is already live. LoRA runs keep one engine for the whole
    run and send each adapter as file bytes (so the actor may run on any node), each to a fresh
    folder because vLLM caches adapters by path; a full fine-tune starts an engine on each exported
    checkpoint. The actor also grades, so the training ranks receive only the metrics.
    """

    def __init__(self, engine_config: dict[str, Any]):
        import tempfile

        from tokenskip.engine import EngineConfig, create_llm

        self._llm = create_llm(EngineConfig.model_validate(engine_config))
        self._root = tempfile.mkdtemp(prefix="tokenskip-dev-adapters-")

    def generate(
        self, prompts_: list[str], sampling: dict[str, Any], name: str, adapter_files: dict[str, bytes] | None
    ) -> list[tuple[str, int]]:
        from tokenskip.engine import SamplingConfig, generate

        folder = None
        if adapter_files is not None:
            folder = os.path.join(self._root, name)
            os.makedirs(folder, exist_ok=False)
            for file_name, blob in adapter_files.items():
                with open(os.path.join(folder, file_name), "wb") as handle:
                    handle.write(blob)
        outputs = generate(self._llm, prompts_, SamplingConfig.model_validate(sampling), lora_path=folder)
        return [(o[0].text, o[0].token_count) for o in outputs]

    def evaluate(
        self,
        prompts_: list[str],
        golds: list[str],
        sampling: dict[str, Any],
        name: str,
        adapter_files: dict[str, bytes] | None,
        last_number_fallback: bool,
    ) -> DevMetrics:
        from tokenskip.failpoints import delay

        started = time.perf_counter()
        delay("tldr.dev_evaluate")  # tests: an evaluation provably longer than the collective timeout
        outputs = self.generate(prompts_, sampling, name, adapter_files)
        metrics = _grade(
            [t for t, _ in outputs], [c for _, c in outputs], golds, "vllm", last_number_fallback
        )
        metrics.seconds = time.perf_counter() - started
        return metrics


class DevResultBoard:
    """Ray actor body (async; started by the driver): hands the dev evaluation rank 0 started to every
    rank. Each rank asks for the result of (attempt, step) with ``ray.get`` under the evaluation's
    budget; no rank waits in a collective while the dev actor works."""

    def __init__(self) -> None:
        import asyncio

        self._asyncio = asyncio
        self._refs: dict[tuple[int, int], Any] = {}
        self._events: dict[tuple[int, int], Any] = {}
        self._served: dict[tuple[int, int], int] = {}

    def _event(self, key: tuple[int, int]):
        return self._events.setdefault(key, self._asyncio.Event())

    async def put(self, key: tuple[int, int], boxed_ref: list[Any]) -> None:
        # The ref arrives inside a list so Ray passes the reference itself, not its value.
        self._refs[key] = boxed_ref[0]
        self._event(key).set()

    async def result(self, key: tuple[int, int], world_size: int) -> DevMetrics:
        await self._event(key).wait()
        metrics = await self._refs[key]
        self._served[key] = self._served.get(key, 0) + 1
        if self._served[key] == world_size:  # every rank has it: let the object go
            for table in (self._refs, self._events, self._served):
                table.pop(key, None)
        return metrics


@dataclass
class PendingDev:
    """A dev evaluation in flight, as rank 0 hands it to every rank: the dev actor's result (a Ray
    object every rank waits for with ``ray.get``, no collective open) or, for backend 'transformers',
    the metrics rank 0 already computed."""

    ref: Any = None
    metrics: DevMetrics | None = None

    def result(self, timeout_s: float) -> DevMetrics:
        if self.metrics is not None:
            return self.metrics
        import ray

        return ray.get(self.ref, timeout=timeout_s)


class DevEvaluator:
    """Generates on the dev set with the current weights and grades the answers (created on rank 0).

    Backend 'vllm' runs a :class:`DevEngine` actor outside the training placement group: for LoRA one
    engine kept for the run, sent the adapter at each evaluation; for a full fine-tune a fresh engine
    on the checkpoint :func:`save_dev_checkpoint` just wrote (on rank 0's node, unless
    ``export_dir`` is a folder every node reads), removed after the evaluation so it holds no memory
    between evaluations. 'transformers' generates with the training model in place.
    """

    def __init__(self, settings: TLDRSettings, model_path: str, tokenizer: Any, lora: bool, lora_rank: int):
        from tokenskip.prompts import render_prompt

        self.settings, self.model_path, self.tokenizer = settings, model_path, tokenizer
        self.lora, self.lora_rank = lora, lora_rank
        self.questions, self.golds = load_dev_set(settings)
        self.prompts = [render_prompt(tokenizer, q) for q in self.questions]
        self._actor = None
        self._export_dir: str | None = None

    @property
    def needs_export(self) -> bool:
        """Whether each evaluation needs a full HF checkpoint (full fine-tune on vLLM)."""
        return self.settings.backend == "vllm" and not self.lora

    def _start_engine(self, model: str, lora: bool, pin_to_this_node: bool):
        import ray

        from tokenskip.engine import EngineConfig

        base = self.settings.engine or EngineConfig(model=model)
        update: dict[str, Any] = {"model": model, "enable_lora": lora}
        if lora:
            update["max_lora_rank"] = max(base.max_lora_rank, self.lora_rank)
        config = base.model_copy(update=update)
        resources = dict(self.settings.engine_resources)
        strategy: Any = "DEFAULT"  # outside the training workers' placement group
        if pin_to_this_node:  # it reads the checkpoint from this node's disk
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            strategy = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        actor_class = ray.remote(DevEngine).options(
            num_cpus=resources.pop("CPU", 0.0),
            num_gpus=resources.pop("GPU", 0.0),
            resources=resources or None,
            scheduling_strategy=strategy,
        )
        return actor_class.remote(config.model_dump(mode="json"))

    def _engine(self):
        if self._actor is None:
            self._actor = self._start_engine(self.model_path, lora=True, pin_to_this_node=False)
        return self._actor

    def close(self) -> None:
        if self._actor is not None:
            import ray

            ray.kill(self._actor)
            self._actor = None
        if self._export_dir is not None:
            import shutil

            shutil.rmtree(self._export_dir, ignore_errors=True)
            self._export_dir = None

    def finish_round(self) -> None:
        """After every rank has its result: a full fine-tune's engine and export go away."""
        if self.needs_export:
            self.close()

    def submit(self, model: Any, step: int, workdir: str, export_dir: str | None = None) -> PendingDev:
        """Start the evaluation of ``model`` at ``step``; ``export_dir`` is where
        :func:`save_dev_checkpoint` wrote a full fine-tune (backend 'vllm')."""
        sampling = self.settings.sampling.model_dump(mode="json")
        name = f"dev-adapter-step-{step:08d}"
        if self.settings.backend == "transformers":
            started = time.perf_counter()
            texts, counts = _generate_transformers(
                model, self.tokenizer, self.prompts, self.settings.sampling.max_tokens
            )
            metrics = _grade(texts, counts, self.golds, "transformers", self.settings.last_number_fallback)
            metrics.seconds = time.perf_counter() - started
            return PendingDev(metrics=metrics)
        if self.lora:
            adapter_dir = os.path.join(workdir, name)
            model.save_pretrained(adapter_dir)
            files: dict[str, bytes] | None = {}
            for file_name in sorted(os.listdir(adapter_dir)):
                if not os.path.isfile(os.path.join(adapter_dir, file_name)):
                    continue
                with open(os.path.join(adapter_dir, file_name), "rb") as handle:
                    files[file_name] = handle.read()
            actor = self._engine()
        else:
            if export_dir is None:
                raise ValueError("a full fine-tune's dev evaluation needs the exported checkpoint folder")
            self.close()  # a previous round's engine, if its round failed before finish_round
            self._export_dir = export_dir
            actor = self._start_engine(export_dir, lora=False, pin_to_this_node=True)
            files = None
        ref = actor.evaluate.remote(
            self.prompts, self.golds, sampling, name, files, self.settings.last_number_fallback
        )
        return PendingDev(ref=ref)

    def evaluate(self, model: Any, step: int, workdir: str, export_dir: str | None = None) -> DevMetrics:
        """Submit and wait (one process: tests, single-worker runs)."""
        metrics = self.submit(model, step, workdir, export_dir).result(self.settings.dev_timeout_s)
        self.finish_round()
        return metrics
