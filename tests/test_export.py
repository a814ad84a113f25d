"""tokenskip export: the run's SFT mix as LLaMA-Factory alpaca JSON and chat JSONL, streamed through the
manifest, record for record what train builds, local and on S3, and nothing half-written on failure."""

from __future__ import annotations

import json

import fsspec
import pytest

from tests.test_sft import _EosTokenizer, _record
from tokenskip.cli import main as cli_main
from tokenskip.export import ExportConfig, export_dataset
from tokenskip.schema import COMPRESSED_SCHEMA, to_table
from tokenskip.sft import SFTMixConfig, build_sft_records
from tokenskip.storage import RunStore, StorageConfig, read_table

DATASET = "gsm8k-compressed"
SHARDS = (5, 0, 7, 4)  # an empty shard and batches that straddle files


@pytest.fixture()
def store(local_or_s3_storage) -> StorageConfig:
    run = RunStore(local_or_s3_storage, DATASET, "r1")
    number = 0
    for shard, rows in enumerate(SHARDS):
        records = []
        for _ in range(rows):
            records.append(_record(key=f"k{number:02d}", question=f"Question {number}: what is 48 + 24?"))
            number += 1
        run.write_shard(f"s-{shard:02d}", {"data": to_table(records, COMPRESSED_SCHEMA)})
    run.commit({"counts": {}})
    return local_or_s3_storage


def _read_text(url: str, options: dict) -> str:
    with fsspec.open(url, "rt", encoding="utf-8", **options) as handle:
        return handle.read()


def _config(store: StorageConfig, output: str, **fields) -> ExportConfig:
    return ExportConfig(
        root=store.root,
        dataset=DATASET,
        storage_options=store.storage_options,
        output=output,
        **{"batch_size": 3, **fields},
    )


def _output_root(store: StorageConfig, tmp_path) -> str:
    return f"{store.root}-export" if store.root.startswith("s3://") else str(tmp_path / "export")


def test_llamafactory_export_holds_exactly_the_records_train_builds(store, tmp_path):
    mix = SFTMixConfig(seed=7)
    config = _config(store, _output_root(store, tmp_path), mix=mix, tokenizer="target")
    result = export_dataset(config, tokenizer=_EosTokenizer())

    expected = build_sft_records(read_table(store, DATASET, "data"), mix, _EosTokenizer()).to_pylist()
    assert result.records == len(expected) == sum(SHARDS)
    exported = json.loads(_read_text(result.files[0], store.storage_options))
    assert exported == [{k: row[k] for k in ("instruction", "input", "output")} for row in expected]
    assert sum(result.by_ratio.values()) == len(expected)
    assert any("<|im_end|>" in row["input"] for row in exported)  # the tokenizer's eos is the delimiter

    info = json.loads(_read_text(result.files[1], store.storage_options))
    assert info == {
        f"{DATASET}_tokenskip": {
            "file_name": f"{DATASET}_tokenskip.json",
            "formatting": "alpaca",
            "columns": {"prompt": "instruction", "query": "input", "response": "output"},
        }
    }


def test_messages_export_is_the_chat_form_train_tokenizes(store, tmp_path):
    mix = SFTMixConfig(delimiter="<|eot_id|>", system="You are terse.")
    result = export_dataset(_config(store, _output_root(store, tmp_path), mix=mix, format="messages"))
    lines = _read_text(result.files[0], store.storage_options).splitlines()
    expected = build_sft_records(read_table(store, DATASET, "data"), mix).to_pylist()
    assert [json.loads(line) for line in lines] == [{"messages": row["messages"]} for row in expected]
    assert result.files[0].endswith(".jsonl") and len(result.files) == 1


