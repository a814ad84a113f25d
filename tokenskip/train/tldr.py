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


def load_dev_set(settings: TLDRSettings) -> tuple[list[str], list[str]]:
    """(questions, gold answers) of the dev set."""
    from tokenskip.train.data import _read_file

    table = _read_file(settings.dev.path, settings.dev.storage_options)
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


class DevEngine:
    """Ray actor body: one vLLM engine with LoRA enabled, kept for the whole run.

    It lives in its own process: vLLM initialises its own torch.distributed state, which hangs inside
    a Ray Train worker whose process group is already live. Adapters arrive as file bytes, so the
    actor may run on any node; each goes to a fresh folder because vLLM caches adapters by path.
    """

    def __init__(self, engine_config: dict[str, Any]):
        import tempfile

        from tokenskip.engine import EngineConfig, create_llm

        self._llm = create_llm(EngineConfig.model_validate(engine_config))
        self._root = tempfile.mkdtemp(prefix="tokenskip-dev-adapters-")

    def generate(
        self, prompts_: list[str], sampling: dict[str, Any], name: str, adapter_files: dict[str, bytes]
    ) -> list[tuple[str, int]]:
        from tokenskip.engine import SamplingConfig, generate

        folder = os.path.join(self._root, name)
        os.makedirs(folder, exist_ok=False)
        for file_name, blob in adapter_files.items():
            with open(os.path.join(folder, file_name), "wb") as handle:
                handle.write(blob)
        outputs = generate(self._llm, prompts_, SamplingConfig.model_validate(sampling), lora_path=folder)
        return [(o[0].text, o[0].token_count) for o in outputs]


class DevEvaluator:
    """Generates on the dev set with the current weights and grades the answers (rank 0 only).

    Backend 'vllm' starts one :class:`DevEngine` actor on first use and sends it the adapter at each
    evaluation; 'transformers' generates with the training model in place.
    """

    def __init__(self, settings: TLDRSettings, model_path: str, tokenizer: Any, lora: bool, lora_rank: int):
        from tokenskip.prompts import render_prompt

        self.settings, self.model_path, self.tokenizer = settings, model_path, tokenizer
        self.lora, self.lora_rank = lora, lora_rank
        self.questions, self.golds = load_dev_set(settings)
        self.prompts = [render_prompt(tokenizer, q) for q in self.questions]
        self._actor = None
        if settings.backend == "vllm" and not lora:
            raise ValueError(
                "TL;DR backend 'vllm' evaluates LoRA adapters; use 'transformers' for full fine-tunes"
            )

    def _engine(self):
        if self._actor is None:
            import ray

            from tokenskip.engine import EngineConfig

            base = self.settings.engine or EngineConfig(model=self.model_path)
            config = base.model_copy(
                update={
                    "model": self.model_path,
                    "enable_lora": True,
                    "max_lora_rank": max(base.max_lora_rank, self.lora_rank),
                }
            )
            resources = dict(self.settings.engine_resources)
            actor_class = ray.remote(DevEngine).options(
                num_cpus=resources.pop("CPU", 0.0),
                num_gpus=resources.pop("GPU", 0.0),
                resources=resources or None,
                scheduling_strategy="DEFAULT",  # outside the training workers' placement group
            )
            self._actor = actor_class.remote(config.model_dump(mode="json"))
        return self._actor

    def close(self) -> None:
        if self._actor is not None:
            import ray

            ray.kill(self._actor)
            self._actor = None

    def evaluate(self, model: Any, step: int, workdir: str) -> DevMetrics:
        if self.settings.backend == "vllm":
            import ray

            name = f"dev-adapter-step-{step:08d}"
            adapter_dir = os.path.join(workdir, name)
            model.save_pretrained(adapter_dir)
            files = {}
            for file_name in sorted(os.listdir(adapter_dir)):
                if not os.path.isfile(os.path.join(adapter_dir, file_name)):
                    continue
                with open(os.path.join(adapter_dir, file_name), "rb") as handle:
                    files[file_name] = handle.read()
            sampling = self.settings.sampling.model_dump(mode="json")
            outputs = ray.get(self._engine().generate.remote(self.prompts, sampling, name, files))
            texts = [text for text, _ in outputs]
            counts = [count for _, count in outputs]
        else:
            texts, counts = _generate_transformers(
                model, self.tokenizer, self.prompts, self.settings.sampling.max_tokens
            )
        from tokenskip.grading import GradingConfig, Verdict, grade_batch

        grades = grade_batch(
            texts, self.golds, GradingConfig(last_number_fallback=self.settings.last_number_fallback)
        )
        accuracy = sum(g.verdict == Verdict.correct for g in grades) / len(grades)
        return DevMetrics(accuracy, statistics.fmean(counts), len(texts), self.settings.backend, texts)
