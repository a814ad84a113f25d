"""The HTML run report: content, escaping, writing through fsspec, and rendering in a real headless
Chromium (every chart lays out, no script/CSP errors, a non-blank screenshot).

The browser tests need Debian's ``chromium`` (``make test`` installs it when it can,
tools/ensure_chromium.sh): a missing browser is a failure, never a skip.
"""

from __future__ import annotations

import html
import io
import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from tokenskip.config import ResourcesConfig
from tokenskip.report import cost_figures, render_html, write_html_report
from tokenskip.schema import COMPRESSED_SCHEMA, problem_id, sample_key

RATIOS = [0.9, 0.8, 0.7, 0.6, 0.5]
HOSTILE = '<script>alert("x")</script>"><img src=x onerror=alert(1)>'


def make_data(rows: int = 80, seed: int = 0) -> pa.Table:
    """Kept rows shaped like the pipeline's: long-tailed CoT lengths, pruning a little above target."""
    rng = random.Random(seed)
    out = []
    for i in range(rows):
        question = f"What is {i} + {i + 1}?"
        pid = problem_id("gsm8k", question)
        original = max(20, int(rng.lognormvariate(5.3, 0.5)))
        compressions = []
        for r in RATIOS:
            tokens = min(original, max(1, round(original * (r + rng.uniform(-0.01, 0.05)))))
            compressions.append(
                {"target_ratio": r, "text": "pruned", "tokens": tokens, "achieved_ratio": tokens / original}
            )
        out.append(
            {
                "key": sample_key(pid, "gen", i % 4),
                "problem_id": pid,
                "source": "gsm8k",
                "split": "test",
                "question": question,
                "answer": str(2 * i + 1),
                "sample_index": i % 4,
                "model": "tiny",
                "cot": "step " * original,
                "reasoning": "step " * (original - 3),
                "answer_tail": "The answer is \\boxed{1}",
                "extracted_answer": str(2 * i + 1),
                "verdict": "correct",
                "original_tokens": original,
                "compressions": compressions,
            }
        )
    return pa.Table.from_pylist(out, schema=COMPRESSED_SCHEMA)


def make_report(data: pa.Table) -> dict:
    """A report dict with the keys run_pipeline writes (counts from run_statistics, attempt timings)."""
    kept = data.num_rows
    achieved = {}
    for comps in data.column("compressions").to_pylist():
        for c in comps:
            achieved.setdefault(c["target_ratio"], []).append(c["achieved_ratio"])
    progress, tokens = [], 0
    for shard in range(6):
        tokens += 4100 + 37 * shard
        progress.append({"t": round(8.5 + 6.25 * shard, 3), "tokens": tokens})
    return {
        "dataset": "gsm8k-demo",
        "run_id": "r-0123456789abcdef",
        "model": "Qwen/Qwen2.5-7B-Instruct",
        "config_hash": "c0ffee",
        "counts": {
            "input_rows": 40,
            "load_errors": 2,
            "dedup": {"duplicate": 3, "contaminated": 1},
            "problems_to_generate": 34,
            "samples": 136,
            "graded_samples": 130,
            "kept_samples": kept,
            "kept_problems": 30,
            "rejects_by_reason": {"incorrect": 44, "unparsable": 5, "timeout": 1},
            "errors_by_reason": {"invalid_json": 2, "generation_error": 4, "compression_error": 2},
            "acceptance_rate": round(kept / 130, 4),
            "mean_original_tokens": 200.0,
            "achieved_ratio": {
                f"{k:g}": round(sum(v) / len(v), 4) for k, v in sorted(achieved.items(), reverse=True)
            },
        },
        "attempt": {
            "shards_committed": 6,
            "shards_resumed": 0,
            "problems_generated": 34,
            "samples_generated": 136,
            "tokens_generated": tokens,
            "tokens_per_second": tokens / 40.0,
            "load_seconds": 0.4,
            "dedup_seconds": 0.1,
            "pipeline_seconds": 40.0,
            "generation_seconds": 61.5,
            "compression_seconds": 7.25,
            "wall_seconds": 42.0,
            "commit_seconds": 0.6,
            "progress": progress,
        },
        "committed": True,
    }


