"""Ray metrics and structured stage logs for the dataset job.

    metrics = StageMetrics()                       # cheap, picklable: build one per stage actor
    metrics.record_rows("generate", n)             # rows leaving a stage          (counter, tag stage)
    metrics.record_tokens(n)                       # tokens generated              (counter)
    metrics.record_rejects("grade", "incorrect")   # rows rejected on purpose      (counter, stage/reason)
    metrics.record_errors("compress", "oom", n)    # rows that failed              (counter, stage/reason)
    metrics.record_stage_seconds("generate", s)    # time per batch/stage          (histogram, tag stage)
    metrics.record_engine_steps("generate", steps, running, max_num_seqs)  # engine occupancy (counters+gauge)
    metrics.set_acceptance_rate(0.62)              # kept / graded                 (gauge)
    metrics.set_achieved_ratio(0.5, 0.52)          # mean achieved per target      (gauge, tag ratio)
    log_stage_event("generate", rows=n, seconds=s) # one JSON object per log line

Metrics go through :mod:`ray.util.metrics`, so a cluster's Prometheus scrapes them from every node
(names get Ray's ``ray_`` prefix, counters a ``_total`` suffix). Outside Ray (``ray.is_initialized()``
false: unit tests, the CLI's ``--dry-run``) every call is a no-op apart from input checks and the
helper's own in-process totals, and nothing starts Ray. A metrics backend that fails is logged once and
never fails the stage: metrics must not cost data.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import threading
from collections import Counter
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from tokenskip.summary import RunCounts

log = logging.getLogger(__name__)
EVENT_LOGGER_NAME = "tokenskip.events"
event_log = logging.getLogger(EVENT_LOGGER_NAME)

_RESERVED_EVENT_KEYS = frozenset({"event", "stage", "ts"})


class MetricsConfig(BaseModel):
    """Names and buckets of the job's Ray metrics."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=True,
        description="Export Ray metrics. Off saves one metric record per call (negligible next to a batch); "
        "the in-process totals and the JSON stage logs stay on either way.",
    )
    prefix: str = Field(
        default="tokenskip",
        pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$",
        description="Metric name prefix. Change it only to keep two jobs' series apart on one cluster; "
        "dashboards query the default.",
    )
    seconds_boundaries: list[float] = Field(
        default=[0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800],
        min_length=1,
        description="Upper bounds (seconds) of the stage-time histogram buckets. More buckets resolve "
        "latency better but multiply the series Prometheus stores.",
    )

    @field_validator("seconds_boundaries")
    @classmethod
    def _increasing_positive(cls, value: list[float]) -> list[float]:
        if any(b <= 0 for b in value) or any(b >= c for b, c in zip(value, value[1:], strict=False)):
            raise ValueError("seconds_boundaries must be positive and strictly increasing")
        return value


# Ray metric objects per process (creating one registers it with the core worker, so reuse them); they
# belong to one Ray session, so a new ray.init in the same process starts a fresh set.
_metrics_lock = threading.Lock()
_metrics: dict[str, Any] = {}
_metrics_session: list[Any] = [None]
_backend_failed: list[bool] = [False]


def ray_active() -> bool:
    """True inside a Ray driver, task or actor (without importing Ray when it was never imported)."""
    import sys

    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def _session_id() -> Any:
    import ray

    try:
        return ray.get_runtime_context().get_job_id()
    except Exception:  # noqa: BLE001 - any answer that differs per session will do
        return id(ray._private.worker.global_worker.core_worker)


