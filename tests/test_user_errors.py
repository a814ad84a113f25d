"""Where the README promises one line and exit 2, a new user gets one line and exit 2 (issue 18,
items 4 and 5): missing S3 credentials, a CoT file without the CoT field, a model that cannot be
resolved (no local folder, not cached, the hub out of reach) before any engine starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import tokenskip
from ray_jobs.evaluate import main as evaluate_job
from tests.tiny_pipeline import tiny_pipeline_config, tiny_problems, write_problems
from tokenskip import cli
from tokenskip.exit_codes import ExitCode
from tokenskip.storage import StorageConfig

CONFIGS = Path(tokenskip.__file__).parent / "configs"


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("log: ")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"tokenskip {command}: error: "), err
    return lines[0]


@pytest.fixture()
def no_s3_credentials(monkeypatch, tmp_path):
    """No AWS credentials anywhere botocore looks (environment, files, instance metadata)."""
    import s3fs

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()  # a cached filesystem would keep earlier credentials
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture()
def hub_out_of_reach(monkeypatch):
    """Online mode, but the Hugging Face hub cannot be reached (what a machine without internet sees)."""
    import huggingface_hub

    def unreachable(self, repo_id, **kwargs):
        raise OSError(f"Max retries exceeded with url: /api/models/{repo_id} (Name or service not known)")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)


def test_shipped_evaluate_example_without_credentials_is_one_line(no_s3_credentials, capsys):
    example = str(CONFIGS / "evaluate_example.yaml")
    assert cli.main(["evaluate", "--config", example, "--set", "limit=2"]) == ExitCode.USER_ERROR
    line = _one_line_error(capsys, "evaluate")
    assert "S3 credentials" in line and "Unable to locate credentials" in line
    assert evaluate_job(["--config", example, "--set", "limit=2"]) == ExitCode.USER_ERROR
    assert "S3 credentials" in _one_line_error(capsys, "evaluate")


def test_gpu_recipe_dry_run_without_credentials_is_one_line(
    no_s3_credentials, tmp_path, tiny_causal_lm, capsys
):
    model = str(tiny_causal_lm)
    argv = ["run", "--dry-run", "--config", str(CONFIGS / "gsm8k_qwen2_5_7b_gpu.yaml")]
    for key, value in {
        "output.root": tmp_path / "out",  # its sources stay on s3://YOUR-BUCKET
        "engine.model": model,
        "compression.scorer.model": model,
        "compression.target_tokenizer": model,
    }.items():
        argv += ["--set", f"{key}={value}"]
    assert cli.main(argv) == ExitCode.USER_ERROR
    assert "S3 credentials: Unable to locate credentials" in _one_line_error(capsys, "run")


def test_compress_without_cot_field_names_the_fields_the_file_has(tmp_path, tiny_causal_lm, capsys):
    cots = tmp_path / "cots.jsonl"
    cots.write_text(json.dumps({"question": "1 + 1?", "response": "2. The answer is 2."}) + "\n")
    argv = ["compress", "--input", str(cots), "--output", str(tmp_path / "out.parquet")]
    argv += ["--scorer", "selfinfo", "--model", str(tiny_causal_lm)]
    assert cli.main(argv) == ExitCode.USER_ERROR
    line = _one_line_error(capsys, "compress")
    assert "no 'cot' field" in line and "question, response" in line and "--cot-field" in line
    assert not (tmp_path / "out.parquet").exists()


def test_compress_with_the_default_scorer_and_no_hub_is_one_line(tmp_path, hub_out_of_reach, capsys):
    cots = tmp_path / "cots.jsonl"
    cots.write_text(json.dumps({"cot": "2. The answer is 2."}) + "\n")
    argv = ["compress", "--input", str(cots), "--output", str(tmp_path / "out.parquet")]
    assert cli.main(argv) == ExitCode.USER_ERROR
    line = _one_line_error(capsys, "compress")
    assert "microsoft/llmlingua-2-xlm-roberta-large-meetingbank" in line
    assert "hub could not be asked" in line and "--skip-model-check" in line


def test_unresolvable_model_fails_run_and_dry_run_before_any_engine(
    tmp_path, tiny_causal_lm, hub_out_of_reach, capsys, monkeypatch
):
    problems = write_problems(tmp_path / "problems.jsonl", tiny_problems(4))
    config = tiny_pipeline_config(tiny_causal_lm, problems, StorageConfig(root=str(tmp_path / "out")))
    data = config.model_dump(mode="json")
    data["engine"]["model"] = "no-such-org/no-such-model-xyz"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))

    import tokenskip.pipeline

    def no_engine(*args, **kwargs):
        raise AssertionError("the run started although its model cannot be resolved")

    monkeypatch.setattr(tokenskip.pipeline, "run_pipeline", no_engine)
    for dry in (["--dry-run"], []):
        assert cli.main(["run", "--config", str(path), *dry]) == ExitCode.USER_ERROR, dry
        line = _one_line_error(capsys, "run")
        assert "engine.model: model 'no-such-org/no-such-model-xyz'" in line and "--skip-model-check" in line
    assert not (tmp_path / "out").exists()

    # The documented opt-out: the dry run goes on to the plan (the engine would be the judge).
    assert cli.main(["run", "--dry-run", "--skip-model-check", "--config", str(path)]) == 0
    assert "model=no-such-org/no-such-model-xyz" in capsys.readouterr().out


def test_relative_output_root_inside_a_ray_job_is_refused_with_one_line(
    tmp_path, tiny_causal_lm, capsys, monkeypatch
):
    problems = write_problems(tmp_path / "problems.jsonl", tiny_problems(4))
    config = tiny_pipeline_config(tiny_causal_lm, problems, StorageConfig(root="outputs-relative"))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    monkeypatch.chdir(tmp_path)
    # Outside a Ray job a relative root is the user's own folder: the dry run accepts it.
    assert cli.main(["run", "--dry-run", "--config", str(path)]) == 0
    capsys.readouterr()
    # What Ray's job supervisor sets in a submitted job's driver (runtime_env with a working_dir).
    job_config = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job_config))
    for root in ("outputs-relative", "./outputs", "file://outputs"):
        argv = ["run", "--dry-run", "--config", str(path), "--set", f"output.root={root}"]
        assert cli.main(argv) == ExitCode.USER_ERROR
        line = _one_line_error(capsys, "run")
        assert f"output root {root!r} is relative" in line and "absolute path" in line and "s3://" in line
    for root in (str(tmp_path / "absolute"),):
        assert cli.main(["run", "--dry-run", "--config", str(path), "--set", f"output.root={root}"]) == 0
        capsys.readouterr()