@pytest.fixture(scope="module")
def data() -> pa.Table:
    return make_data()


@pytest.fixture(scope="module")
def report(data) -> dict:
    return make_report(data)


def _chart_count(page: str) -> int:
    return page.count('<svg class="chart"')


# --------------------------------------------------------------------------------------------------
# Content


def test_report_has_every_figure_and_the_numbers(report, data):
    page = render_html(report, data, resources=ResourcesConfig())
    # funnel, rejects/errors, 1 + 5 histograms, achieved-vs-target, throughput, stage wall time
    assert _chart_count(page) == 11
    assert f'data-charts="{_chart_count(page)}"' in page
    text = html.unescape(re.sub(r"<[^>]+>", " ", page))
    for label in [
        "input rows",
        "kept samples",
        "reject: incorrect",
        "error: generation_error",
        "dedup: duplicate",
    ]:
        assert label in text
    for r in RATIOS:
        assert f"ratio {r:g}" in text
    # acceptance figure and the achieved ratios from the data, to 4 digits
    assert f"{100 * data.num_rows / 130:.1f}%" in text
    assert str(report["counts"]["achieved_ratio"]["0.5"])[:5] in text
    # every histogram has one bin per non-empty bar and every bar sits in the plot
    assert page.count('data-mark="bin"') > 6
    # nothing is fetched: no external URLs, no src/href attributes
    assert not re.search(r"""\b(src|href)\s*=""", page)
    assert "http://" not in page and "https://" not in page and "url(" not in page


def test_histograms_and_stats_match_the_data(report, data):
    import statistics

    page = render_html(report, data)
    rows = data.to_pylist()
    expected = {"original CoT": [r["original_tokens"] for r in rows]}
    for r in RATIOS:
        expected[f"ratio {r:g}"] = [
            c["tokens"] for row in rows for c in row["compressions"] if c["target_ratio"] == r
        ]
    figures = re.findall(r"<figure><figcaption>([^<:]+): (\d+) CoTs</figcaption>(.*?)</figure>", page, re.S)
    assert [name for name, _, _ in figures] == list(expected)
    for name, n, svg in figures:
        values = expected[name]
        assert int(n) == len(values)
        bins = [(float(lo.replace(",", "")), float(hi.replace(",", "")), int(c))
                for lo, hi, c in re.findall(r"<title>([\d,.]+)-([\d,.]+) tokens: (\d+)</title>", svg)]  # fmt: skip
        assert sum(c for _, _, c in bins) == len(values)
        for lo, hi, count in bins:
            assert count == sum(1 for v in values if lo <= v < hi)
        mean = statistics.fmean(values)
        assert re.search(rf"<td>{re.escape(name)}</td><td>{len(values)}</td><td>{mean:.3g}</td>", page)


def test_cost_figures_gpu_and_cpu(report):
    gpu = ResourcesConfig(generation_actors=2, generation_gpus=1, compression_actors=1, compression_gpus=0.5)
    figures = cost_figures(report, gpu)
    assert figures["gpus"] == 2.5
    assert figures["gpu_hours"] == pytest.approx(42.0 / 3600 * 2.5)
    cpu = cost_figures(
        report, ResourcesConfig(generation_actors=1, generation_cpus=1.0, compression_cpus=0.5)
    )
    assert cpu["gpus"] == 0 and cpu["gpu_hours"] == 0
    assert cpu["cpu_core_hours"] == pytest.approx(42.0 / 3600 * (1.0 + 0.5 + 0.25))
    tokens = report["attempt"]["tokens_generated"]
    assert cpu["tokens_per_accepted_sample"] == pytest.approx(tokens / report["counts"]["kept_samples"])
    assert cpu["estimated"] is False
    page = render_html(report, None, resources=gpu)
    assert "GPU-hours (wall x GPUs)" in page and f"{42.0 / 3600 * 2.5:.4f}" in page
    page = render_html(report, None, resources=ResourcesConfig())
    assert "CPU-core-hours" in page and "0 (CPU only)" in page


