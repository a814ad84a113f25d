"""Create one RayJob from a template under a date-based name, wait for it, exit with its outcome.

Run by the CronJob in cronjob-refresh.yaml (one pod per scheduled run). Its exit code is what the
CronJob's job history shows, so it reflects the RayJob's final status:

    0  the Ray job SUCCEEDED
    1  the RayJob ended any other way (job FAILED or STOPPED, deployment Failed / ValidationFailed),
       or it disappeared while we waited
    2  bad input (template unreadable, not a RayJob, unfilled ${...} placeholder, name too long)
    3  the RayJob was still running when --timeout-seconds ran out (it keeps running; its own
       activeDeadlineSeconds bounds it)
    4  the Kubernetes API kept failing

The RayJob's name is "<prefix>-<YYYYMMDD>-<HHMM>" of the run's SCHEDULED time (UTC), taken from
the Job name the CronJob controller gives each run ("<cronjob>-<minutes since the epoch>", passed
in as $CRON_JOB_NAME): a retried launcher pod of the same run computes the same name, finds the
RayJob its predecessor created (HTTP 409 on create) and waits for that one instead of starting a
second refresh. Without $CRON_JOB_NAME (a manual run) the current minute is used.

Needs only `kubernetes` (the official client) and PyYAML; the API is injected in tests.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Protocol

import yaml

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
# KubeRay's limit for RayJob names: the RayCluster it creates is "<name>-<5 chars>" and RayCluster
# names are limited to 53 characters (63 minus the longest Service suffix, "-serve-svc").
MAX_RAYJOB_NAME = 47
DATE_SUFFIX_FORMAT = "%Y%m%d-%H%M"  # 13 characters, sorts by time
MANAGED_BY = "tokenskip-refresh-launcher"
SCHEDULED_TIME_ANNOTATION = "tokenskip.io/scheduled-time"

EXIT_SUCCEEDED, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_TIMEOUT, EXIT_API_ERROR = 0, 1, 2, 3, 4
# jobDeploymentStatus values after which KubeRay does nothing more with a RayJob.
TERMINAL_DEPLOYMENT_STATUSES = frozenset({"Complete", "Failed", "ValidationFailed"})

_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# The CronJob controller's suffix: the scheduled time in minutes since the epoch (8 digits since 1989).
_CRON_JOB_NAME = re.compile(r"^(?P<cronjob>.+)-(?P<minutes>\d{8,10})$")
# A launcher pod runs within days of its scheduled time; a "time" further off is not one.
MAX_SCHEDULE_SKEW = timedelta(days=7)
_PLACEHOLDER = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}")


class LauncherError(Exception):
    """Bad input: the launcher cannot start a run (exit code 2)."""


class AlreadyExists(Exception):
    """The RayJob name is taken (HTTP 409)."""


class NotFound(Exception):
    """The RayJob does not exist (HTTP 404)."""


class ApiError(Exception):
    """Any other API failure; ``transient`` ones (5xx, 429, no connection) are retried."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


class RayJobApi(Protocol):
    """The two calls the launcher makes; raises AlreadyExists / NotFound / ApiError."""

    def create(self, namespace: str, body: dict) -> dict: ...

    def get(self, namespace: str, name: str) -> dict: ...


def translate_api_exception(exc: Exception) -> Exception:
    """Map a kubernetes-client exception (anything with an HTTP ``status``) to ours."""
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None) or str(exc)
    if status == 409:
        return AlreadyExists(reason)
    if status == 404:
        return NotFound(reason)
    if isinstance(status, int) and status > 0:
        return ApiError(f"HTTP {status}: {reason}", transient=status >= 500 or status == 429)
    # No HTTP status: connection refused, timeout, DNS - the API server may come back.
    return ApiError(f"{type(exc).__name__}: {exc}", transient=True)


class KubernetesRayJobApi:
    """RayJobApi on the official client: in-cluster credentials, else the local kubeconfig."""

    def __init__(self) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self._api = client.CustomObjectsApi()

    def create(self, namespace: str, body: dict) -> dict:
        try:
            return self._api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        except Exception as exc:
            raise translate_api_exception(exc) from exc

    def get(self, namespace: str, name: str) -> dict:
        try:
            return self._api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except Exception as exc:
            raise translate_api_exception(exc) from exc


