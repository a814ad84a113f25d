"""Fault injection: the dataset pipeline loses nothing and duplicates nothing when things break.

Faults: a generation actor killed mid-run, the driver killed at stage boundaries and re-run, S3
answering 503/500 (transient, and persistently on the commit), pathological answers for the grader,
a prompt longer than the context and an engine error on one row. Every pipeline run checks that
each expected (problem, sample) key is in the output exactly once and that the counts reconcile.
"""

from __future__ import annotations

import threading
import time

from tokenskip.engine import SamplingConfig, generate_safe
from tokenskip.grading import Grader, GradingConfig, Verdict

# ---------------------------------------------------------------------------------------------
# Grader: pathological answers are bounded and graded `timeout` (no engine)
# ---------------------------------------------------------------------------------------------

PATHOLOGICAL = {
    "deeply nested fractions": "\\boxed{" + "\\frac{1}{" * 2000 + "2" + "}" * 2000 + "}",
    "power tower": "The final answer is \\boxed{9^{9^{9^{9}}}}",
    "huge number to a huge power": "\\boxed{" + "7" * 5000 + "^{" + "7" * 5000 + "}}",
}


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