def test_the_export_loads_with_hf_datasets_and_keeps_other_dataset_info_entries(tmp_path):
    import datasets

    store = StorageConfig(root=str(tmp_path / "store"))
    run = RunStore(store, DATASET, "r1")
    run.write_shard("s-00", {"data": to_table([_record(f"k{i}") for i in range(6)], COMPRESSED_SCHEMA)})
    run.commit({"counts": {}})
    out = tmp_path / "llamafactory-data"
    out.mkdir()
    (out / "dataset_info.json").write_text(
        json.dumps({"alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}})
    )

    result = export_dataset(
        _config(store, str(out), mix=SFTMixConfig(delimiter="<|eot_id|>"), name="gsm8k_ts")
    )
    info = json.loads((out / "dataset_info.json").read_text())
    assert set(info) == {"alpaca_en_demo", "gsm8k_ts"}
    loaded = datasets.load_dataset("json", data_files=str(out / info["gsm8k_ts"]["file_name"]), split="train")
    assert loaded.num_rows == result.records == 6
    assert set(loaded.column_names) == {"instruction", "input", "output"}
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]


def test_cli_exports_with_the_train_mix_options_and_prints_what_it_wrote(tmp_path, capsys):
    store = StorageConfig(root=str(tmp_path / "store"))
    run = RunStore(store, DATASET, "r1")
    run.write_shard("s-00", {"data": to_table([_record(f"k{i}") for i in range(20)], COMPRESSED_SCHEMA)})
    run.commit({"counts": {}})
    out = tmp_path / "out"
    code = cli_main(
        ["export", "--root", store.root, "--dataset", DATASET, "--out", str(out), "--format", "llamafactory",
         "--set", "mix.delimiter=<|eot_id|>", "--set", "mix.ratios=[1.0,0.7]", "--set", "mix.seed=3"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("exported 20 records (1.0: ")
    rows = json.loads((out / f"{DATASET}_tokenskip.json").read_text())
    expected = build_sft_records(
        read_table(store, DATASET, "data"), SFTMixConfig(delimiter="<|eot_id|>", ratios=[1.0, 0.7], seed=3)
    ).to_pylist()
    assert [r["input"] for r in rows] == [r["input"] for r in expected]
    assert {r["input"].endswith("<|eot_id|>0.7<|eot_id|>") for r in rows} == {True, False}


def test_bad_input_is_one_line_and_leaves_no_partial_file(tmp_path, capsys):
    store = StorageConfig(root=str(tmp_path / "store"))
    run = RunStore(store, DATASET, "r1")
    broken = _record("k-broken")
    broken["compressions"] = [c for c in broken["compressions"] if c["target_ratio"] != 0.5]
    rows = [_record(f"k{i}") for i in range(5)] + [broken]
    run.write_shard("s-00", {"data": to_table(rows, COMPRESSED_SCHEMA)})
    run.commit({"counts": {}})
    out = tmp_path / "out"
    base = ["export", "--root", store.root, "--dataset", DATASET, "--out", str(out)]

    # No tokenizer and no delimiter: the ratio marker is unknown.
    assert cli_main(base) == 2
    assert "tokenizer" in capsys.readouterr().err
    # A row without the drawn ratio's compression fails the export, naming the row; no file is left.
    assert cli_main([*base, "--set", "mix.delimiter=|", "--set", "mix.ratios=[0.5]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "row 5 (key k-broken): no compression at ratio 0.5" in err[0]
    assert not out.exists() or not list(out.iterdir())
    # A dataset that does not exist.
    assert cli_main([*base[:4], "nope", *base[5:], "--set", "mix.delimiter=|"]) == 2
    assert "nope" in capsys.readouterr().err


def test_a_failed_export_leaves_nothing_at_the_output_local_or_s3(store, tmp_path):
    from tokenskip.sft import SFTMixError

    output = _output_root(store, tmp_path)
    # Every stored row lacks a 0.3 compression: the first batch already fails.
    config = _config(store, output, mix=SFTMixConfig(delimiter="|", ratios=[0.3]), batch_size=2)
    with pytest.raises(SFTMixError, match="no compression at ratio 0.3"):
        export_dataset(config)
    fs, path = fsspec.core.url_to_fs(output, **store.storage_options)
    assert not fs.exists(f"{path}/{config.data_file}")
    assert not [name for name in (fs.ls(path) if fs.exists(path) else []) if ".tmp-" in name]
