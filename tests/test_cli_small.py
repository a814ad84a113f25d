"""Small CLI behaviours a new user meets first: version, argument checks, storage listings, compress
before-the-work checks, and a dry run that says why rows failed to load."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from tests.tiny_pipeline import tiny_pipeline_config, write_problems
from tokenskip import cli
from tokenskip.exit_codes import ExitCode
from tokenskip.schema import COMPRESSED_SCHEMA, to_table
from tokenskip.storage import RunStore, StorageConfig, pin

DATASET = "tiny-arith"


def test_version_and_positive_max_shards(capsys):
    with pytest.raises(SystemExit) as version:
        cli.main(["--version"])
    assert version.value.code == 0 and capsys.readouterr().out.startswith("tokenskip 0.1.0")
    with pytest.raises(SystemExit) as bad:
        cli.main(["run", "--config", "x.yaml", "--max-shards", "-3"])
    assert bad.value.code == 2 and "must be a positive integer" in capsys.readouterr().err


def _commit(output: StorageConfig, run_id: str, keys: list[str]) -> None:
    store = RunStore(output, DATASET, run_id)
    rows = to_table([{"key": k, "problem_id": k} for k in keys], COMPRESSED_SCHEMA)
    store.write_shard("s-1", {"data": rows}, problem_ids=keys)
    store.commit({"counts": {}})


def test_storage_runs_is_a_table_marking_latest_and_pins(tmp_path, capsys):
    output = StorageConfig(root=str(tmp_path))
    _commit(output, "run-a", ["k1", "k2"])
    _commit(output, "run-b", ["k3"])
    pin(output, DATASET, "run-a")
    assert cli.main(["storage", "runs", "--root", str(tmp_path), "--dataset", DATASET]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["RUN", "COMMITTED", "(UTC)", "DATA", "REJECTS", "ERRORS"]
    a, b = (line.split() for line in lines[1:])
    assert a[0] == "run-a" and a[3:] == ["2", "0", "0", "pinned"]
    assert b[0] == "run-b" and b[3:] == ["1", "0", "0", "LATEST"]

    code = cli.main(["storage", "unpin", "--root", str(tmp_path), "--dataset", DATASET, "--run-id", "run-b"])
    assert code == ExitCode.USER_ERROR and "'run-b' of 'tiny-arith' is not pinned" in capsys.readouterr().err
    assert (
        cli.main(["storage", "unpin", "--root", str(tmp_path), "--dataset", DATASET, "--run-id", "run-a"])
        == 0
    )



@pytest.mark.parametrize(
    "argv",
    [
        ["storage", "runs", "--root", "{root}", "--dataset", DATASET],
        ["show", "--root", "{root}", "--dataset", DATASET],
        ["export", "--root", "{root}", "--dataset", DATASET, "--out", "{root}/export"],
        ["export-model", "{root}/checkpoint", "{root}/model"],
    ],
    ids=lambda argv: argv[0],
)
@pytest.mark.parametrize("options", ["{not json", "[1]"])
def test_storage_options_must_be_a_json_object_before_anything_runs(tmp_path, capsys, argv, options):
    argv = [arg.format(root=tmp_path) for arg in argv] + ["--storage-options", options]
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == ExitCode.USER_ERROR
    assert "--storage-options" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

def test_compress_checks_output_first_and_drops_a_stale_errors_file(tmp_path, tiny_causal_lm, capsys):
    cots = tmp_path / "cots.jsonl"
    cots.write_text(
        "".join(
            json.dumps({"id": i, "cot": f"Add {i} and 2. So {i + 2}. The answer is {i + 2}."}) + "\n"
            for i in range(3)
        )
    )
    blocker = tmp_path / "file"
    blocker.write_text("x")
    base = ["compress", "--input", str(cots), "--scorer", "selfinfo", "--model", str(tiny_causal_lm)]
    code = cli.main([*base, "--output", str(blocker / "out.parquet")])
    assert code == ExitCode.USER_ERROR and "is a file" in capsys.readouterr().err

    code = cli.main([*base, "--output", str(tmp_path / "out.parquet"), "--model", str(tmp_path / "missing")])
    assert code == ExitCode.USER_ERROR and "no such folder" in capsys.readouterr().err

    stale = tmp_path / "out.errors.parquet"
    stale.write_bytes(b"an earlier run's errors")
    assert cli.main([*base, "--output", str(tmp_path / "out.parquet")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_out"] == 3 and summary["errors"] == 0
    assert not stale.exists()


@pytest.mark.slow
def test_compress_resolves_the_embedded_model_name(tmp_path, capsys):
    from tokenskip.models import EMBEDDED_MODEL

    cots = tmp_path / "cots.jsonl"
    cots.write_text(json.dumps({"cot": "Add 3 and 4. So 7. The answer is 7."}) + "\n")
    out = tmp_path / "out.parquet"
    argv = [
        "compress",
        "--input",
        str(cots),
        "--output",
        str(out),
        "--scorer",
        "selfinfo",
        "--model",
        EMBEDDED_MODEL,
    ]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["rows_out"] == 1


def test_dry_run_names_the_load_errors(tmp_path, tiny_causal_lm, capsys):
    path = write_problems(tmp_path / "p.jsonl", [{"id": "1", "answer": "2"}], [b"not json"])
    config = tiny_pipeline_config(tiny_causal_lm, path, StorageConfig(root=str(tmp_path / "out")))
    config_path = tmp_path / "run.yaml"
    import yaml

    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    assert cli.main(["run", "--dry-run", "--config", str(config_path)]) == 0
    out = capsys.readouterr().out
    assert "load errors: " in out and "missing_question 1" in out and "invalid_json 1" in out
    assert f"first: {path}:1" in out
    assert "decontamination: off" in out
    assert not Path(tmp_path / "out").exists()


def test_every_subcommand_is_listed_and_a_broken_one_fails_the_cli(monkeypatch, capsys):
    import subprocess
    import sys

    listed = subprocess.run(
        [sys.executable, "-m", "tokenskip.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0
    for command in ("run", "compress", "storage", "train", "evaluate"):
        assert command in listed.stdout
    registered = [command.name for command in cli.COMMANDS]
    assert "refresh" in registered and len(set(registered)) == len(registered)
    for name in registered:  # each on its own line of the subcommand list
        assert re.search(rf"^ {{4}}{name} ", listed.stdout, re.MULTILINE), name
    for code in ExitCode:  # the epilog is the exit-code table
        assert f"  {code.value}  {code.summary}" in listed.stdout
    broken = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['tokenskip.evaluate'] = None; from tokenskip import cli; cli.main(['--help'])",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert broken.returncode != 0 and "tokenskip.evaluate" in broken.stderr


def test_show_prints_the_summary_and_examples_with_dropped_words_marked(tmp_path, capsys):
    from tokenskip.show import mark_dropped

    assert (
        mark_dropped("First add 3 and 4 to get 7", "add 3 4 get 7")
        == "[-First-] add 3 [-and-] 4 [-to-] get 7"
    )
    output = StorageConfig(root=str(tmp_path))
    tail = "The answer is 7."
    row = {
        "key": "k1",
        "problem_id": "p1",
        "question": "What is 3 + 4?",
        "answer": "7",
        "cot": f"First add 3 and 4 to get 7. {tail}",
        "reasoning": "First add 3 and 4 to get 7.",
        "answer_tail": tail,
        "original_tokens": 14,
        "compressions": [
            {
                "target_ratio": 0.9,
                "text": f"First add 3 and 4 get 7. {tail}",
                "tokens": 13,
                "achieved_ratio": 0.93,
            },
            {"target_ratio": 0.5, "text": f"add 3 4 7. {tail}", "tokens": 9, "achieved_ratio": 0.64},
        ],
    }
    store = RunStore(output, DATASET, "run-a")
    store.write_shard("s-1", {"data": to_table([row], COMPRESSED_SCHEMA)}, problem_ids=["p1"])
    store.commit(
        {"counts": {"kept_samples": 1, "kept_problems": 1, "acceptance_rate": 0.5, "graded_samples": 2}}
    )

    assert cli.main(["show", "--root", str(tmp_path), "--dataset", DATASET, "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "run run-a of dataset tiny-arith" in out and "kept 1 samples from 1 problems" in out
    assert "What is 3 + 4?" in out and "original CoT (14 tokens):" in out
    assert "ratio 0.9 (achieved 0.93, 13 tokens" in out and "First add 3 and 4 [-to-] get 7." in out
    assert (
        "ratio 0.5 (achieved 0.64, 9 tokens" in out and "[-First-] add 3 [-and-] 4 [-to-] [-get-] 7." in out
    )
    assert out.count(tail) >= 3  # original and both ratios keep the answer tail
    assert cli.main(["show", "--root", str(tmp_path), "--dataset", "nope"]) == ExitCode.USER_ERROR


def test_no_library_module_imports_the_cli():
    """The CLI imports the library, never the other way round (a library import of the CLI is a cycle
    waiting to happen, and hides which module owns what)."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "tokenskip"
    offenders = []
    for path in package.rglob("*.py"):
        if path.name == "cli.py" and path.parent == package:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(package)}: {n}" for n in names if n == "tokenskip.cli"]
    assert offenders == []


