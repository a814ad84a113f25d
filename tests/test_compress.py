"""Compression stage: columns, answer tail untouched, per-row errors, Ray Data, file -> file."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from tests.fixture_data import read_jsonl
from tokenskip.compress import ADDED_COLUMNS, CompressConfig, Compressor, _join, compress_file
from tokenskip.grading import split_answer_tail
from tokenskip.schema import COMPRESS_STAGE, COMPRESSION_STRUCT, ERROR_SCHEMA
from tokenskip.scoring import ScorerConfig

RATIOS = [0.9, 0.7, 0.5]


@pytest.fixture(scope="module")
def tiny_classifier(model_cache, tmp_path_factory):
    from tokenskip.testing.tiny_token_classifier import build_tiny_token_classifier, offline_tiktoken_cache

    offline_tiktoken_cache(tmp_path_factory.mktemp("tiktoken"))
    return build_tiny_token_classifier(model_cache / "tiny-xlm-roberta-large")


@pytest.fixture(scope="module")
def config(tiny_classifier, tiny_causal_lm) -> CompressConfig:
    return CompressConfig(
        ratios=RATIOS,
        scorer=ScorerConfig(kind="llmlingua2", model=str(tiny_classifier), batch_size=8),
        target_tokenizer=str(tiny_causal_lm),
    )


@pytest.fixture(scope="module")
def compressor(config) -> Compressor:
    return Compressor(config)


@pytest.fixture(scope="module")
def cots(fixture_data) -> list[dict]:
    """Short real CoTs (gsm8k and math500) that state a final answer."""
    rows = []
    for name in ("r1_distill_7b_gsm8k_test.jsonl.gz", "r1_distill_7b_math500_test.jsonl.gz"):
        data = read_jsonl(fixture_data / "cot_samples" / name)
        data = [r for r in data if split_answer_tail(r["response"])[1]]
        rows += sorted(data, key=lambda r: len(r["response"]))[:4]
    return rows


def test_compressor_prunes_only_the_reasoning(compressor, cots):
    batch = {
        "cot": [r["response"] for r in cots],
        "id": [r["id"] for r in cots],
        "extra": list(range(len(cots))),
    }
    out = compressor(batch)

    assert out["id"] == batch["id"] and out["extra"] == batch["extra"]  # passed through
    assert set(ADDED_COLUMNS) <= set(out)
    # The same reasoning pruned alone: batching across CoTs changes nothing.
    alone = compressor.scorer.prune([split_answer_tail(r["response"])[0] for r in cots], RATIOS)
    pa.array(out["compressions"], type=pa.list_(COMPRESSION_STRUCT))  # matches the shared schema
    for i, row in enumerate(cots):
        cot = row["response"]
        assert out["error"][i] is None
        reasoning, tail = out["reasoning"][i], out["answer_tail"][i]
        assert (reasoning, tail) == split_answer_tail(cot) and tail
        assert out["original_tokens"][i] == compressor.count_tokens([cot])[0] > 0
        comps = out["compressions"][i]
        assert [c["target_ratio"] for c in comps] == RATIOS
        for c in comps:
            assert c["text"].endswith(tail)  # the answer is never pruned
            assert c["text"] == _join(alone[i][c["target_ratio"]], reasoning, tail)
            assert c["tokens"] == compressor.count_tokens([c["text"]])[0]
            assert c["achieved_ratio"] == pytest.approx(c["tokens"] / out["original_tokens"][i])
            assert c["achieved_ratio"] < 1.0
        assert comps[-1]["tokens"] < comps[0]["tokens"]  # 0.5 keeps less than 0.9


def test_bad_rows_become_error_rows(compressor, cots):
    good = cots[0]["response"]
    batch = {"cot": [None, "", "   \n", 42, good], "n": [0, 1, 2, 3, 4]}
    out = compressor(batch)
    assert out["error"] == ["invalid_cot", "empty_cot", "empty_cot", "invalid_cot", None]
    assert all(out["error_detail"][i] for i in range(4))
    assert all(out["compressions"][i] is None for i in range(4))
    assert out["n"] == [0, 1, 2, 3, 4]
    assert out["compressions"][4] == compressor({"cot": [good]})["compressions"][0]


def test_scorer_failure_only_fails_its_row(compressor, cots, monkeypatch):
    real_prune = compressor.scorer.prune

    def flaky_prune(texts, ratios):
        if any("BOOM" in t for t in texts):
            raise RuntimeError("scorer exploded")
        return real_prune(texts, ratios)

    monkeypatch.setattr(compressor.scorer, "prune", flaky_prune)
    good = cots[1]["response"]
    out = compressor({"cot": [good, "BOOM goes the first step.\nSo the answer is 3.", good]})
    assert out["error"] == [None, "scoring_error", None]
    assert "scorer exploded" in out["error_detail"][1]
    assert out["compressions"][0] == out["compressions"][2] is not None


def test_whole_cot_pruned_without_answer_split(config, compressor, cots):
    whole = Compressor.__new__(Compressor)  # share the loaded models; only the option differs
    whole.__dict__.update(compressor.__dict__, config=config.model_copy(update={"split_answer": False}))
    cot = cots[2]["response"]
    out = whole({"cot": np.array([cot], dtype=object)})  # Ray's numpy batch format
    assert out["reasoning"] == [cot] and out["answer_tail"] == [""]
    assert [c["text"] for c in out["compressions"][0]] == [
        compressor.scorer.prune([cot], RATIOS)[0][r] for r in RATIOS
    ]


def test_config_validation():
    with pytest.raises(ValidationError):
        CompressConfig(ratios=[0.9, 1.5])
    with pytest.raises(ValidationError):
        CompressConfig(ratios=[0.5, 0.5])
    with pytest.raises(ValidationError):
        CompressConfig(ratios=[])
    with pytest.raises(ValidationError):
        CompressConfig(unknown_option=1)
    assert CompressConfig().ratios == [0.9, 0.8, 0.7, 0.6, 0.5]


def test_compress_file_jsonl_to_parquet(config, cots, tmp_path):
    src = tmp_path / "cots.jsonl"
    metas = [7, "seven", {"n": 7}]  # a column whose rows disagree in type must not sink the file
    lines = [json.dumps(r | {"meta": m}) for r, m in zip(cots[:3], metas, strict=True)]
    lines.insert(1, "{not json")
    lines.append(json.dumps({"id": "empty", "response": ""}))
    src.write_text("\n".join(lines) + "\n")
    out_path = tmp_path / "out" / "compressed.parquet"

    summary = compress_file(src, out_path, config, cot_column="response", batch_size=2, progress=False)

    assert summary["rows_in"] == 5 and summary["rows_out"] == 3 and summary["errors"] == 2
    assert summary["errors_by_reason"] == {"invalid_json": 1, "empty_cot": 1}
    means = summary["mean_achieved_ratio"]
    assert list(means) == RATIOS and means[0.5] < means[0.9] < 1.0

    table = pq.read_table(out_path)
    assert table.schema.field("compressions").type == pa.list_(COMPRESSION_STRUCT)
    records = table.to_pylist()
    assert [r["id"] for r in records] == [r["id"] for r in cots[:3]]
    assert [r["meta"] for r in records] == ["7", "seven", '{"n": 7}']
    for rec in records:
        assert rec["reasoning"] + rec["answer_tail"] == rec["response"]
        assert [c["target_ratio"] for c in rec["compressions"]] == RATIOS

    errors = pq.read_table(summary["errors_output"])
    assert errors.schema == ERROR_SCHEMA
    err = {r["error"]: r for r in errors.to_pylist()}
    assert {r["stage"] for r in errors.to_pylist()} == {COMPRESS_STAGE}  # the compress stage's, bad lines too
    assert err["invalid_json"]["raw"] == "{not json"  # the bad input is kept verbatim
    assert json.loads(err["empty_cot"]["raw"])["id"] == "empty" and err["empty_cot"]["key"] == "empty"


def test_compress_file_parquet_input_and_arrow_batches(config, compressor, cots, tmp_path):
    src = tmp_path / "cots.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": r["id"], "cot": r["response"]} for r in cots[:2]]), src)
    summary = compress_file(src, tmp_path / "out.parquet", config, progress=False)
    assert summary["rows_out"] == 2 and summary["errors"] == 0 and summary["errors_output"] is None
    records = pq.read_table(tmp_path / "out.parquet").to_pylist()
    # An Arrow batch (Ray's batch_format="pyarrow") gives the same compressions as a dict batch.
    arrow_out = compressor(pq.read_table(src))
    assert [r["compressions"] for r in records] == arrow_out["compressions"]
    assert arrow_out["id"] == [r["id"] for r in cots[:2]]


@pytest.mark.slow
def test_compressor_in_ray_data_map_batches(config, compressor, cots):
    import ray

    started_here = not ray.is_initialized()  # another module may have left its Ray session up
    if started_here:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        rows = [{"cot": r["response"], "id": r["id"]} for r in cots[:4]]
        ds = ray.data.from_items(rows).map_batches(
            Compressor, fn_constructor_args=(config,), batch_size=2, concurrency=1, num_cpus=1
        )
        got = {r["id"]: r for r in ds.take_all()}
    finally:
        if started_here:
            ray.shutdown()
    direct = compressor({"cot": [r["cot"] for r in rows]})
    assert set(got) == {r["id"] for r in rows}
    for i, row in enumerate(rows):
        assert got[row["id"]]["error"] is None
        assert [c["text"] for c in got[row["id"]]["compressions"]] == [
            c["text"] for c in direct["compressions"][i]
        ]


def test_cli_compress_with_llmlingua2_and_a_target_tokenizer(tiny_classifier, tiny_causal_lm, cots, tmp_path, capsys):
    from tokenskip.cli import main

    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in cots[:2]) + "\n")
    out_path = tmp_path / "out.parquet"
    args = ["compress", "--input", str(src), "--output", str(out_path), "--cot-field", "response"]
    args += ["--ratios", "0.8,0.5", "--scorer", "llmlingua2", "--model", str(tiny_classifier)]
    args += ["--target-tokenizer", str(tiny_causal_lm)]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_out"] == 2 and summary["errors"] == 0
    assert [c["target_ratio"] for c in pq.read_table(out_path).to_pylist()[0]["compressions"]] == [0.8, 0.5]
