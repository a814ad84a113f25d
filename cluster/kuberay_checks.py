"""KubeRay's own checks that its CRDs cannot express, and built-in kinds against Kubernetes' schemas.

Part of the offline manifest validator (:mod:`cluster.validate_manifests`); see its docstring for how
the name limits are derived.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import jsonschema
import yaml

from cluster.crd_schemas import field_path

if TYPE_CHECKING:
    from cluster.validate_manifests import ValidationConfig

RAY_GROUP = "ray.io"
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayService", "RayCronJob")

# KubeRay name limits (see the module docstring for how they are derived).
MAX_RAYCLUSTER_NAME = 63 - len("-serve-svc")  # 53
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - len("-") - 5  # 47
MAX_RAYSERVICE_NAME = MAX_RAYJOB_NAME  # 47
MAX_RAYCRONJOB_NAME = MAX_RAYJOB_NAME - len("-") - 8  # 38
KUBERAY_NAME_LIMITS = {
    "RayCluster": MAX_RAYCLUSTER_NAME,
    "RayJob": MAX_RAYJOB_NAME,
    "RayService": MAX_RAYSERVICE_NAME,
    "RayCronJob": MAX_RAYCRONJOB_NAME,
}
# The CronJob controller names Jobs "<cronjob>-<minutes since epoch>" and Job names must leave room
# for the pod suffix: Kubernetes caps CronJob names at 52 characters.
MAX_CRONJOB_NAME = 52

_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_RAY_START_RESOURCE_KEYS = ("num-cpus", "num-gpus", "memory", "resources")


def name_problems(kind: str, name: Any) -> list[str]:
    """Why ``name`` is not a valid name for ``kind`` (empty if it is)."""
    if not isinstance(name, str) or not name:
        return ["metadata.name is required"]
    if kind in KUBERAY_NAME_LIMITS:
        limit = KUBERAY_NAME_LIMITS[kind]
        out = []
        if len(name) > limit:
            out.append(f"{kind} name {name!r} is {len(name)} characters; KubeRay allows at most {limit}")
        if not _DNS1035_LABEL.match(name):
            out.append(
                f"{kind} name {name!r} is not a DNS-1035 label (lower-case letters, digits and '-', "
                "starting with a letter, ending with a letter or digit)"
            )
        return out
    limit = MAX_CRONJOB_NAME if kind == "CronJob" else 253
    out = []
    if len(name) > limit:
        out.append(f"{kind} name {name!r} is {len(name)} characters; at most {limit} allowed")
    if not all(DNS1123_LABEL.match(part) for part in name.split(".")):
        out.append(f"{kind} name {name!r} is not a DNS-1123 subdomain")
    return out


def is_valid_dns1035_label(name: str, max_length: int = 63) -> bool:
    """True if ``name`` is an RFC 1035 label of at most ``max_length`` characters."""
    return len(name) <= max_length and _DNS1035_LABEL.match(name) is not None


def runtime_env_problems(runtime_env_yaml: str) -> list[str]:
    """Why a RayJob's runtimeEnvYAML is not a valid Ray runtime env (empty if it is)."""
    try:
        parsed = yaml.safe_load(runtime_env_yaml)
    except yaml.YAMLError as exc:
        return [f"runtimeEnvYAML is not valid YAML: {exc}"]
    if parsed is None:
        return []
    if not isinstance(parsed, dict):
        return [f"runtimeEnvYAML must be a mapping, got {type(parsed).__name__}"]
    from ray.runtime_env import RuntimeEnv

    # Ray takes any other key for a runtime-env plugin and fails only when the job starts, if no
    # such plugin is installed; a misspelt "env_var" must fail here instead.
    unknown = sorted(k for k in parsed if k not in RuntimeEnv.known_fields)
    if unknown:
        return [f"runtimeEnvYAML has unknown field(s) {unknown}; Ray knows {sorted(RuntimeEnv.known_fields)}"]
    try:
        RuntimeEnv(**parsed)
    except Exception as exc:  # RuntimeEnv raises TypeError/ValueError/... for bad fields
        return [f"runtimeEnvYAML is not a valid Ray runtime env: {type(exc).__name__}: {exc}"]
    return []


def time_zone_problems(time_zone: Any) -> list[str]:
    """A timeZone must name an IANA zone (both the CronJob and the RayCronJob controller load it)."""
    if time_zone is None:
        return []
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(str(time_zone))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return [f"timeZone {time_zone!r} is not a known IANA time zone"]
    return []


def cron_problems(schedule: Any) -> list[str]:
    if not isinstance(schedule, str):
        return ["schedule must be a string"]
    if "TZ" in schedule:
        return ["cannot use TZ or CRON_TZ in schedule, use the timeZone field instead"]
    from croniter import croniter

    if not schedule.startswith("@") and len(schedule.split()) != 5:
        return [f"schedule {schedule!r} must have 5 fields (minute hour day month weekday)"]
    if not croniter.is_valid(schedule):
        return [f"schedule {schedule!r} is not a valid cron expression"]
    return []


