"""Each command's log goes where its output goes (run and refresh: the run's folder; train: under the
checkpoint storage path; evaluate: its output folder; compress: beside its output), and commands
that show nobody their log (show, storage, dry runs, one-line errors) leave no staging file behind.
``train`` and a re-run of a committed config print a short summary, not raw JSON."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import pytest
import yaml

from tokenskip import cli
from tokenskip.console import console_logging
from tokenskip.exit_codes import ExitCode


@pytest.fixture
def staging(tmp_path, monkeypatch) -> Path:
    """A private temp folder, so the staging files of this test alone are seen."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return tmp_path / "tmp" / "tokenskip-logs"


def _staged(staging: Path) -> list[Path]:
    return sorted(staging.glob("*.log")) if staging.exists() else []


def test_short_commands_leave_no_staging_log(tmp_path, staging, capsys):
    assert cli.main(["storage", "runs", "--root", str(tmp_path), "--dataset", "nope"]) == ExitCode.USER_ERROR
    assert cli.main(["show", "--root", str(tmp_path), "--dataset", "nope"]) == ExitCode.USER_ERROR
    assert _staged(staging) == []
    assert "log:" not in capsys.readouterr().err


def test_a_crash_keeps_its_log_and_says_where_it_is(staging, capsys):
    with pytest.raises(RuntimeError), console_logging("train", verbose=False) as run_log:
        logging.getLogger("tokenskip.train").info("step 3 went wrong")
        raise RuntimeError("boom")
    (kept,) = _staged(staging)
    assert kept == run_log.path and "step 3 went wrong" in kept.read_text()
    assert f"log: {kept}" in capsys.readouterr().err