def scheduled_time(cron_job_name: str | None, now: datetime) -> datetime:
    """The run's scheduled time: from "<cronjob>-<minutes since epoch>", else ``now`` (to the minute).

    A Job made by hand (``kubectl create job --from=cronjob/...``) has a name of its own choosing; one
    that merely ends in digits ("refresh-2") is recognised by its implausible time and uses ``now``.
    """
    match = _CRON_JOB_NAME.match(cron_job_name or "")
    if match:
        scheduled = datetime.fromtimestamp(int(match.group("minutes")) * 60, tz=timezone.utc)
        if abs(now - scheduled) <= MAX_SCHEDULE_SKEW:
            return scheduled
    return now.astimezone(timezone.utc).replace(second=0, microsecond=0)


def rayjob_name(prefix: str, when: datetime) -> str:
    """``<prefix>-<YYYYMMDD>-<HHMM>`` (UTC); a valid DNS-1035 label within KubeRay's 47 characters."""
    name = f"{prefix}-{when.astimezone(timezone.utc).strftime(DATE_SUFFIX_FORMAT)}"
    if len(name) > MAX_RAYJOB_NAME:
        room = MAX_RAYJOB_NAME - len(name) + len(prefix)
        raise LauncherError(
            f"RayJob name {name!r} is {len(name)} characters, KubeRay allows {MAX_RAYJOB_NAME}: "
            f"shorten --name-prefix to at most {room} characters"
        )
    if not _DNS1035_LABEL.match(name):
        raise LauncherError(
            f"RayJob name {name!r} is not a DNS-1035 label: --name-prefix must start with a "
            "lower-case letter and hold only lower-case letters, digits and '-'"
        )
    return name


def load_template(path: Path) -> dict:
    """Read and check the RayJob template (a RayJob manifest; its name is replaced)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise LauncherError(f"cannot read the RayJob template {path}: {exc}") from exc
    left = sorted(set(_PLACEHOLDER.findall(text)))
    if left:
        raise LauncherError(
            f"the RayJob template {path} still holds placeholders {left}: fill them (envsubst) "
            "when applying the ConfigMap"
        )
    try:
        template = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise LauncherError(f"the RayJob template {path} is not valid YAML: {exc}") from exc
    if (
        not isinstance(template, dict)
        or template.get("kind") != "RayJob"
        or template.get("apiVersion") != f"{GROUP}/{VERSION}"
    ):
        raise LauncherError(f"the template {path} must be one {GROUP}/{VERSION} RayJob manifest")
    if not isinstance(template.get("spec"), dict):
        raise LauncherError(f"the RayJob template {path} has no spec")
    return template


def build_rayjob(template: dict, name: str, namespace: str, when: datetime) -> dict:
    """The RayJob to create: the template's spec under ``name`` in ``namespace``, labelled as ours."""
    metadata = copy.deepcopy(template.get("metadata") or {})
    for server_field in (
        "generateName",
        "resourceVersion",
        "uid",
        "creationTimestamp",
        "managedFields",
        "selfLink",
        "generation",
        "ownerReferences",
    ):
        metadata.pop(server_field, None)
    metadata["name"] = name
    metadata["namespace"] = namespace
    metadata.setdefault("labels", {})["app.kubernetes.io/managed-by"] = MANAGED_BY
    metadata.setdefault("annotations", {})[SCHEDULED_TIME_ANNOTATION] = when.astimezone(
        timezone.utc
    ).isoformat()
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RayJob",
        "metadata": metadata,
        "spec": copy.deepcopy(template["spec"]),
    }


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    summary: str


def rayjob_outcome(rayjob: dict) -> Outcome | None:
    """The final outcome of a RayJob, or None while KubeRay is still working on it."""
    status = rayjob.get("status") or {}
    deployment = status.get("jobDeploymentStatus")
    if deployment not in TERMINAL_DEPLOYMENT_STATUSES:
        return None
    job_status = status.get("jobStatus") or "UNKNOWN"
    detail = "; ".join(str(status[k]) for k in ("reason", "message") if status.get(k))
    summary = f"jobDeploymentStatus={deployment} jobStatus={job_status}" + (f" ({detail})" if detail else "")
    succeeded = deployment == "Complete" and job_status == "SUCCEEDED"
    return Outcome(EXIT_SUCCEEDED if succeeded else EXIT_FAILED, summary)


def _log(message: str) -> None:
    # Timestamped and flushed at once: the pod log is the only record of a scheduled run.
    print(f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ} {message}", flush=True)