def _cluster_spec_problems(spec: dict, annotations: dict, config: ValidationConfig) -> list[tuple[str, str]]:
    """A subset of KubeRay's ValidateRayClusterSpec."""
    out: list[tuple[str, str]] = []
    groups = [("headGroupSpec", "Head", spec.get("headGroupSpec") or {})]
    groups += [
        (f"workerGroupSpecs[{i}]", g.get("groupName", f"#{i}"), g)
        for i, g in enumerate(spec.get("workerGroupSpecs") or [])
    ]
    for path, group_name, group in groups:
        containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
        if not containers:
            out.append(
                (f"{path}.template.spec.containers", f"{group_name} group needs at least one container")
            )
        params = group.get("rayStartParams") or {}
        if any(params.get(k) for k in _RAY_START_RESOURCE_KEYS) and group.get("resources"):
            out.append(
                (path, f"resource fields set in both rayStartParams and resources for {group_name} group")
            )
        if "labels" in params:
            out.append(
                (f"{path}.rayStartParams.labels", "rayStartParams['labels'] is not supported; use labels")
            )
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        path = f"workerGroupSpecs[{i}]"
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        replicas = group.get("replicas", low)
        if isinstance(low, int) and isinstance(high, int) and low > high:
            out.append((path, f"minReplicas ({low}) is greater than maxReplicas ({high})"))
        elif (
            isinstance(replicas, int)
            and isinstance(low, int)
            and isinstance(high, int)
            and not low <= replicas <= high
        ):
            out.append(
                (
                    f"{path}.replicas",
                    f"replicas ({replicas}) outside [minReplicas, maxReplicas] = [{low}, {high}]",
                )
            )
        if group.get("suspend"):
            if autoscaling:
                out.append(
                    (f"{path}.suspend", "a worker group cannot be suspended with the autoscaler enabled")
                )
            elif "RayJobDeletionPolicy" not in config.enabled_feature_gates:
                out.append(
                    (
                        f"{path}.suspend",
                        "suspending a worker group needs the RayJobDeletionPolicy feature gate",
                    )
                )
    if annotations.get("ray.io/ft-enabled") and spec.get("gcsFaultToleranceOptions"):
        out.append(
            (
                "gcsFaultToleranceOptions",
                "ray.io/ft-enabled annotation and gcsFaultToleranceOptions are both set",
            )
        )
    return out


def _rayjob_spec_problems(spec: dict, annotations: dict, config: ValidationConfig) -> list[tuple[str, str]]:
    """A subset of KubeRay's ValidateRayJobSpec (run on the defaulted spec)."""
    out: list[tuple[str, str]] = []
    shutdown = bool(spec.get("shutdownAfterJobFinishes"))
    if spec.get("suspend") and not shutdown:
        out.append(("suspend", "a RayJob with shutdownAfterJobFinishes false cannot be suspended"))
    ttl = spec.get("ttlSecondsAfterFinished") or 0
    if isinstance(ttl, int) and ttl < 0:
        out.append(("ttlSecondsAfterFinished", "must be a non-negative integer"))
    if not shutdown and isinstance(ttl, int) and ttl > 0:
        out.append(("ttlSecondsAfterFinished", "needs shutdownAfterJobFinishes: true"))
    if (
        spec.get("deletionStrategy") is not None
        and "RayJobDeletionPolicy" not in config.enabled_feature_gates
    ):
        out.append(("deletionStrategy", "needs the RayJobDeletionPolicy feature gate"))
    selector = spec.get("clusterSelector") or {}
    if spec.get("rayClusterSpec") is None and not selector:
        out.append(("", "one of rayClusterSpec or clusterSelector must be set"))
    if selector and not selector.get("ray.io/cluster"):
        out.append(("clusterSelector", "cluster name (ray.io/cluster) in clusterSelector must not be empty"))
    mode = spec.get("submissionMode")
    backoff = spec.get("backoffLimit")
    if mode == "InteractiveMode" and isinstance(backoff, int) and backoff > 0:
        out.append(("backoffLimit", "backoffLimit is incompatible with InteractiveMode"))
    if isinstance(backoff, int) and backoff < 0:
        out.append(("backoffLimit", "must be non-negative"))
    deadline = spec.get("activeDeadlineSeconds")
    if isinstance(deadline, int) and deadline <= 0:
        out.append(("activeDeadlineSeconds", "must be a positive integer"))
    if mode == "SidecarMode" and (spec.get("submitterPodTemplate") or spec.get("submitterConfig")):
        out.append(
            ("submissionMode", "SidecarMode supports neither submitterPodTemplate nor submitterConfig")
        )
    if isinstance(spec.get("rayClusterSpec"), dict):
        out += [
            (f"rayClusterSpec.{p}".rstrip("."), m)
            for p, m in _cluster_spec_problems(spec["rayClusterSpec"], annotations, config)
        ]
    if isinstance(spec.get("runtimeEnvYAML"), str):
        out += [("runtimeEnvYAML", m) for m in runtime_env_problems(spec["runtimeEnvYAML"])]
    return out


