"""The quiet console: what goes to the terminal, what to the log file, the live display's lines and
figures, the worker output redirect, and the dataset card. No Ray: the board is used as a plain class."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import pyarrow as pa

from tokenskip.config import PipelineConfig
from tokenskip.console import WORKER_LOG_ENV, RunDisplay, StepDisplay, console_logging
from tokenskip.dataset_card import dataset_card, source_licence
from tokenskip.progress import MAX_PENDING_EVENTS, ProgressTally, _Board
from tokenskip.run_report import RunReport
from tokenskip.schema import COMPRESSED_SCHEMA
from tokenskip.sources import SourceConfig
from tokenskip.summary import EngineTotals, ShardSummary


class _FakeBoard:
    """The board's driver-side interface over the plain actor class."""

    def __init__(self):
        self.board = _Board()

    def post(self, event, **fields):
        self.board.post({"event": event, **fields})

    def drain(self, timeout_s=5.0):
        return self.board.drain()


def _summary(samples: int, kept: int, tokens: int) -> ShardSummary:
    return ShardSummary(
        kept_samples=kept,
        engine=EngineTotals(samples_generated=samples, problems_generated=samples // 4, tokens_generated=tokens),
    )


def test_the_board_drains_in_order_and_stays_bounded():
    board = _Board()
    for i in range(MAX_PENDING_EVENTS + 5):
        board.post({"i": i})
    events = board.drain()
    assert len(events) == MAX_PENDING_EVENTS
    assert events[0]["i"] == 5 and events[-1]["i"] == MAX_PENDING_EVENTS + 4  # the oldest went
    assert board.drain() == []


def test_without_a_tty_the_display_prints_the_engine_wait_and_one_line_per_shard():
    stream = io.StringIO()
    board = _FakeBoard()
    display = RunDisplay(total_shards=2, total_samples=16, stream=stream, tty=False, board=board)
    display.start()
    display.engine_starting(model="smollm2-135m-instruct", device="cpu", eager=False)
    board.post("engine_ready", seconds=97.6)
    board.post("generated", problems=2, samples=8, tokens=800)
    for event in board.drain():
        display.apply(event)
    display.shard_committed(_summary(samples=8, kept=2, tokens=800))
    board.post("generated", problems=2, samples=8, tokens=700)
    for event in board.drain():
        display.apply(event)
    display.shard_committed(_summary(samples=8, kept=0, tokens=700))
    display.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("starting vLLM engine (model smollm2-135m-instruct, device cpu): first start")
    assert lines[1] == "vLLM engine ready in 98 s"
    assert lines[2].startswith("shard 1/2 committed | samples 8/16 | kept 2 (25%) | ")
    assert lines[3].startswith("shard 2/2 committed | samples 16/16 | kept 2 (12%) | ")
    assert lines[3].endswith("ETA 0:00")
    assert len(lines) == 4
    assert display.tokens == 1500


def test_without_a_board_the_figures_come_from_the_commits():
    stream = io.StringIO()
    display = RunDisplay(total_shards=3, total_samples=24, stream=stream, tty=False)
    display.start()
    display.shard_committed(_summary(samples=8, kept=4, tokens=640))
    display.close()
    assert display.samples == 8 and display.tokens == 640 and display.kept == 4
    assert stream.getvalue().startswith("shard 1/3 committed | samples 8/24 | kept 4 (50%) | -- tok/s | ETA --:--")


def test_on_a_tty_the_display_is_one_redrawn_line():
    stream = io.StringIO()
    display = RunDisplay(total_shards=2, total_samples=8, stream=stream, tty=True, refresh_s=0.05)
    display.start()
    display.apply({"event": "engine_ready", "seconds": 3.0})
    display.shard_committed(_summary(samples=4, kept=1, tokens=100))
    display.close()
    text = stream.getvalue()
    # tqdm redraws in place with carriage returns; the final state is on the last segment
    last = text.replace("\n", "\r").rstrip("\r").split("\r")[-1]
    assert "done" in last and "1/2 shards" in last and "kept 1 (25%)" in last
    assert "vLLM engine ready in 3 s" in text


def test_quiet_logging_sends_records_to_the_file_and_only_tokenskip_warnings_to_the_console(capsys):
    before = (logging.getLogger().level, len(logging.getLogger().handlers), os.environ.get(WORKER_LOG_ENV))
    with console_logging("run", verbose=False) as run_log:
        logging.getLogger("somelib.engine").info("engine chatter")
        logging.getLogger("somelib.data").warning("a warning nobody can act on")
        logging.getLogger("tokenskip.pipeline").warning("0 problems loaded: check the path")
        logging.getLogger("somelib").error("a real error")
        assert os.environ[WORKER_LOG_ENV] == str(run_log.path)
        text = run_log.text().decode()
    err = capsys.readouterr().err
    assert "engine chatter" in text and "a warning nobody can act on" in text and "a real error" in text
    assert "check the path" in err and "a real error" in err
    assert "engine chatter" not in err and "nobody can act on" not in err
    after = (logging.getLogger().level, len(logging.getLogger().handlers), os.environ.get(WORKER_LOG_ENV))
    assert after == before


def test_the_log_moves_into_the_run_folder_with_what_it_had(tmp_path):
    with console_logging("run", verbose=False) as run_log:
        logging.getLogger("tokenskip.plan").info("planned")
        staged = run_log.path
        moved = run_log.move_to(tmp_path / "runs" / "run-1" / "logs")
        logging.getLogger("tokenskip.plan").info("running")
        assert os.environ[WORKER_LOG_ENV] == str(moved)
    assert not staged.exists()
    text = moved.read_text()
    assert "planned" in text and "running" in text


def test_a_worker_setup_hook_sends_python_and_c_output_to_the_log(tmp_path):
    log_file = tmp_path / "run.log"
    code = (
        "import os, sys; from tokenskip.console import redirect_worker_output; redirect_worker_output(); "
        "print('python stdout'); print('python stderr', file=sys.stderr); sys.stdout.flush(); "
        "os.write(2, b'c-level warning\\n')"
    )
    env = {**os.environ, WORKER_LOG_ENV: str(log_file)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert log_file.read_text().splitlines() == ["python stdout", "python stderr", "c-level warning"]


def test_the_dataset_card_explains_every_column_and_the_sources_licences(tmp_path):
    config = PipelineConfig.model_validate(
        {
            "dataset": "demo",
            "sources": [
                {"path": "builtin:demo_arithmetic", "kind": "custom", "name": "demo",
                 "field_map": {"question": "question", "answer": "answer", "id": "id"}},
                {"path": str(tmp_path / "gsm8k.jsonl"), "kind": "gsm8k"},
                {"path": str(tmp_path / "mine.jsonl"), "kind": "gsm8k", "name": "mine", "license": "CC-BY-4.0"},
            ],
            "engine": {"model": "m"},
            "compression": {"scorer": {"kind": "selfinfo", "model": "m"}, "target_tokenizer": "m"},
            "output": {"root": str(tmp_path / "out")},
        }
    )
    counts = {
        "input_rows": 10, "problems_to_generate": 9, "samples": 36, "kept_samples": 5, "kept_problems": 4,
        "acceptance_rate": 5 / 36, "rejects_by_reason": {"incorrect": 31}, "errors_by_reason": {},
        "achieved_ratio": {"0.5": 0.61},
    }
    card = dataset_card(
        config, RunReport.model_validate({"dataset": "demo", "run_id": "run-abc", "counts": counts, "config_hash": "h"})
    )
    assert card.startswith("# demo / run-abc")
    assert "| demo | train | " in card and "Apache-2.0 (bundled with tokenskip)" in card
    assert "MIT (GSM8K" in card and "CC-BY-4.0" in card
    for field in COMPRESSED_SCHEMA:
        assert f"| `{field.name}` | " in card
    assert "| `compressions[].achieved_ratio` | double | tokens / original_tokens |" in card
    assert "kept: 5 samples from 4 problems (acceptance 13.9%)" in card
    assert f"read_table(StorageConfig(root={str(tmp_path / 'out')!r}), 'demo', run_id='run-abc')" in card
    assert "decontamination: off" in card
    # every column of the kept-data table says what it holds
    assert all((f.metadata or {}).get(b"doc") for f in COMPRESSED_SCHEMA)
    assert source_licence(SourceConfig(path="x.jsonl", kind="aime")).startswith("not stated")


def test_the_dataset_card_names_the_manifest_file_and_loads_with_hf_datasets(tmp_path, monkeypatch):
    """The card says `_MANIFEST.json` (storage's name, not a literal), and its Hugging Face `datasets`
    snippet, run as printed, loads exactly the committed rows."""
    import re

    from tokenskip.storage import MANIFEST_NAME, RunStore, StorageConfig

    output = StorageConfig(root=str(tmp_path / "out"))
    config = PipelineConfig.model_validate(
        {"dataset": "demo", "sources": [{"path": "x.jsonl", "kind": "gsm8k"}], "engine": {"model": "m"},
         "output": output}
    )  # fmt: skip
    store = RunStore(output, "demo", "run-abc")
    for shard, keys in (("s-1", ["k1", "k2"]), ("s-2", ["k3"])):
        rows = [{"key": k, "problem_id": f"p-{k}", "question": f"q {k}?", "cot": "c"} for k in keys]
        store.write_shard(shard, {"data": pa.Table.from_pylist(rows, schema=COMPRESSED_SCHEMA)})
    (tmp_path / "out" / "demo" / "runs" / "run-abc" / "data" / "part-uncommitted.parquet").write_bytes(b"x")
    store.commit({"counts": {}})
    counts = {
        "input_rows": 3, "problems_to_generate": 3, "samples": 3, "kept_samples": 3, "kept_problems": 3,
        "acceptance_rate": 1.0, "rejects_by_reason": {}, "errors_by_reason": {}, "achieved_ratio": {},
    }  # fmt: skip
    card = dataset_card(config, RunReport.model_validate({"dataset": "demo", "run_id": "run-abc", "counts": counts}))
    assert MANIFEST_NAME == "_MANIFEST.json" and card.count("`_MANIFEST.json`") == 2
    assert "_manifest.json" not in card
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", card, re.S) if "load_dataset" in b]
    assert 'datasets.load_dataset("parquet", data_files=files, split="train")' in snippet
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scope: dict = {}
    exec(snippet, scope)
    assert sorted(scope["data"]["key"]) == ["k1", "k2", "k3"]  # the manifest's parts, not the stray one


def test_the_licence_is_not_part_of_the_run_id(tmp_path):
    base = {
        "dataset": "d",
        "sources": [{"path": str(tmp_path / "a.jsonl"), "kind": "gsm8k"}],
        "engine": {"model": "m"},
        "compression": {"scorer": {"kind": "selfinfo", "model": "m"}, "target_tokenizer": "m"},
    }
    licensed = {**base, "sources": [{**base["sources"][0], "license": "MIT"}]}
    assert PipelineConfig.model_validate(base).resolved_run_id() == PipelineConfig.model_validate(
        licensed
    ).resolved_run_id()
    assert pa.types.is_struct(COMPRESSED_SCHEMA.field("compressions").type.value_type)


def test_the_plan_names_the_device_the_actors_get_not_the_drivers():
    from tokenskip.engine import EngineConfig

    auto = EngineConfig(model="m")
    assert auto.planned_device(1.0) == "cuda"  # a GPU cluster's driver often has no GPU
    assert auto.planned_device(0.0) == auto.resolved_device() == "cpu"  # this machine has none
    assert EngineConfig(model="m", device="cpu").planned_device(1.0) == "cpu"


def test_the_training_display_prints_a_line_every_n_steps_with_loss_speed_and_eta():
    stream = io.StringIO()
    board = _FakeBoard()
    display = StepDisplay(board=board, stream=stream, tty=False, every=2)
    for step in (1, 2, 3, 4, 5):
        board.post("train_step", step=step, total=5, loss=1.0 / step, tokens_per_s=100.0 * step)
    board.post("engine_ready", seconds=1.0)  # not a training event: ignored
    display.close()  # drains what is left
    lines = stream.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 2/5", "step 4/5", "step 5/5"]
    assert lines[0].startswith("step 2/5 | loss 0.5000 | 200 tok/s | ETA ")
    assert lines[-1].endswith("ETA 0:00")
    assert display.step == 5 and display.total == 5


def test_a_tally_posts_its_counts_at_most_once_an_interval_and_the_rest_on_flush():
    board = _FakeBoard()
    tally = ProgressTally(board, "generated", interval_s=3600)
    for _ in range(1000):  # a thousand finished requests: no board call yet
        tally.add(problems=1, samples=4, tokens=100)
    assert board.drain() == []
    tally.flush()
    assert board.drain() == [{"event": "generated", "problems": 1000, "samples": 4000, "tokens": 100_000}]
    tally.flush()  # nothing new: nothing posted
    assert board.drain() == []
    eager = ProgressTally(board, "generated", interval_s=0)
    eager.add(problems=1, samples=2, tokens=7)
    assert board.drain() == [{"event": "generated", "problems": 1, "samples": 2, "tokens": 7}]
    ProgressTally(None, "generated").add(problems=1)  # no board: nothing to do, nothing raised