def test_train_logs_under_its_storage_path_and_prints_a_summary(tmp_path, staging, monkeypatch, capsys):
    from tokenskip.train import job

    storage_path = tmp_path / "checkpoints"
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": "m",
                "data": {"path": str(tmp_path / "d.jsonl")},
                "checkpoint": {"storage_path": str(storage_path)},
            }
        )
    )
    result = job.TrainResult(
        metrics={"step": 12, "epoch": 1.5, "loss": 0.4321, "lr": 5e-5, "tokens_per_s": 812.4},
        checkpoint_path=str(storage_path / "tokenskip-sft" / "checkpoint_000002"),
        run_path=str(storage_path / "tokenskip-sft"),
        error=None,
    )

    def fake_training(cfg, progress):
        logging.getLogger("tokenskip.train").info("training the model")
        return result

    monkeypatch.setattr(job, "run_training", fake_training)
    assert cli.main(["train", "--config", str(config)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "trained: step 12, epoch 1.50, loss 0.4321, lr 5.00e-05, 812 tokens/s",
        f"checkpoint: {result.checkpoint_path}",
        f"run folder: {result.run_path} (--json prints the final metrics as JSON)",
    ]
    (log,) = (storage_path / "logs").glob("train-*.log")
    assert "training the model" in log.read_text() and f"log: {log}" in captured.err
    assert _staged(staging) == []
    # --json: the metrics as before
    assert cli.main(["train", "--config", str(config), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {
        "metrics": result.metrics,
        "checkpoint": result.checkpoint_path,
        "run": result.run_path,
    }
    # a failed run says so and exits 1
    monkeypatch.setattr(
        job, "run_training", lambda cfg, progress: result.__class__(**{**vars(result), "error": "X"})
    )
    assert cli.main(["train", "--config", str(config)]) == 1
    assert capsys.readouterr().out.startswith("training failed: step 12")


def test_evaluate_logs_into_its_output_folder(tmp_path, staging, monkeypatch, capsys):
    import tokenskip.evaluate as evaluate_module

    config = tmp_path / "eval.yaml"
    out = tmp_path / "eval-out"
    source = {"path": str(tmp_path / "test.jsonl"), "kind": "gsm8k"}
    config.write_text(yaml.safe_dump({"engine": {"model": "m"}, "source": source, "output": str(out)}))

    def fake_run(cfg):
        logging.getLogger("tokenskip.evaluate").info("generating at ratio 0.5")
        return "the table", 0

    monkeypatch.setattr(evaluate_module, "run_config", fake_run)
    assert cli.main(["evaluate", "--config", str(config)]) == 0
    (log,) = (out / "logs").glob("evaluate-*.log")
    assert "generating at ratio 0.5" in log.read_text()
    assert f"log: {log}" in capsys.readouterr().err and _staged(staging) == []


@pytest.mark.usefixtures("one_torch_thread")
def test_compress_logs_beside_its_output(tmp_path, staging, tiny_causal_lm, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"cot": "First add 3 and 4 to get 7. The answer is 7."}) + "\n")
    out = tmp_path / "results" / "out.parquet"
    out.parent.mkdir()
    argv = ["compress", "--input", str(src), "--output", str(out), "--scorer", "selfinfo"]
    assert cli.main([*argv, "--model", str(tiny_causal_lm), "--ratios", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["rows_out"] == 1
    (log,) = (out.parent / "logs").glob("compress-*.log")
    assert log.is_file() and _staged(staging) == []


def test_refresh_logs_into_the_versions_folder(tmp_path, staging, monkeypatch, capsys):
    import tokenskip.refresh as refresh_module
    from ray_jobs.refresh import main as refresh_job
    from tests.tiny_pipeline import DATASET, tiny_pipeline_data, write_problems
    from tokenskip.storage import StorageConfig
    from tokenskip.testing.tiny_models import arithmetic_problems

    output = StorageConfig(root=str(tmp_path / "out"))
    problems = write_problems(
        tmp_path / "p.jsonl",
        [{k: p[k] for k in ("id", "question", "answer")} for p in arithmetic_problems()[:2]],
    )
    config = tmp_path / "refresh.yaml"
    config.write_text(yaml.safe_dump({"pipeline": tiny_pipeline_data(tmp_path, problems, output)}))

    def pending_pipeline(pipeline, *, max_shards=None, progress=True, plan=None):
        logging.getLogger("tokenskip.pipeline").info("generating the new problems")
        from tokenskip.run_report import AttemptReport, RunReport
        from tokenskip.summary import RunCounts

        return RunReport(
            dataset=pipeline.dataset, run_id=plan.run_id, counts=RunCounts(), attempt=AttemptReport(), pending_shards=1
        )

    monkeypatch.setattr(refresh_module, "run_pipeline", pending_pipeline)
    assert refresh_job(["--config", str(config)]) == 0
    (log,) = (tmp_path / "out" / DATASET / "runs").glob("v-*/logs/refresh-*.log")
    assert "generating the new problems" in log.read_text() and "refresh plan" in log.read_text()
    assert f"log: {log}" in capsys.readouterr().err and _staged(staging) == []
    # a dry run shows the plan; its log is dropped
    assert refresh_job(["--config", str(config), "--dry-run"]) == 0
    assert _staged(staging) == []


def test_rerunning_a_committed_config_prints_a_summary_not_json(tmp_path, staging, tiny_causal_lm, capsys):
    from tests.tiny_pipeline import tiny_pipeline_data, write_problems
    from tokenskip.config import PipelineConfig
    from tokenskip.schema import COMPRESSED_SCHEMA
    from tokenskip.storage import RunStore, StorageConfig
    from tokenskip.testing.tiny_models import arithmetic_problems

    output = StorageConfig(root=str(tmp_path / "out"))
    rows = [{k: p[k] for k in ("id", "question", "answer")} for p in arithmetic_problems()[:2]]
    data = tiny_pipeline_data(tiny_causal_lm, write_problems(tmp_path / "p.jsonl", rows), output)
    config = PipelineConfig.model_validate(data)
    store = RunStore(output, config.dataset, config.resolved_run_id())
    store.write_shard("s-1", {"data": COMPRESSED_SCHEMA.empty_table()})
    store.commit(
        {"config": config.model_dump(mode="json"), "counts": {"kept_samples": 3, "kept_problems": 2}}
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))

    assert cli.main(["run", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert (
        f"run {config.resolved_run_id()} of {config.dataset} is already committed: nothing to do "
        "(kept 3 samples from 2 problems; its report.json has the figures)"
    ) in out
    assert "read it:" in out and "{" not in out.split("already committed")[1].split("read it:")[0]
    assert _staged(staging) == []  # nothing ran: no log kept