def kuberay_problems(obj: dict, config: ValidationConfig) -> list[tuple[str, str, str]]:
    """(check, path, message) of the operator-side checks for a defaulted KubeRay object."""
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    out = [("name", "metadata.name", m) for m in name_problems(kind, (obj.get("metadata") or {}).get("name"))]
    found: list[tuple[str, str]] = []
    if kind == "RayCluster":
        found = _cluster_spec_problems(spec, annotations, config)
    elif kind == "RayJob":
        found = _rayjob_spec_problems(spec, annotations, config)
    elif kind == "RayService":
        found = _cluster_spec_problems(spec.get("rayClusterConfig") or {}, annotations, config)
        found = [(f"rayClusterConfig.{p}".rstrip("."), m) for p, m in found]
    elif kind == "RayCronJob":
        found = [("schedule", m) for m in cron_problems(spec.get("schedule"))]
        found += [("timeZone", m) for m in time_zone_problems(spec.get("timeZone"))]
        if spec.get("jobTemplate") is None:
            found.append(("jobTemplate", "jobTemplate cannot be empty"))
        else:
            found += [
                (f"jobTemplate.{p}".rstrip("."), m)
                for p, m in _rayjob_spec_problems(spec["jobTemplate"], annotations, config)
            ]
    for path, message in found:
        check = "runtime_env" if path.endswith("runtimeEnvYAML") else "kuberay"
        out.append((check, f"spec.{path}".rstrip("."), message))
    return out


def pod_templates(obj: dict) -> Iterator[tuple[str, dict]]:
    """(path, pod template) of every pod template inside a KubeRay object."""
    kind, spec = obj.get("kind"), obj.get("spec") or {}

    def from_cluster(cluster: dict, prefix: str) -> Iterator[tuple[str, dict]]:
        if isinstance((cluster.get("headGroupSpec") or {}).get("template"), dict):
            yield f"{prefix}headGroupSpec.template", cluster["headGroupSpec"]["template"]
        for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
            if isinstance(group.get("template"), dict):
                yield f"{prefix}workerGroupSpecs[{i}].template", group["template"]

    def from_job(job: dict, prefix: str) -> Iterator[tuple[str, dict]]:
        if isinstance(job.get("rayClusterSpec"), dict):
            yield from from_cluster(job["rayClusterSpec"], f"{prefix}rayClusterSpec.")
        if isinstance(job.get("submitterPodTemplate"), dict):
            yield f"{prefix}submitterPodTemplate", job["submitterPodTemplate"]

    if kind == "RayCluster":
        yield from from_cluster(spec, "spec.")
    elif kind == "RayJob":
        yield from from_job(spec, "spec.")
    elif kind == "RayService":
        yield from from_cluster(spec.get("rayClusterConfig") or {}, "spec.rayClusterConfig.")
    elif kind == "RayCronJob":
        yield from from_job(spec.get("jobTemplate") or {}, "spec.jobTemplate.")


@lru_cache(maxsize=64)
def _builtin_validator(api_version: str, kind: str, kubernetes_version: str, strict: bool):
    """A jsonschema validator for a built-in kind from kubernetes-validate's bundled schemas.

    kubernetes_validate.validate() stops at the first error; this loads the same schema files the
    same way (its ``schema_contents``) so that every error is reported at once.
    """
    from kubernetes_validate import utils as kvu
    from referencing import Registry, Resource

    wanted = kvu.major_minor(kubernetes_version.lstrip("v"))
    candidates = [v for v in kvu.all_versions() if kvu.major_minor(v) <= wanted]
    if not candidates:
        raise ValueError(f"kubernetes-validate has no schemas for Kubernetes {kubernetes_version}")
    folder = f"v{candidates[-1]}-local" + ("-strict" if strict else "")
    # "rbac.authorization.k8s.io/v1" -> "rbac-v1", "v1" -> "v1" (the bundle's file naming).
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = kvu.schema_contents(f"kubernetes-json-schema/{folder}/{kind.lower()}-{api}.json", wanted)
    except FileNotFoundError:
        return None
    definitions = kvu.schema_contents(f"kubernetes-json-schema/{folder}/_definitions.json", wanted)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def builtin_problems(obj: dict, config: ValidationConfig) -> list[tuple[str, str]]:
    """(path, message) of every violation of the Kubernetes OpenAPI schema for a built-in kind."""
    validator = _builtin_validator(
        str(obj.get("apiVersion")),
        str(obj.get("kind")),
        config.kubernetes_version,
        config.reject_unknown_fields,
    )
    if validator is None:
        return [
            (
                "",
                f"no Kubernetes {config.kubernetes_version} schema for {obj.get('apiVersion')} {obj.get('kind')}",
            )
        ]
    errors = sorted(validator.iter_errors(obj), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    return [(field_path(e.absolute_path), e.message) for e in errors]