# Each Ray job entrypoint and the tokenskip command it runs.
RAY_JOBS = {"build_dataset": "run", "train_sft": "train", "evaluate": "evaluate", "refresh": "refresh"}


def test_each_ray_job_is_a_thin_wrapper_around_its_tokenskip_command(monkeypatch, capsys):
    import importlib
    import sys

    jobs = Path(__file__).resolve().parents[1] / "ray_jobs"
    assert sorted(p.stem for p in jobs.glob("*.py") if p.stem != "__init__") == sorted(RAY_JOBS)
    for module_name, command in RAY_JOBS.items():
        path = jobs / f"{module_name}.py"
        tree = ast.parse(path.read_text())
        imports = [
            (node.module, alias.name)
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            for alias in node.names
        ]
        functions = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
        # No options, handling or exit codes of its own: one main() that hands its arguments on.
        assert imports == [("tokenskip.cli", "main")] and functions == ["main"], module_name
        assert len(path.read_text().splitlines()) <= 20, module_name

        # Its --help is the command's own, from the arguments `ray job submit` gives it (sys.argv).
        monkeypatch.setattr(sys, "argv", [f"ray_jobs/{module_name}.py", "--help"])
        with pytest.raises(SystemExit) as job_help:
            importlib.import_module(f"ray_jobs.{module_name}").main()
        job_out = capsys.readouterr().out
        with pytest.raises(SystemExit) as command_help:
            cli.main([command, "--help"])
        assert job_help.value.code == command_help.value.code == 0
        assert job_out == capsys.readouterr().out and job_out.startswith(f"usage: tokenskip {command} ")


def test_one_set_of_exit_codes_the_readme_explains():
    """Exit codes are defined once (tokenskip.exit_codes), no module keeps numbers of its own, and the
    README's table has exactly those codes."""
    root = Path(__file__).resolve().parents[1]
    own = []
    for path in [*(root / "tokenskip").rglob("*.py"), *(root / "ray_jobs").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else []
            names = [t.id for t in targets if isinstance(t, ast.Name)]
            own += [f"{path.relative_to(root)}: {name}" for name in names if name.startswith("EXIT_")]
    assert own == []
    readme = (root / "README.md").read_text()
    section = readme.split("### Exit codes", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| (\d+) \|", section, re.MULTILINE)
    assert [int(row) for row in rows] == [code.value for code in ExitCode]
    assert ExitCode.REFUSED == 5 and ExitCode.FAILED == 1  # a run not published and a refresh held back
