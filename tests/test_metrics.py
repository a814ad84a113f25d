"""Ray metrics helper and structured stage logs.

Inside Ray the metrics recorded in a task and an actor are read back from the node's Prometheus endpoint
(what a cluster scrapes); outside Ray every call is a no-op that never imports or starts Ray.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from tokenskip import metrics as metrics_module
from tokenskip.metrics import (
    EVENT_LOGGER_NAME,
    MetricsConfig,
    StageMetrics,
    json_log_handler,
    log_stage_event,
    stage_event,
)

# -------------------------------------------------------------------------------------------------
# Outside Ray


def test_outside_ray_is_a_no_op_that_never_imports_ray():
    script = """
import sys
from tokenskip.metrics import StageMetrics
m = StageMetrics()
m.record_rows("generate", 3)
m.record_rows("generate", 2)
m.record_tokens(100)
m.record_errors("compress", "oom", 2)
m.record_rejects("grade", "incorrect")
m.record_stage_seconds("generate", 1.5)
m.set_acceptance_rate(0.5)
m.set_achieved_ratio(0.5, 0.52)
assert "ray" not in sys.modules, "recording metrics outside Ray imported Ray"
import json; print(json.dumps(m.totals(), sort_keys=True))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    totals = json.loads(out.stdout.strip().splitlines()[-1])
    assert totals["rows"] == {"stage=generate": 5}
    assert totals["tokens_generated"] == {"stage=generate": 100}
    assert totals["errors"] == {"reason=oom,stage=compress": 2}
    assert totals["rejects"] == {"reason=incorrect,stage=grade": 1}
    assert totals["stage_calls"] == {"stage=generate": 1}
    assert totals["acceptance_rate"] == {"": 0.5}
    assert totals["achieved_ratio"] == {"ratio=0.5": 0.52}


def test_outside_ray_creates_no_ray_metric(monkeypatch):
    monkeypatch.setattr(metrics_module, "ray_active", lambda: False)
    built = []
    monkeypatch.setattr(metrics_module, "_build_metric", lambda *a: built.append(a))
    m = StageMetrics()
    m.record_rows("grade", 4)
    m.set_acceptance_rate(1.0)
    assert built == []
    assert m.totals()["rows"] == {"stage=grade": 4}


