"""Generation stage: problems -> chat-template prompts -> vLLM samples.

A callable class for Ray Data's ``map_batches`` (one engine per actor, built once). It keeps the
problem grouping: each output row is one problem with a list of its ``n`` samples, so the grading
stage can apply a per-problem selection policy. A problem the engine cannot serve (prompt too long,
engine error) keeps its row with ``gen_error`` set; nothing is dropped.

Why not ``ray.data.llm``: its vLLM stage keeps only ``outputs[0]`` of each request, so ``n > 1``
samples per problem (the point of a correctness filter) are lost; it does run on CPU with
``placement_group_config={"bundles": [{"CPU": 1}]}``. This stage serves CPU and GPU alike through
:mod:`tokenskip.engine`.
"""

from __future__ import annotations

import time

import pyarrow as pa

from tokenskip.engine import EngineConfig, SamplingConfig, create_llm, generate_safe
from tokenskip.metrics import StageMetrics
from tokenskip.models import resolve_model
from tokenskip.prompts import render_prompt
from tokenskip.torch_thread import TorchThread

__all__ = ["GENERATED_FIELDS", "SAMPLE_STRUCT", "GenerateStage"]

SAMPLE_STRUCT = pa.struct(
    [
        pa.field("text", pa.string()),
        pa.field("tokens", pa.int64()),
        pa.field("finish_reason", pa.string()),
    ]
)

GENERATED_FIELDS = [
    pa.field("samples", pa.list_(SAMPLE_STRUCT)),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("gen_error", pa.string()),
    pa.field("gen_error_detail", pa.string()),
    pa.field("gen_seconds", pa.float64()),
]


class GenerateStage:
    """``map_batches`` callable: adds ``samples``/``prompt_tokens``/``gen_error`` columns."""

    def __init__(
        self,
        engine: EngineConfig,
        sampling: SamplingConfig,
        prompt: dict,
        *,
        cpus: float = 1.0,
        omp_threads: int | None = None,
    ):
        # The engine is built and driven on one thread of ours (see tokenskip.torch_thread).
        self.torch_thread = TorchThread(omp_threads, cpus, name="vllm-engine")
        self.engine_config = engine.model_copy(update={"model": resolve_model(engine.model)})
        self.sampling = sampling
        self.prompt = prompt
        self.llm = self.torch_thread.run(create_llm, self.engine_config)
        self.tokenizer = self.llm.get_tokenizer()
        self.metrics = StageMetrics()

    def render(self, question: str) -> str:
        return render_prompt(
            self.tokenizer,
            question,
            ratio=self.prompt.get("ratio"),
            delimiter=self.prompt.get("delimiter"),
            instruction=self.prompt.get("instruction"),
            system=self.prompt.get("system"),
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        prompts = []
        render_errors: dict[int, str] = {}
        for i, question in enumerate(batch.column("question").to_pylist()):
            try:
                prompts.append(self.render(question))
            except Exception as e:  # a template that rejects this input: an error row, not a crash
                render_errors[i] = f"{type(e).__name__}: {e}"
                prompts.append("")
        results = self.torch_thread.run(generate_safe, self.llm, prompts, self.sampling)
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
            else:
                errors.append(r.error)
                details.append(r.error_detail)
        self.metrics.record_rows("generate", batch.num_rows)
        self.metrics.record_tokens(sum(g.token_count for r in results for g in r.generations))
        self.metrics.record_stage_seconds("generate", elapsed)
        for reason in errors:
            if reason:
                self.metrics.record_errors("generate", reason)
        # Wall time of the call, spread over its rows, so per-stage throughput can be reported.
        per_row = elapsed / max(1, batch.num_rows)
        columns = [samples, prompt_tokens, errors, details, [per_row] * batch.num_rows]
        out = batch
        for field, values in zip(GENERATED_FIELDS, columns, strict=True):
            out = out.append_column(field, pa.array(values, type=field.type))
        return out