def test_resumed_attempt_scales_tokens_per_accepted_sample(report):
    resumed = json.loads(json.dumps(report))
    resumed["attempt"]["samples_generated"] = 68  # half the samples were committed by an earlier attempt
    figures = cost_figures(resumed, ResourcesConfig())
    kept = report["counts"]["kept_samples"]
    assert figures["tokens_per_accepted_sample"] == pytest.approx(
        resumed["attempt"]["tokens_generated"] / (kept / 2)
    )
    assert figures["estimated"] is True
    assert "estimated: resumed run" in render_html(resumed, None)


def test_without_data_uses_aggregate_ratios_and_says_what_is_missing(report):
    page = render_html(report, None)
    assert "No data rows" in page
    # funnel, rejects/errors, ratio chart (from counts), throughput, stage time
    assert _chart_count(page) == 5
    assert "0.5" in page and "GPU-hours" in page and "resources unknown" in page


def test_sparse_report_renders(data):
    """The short report of an already-committed run (counts only) still renders."""
    page = render_html({"dataset": "d", "run_id": "r", "committed": True, "counts": {"input_rows": 3}}, None)
    assert "No shard was committed" in page and "No compressions" in page
    assert _chart_count(page) == 1  # the funnel


def test_all_text_is_escaped(report, data):
    hostile = json.loads(json.dumps(report))
    hostile["model"] = HOSTILE
    hostile["dataset"] = HOSTILE
    hostile["counts"]["rejects_by_reason"][HOSTILE] = 3
    hostile["counts"]["errors_by_reason"][HOSTILE] = 1
    page = render_html(hostile, data)
    assert "<script>alert" not in page and "<img" not in page
    assert html.escape(HOSTILE, quote=True) in page
    assert page.count("<script>") == 2  # ours only


def test_bad_input_is_a_clear_error(report):
    with pytest.raises(ValueError, match="counts"):
        render_html({"attempt": {}}, None)
    with pytest.raises(TypeError, match="report"):
        render_html([report], None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="original_tokens"):
        render_html(report, pa.table({"x": [1]}))
    with pytest.raises(TypeError, match="pyarrow"):
        render_html(report, [{"original_tokens": 1}])  # type: ignore[arg-type]


def test_nulls_and_empty_compressions_are_skipped(report):
    table = pa.Table.from_pylist(
        [
            {"key": "a", "problem_id": "p", "original_tokens": None, "compressions": None},
            {"key": "b", "problem_id": "p", "original_tokens": 50, "compressions": []},
            {
                "key": "c",
                "problem_id": "p",
                "original_tokens": 50,
                "compressions": [{"target_ratio": 0.5, "text": "t", "tokens": None, "achieved_ratio": None}],
            },
        ],
        schema=COMPRESSED_SCHEMA,
    )
    page = render_html(report, table)
    assert "original CoT: 2 CoTs" in page


# --------------------------------------------------------------------------------------------------
# Writing next to the manifest


def _committed_run(root: str, storage_options: dict | None, data: pa.Table):
    from tokenskip.config import PipelineConfig
    from tokenskip.storage import RunStore, StorageConfig

    config = PipelineConfig.model_validate(
        {
            "dataset": "gsm8k-demo",
            "run_id": "r1",
            "sources": [{"kind": "gsm8k", "path": "x.jsonl"}],
            "engine": {"model": "tiny"},
            "output": StorageConfig(root=root, storage_options=storage_options or {}),
        }
    )
    store = RunStore(config.output, config.dataset, "r1")
    store.write_shard("s-1", {"data": data})
    store.commit({"config": {"x": 1}, "counts": {}})
    return config, store


def test_write_html_report_local_reads_the_committed_data(tmp_path, report, data):
    config, store = _committed_run(str(tmp_path), None, data)
    written = write_html_report(config, store, report | {"run_id": "r1"})
    path = Path(store.run_dir) / "report.html"
    assert written == str(path) and path.is_file()
    assert (Path(store.run_dir) / "_MANIFEST.json").is_file()  # next to the manifest
    page = path.read_text()
    assert _chart_count(page) == 11  # the data table was read back from the committed run
    assert f"original CoT: {data.num_rows} CoTs" in page


