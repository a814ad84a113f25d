"""The embedded default, end to end: the demo config (SmolLM2-135M from the PyPI package, self-information
scorer, local Ray, local folder) run through the CLI on a slice of its problems, and its HTML report
opened in a real headless browser."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_report import _body_attrs, _chart_count, _dump_dom, chromium  # noqa: F401 (fixture)
from tokenskip.storage import StorageConfig, read_manifest, read_table

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_demo_config_runs_and_its_report_renders_in_chromium(tmp_path, chromium):  # noqa: F811
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "tokenskip.cli",
        "run",
        "--config",
        str(REPO / "tokenskip" / "configs" / "demo.yaml"),
        "--set",
        f"output.root={out}",
        "--set",
        "sources.0.limit=12",
        "--set",
        "sampling.max_tokens=128",
        "--set",
        "sampling.n=4",  # 48 samples: a kept one is all but certain (the demo itself runs n=2 on 47 problems)
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tokenskip run report" in result.stdout
    # The quiet console: the plan, the engine wait, a line per shard, the summary, where the data is.
    console = (result.stdout + result.stderr).splitlines()
    assert len(console) <= 40, "\n".join(console)
    assert any(line.startswith("starting vLLM engine (model smollm2-135m-instruct, device cpu)") for line in console)
    assert any(line.startswith("vLLM engine ready in ") for line in console)
    assert any(line.startswith("shard 1/1 committed | samples 48/48 | kept ") for line in console)
    assert "read it:" in console
    assert not [line for line in console if " INFO " in line or "(pid=" in line]  # no engine/Ray log lines

    storage = StorageConfig(root=str(out))
    manifest = read_manifest(storage, "demo-arithmetic")
    counts = manifest.counts
    assert counts["input_rows"] == 12
    assert counts["samples"] == counts["problems_to_generate"] * 4
    data = read_table(storage, "demo-arithmetic", "data")
    assert counts["kept_samples"] == data.num_rows
    for row in data.to_pylist():
        assert [c["target_ratio"] for c in row["compressions"]] == [0.9, 0.8, 0.7, 0.6, 0.5]

    run_dir = out / "demo-arithmetic" / "runs" / manifest.run_id
    # ... and they went to the run's log file, whose path the console printed
    (log_file,) = (run_dir / "logs").glob("run-*.log")
    assert f"log: {log_file}" in result.stdout
    log_text = log_file.read_text()
    assert "vLLM engine ready in" in log_text and "Initializing a V1 LLM engine" in log_text
    # tokenskip show on the demo's output: its examples, with the pruned words marked
    shown = subprocess.run(
        [sys.executable, "-m", "tokenskip.cli", "show", "--root", str(out), "--dataset", "demo-arithmetic", "-k", "2", "--width", "1000"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert any(row["question"] in shown.stdout for row in data.to_pylist())
    assert "ratio 0.5 (achieved " in shown.stdout
    assert any("[-" in line and "dropped words" not in line for line in shown.stdout.splitlines())
    card = (run_dir / "README.md").read_text()
    assert f"# demo-arithmetic / {manifest.run_id}" in card and "| `compressions[].text` |" in card
    report = json.loads((run_dir / "report.json").read_text())
    assert report["counts"]["kept_samples"] == data.num_rows
    page = (run_dir / "report.html").read_text()
    attrs = _body_attrs(_dump_dom(chromium, tmp_path, page))
    assert attrs["data-errors"] == ""
    assert int(attrs["data-charts"]) == _chart_count(page) > 0
    assert attrs["data-rendered"] == attrs["data-charts"]
    # tokenskip export of the demo's output: LLaMA-Factory's alpaca JSON holds exactly the
    # instruction/input/output records train builds with the same mix, and it loads with `datasets`.
    import datasets
    from transformers import AutoTokenizer

    from tokenskip.models import resolve_model
    from tokenskip.sft import SFTMixConfig, build_sft_records

    exported = subprocess.run(
        [sys.executable, "-m", "tokenskip.cli", "export", "--root", str(out), "--dataset", "demo-arithmetic",
         "--out", str(tmp_path / "lf"), "--tokenizer", "smollm2-135m-instruct", "--set", "mix.seed=5"],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert exported.stdout.startswith(f"exported {data.num_rows} records (")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    expected = build_sft_records(data, SFTMixConfig(seed=5), tokenizer).to_pylist()
    info = json.loads((tmp_path / "lf" / "dataset_info.json").read_text())
    data_file = tmp_path / "lf" / info["demo-arithmetic_tokenskip"]["file_name"]
    assert json.loads(data_file.read_text()) == [
        {"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in expected
    ]
    loaded = datasets.load_dataset("json", data_files=str(data_file), split="train")
    assert loaded.num_rows == data.num_rows