def _check_count(n: Any, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{what} must be a non-negative int, got {n!r}")
    return n


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _check_float(value: Any, what: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{what} must be in [{lo}, {hi}], got {value!r}")
    return float(value)


def ratio_tag(target: float) -> str:
    """Tag value of a target ratio: ``0.5`` -> ``"0.5"`` (the same spelling as the run report's keys)."""
    return f"{float(target):g}"


class StageMetrics:
    """Records the job's metrics; safe anywhere (a no-op for Ray outside Ray) and cheap to pickle.

    Besides exporting to Ray it keeps this instance's totals in-process (:meth:`totals`), so a stage can
    put them in its completion log line and a test can read them back from an actor.
    """

    def __init__(self, config: MetricsConfig | None = None):
        self.config = config or MetricsConfig()
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "counts": self._counts, "gauges": self._gauges}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"])
        self._counts.update(state["counts"])
        self._gauges.update(state["gauges"])

    # -- public API ---------------------------------------------------------------------------------

    def record_rows(self, stage: str, n: int) -> None:
        """``n`` rows left ``stage`` (its output rows, whatever their status)."""
        self._count("rows", n, stage=_check_name(stage, "stage"))

    def record_tokens(self, n: int, stage: str = "generate") -> None:
        """``n`` tokens generated (completion tokens, all samples)."""
        self._count("tokens_generated", n, stage=_check_name(stage, "stage"))

    def record_rejects(self, stage: str, reason: str, n: int = 1) -> None:
        """``n`` rows rejected on purpose by ``stage`` (incorrect, duplicate, policy, ...)."""
        self._count("rejects", n, stage=_check_name(stage, "stage"), reason=_check_name(reason, "reason"))

    def record_errors(self, stage: str, reason: str, n: int = 1) -> None:
        """``n`` rows that ``stage`` could not process, by machine-readable ``reason``."""
        self._count("errors", n, stage=_check_name(stage, "stage"), reason=_check_name(reason, "reason"))

    def record_stage_seconds(self, stage: str, seconds: float) -> None:
        """Wall time of one call of ``stage`` (a batch, or the whole stage)."""
        seconds = _check_float(seconds, "seconds", lo=0.0)
        stage = _check_name(stage, "stage")
        with self._lock:
            self._counts[("stage_calls", (("stage", stage),))] += 1
        self._export("stage_seconds", "observe", seconds, {"stage": stage})

    def record_engine_steps(
        self, stage: str, steps: int, running_seqs: int, max_num_seqs: int | None
    ) -> None:
        """``steps`` engine steps ran ``running_seqs`` sequences in total (summed over the steps), in an
        engine with room for ``max_num_seqs``. Counters, so occupancy over any window is
        ``rate(running_seqs) / rate(steps) / max_num_seqs``; the gauge holds this instance's lifetime value."""
        stage = _check_name(stage, "stage")
        self._count("engine_steps", steps, stage=stage)
        self._count("engine_running_seqs", running_seqs, stage=stage)
        with self._lock:
            total_steps = self._counts[("engine_steps", (("stage", stage),))]
            total_running = self._counts[("engine_running_seqs", (("stage", stage),))]
        if total_steps and max_num_seqs:
            self._gauge("engine_occupancy", total_running / (total_steps * max_num_seqs), stage=stage)

    def set_acceptance_rate(self, rate: float) -> None:
        """Kept samples / graded samples so far (0..1)."""
        self._gauge("acceptance_rate", _check_float(rate, "acceptance rate", 0.0, 1.0))

    def set_achieved_ratio(self, target: float, achieved: float) -> None:
        """Mean achieved compression ratio (compressed / original tokens) at ``target``."""
        _check_float(target, "target ratio", 0.0, 1.0)
        self._gauge(
            "achieved_ratio", _check_float(achieved, "achieved ratio", lo=0.0), ratio=ratio_tag(target)
        )

    def record_run_counts(self, counts: RunCounts) -> None:
        """Set the gauges from ``run_statistics`` output (``acceptance_rate``, ``achieved_ratio``)."""
        self.set_acceptance_rate(counts.acceptance_rate)
        for target, achieved in counts.achieved_ratio.items():
            self.set_achieved_ratio(float(target), achieved)

    def totals(self) -> dict[str, Any]:
        """What this instance recorded: ``{metric: {"tag=value,...": total}}`` (gauges: last value)."""
        out: dict[str, dict[str, float]] = {}
        with self._lock:
            items = list(self._counts.items()) + list(self._gauges.items())
        for (name, tags), value in sorted(items):
            out.setdefault(name, {})[",".join(f"{k}={v}" for k, v in tags)] = value
        return out

    # -- internals ----------------------------------------------------------------------------------

    def _count(self, name: str, n: int, **tags: str) -> None:
        n = _check_count(n, "n")
        if n == 0:
            return  # Ray counters refuse increments <= 0; nothing happened anyway
        with self._lock:
            self._counts[(name, tuple(sorted(tags.items())))] += n
        self._export(name, "inc", n, tags)

    def _gauge(self, name: str, value: float, **tags: str) -> None:
        with self._lock:
            self._gauges[(name, tuple(sorted(tags.items())))] = value
        self._export(name, "set", value, tags)

    def _export(self, name: str, method: str, value: float, tags: dict[str, str]) -> None:
        if not self.config.enabled or _backend_failed[0] or not ray_active():
            return
        try:
            metric = self._metric(name)
            getattr(metric, method)(value, tags=tags)
        except Exception as e:  # noqa: BLE001 - metrics never fail a stage
            _backend_failed[0] = True
            log.warning("Ray metrics disabled in this process after an error: %s: %s", type(e).__name__, e)

    def _metric(self, name: str) -> Any:
        from ray.util import metrics as ray_metrics

        full = f"{self.config.prefix}_{name}"
        with _metrics_lock:
            session = _session_id()
            if _metrics_session[0] != session:
                _metrics.clear()
                _metrics_session[0] = session
            metric = _metrics.get(full)
            if metric is None:
                metric = _build_metric(ray_metrics, full, name, self.config)
                _metrics[full] = metric
            return metric


_DEFINITIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "rows": ("Counter", "Rows that left a pipeline stage.", ("stage",)),
    "tokens_generated": ("Counter", "Completion tokens generated.", ("stage",)),
    "rejects": ("Counter", "Rows rejected on purpose, by stage and reason.", ("stage", "reason")),
    "errors": ("Counter", "Rows that could not be processed, by stage and reason.", ("stage", "reason")),
    "engine_steps": ("Counter", "Engine steps with at least one running sequence.", ("stage",)),
    "engine_running_seqs": ("Counter", "Running sequences summed over engine steps.", ("stage",)),
    "engine_occupancy": (
        "Gauge",
        "Mean running sequences / max_num_seqs over an actor's engine steps so far.",
        ("stage",),
    ),
    "stage_seconds": ("Histogram", "Wall seconds of one stage call.", ("stage",)),
    "acceptance_rate": ("Gauge", "Kept samples / graded samples.", ()),
    "achieved_ratio": ("Gauge", "Mean achieved compression ratio per target ratio.", ("ratio",)),
}