def test_write_html_report_s3(s3_bucket, report, data):
    import fsspec

    endpoint, bucket = s3_bucket
    options = {"endpoint_url": endpoint}
    config, store = _committed_run(f"s3://{bucket}/runs", options, data)
    path = write_html_report(config, store.run_dir, report | {"run_id": "r1"}, data)
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint})
    page = fs.cat(path).decode()
    assert path.endswith("gsm8k-demo/runs/r1/report.html")
    assert _chart_count(page) == 11


def test_report_shows_examples_with_pruned_words_marked(tmp_path, report):
    """A committed run's page shows its first kept samples: the question, the original CoT and every
    ratio's CoT with the words pruning dropped marked, all of it escaped."""
    tail = "The answer is \\boxed{7}."
    question = 'What is 3 + 4? <b>"bold" & sure</b>'
    rows = []
    for i in range(4):
        rows.append(
            {
                "key": f"k{i}", "problem_id": f"p{i}", "source": "gsm8k", "split": "test",
                "question": question if i == 0 else f"Question number {i}?", "answer": "7", "sample_index": 0,
                "model": "tiny", "cot": f"First add 3 and 4 <to> get 7. {tail}",
                "reasoning": "First add 3 and 4 <to> get 7. ", "answer_tail": tail, "extracted_answer": "7",
                "verdict": "correct", "original_tokens": 14,
                "compressions": [
                    {"target_ratio": 0.9, "text": f"First add 3 and 4 get 7. {tail}", "tokens": 13,
                     "achieved_ratio": 0.93},
                    {"target_ratio": 0.5, "text": f"add 3 4 7. {tail}", "tokens": 9, "achieved_ratio": 0.64},
                ],
            }
        )  # fmt: skip
    config, store = _committed_run(str(tmp_path), None, pa.Table.from_pylist(rows, schema=COMPRESSED_SCHEMA))
    write_html_report(config, store, report | {"run_id": "r1"})
    page = (Path(store.run_dir) / "report.html").read_text()
    examples = page[page.index("<h2>Examples</h2>") : page.index("<h2>Raw report</h2>")]
    # the first 3 kept samples, in the run's order; the question is text, not markup
    assert examples.count('<div class="example">') == 3
    assert html.escape(question, quote=True) in examples
    assert "<b>" not in examples.replace("<b>Question</b>", "")
    assert "Question number 2?" in examples and "Question number 3?" not in examples
    assert "First add 3 and 4 &lt;to&gt; get 7." in examples  # the original CoT, whole
    # ratio 0.9 dropped "<to>"; ratio 0.5 dropped "First", "and", "<to>" and "get"
    assert "ratio 0.9, achieved 0.93, 13 tokens" in examples
    assert "ratio 0.5, achieved 0.64, 9 tokens" in examples
    assert 'First add 3 and 4 <del class="dropped">&lt;to&gt;</del> get 7.' in examples
    assert (
        '<del class="dropped">First</del> add 3 <del class="dropped">and</del> 4 '
        '<del class="dropped">&lt;to&gt;</del> <del class="dropped">get</del> 7.'
    ) in examples
    assert examples.count(f'<span class="tail">{html.escape(tail)}</span>') == 3 * 2  # never pruned
    # no examples section when the caller has no examples to show
    assert "<h2>Examples</h2>" not in render_html(report, None)


# --------------------------------------------------------------------------------------------------
# A real headless browser


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("chromium not found: `make test` needs it (apt-get install -y chromium)")