def test_bad_input_is_a_clear_error():
    m = StageMetrics()
    with pytest.raises(ValueError, match="non-negative int"):
        m.record_rows("generate", -1)
    with pytest.raises(ValueError, match="non-negative int"):
        m.record_tokens(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stage"):
        m.record_rows("", 1)
    with pytest.raises(ValueError, match="reason"):
        m.record_errors("compress", None, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"acceptance rate must be in \[0.0, 1.0\]"):
        m.set_acceptance_rate(1.5)
    with pytest.raises(ValueError, match="finite"):
        m.set_achieved_ratio(0.5, float("nan"))
    with pytest.raises(ValueError, match="seconds"):
        m.record_stage_seconds("generate", -0.1)
    with pytest.raises(ValueError, match="increasing"):
        MetricsConfig(seconds_boundaries=[1, 1])
    assert m.totals() == {}  # nothing half-recorded
    m.record_rows("generate", 0)  # zero is fine and records nothing
    assert m.totals() == {}


def test_record_run_counts_sets_gauges():
    m = StageMetrics()
    from tokenskip.summary import RunCounts

    m.record_run_counts(RunCounts(acceptance_rate=0.625, achieved_ratio={"0.9": 0.91, "0.5": 0.52}))
    assert m.totals()["acceptance_rate"] == {"": 0.625}
    assert m.totals()["achieved_ratio"] == {"ratio=0.5": 0.52, "ratio=0.9": 0.91}


def test_pickle_keeps_config_and_totals():
    m = StageMetrics(MetricsConfig(prefix="other"))
    m.record_rows("generate", 2)
    copy = pickle.loads(pickle.dumps(m))
    assert copy.config.prefix == "other"
    assert copy.totals() == m.totals()
    copy.record_rows("generate", 1)
    assert copy.totals()["rows"] == {"stage=generate": 3} and m.totals()["rows"] == {"stage=generate": 2}


def test_a_failing_backend_is_logged_once_and_never_raises(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("metrics agent is down")

    monkeypatch.setattr(metrics_module, "ray_active", lambda: True)
    monkeypatch.setattr(metrics_module, "_session_id", lambda: "session")
    monkeypatch.setattr(metrics_module, "_build_metric", broken)
    monkeypatch.setattr(metrics_module, "_backend_failed", [False])
    monkeypatch.setattr(metrics_module, "_metrics", {})
    m = StageMetrics()
    with caplog.at_level(logging.WARNING, logger="tokenskip.metrics"):
        m.record_rows("generate", 1)
        m.record_rows("generate", 1)
        m.set_acceptance_rate(0.5)
    warnings = [r for r in caplog.records if "metrics disabled" in r.getMessage()]
    assert len(warnings) == 1 and "metrics agent is down" in warnings[0].getMessage()
    assert m.totals()["rows"] == {"stage=generate": 2}


# -------------------------------------------------------------------------------------------------
# Structured logs


def test_stage_event_is_one_line_of_json_with_the_fields():
    stream = io.StringIO()
    handler = json_log_handler(stream)
    logger = logging.getLogger(EVENT_LOGGER_NAME)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        record = log_stage_event(
            "generate",
            rows=12,
            seconds=1.25,
            reasons={"incorrect": 3},
            detail='line one\nline "two"',
            rate=float("nan"),
            ratios=(0.9, 0.5),
        )
        log_stage_event("compress", rows=4)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first == record
    assert first["event"] == "stage_complete" and first["stage"] == "generate"
    assert first["rows"] == 12 and first["seconds"] == 1.25 and first["reasons"] == {"incorrect": 3}
    assert first["detail"] == 'line one\nline "two"'
    assert first["rate"] is None  # JSON has no NaN
    assert first["ratios"] == [0.9, 0.5]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert json.loads(lines[1])["stage"] == "compress"


def test_stage_event_rejects_reserved_keys_and_bad_stage(caplog):
    with pytest.raises(ValueError, match="reserved"):
        stage_event("generate", ts=1)
    with pytest.raises(ValueError, match="stage"):
        stage_event("")
    with caplog.at_level(logging.INFO, logger=EVENT_LOGGER_NAME):
        log_stage_event("grade", kept=3, config=MetricsConfig())
    (logged,) = [r for r in caplog.records if r.name == EVENT_LOGGER_NAME]
    assert json.loads(logged.getMessage())["config"]["prefix"] == "tokenskip"


# -------------------------------------------------------------------------------------------------
# Inside Ray: recorded in a task and an actor, read back from the node's Prometheus endpoint


@pytest.fixture(scope="module")
def ray_with_metrics():
    import ray

    started = False
    if not ray.is_initialized():
        # Export every 0.5 s instead of 10 s, so the test reads its metrics back quickly.
        old = os.environ.get("RAY_metrics_report_interval_ms")
        os.environ["RAY_metrics_report_interval_ms"] = "500"
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        finally:
            if old is None:
                os.environ.pop("RAY_metrics_report_interval_ms", None)
            else:
                os.environ["RAY_metrics_report_interval_ms"] = old
        started = True
    yield ray
    if started:
        ray.shutdown()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = []
    for line in body.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            samples.append((match[1], dict(_LABEL.findall(match[2] or "")), float(match[3])))
    return samples


def _total(samples, name: str, **labels: str) -> float:
    """Sum over workers (each Ray worker exports its own series) of the samples matching labels."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


@pytest.mark.slow  # starts Ray
def test_metrics_inside_ray_task_and_actor_reach_prometheus(ray_with_metrics):
    ray = ray_with_metrics
    prefix = "tstest_" + uuid.uuid4().hex[:8]
    config = MetricsConfig(prefix=prefix)

    @ray.remote(num_cpus=0.5)
    def grade_task(metrics: StageMetrics) -> dict:
        metrics.record_rows("grade", 5)
        metrics.record_rejects("grade", "incorrect", 2)
        metrics.set_acceptance_rate(0.6)
        return metrics.totals()

    @ray.remote(num_cpus=0.5)
    class GenerateActor:
        def __init__(self, config: MetricsConfig):
            self.metrics = StageMetrics(config)

        def batch(self, rows: int, tokens: int) -> dict:
            self.metrics.record_rows("generate", rows)
            self.metrics.record_tokens(tokens)
            self.metrics.record_errors("generate", "engine_error", 1)
            self.metrics.record_stage_seconds("generate", 0.3)
            self.metrics.set_achieved_ratio(0.5, 0.52)
            return self.metrics.totals()

    actor = GenerateActor.remote(config)
    ray.get(actor.batch.remote(4, 100))
    actor_totals = ray.get(actor.batch.remote(3, 50))
    task_totals = ray.get(grade_task.remote(StageMetrics(config)))
    assert actor_totals["rows"] == {"stage=generate": 7}
    assert actor_totals["tokens_generated"] == {"stage=generate": 150}
    assert task_totals["rejects"] == {"reason=incorrect,stage=grade": 2}

    port = ray._private.worker.global_worker.node.metrics_export_port
    expected = {
        (f"ray_{prefix}_rows_total", ("stage", "generate")): 7,
        (f"ray_{prefix}_rows_total", ("stage", "grade")): 5,
        (f"ray_{prefix}_tokens_generated_total", ("stage", "generate")): 150,
        (f"ray_{prefix}_errors_total", ("reason", "engine_error")): 2,
        (f"ray_{prefix}_rejects_total", ("reason", "incorrect")): 2,
        (f"ray_{prefix}_stage_seconds_count", ("stage", "generate")): 2,
        (f"ray_{prefix}_acceptance_rate", None): 0.6,
        (f"ray_{prefix}_achieved_ratio", ("ratio", "0.5")): 0.52,
    }

    def seen(samples) -> dict:
        return {
            key: _total(samples, key[0], **({key[1][0]: key[1][1]} if key[1] else {})) for key in expected
        }

    # Wait for the export (every 0.5 s here; 10 s if another module started Ray), at most 60 s.
    deadline = time.monotonic() + 60
    got = {}
    while time.monotonic() < deadline:
        got = seen(_scrape(port))
        if all(got[k] == pytest.approx(v) for k, v in expected.items()):
            break
        time.sleep(0.5)
    assert got == pytest.approx(expected)
    ray.kill(actor)