def _call_with_retries(
    call: Callable[[], dict], *, attempts: int, sleep: Callable[[float], None], log: Callable[[str], None]
) -> dict:
    delay = 2.0
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except ApiError as exc:
            if not exc.transient or attempt == attempts:
                raise
            log(f"API error ({exc}); retry {attempt}/{attempts - 1} in {delay:.0f} s")
            sleep(delay)
            delay = min(delay * 2, 60.0)
    raise AssertionError("unreachable")


def launch_and_wait(
    api: RayJobApi,
    template: dict,
    *,
    namespace: str,
    name_prefix: str,
    when: datetime,
    poll_seconds: float = 30.0,
    timeout_seconds: float | None = None,
    api_attempts: int = 5,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    log: Callable[[str], None] = _log,
) -> int:
    """Create the run's RayJob (or attach to it if a previous pod of this run created it), poll until
    it is terminal, and return the exit code. Entry function; see the module docstring."""
    name = rayjob_name(name_prefix, when)
    body = build_rayjob(template, name, namespace, when)
    try:
        _call_with_retries(lambda: api.create(namespace, body), attempts=api_attempts, sleep=sleep, log=log)
        log(f"created RayJob {namespace}/{name}")
    except AlreadyExists:
        # Same scheduled time, same name: a previous launcher pod of this run created it.
        log(f"RayJob {namespace}/{name} already exists (a retried launcher); waiting for it")
    except ApiError as exc:
        log(f"cannot create RayJob {namespace}/{name}: {exc}")
        return EXIT_API_ERROR

    deadline = None if timeout_seconds is None else clock() + timeout_seconds
    last_state = None
    while True:
        try:
            current = _call_with_retries(
                lambda: api.get(namespace, name), attempts=api_attempts, sleep=sleep, log=log
            )
        except NotFound:
            log(f"RayJob {namespace}/{name} disappeared before finishing (deleted by someone?)")
            return EXIT_FAILED
        except ApiError as exc:
            log(f"cannot read RayJob {namespace}/{name}: {exc}")
            return EXIT_API_ERROR
        outcome = rayjob_outcome(current)
        if outcome is not None:
            log(f"RayJob {namespace}/{name} finished: {outcome.summary}")
            return outcome.exit_code
        status = current.get("status") or {}
        state = (status.get("jobDeploymentStatus"), status.get("jobStatus"))
        if state != last_state:
            log(f"RayJob {namespace}/{name}: jobDeploymentStatus={state[0]} jobStatus={state[1]}")
            last_state = state
        if deadline is not None and clock() >= deadline:
            log(
                f"RayJob {namespace}/{name} still running after {timeout_seconds:.0f} s; giving up waiting "
                "(it keeps running, bounded by its activeDeadlineSeconds)"
            )
            return EXIT_TIMEOUT
        sleep(poll_seconds)


def main(
    argv: list[str] | None = None,
    api: RayJobApi | None = None,
    environ: dict[str, str] | None = None,
    now: datetime | None = None,
) -> int:
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(description="Create a RayJob from a template and wait for it.")
    parser.add_argument("--template", type=Path, required=True, help="RayJob manifest to copy the spec from")
    parser.add_argument("--name-prefix", required=True, help="RayJob name = <prefix>-<YYYYMMDD>-<HHMM>")
    parser.add_argument(
        "--namespace",
        default=environ.get("POD_NAMESPACE") or "default",
        help="namespace for the RayJob (default: $POD_NAMESPACE)",
    )
    parser.add_argument("--poll-seconds", type=float, default=30.0)
    parser.add_argument(
        "--timeout-seconds",
        type=float,
        default=None,
        help="stop waiting after this long (exit 3); default: wait until terminal",
    )
    args = parser.parse_args(argv)
    if args.poll_seconds <= 0:
        parser.error("--poll-seconds must be positive")
    when = scheduled_time(environ.get("CRON_JOB_NAME"), now or datetime.now(timezone.utc))
    try:
        template = load_template(args.template)
        rayjob_name(args.name_prefix, when)  # a bad prefix fails before any API call
        api = api if api is not None else KubernetesRayJobApi()
        return launch_and_wait(
            api,
            template,
            namespace=args.namespace,
            name_prefix=args.name_prefix,
            when=when,
            poll_seconds=args.poll_seconds,
            timeout_seconds=args.timeout_seconds,
        )
    except LauncherError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