def _chromium(binary: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _dump_dom(binary: str, tmp_path: Path, page: str) -> str:
    file = tmp_path / "report.html"
    file.write_text(page)
    result = _chromium(binary, tmp_path, "--dump-dom", file.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    assert "<body" in result.stdout, result.stderr[-2000:]
    return result.stdout


def _body_attrs(dom: str) -> dict[str, str]:
    tag = re.search(r"<body([^>]*)>", dom).group(1)
    return {k: html.unescape(v) for k, v in re.findall(r'([\w-]+)="([^"]*)"', tag)}


def test_every_chart_renders_in_chromium(chromium, tmp_path, report, data):
    page = render_html(report, data, resources=ResourcesConfig())
    attrs = _body_attrs(_dump_dom(chromium, tmp_path, page))
    assert attrs["data-errors"] == ""
    assert int(attrs["data-charts"]) == _chart_count(page) == 11
    assert attrs["data-rendered"] == attrs["data-charts"]


def test_hostile_text_stays_text_in_chromium(chromium, tmp_path, report, data):
    hostile = json.loads(json.dumps(report))
    hostile["model"] = HOSTILE
    hostile["counts"]["rejects_by_reason"][HOSTILE] = 3
    dom = _dump_dom(chromium, tmp_path, render_html(hostile, data))
    attrs = _body_attrs(dom)
    assert attrs["data-errors"] == "" and attrs["data-rendered"] == attrs["data-charts"] == "11"
    assert dom.count("<script>") == 2 and "<img" not in dom


def test_the_browser_check_catches_errors_and_blocked_fetches(chromium, tmp_path, report):
    """The page's own checks can fail: a throwing script and an external image are both recorded."""
    page = render_html(report, None)
    broken = page.replace(
        "</body>",
        '<script>undefinedFunction();</script><img src="https://example.invalid/x.png"></body>',
    )
    attrs = _body_attrs(_dump_dom(chromium, tmp_path, broken))
    assert "undefinedFunction" in attrs["data-errors"]
    assert "blocked by CSP" in attrs["data-errors"]
    # an empty chart is not counted as rendered
    empty = page.replace("</body>", '<svg class="chart" width="10" height="10"></svg></body>')
    attrs = _body_attrs(_dump_dom(chromium, tmp_path, empty))
    assert int(attrs["data-rendered"]) == _chart_count(page) and int(attrs["data-charts"]) == _chart_count(
        page
    )


def test_screenshot_is_not_blank(chromium, tmp_path, report, data):
    from PIL import Image, ImageStat

    file = tmp_path / "report.html"
    file.write_text(render_html(report, data, resources=ResourcesConfig()))
    shot = tmp_path / "shot.png"
    result = _chromium(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1100,2400", file.as_uri())
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    image = Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
    assert image.size == (1100, 2400)
    stddev = ImageStat.Stat(image).stddev
    assert min(stddev) > 10, f"screenshot looks blank (per-channel stddev {stddev})"
    # the charts' colours are on screen, not just black text on white
    colours = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=32).getcolors()
    assert colours is not None and len(colours) >= 6


def test_the_typed_run_report_reads_and_writes_report_json_as_it_was(report):
    """report.json keeps its format: an existing file (the fixture's keys, as run_pipeline wrote them)
    reads back into a RunReport and writes out the same keys and values; parts a report does not
    have (stopped, pending_shards, refused, a zero filtered_out) are left out, not written as null."""
    from tokenskip.run_report import AttemptReport, RunReport

    typed = RunReport.model_validate(report)
    written = json.loads(typed.to_json())
    assert set(written) == set(report)
    assert written["counts"] == report["counts"] | {"reject_rows_by_reason": {}}
    assert {k: written["attempt"][k] for k in report["attempt"]} == report["attempt"]
    assert RunReport.model_validate_json(typed.to_json()) == typed

    stopped = typed.model_copy(update={"stopped": "SIGTERM", "pending_shards": 2, "committed": False})
    assert json.loads(stopped.to_json())["pending_shards"] == 2
    filtered = typed.model_copy(update={"counts": typed.counts.model_copy(update={"filtered_out": 4})})
    assert json.loads(filtered.to_json())["counts"]["filtered_out"] == 4
    # The summary text (report.txt, the CLI's end of run) is the report's own.
    text = typed.model_copy(update={"attempt": AttemptReport(shards_committed=6)}).summary_text()
    assert text.startswith("tokenskip run report: dataset gsm8k-demo, run r-0123456789abcdef")
    assert "this attempt      6 shards" in text and "engine occupancy  n/a" in text