def _build_metric(ray_metrics: Any, full_name: str, name: str, config: MetricsConfig) -> Any:
    kind, description, tag_keys = _DEFINITIONS[name]
    if kind == "Histogram":
        return ray_metrics.Histogram(
            full_name, description, boundaries=list(config.seconds_boundaries), tag_keys=tag_keys
        )
    return getattr(ray_metrics, kind)(full_name, description, tag_keys=tag_keys)


# --------------------------------------------------------------------------------------------------
# Structured logs


def _json_safe(value: Any) -> Any:
    """JSON-encodable copy: non-finite floats become null (JSON has no NaN), unknown objects str()."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    if hasattr(value, "model_dump"):
        return _json_safe(value.model_dump(mode="json"))
    return str(value)


def stage_event(stage: str, **fields: Any) -> dict[str, Any]:
    """The record :func:`log_stage_event` logs: ``event``, ``stage``, ``ts`` (UTC ISO-8601), ``fields``."""
    _check_name(stage, "stage")
    clash = _RESERVED_EVENT_KEYS & set(fields)
    if clash:
        raise ValueError(f"fields {sorted(clash)} are reserved in a stage event (event, stage, ts)")
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"event": "stage_complete", "stage": stage, "ts": now, **_json_safe(fields)}


def log_stage_event(stage: str, *, level: int = logging.INFO, **fields: Any) -> dict[str, Any]:
    """Log one stage completion as ONE line of JSON on the ``tokenskip.events`` logger; returns the record.

    The message is the JSON object itself (strings with newlines are escaped, NaN becomes null), so a log
    shipper can parse every line; attach :func:`json_log_handler` to get lines with nothing around them.
    """
    record = stage_event(stage, **fields)
    event_log.log(level, json.dumps(record, allow_nan=False, ensure_ascii=False, separators=(",", ":")))
    return record


def json_log_handler(stream: Any = None) -> logging.Handler:
    """A handler that writes each event message as-is (one JSON object per line)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler
