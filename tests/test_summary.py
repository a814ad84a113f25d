"""Shard summaries: merging equals summarising the concatenated rows, run_statistics from summaries
equals the old computation over the whole tables, and markers without a summary still work."""

from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from tokenskip.pipeline import INPUT_SHARD, Plan, run_statistics
from tokenskip.report import render_html
from tokenskip.schema import COMPRESSED_SCHEMA, ERROR_SCHEMA, REJECT_SCHEMA, current_error_columns, to_table
from tokenskip.storage import RunStore, StorageConfig, read_table
from tokenskip.summary import (
    TOKEN_BIN_EDGES,
    EngineTotals,
    ShardSummary,
    merge,
    run_summary,
    summary_from_files,
)

RATIOS = [0.9, 0.7, 0.5]
DATASET = "summaries"


def make_shard(shard: int, problems: int = 6, n: int = 4, seed: int = 0) -> dict[str, pa.Table]:
    """One shard's tables as split_outcomes makes them: problems of this shard only, kept rows with
    long-tailed lengths (some null/empty compressions), grade rejects and sample errors."""
    rng = random.Random(seed * 1000 + shard)
    data, rejects, errors = [], [], []
    for p in range(problems):
        pid = f"p-{shard}-{p}"
        for i in range(n):
            key = f"{pid}-{i}"
            roll = rng.random()
            if roll < 0.55:
                original = max(1, int(rng.lognormvariate(5.5, 1.2)))
                comps = [
                    {"target_ratio": r, "text": "t", "tokens": max(1, round(original * r * rng.uniform(0.97, 1.1))),
                     "achieved_ratio": None}
                    for r in RATIOS
                ]  # fmt: skip
                for c in comps:
                    c["achieved_ratio"] = c["tokens"] / original
                if rng.random() < 0.05:
                    comps = [] if rng.random() < 0.5 else None
                data.append({"key": key, "problem_id": pid, "original_tokens": original, "compressions": comps,
                             "cot": "x" * original})  # fmt: skip
            elif roll < 0.9:
                reason = rng.choice(["incorrect", "incorrect", "unparsable", "timeout"])
                rejects.append({"key": key, "problem_id": pid, "stage": "grade", "reason": reason})
            else:
                stage = rng.choice(["generate", "compress"])
                errors.append({"key": key, "problem_id": pid, "stage": stage, "error": f"{stage}_error"})
    return {
        "data": to_table(data, COMPRESSED_SCHEMA),
        "rejects": to_table(rejects, REJECT_SCHEMA),
        "errors": to_table(errors, ERROR_SCHEMA),
    }


def input_tables() -> dict[str, pa.Table]:
    rejects = [
        {"key": f"d{i}", "problem_id": f"d{i}", "stage": "dedup", "reason": "duplicate"} for i in range(3)
    ]
    rejects += [{"key": "c0", "problem_id": "c0", "stage": "dedup", "reason": "contaminated"}]
    errors = [{"key": None, "problem_id": None, "stage": "load", "error": "invalid_json"} for _ in range(2)]
    errors += [{"key": "e", "problem_id": None, "stage": "load", "error": None}]  # a null reason
    return {"rejects": to_table(rejects, REJECT_SCHEMA), "errors": to_table(errors, ERROR_SCHEMA)}


def _rounded(value: Any) -> Any:
    """Float sums depend on the order of addition: compare them to 12 significant digits."""
    if isinstance(value, float):
        return float(f"{value:.12g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _concat(shards: list[dict[str, pa.Table]]) -> dict[str, pa.Table]:
    kinds = {k for s in shards for k in s}
    return {k: pa.concat_tables([s[k] for s in shards if k in s]) for k in kinds}


def test_merge_equals_summary_of_the_concatenated_tables():
    shards = [make_shard(i) for i in range(7)] + [input_tables()]
    merged = merge(ShardSummary.from_tables(s) for s in shards)
    whole = ShardSummary.from_tables(_concat(shards))
    assert merged.shards == len(shards) and whole.shards == 1
    assert _rounded(merged.model_dump(exclude={"shards"})) == _rounded(whole.model_dump(exclude={"shards"}))
    # The figures are the rows' own.
    data = _concat(shards)["data"]
    assert merged.kept_samples == data.num_rows
    assert merged.kept_problems == len(set(data.column("problem_id").to_pylist()))
    assert merged.reasons("rejects")["duplicate"] == 3
    assert merged.errors["load"] == {"(none)": 1, "invalid_json": 2}
    original = [v for v in data.column("original_tokens").to_pylist()]
    assert merged.distributions.original_tokens.count == len(original)
    assert merged.distributions.original_tokens.total == sum(original)
    assert merged.distributions.original_tokens.max == max(original)
    # Merging is associative: merging merged summaries changes nothing.
    halves = [
        merge(ShardSummary.from_tables(s) for s in shards[:3]),
        merge(ShardSummary.from_tables(s) for s in shards[3:]),
    ]
    assert _rounded(merge(halves).model_dump()) == _rounded(merged.model_dump())


def test_summary_is_json_and_small():
    summary = ShardSummary.from_tables(make_shard(0, problems=64))
    text = json.dumps(summary.model_dump(mode="json"))
    assert ShardSummary.model_validate(json.loads(text)) == summary
    assert len(text) < 20_000  # histograms are stored trimmed to their non-empty bins


def test_histogram_quantiles_are_within_one_bin():
    rng = np.random.default_rng(0)
    values = np.round(rng.lognormal(6.0, 1.0, 5000)).clip(1)
    table = to_table(
        [{"key": str(i), "problem_id": str(i), "original_tokens": int(v), "compressions": [
            {"target_ratio": 0.5, "text": "", "tokens": int(v), "achieved_ratio": float(r)}]}
         for i, (v, r) in enumerate(zip(values, rng.uniform(0.4, 0.7, 5000), strict=True))],
        COMPRESSED_SCHEMA,
    )  # fmt: skip
    stats = ShardSummary.from_tables({"data": table}).distributions
    edges = np.asarray(TOKEN_BIN_EDGES, np.float64)
    for q, got in zip([0.1, 0.5, 0.9], stats.original_tokens.quantiles([0.1, 0.5, 0.9]), strict=True):
        exact = float(np.quantile(values, q))
        i = np.searchsorted(edges, exact, side="right") - 1
        assert edges[i - 1] <= got <= edges[i + 2], (q, got, exact)
    achieved = np.asarray(
        pa.compute.list_flatten(table.column("compressions")).combine_chunks().field("achieved_ratio")
    )
    for q, got in zip([0.1, 0.5, 0.9], stats.achieved_ratio["0.5"].quantiles([0.1, 0.5, 0.9]), strict=True):
        assert abs(got - float(np.quantile(achieved, q))) <= 0.0011
    assert stats.original_tokens.quantiles([0.0, 1.0]) == [values.min(), values.max()]


def test_engine_totals_from_sample_rows():
    rows = pa.table(
        {
            "problem_id": ["a", "a", "b", "b"],
            "gen_tokens": [10, 20, 5, None],
            "gen_seconds": [1.5, 1.5, 2.0, 2.0],  # per problem, repeated on its samples
            "compress_seconds": [0.25, None, 0.5, 0.25],
        }
    )
    engine = EngineTotals.from_sample_rows(rows)
    assert engine == EngineTotals(
        samples_generated=4, problems_generated=2, tokens_generated=35, generation_seconds=3.5,
        compression_seconds=1.0,
    )  # fmt: skip
    with_engine = ShardSummary.from_tables(make_shard(0), samples=rows)
    without = ShardSummary.from_tables(make_shard(1))
    assert merge([with_engine, with_engine]).engine.tokens_generated == 70
    assert merge([with_engine, without]).engine is None  # unknown for some shard: not a partial sum


# --------------------------------------------------------------------------------------------------
# run_statistics: summaries vs the old computation over whole tables


def old_run_statistics(plan: Plan, data: pa.Table, rejects: pa.Table, errors: pa.Table) -> dict[str, Any]:
    """run_statistics as it was before summaries (tables of every committed part, read whole): the
    oracle the summaries must reproduce key for key."""
    reasons = Counter(rejects.column("reason").to_pylist()) if rejects.num_rows else Counter()
    error_reasons = Counter(errors.column("error").to_pylist()) if errors.num_rows else Counter()
    input_errors = plan.load_errors.num_rows
    sample_errors = sum(error_reasons.values()) - input_errors
    dedup = (
        Counter(plan.dedup_rejects.column("reason").to_pylist()) if plan.dedup_rejects.num_rows else Counter()
    )
    grade_rejects = sum(v for k, v in reasons.items() if k not in ("duplicate", "contaminated"))
    samples = data.num_rows + grade_rejects + sample_errors
    graded = data.num_rows + grade_rejects
    ratio_sums: dict[float, list[float]] = defaultdict(list)
    if data.num_rows:
        for comps in data.column("compressions").to_pylist():
            for c in comps or []:
                ratio_sums[c["target_ratio"]].append(c["achieved_ratio"])
    kept_problems = len(set(data.column("problem_id").to_pylist())) if data.num_rows else 0
    return {
        "input_rows": plan.input_rows,
        "load_errors": input_errors,
        "dedup": {"duplicate": dedup.get("duplicate", 0), "contaminated": dedup.get("contaminated", 0)},
        "problems_to_generate": plan.problems.num_rows,
        "samples": samples,
        "graded_samples": graded,
        "kept_samples": data.num_rows,
        "kept_problems": kept_problems,
        "rejects_by_reason": dict(
            sorted((k, v) for k, v in reasons.items() if k not in ("duplicate", "contaminated"))
        ),
        "reject_rows_by_reason": dict(sorted(reasons.items())),
        "errors_by_reason": dict(sorted(error_reasons.items())),
        "acceptance_rate": round(data.num_rows / graded, 4) if graded else 0.0,
        "mean_original_tokens": round(sum(data.column("original_tokens").to_pylist()) / data.num_rows, 2)
        if data.num_rows
        else None,
        "achieved_ratio": {
            f"{k:g}": round(sum(v) / len(v), 4) for k, v in sorted(ratio_sums.items(), reverse=True)
        },
    }


def _plan(inputs: dict[str, pa.Table], problems: int) -> Plan:
    errors = inputs["errors"]
    # The old computation counts reasons with Counter: a null reason is its own key there. Use only
    # named reasons for the comparison (a null reason is covered in the merge test above).
    return Plan(
        config=None,  # run_statistics reads the plan's input figures only
        run_id="r1",
        input_rows=problems + inputs["rejects"].num_rows + errors.num_rows,
        load_errors=errors,
        dedup_rejects=inputs["rejects"],
        problems=pa.table({"id": [f"p{i}" for i in range(problems)]}),
        shards=[],
    )


def _write_run(root: str, shards: list[dict[str, pa.Table]], inputs, with_summary) -> RunStore:
    store = RunStore(StorageConfig(root=root), DATASET, "r1")
    store.write_shard(
        INPUT_SHARD, inputs, summary=ShardSummary.from_tables(inputs) if with_summary(-1) else None
    )
    for i, tables in enumerate(shards):
        store.write_shard(
            f"s-{i:04d}", tables, summary=ShardSummary.from_tables(tables) if with_summary(i) else None
        )
    return store


@pytest.mark.parametrize("with_summary", ["all", "none", "mixed"])
def test_run_statistics_from_summaries_equals_the_table_computation(tmp_path, with_summary):
    shards = [make_shard(i, seed=3) for i in range(9)]
    inputs = input_tables()
    inputs["errors"] = inputs["errors"].filter(pa.compute.is_valid(inputs["errors"]["error"]))
    choose = {"all": lambda i: True, "none": lambda i: False, "mixed": lambda i: i % 2 == 0}[with_summary]
    store = _write_run(str(tmp_path), shards, inputs, choose)
    markers = {r.shard_id: r for r in store.iter_committed_shards()}
    assert sum(m.summary is not None for m in markers.values()) == sum(choose(i) for i in range(-1, 9))
    plan = _plan(inputs, problems=9 * 6)

    counts = run_statistics(plan, store)
    store.commit({"counts": counts.model_dump(mode="json")})
    tables = {k: read_table(store.config, DATASET, k) for k in ("data", "rejects", "errors")}
    expected = old_run_statistics(plan, tables["data"], tables["rejects"], tables["errors"])
    assert counts.model_dump(mode="json") == expected
    assert counts.kept_samples > 0 and counts.rejects_by_reason and counts.achieved_ratio
    assert set(counts.errors_by_reason) >= {"invalid_json", "generate_error"}


def test_reject_rows_by_reason_sums_to_the_rejects_table_dedup_included(tmp_path):
    """report.txt, `show` and the dataset card list every rejects row by reason: the dedup duplicate
    too (the demo's run listed 87 of its 88 rejects rows)."""
    from tokenskip.run_report import RunReport
    from tokenskip.show import show_run

    inputs = input_tables()
    store = _write_run(str(tmp_path), [make_shard(0, seed=3)], inputs, lambda i: True)
    counts = run_statistics(_plan(inputs, problems=6), store)
    store.commit({"counts": counts.model_dump(mode="json")})
    rejects = read_table(store.config, DATASET, "rejects")
    assert counts.dedup["duplicate"] > 0 and counts.reject_rows_by_reason["duplicate"] > 0
    assert sum(counts.reject_rows_by_reason.values()) == rejects.num_rows
    attempt = dict.fromkeys(
        ["shards_committed", "problems_generated", "tokens_generated", "wall_seconds", "tokens_per_second",
         "load_seconds", "dedup_seconds", "pipeline_seconds", "commit_seconds"], 0,
    )  # fmt: skip
    text = RunReport.model_validate(
        {"dataset": DATASET, "run_id": "r1", "counts": counts, "attempt": attempt}
    ).summary_text()
    assert f"  rejects           {counts.reject_rows_by_reason}" in text
    assert f"rejects by reason {counts.reject_rows_by_reason}" in show_run(store.config, DATASET)


def test_marker_without_summary_field_still_parses_and_is_summarised_from_files(tmp_path):
    """Markers written before summaries existed have no "summary" key at all."""
    shards = [make_shard(i) for i in range(3)]
    store = _write_run(str(tmp_path), shards, input_tables(), lambda i: True)
    marker = tmp_path / DATASET / "runs" / "r1" / "_shards" / "s-0001.json"
    record = json.loads(marker.read_text())
    del record["summary"]
    marker.write_text(json.dumps(record))
    (old,) = [r for r in store.iter_committed_shards() if r.shard_id == "s-0001"]
    assert old.summary is None
    assert _rounded(summary_from_files(store, old).model_dump()) == _rounded(
        ShardSummary.from_tables(shards[1]).model_dump()
    )
    merged = run_summary(store)
    assert merged.engine is None  # the old shard's engine work is unknown
    assert _rounded(merged.model_dump(exclude={"engine"})) == _rounded(
        merge(ShardSummary.from_tables(t) for t in [input_tables(), *shards]).model_dump(exclude={"engine"})
    )


def test_an_errors_part_written_with_the_old_column_names_is_summarised_by_its_errors(tmp_path):
    """Errors tables written before errors were ``error``/``error_detail`` said ``reason``/``detail``."""
    shard = make_shard(0)
    old_names = {"error": "reason", "error_detail": "detail"}
    shard["errors"] = shard["errors"].rename_columns([old_names.get(n, n) for n in ERROR_SCHEMA.names])
    store = RunStore(StorageConfig(root=str(tmp_path)), DATASET, "r1")
    record = store.write_shard("s-0000", shard)  # no summary: summarised from the files
    assert shard["errors"].num_rows and record.summary is None
    assert summary_from_files(store, record).errors == ShardSummary.from_tables(make_shard(0)).errors
    assert current_error_columns(shard["errors"]).equals(make_shard(0)["errors"])


def test_fallback_reads_each_file_checked(tmp_path):
    from tokenskip.storage import IntegrityError

    store = _write_run(str(tmp_path), [make_shard(0)], input_tables(), lambda i: False)
    part = tmp_path / DATASET / "runs" / "r1" / "data" / "part-s-0000.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        run_summary(store)


def test_report_from_summary_equals_report_from_table():
    """The HTML report drawn from merged summaries is the one drawn from the whole data table."""
    from tests.test_report import make_report

    shards = [make_shard(i) for i in range(5)]
    data = _concat(shards)["data"]
    report = make_report(data.filter(pa.compute.is_valid(data["compressions"])))
    merged = merge(ShardSummary.from_tables(s) for s in shards)
    from_summary = render_html(report, merged)
    from_table = render_html(report, data)
    # Identical up to float digits of summed values (order of addition).
    number = r"\d+\.\d{6,}"
    import re

    assert re.sub(number, "#", from_summary) == re.sub(number, "#", from_table)
    assert math.isclose(merged.distributions.original_tokens.mean, np.mean(data["original_tokens"]))
