"""Offline validation of the Kubernetes / KubeRay manifests in ``cluster/``.

What ``kubectl apply --validate=strict`` and the KubeRay operator would reject, checked without a
cluster, so a broken manifest fails in CI instead of at 3 a.m. on the cluster:

* **KubeRay custom resources** (RayCluster, RayJob, RayService, RayCronJob) against the CRDs of a
  KubeRay release (``ray.io_*.yaml``, e.g. v1.7.0): the served version's ``openAPIV3Schema`` is
  turned into a JSON schema the way the API server reads it (``x-kubernetes-int-or-string``,
  ``nullable``, ``x-kubernetes-embedded-resource``, int32/int64 ranges), the schema's
  ``default`` values are applied first (as the API server does before validating), and unknown
  fields are REJECTED (``additionalProperties: false`` wherever a schema lists ``properties`` and
  has no ``x-kubernetes-preserve-unknown-fields``), as server-side strict field validation does.
* **CEL rules** (``x-kubernetes-validations``) are evaluated with cel-python on the defaulted
  object. Transition rules (those using ``oldSelf``) are skipped, as the API server skips them on
  create; every other rule in the v1.7.0 CRDs is evaluated (the deletion-rule and
  deletion-strategy checks of RayJob/RayCronJob and the ``managedBy`` value check).
* **Operator-side checks** the CRDs cannot express, a faithful subset of KubeRay's
  ``ray-operator/controllers/ray/utils/validation.go``: names (below), at least one container per
  group, ``rayStartParams`` resources vs the group ``resources`` field, no ``rayStartParams.labels``,
  RayJob ``shutdownAfterJobFinishes`` vs ``ttlSecondsAfterFinished`` / ``suspend``, one of
  ``rayClusterSpec`` / ``clusterSelector``, positive ``activeDeadlineSeconds``, non-negative
  ``backoffLimit``, ``deletionStrategy`` only behind its feature gate, ``runtimeEnvYAML`` parsed as
  a Ray runtime env (``ray.runtime_env.RuntimeEnv``; KubeRay itself only checks it is YAML), and a
  RayCronJob schedule that is a standard 5-field cron expression without ``TZ=``.
* **Built-in kinds** (CronJob, ServiceAccount, Role, RoleBinding, ConfigMap, Secret, ...) against
  the Kubernetes OpenAPI schemas that ``kubernetes-validate`` ships (its strict variant rejects
  unknown fields; every error is reported, not only the first), and so are the pod templates
  inside KubeRay resources (as ``v1/PodTemplate``) and their ``metadata`` (as ObjectMeta: the CRDs
  leave it open, the API server does not). Also label keys/values (``metadata.labels``,
  ``nodeSelector``), cron schedules and IANA ``timeZone`` names, which the schemas do not check.
* **Names**: RFC 1035 labels within KubeRay's limits. KubeRay derives Service names from a
  RayCluster's name and the longest suffix is ``-serve-svc`` (10 characters), so a RayCluster name
  is at most 63 - 10 = 53 characters; a RayJob (and a RayService) gets a cluster named
  ``<name>-<5 random chars>``, so at most 53 - 6 = 47. A RayCronJob names its RayJobs
  ``<name>-<suffix>``: 5 random characters in v1.7.0, the tick in minutes since the epoch (8
  digits) in later versions; we enforce 47 - 9 = 38 so both stay valid. Built-in kinds follow
  their own rules (DNS-1123 subdomain; CronJob at most 52 characters, because the Job controller
  appends an 11-character suffix).
* **Policy** (this project's rules): no literal value for credential-like environment variables
  (``AWS_SECRET_ACCESS_KEY`` & co.; use ``secretKeyRef``), no Secret with data in the repository,
  images pinned by a tag other than ``latest`` or by a digest.

Manifests may hold ``${VAR}`` placeholders (filled by ``envsubst`` at deploy time); they are
replaced with sample values before validation and an unknown placeholder is itself a problem.

Entry function: :func:`validate_paths`. CLI: ``python -m tokenskip.k8s_validate cluster/ --crds DIR``.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from pydantic import BaseModel, Field

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
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_RAY_START_RESOURCE_KEYS = ("num-cpus", "num-gpus", "memory", "resources")
_CREDENTIAL_ENV = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.IGNORECASE)
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}

# Sample values for the placeholders the manifests in cluster/ use (README.md documents them).
DEFAULT_PLACEHOLDERS = {
    "TOKENSKIP_IMAGE": "registry.example.com/tokenskip:0.1.0@sha256:" + "0" * 64,
    "TOKENSKIP_NAMESPACE": "tokenskip",
    "TOKENSKIP_S3_ROLE_ARN": "arn:aws:iam::123456789012:role/tokenskip-s3",
}


class ValidationConfig(BaseModel):
    """What to validate against. Every field is a trade-off between strictness and portability."""

    crd_dir: Path = Field(
        description="Folder with the KubeRay CRD files (ray.io_*.yaml) of the operator release the "
        "manifests target. Validating against another release's CRDs can accept fields the "
        "installed operator does not know, so keep it in step with the cluster."
    )
    kubernetes_version: str = Field(
        default="1.33.0",
        description="Kubernetes version whose OpenAPI schemas check built-in kinds and pod "
        "templates. Use the oldest version among your clusters: newer fields then fail here "
        "instead of on the older cluster.",
    )
    placeholders: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_PLACEHOLDERS),
        description="Sample value for each ${VAR} placeholder allowed in manifests. A placeholder "
        "not listed here is reported, so a typo in a variable name cannot reach envsubst "
        "(which would silently substitute an empty string).",
    )
    reject_unknown_fields: bool = Field(
        default=True,
        description="Reject fields the schemas do not declare (kubectl's strict field "
        "validation). Turning it off lets misspelt fields through: the API server would prune "
        "them silently with non-strict validation.",
    )
    evaluate_cel: bool = Field(
        default=True,
        description="Evaluate the CRDs' CEL rules (x-kubernetes-validations) with cel-python. "
        "Off only where cel-python is not installed; the schema checks still run.",
    )
    check_builtin_kinds: bool = Field(
        default=True,
        description="Validate built-in kinds and KubeRay pod templates with kubernetes-validate "
        "(its bundled OpenAPI schemas, strict mode). Off skips them (e.g. a Kubernetes version it "
        "does not ship).",
    )
    enabled_feature_gates: frozenset[str] = Field(
        default=frozenset(),
        description="KubeRay operator feature gates assumed on (e.g. RayJobDeletionPolicy). Fields "
        "that need a gate are reported unless it is listed; RayCronJob objects are accepted "
        "either way (the README documents that they need the RayCronJob gate).",
    )


@dataclass(frozen=True)
class Problem:
    """One reason a manifest would be rejected."""

    source: str  # file (and document index) the object came from
    kind: str
    name: str
    check: str  # placeholder | yaml | schema | cel | kuberay | name | runtime_env | builtin | policy
    path: str  # dotted path inside the object ("" for the object itself)
    message: str

    def __str__(self) -> str:
        where = f"{self.kind}/{self.name}" + (f" at {self.path}" if self.path else "")
        return f"{self.source}: {where}: [{self.check}] {self.message}"


class ManifestValidationError(ValueError):
    """Raised by :func:`assert_valid` with every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# ---------------------------------------------------------------------------------------------
# Loading manifests


def substitute_placeholders(text: str, placeholders: dict[str, str]) -> tuple[str, list[str]]:
    """Replace ``${VAR}`` with its sample value; returns (text, names with no value)."""
    unknown: list[str] = []

    def repl(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in placeholders:
            unknown.append(name)
            return match.group(0)
        return placeholders[name]

    return _PLACEHOLDER.sub(repl, text), unknown


def manifest_files(paths: Iterable[Path]) -> list[Path]:
    """The YAML files under ``paths`` (files or folders, recursively), sorted."""
    found: set[Path] = set()
    for path in paths:
        path = Path(path)
        if path.is_dir():
            found.update(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
        elif path.is_file():
            found.add(path)
        else:
            raise FileNotFoundError(f"no such manifest file or folder: {path}")
    return sorted(found)


def load_documents(path: Path, config: ValidationConfig) -> tuple[list[tuple[str, dict]], list[Problem]]:
    """Parse every YAML document of a file after placeholder substitution."""
    text, unknown = substitute_placeholders(Path(path).read_text(encoding="utf-8"), config.placeholders)
    problems = [
        Problem(
            str(path),
            "-",
            "-",
            "placeholder",
            "",
            f"unknown placeholder ${{{name}}} (allowed: {', '.join(sorted(config.placeholders)) or 'none'})",
        )
        for name in sorted(set(unknown))
    ]
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        return [], [*problems, Problem(str(path), "-", "-", "yaml", "", f"not valid YAML: {exc}")]
    out: list[tuple[str, dict]] = []
    for index, doc in enumerate(docs):
        if doc is None:
            continue
        source = f"{path}#{index}" if len(docs) > 1 else str(path)
        if not isinstance(doc, dict):
            problems.append(Problem(source, "-", "-", "yaml", "", "a manifest must be a mapping"))
            continue
        out.append((source, doc))
    return out, problems


# ---------------------------------------------------------------------------------------------
# CRD schemas


@lru_cache(maxsize=8)
def load_crd_schemas(crd_dir: str) -> dict[tuple[str, str], dict]:
    """{(apiVersion, kind): openAPIV3Schema} for every served version of every CRD in the folder."""
    schemas: dict[tuple[str, str], dict] = {}
    files = sorted(Path(crd_dir).glob("*.yaml"))
    if not files:
        raise FileNotFoundError(f"no CRD files (*.yaml) in {crd_dir}")
    for file in files:
        # The C loader: the four v1.7.0 CRDs are 74,000 lines, ~10x slower with the pure-Python one.
        for crd in yaml.load_all(file.read_text(encoding="utf-8"), Loader=_YAML_LOADER):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for version in spec["versions"]:
                if version.get("served", True):
                    api_version = f"{spec['group']}/{version['name']}"
                    schemas[(api_version, spec["names"]["kind"])] = version["schema"]["openAPIV3Schema"]
    return schemas


def crd_schema(config: ValidationConfig, api_version: str, kind: str) -> dict | None:
    """The CRD's openAPIV3Schema for an apiVersion/kind, or None if no CRD serves it."""
    return load_crd_schemas(str(config.crd_dir)).get((api_version, kind))


def to_json_schema(node: dict, reject_unknown_fields: bool = True) -> dict:
    """Translate a structural OpenAPI v3 schema into a JSON schema with the API server's semantics."""
    out: dict[str, Any] = {}
    for key in (
        "enum",
        "pattern",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
        "uniqueItems",
        "minProperties",
        "maxProperties",
        "required",
        "format",
    ):
        if key in node:
            out[key] = node[key]
    # OpenAPI v3.0 spells exclusive bounds as booleans; JSON schema 2020-12 wants numbers.
    if out.get("exclusiveMinimum") is True:
        out["exclusiveMinimum"] = out.pop("minimum")
    elif out.get("exclusiveMinimum") is False:
        out.pop("exclusiveMinimum")
    if out.get("exclusiveMaximum") is True:
        out["exclusiveMaximum"] = out.pop("maximum")
    elif out.get("exclusiveMaximum") is False:
        out.pop("exclusiveMaximum")

    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    elif "type" in node:
        out["type"] = [node["type"], "null"] if node.get("nullable") else node["type"]

    properties = dict(node.get("properties", {}))
    if node.get("x-kubernetes-embedded-resource"):
        # An embedded object always carries apiVersion, kind and metadata, declared or not.
        properties.setdefault("apiVersion", {"type": "string"})
        properties.setdefault("kind", {"type": "string"})
        properties.setdefault("metadata", {"type": "object", "x-kubernetes-preserve-unknown-fields": True})
    if properties:
        out["properties"] = {k: to_json_schema(v, reject_unknown_fields) for k, v in properties.items()}
        if reject_unknown_fields and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(node["additionalProperties"], reject_unknown_fields)
    elif node.get("additionalProperties") is False:
        out["additionalProperties"] = False
    if "items" in node:
        out["items"] = to_json_schema(node["items"], reject_unknown_fields)
    for key in ("allOf", "anyOf", "oneOf"):
        if key in node:
            # Inside these, structural schemas only constrain values; unknown-field pruning is
            # decided by the surrounding node, so do not close them.
            out[key] = [to_json_schema(sub, reject_unknown_fields=False) for sub in node[key]]
    if "not" in node:
        out["not"] = to_json_schema(node["not"], reject_unknown_fields=False)
    return out


def apply_defaults(value: Any, node: dict) -> Any:
    """Return a copy of ``value`` with the schema's defaults filled in where fields are absent.

    As the API server does: a default applies to an absent property of an object that is present
    (recursively, including array items and map values); a null is not replaced unless the schema is
    non-nullable (then the API server drops the null and defaults it).
    """
    value = copy.deepcopy(value)
    _default_in_place(value, node)
    return value


def _default_in_place(value: Any, node: dict) -> None:
    if isinstance(value, dict):
        for key, sub in node.get("properties", {}).items():
            if (key not in value or (value[key] is None and not sub.get("nullable"))) and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                _default_in_place(value[key], sub)
        if isinstance(node.get("additionalProperties"), dict):
            for sub_value in value.values():
                _default_in_place(sub_value, node["additionalProperties"])
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for item in value:
            _default_in_place(item, node["items"])


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker(formats=())
    for name, (low, high) in _INT_RANGES.items():

        def check(instance: Any, low: int = low, high: int = high) -> bool:
            return not isinstance(instance, int) or isinstance(instance, bool) or low <= instance <= high

        checker.checks(name)(check)
    return checker


def _path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def schema_problems(obj: dict, schema: dict, config: ValidationConfig) -> list[tuple[str, str]]:
    """(path, message) of every JSON-schema violation of a (defaulted) object."""
    json_schema = to_json_schema(schema, config.reject_unknown_fields)
    validator = jsonschema.Draft202012Validator(json_schema, format_checker=_format_checker())
    errors = sorted(validator.iter_errors(obj), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    return [(_path(e.absolute_path), e.message) for e in errors]


# ---------------------------------------------------------------------------------------------
# CEL rules


def iter_cel_rules(value: Any, node: dict, path: tuple = ()) -> Iterator[tuple[tuple, Any, dict]]:
    """(path, value, rule) for every x-kubernetes-validations rule whose field is present."""
    for rule in node.get("x-kubernetes-validations", ()):
        yield path, value, rule
    if isinstance(value, dict):
        for key, sub in node.get("properties", {}).items():
            if key in value and value[key] is not None:
                yield from iter_cel_rules(value[key], sub, (*path, key))
        if isinstance(node.get("additionalProperties"), dict):
            for key, sub_value in value.items():
                yield from iter_cel_rules(sub_value, node["additionalProperties"], (*path, key))
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for index, item in enumerate(value):
            yield from iter_cel_rules(item, node["items"], (*path, index))


def is_transition_rule(rule: str) -> bool:
    """Rules that compare with ``oldSelf`` run only on update; create never evaluates them."""
    return re.search(r"\boldSelf\b", rule) is not None


@lru_cache(maxsize=256)
def _cel_program(rule: str):
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_problems(obj: dict, schema: dict) -> list[tuple[str, str]]:
    """(path, message) for every create-time CEL rule the (defaulted) object violates."""
    import celpy

    out = []
    for path, value, rule in iter_cel_rules(obj, schema):
        expression = rule["rule"]
        if is_transition_rule(expression):
            continue
        try:
            result = _cel_program(expression).evaluate({"self": celpy.json_to_cel(value)})
        except Exception as exc:  # an evaluation error rejects the object on the API server too
            out.append((_path(path), f"CEL rule {expression!r} could not be evaluated: {exc}"))
            continue
        if result is not True and not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
            out.append((_path(path), rule.get("message") or f"failed CEL rule {expression!r}"))
    return out


# ---------------------------------------------------------------------------------------------
# Names, runtime envs, KubeRay operator checks


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
    if not all(_DNS1123_LABEL.match(part) for part in name.split(".")):
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


def _time_zone_problems(time_zone: Any) -> list[str]:
    """A timeZone must name an IANA zone (both the CronJob and the RayCronJob controller load it)."""
    if time_zone is None:
        return []
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(str(time_zone))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return [f"timeZone {time_zone!r} is not a known IANA time zone"]
    return []


def _cron_problems(schedule: Any) -> list[str]:
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
        found = [("schedule", m) for m in _cron_problems(spec.get("schedule"))]
        found += [("timeZone", m) for m in _time_zone_problems(spec.get("timeZone"))]
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
    return [(_path(e.absolute_path), e.message) for e in errors]


# ---------------------------------------------------------------------------------------------
# Policy


def _walk(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    yield path, value
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from _walk(sub, (*path, key))
    elif isinstance(value, list):
        for index, sub in enumerate(value):
            yield from _walk(sub, (*path, index))


def _image_is_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" in last and not last.endswith(":latest")


def _qualified_name_problems(key: Any) -> list[str]:
    if not isinstance(key, str):
        return [f"key {key!r} must be a string"]
    prefix, _, name = key.rpartition("/")
    out = []
    if prefix and (len(prefix) > 253 or not all(_DNS1123_LABEL.match(part) for part in prefix.split("."))):
        out.append(f"key {key!r}: prefix must be a DNS-1123 subdomain")
    if not name or len(name) > 63 or not _QUALIFIED_NAME.match(name):
        out.append(
            f"key {key!r}: name part must be 1-63 alphanumerics, '-', '_' or '.', alphanumeric at both ends"
        )
    return out


def label_problems(obj: dict) -> list[tuple[str, str]]:
    """(path, message) for every label map (metadata.labels, nodeSelector) with invalid keys or values."""
    out = []
    for path, value in _walk(obj):
        is_labels = len(path) >= 2 and path[-1] == "labels" and path[-2] == "metadata"
        if not (is_labels or (path and path[-1] == "nodeSelector")) or not isinstance(value, dict):
            continue
        for key, label in value.items():
            out += [(_path(path), m) for m in _qualified_name_problems(key)]
            if not isinstance(label, str):
                out.append(
                    (_path((*path, key)), f"label value {label!r} must be a string (quote it in YAML)")
                )
            elif len(label) > 63 or (label and not _QUALIFIED_NAME.match(label)):
                out.append((_path((*path, key)), f"label value {label!r} is not a valid label value"))
    return out


def policy_problems(obj: dict) -> list[tuple[str, str]]:
    """(path, message) of this project's rules: no literal credentials, pinned images."""
    out = []
    if obj.get("kind") == "Secret" and (obj.get("data") or obj.get("stringData")):
        out.append(("data", "Secrets must not be committed with data; create them out of band"))
    for path, value in _walk(obj):
        if not path:
            continue
        if path[-1] == "env" and isinstance(value, list):
            for i, env in enumerate(value):
                if (
                    isinstance(env, dict)
                    and _CREDENTIAL_ENV.search(str(env.get("name", "")))
                    and "value" in env
                ):
                    out.append(
                        (
                            _path((*path, i)),
                            f"environment variable {env['name']} has a literal value; "
                            "use valueFrom.secretKeyRef (or IRSA)",
                        )
                    )
        if path[-1] == "image" and isinstance(value, str) and not _image_is_pinned(value):
            out.append(
                (_path(path), f"image {value!r} is not pinned (use a version tag or a digest, not latest)")
            )
    return out


# ---------------------------------------------------------------------------------------------
# Entry points


def validate_object(obj: dict, config: ValidationConfig, source: str = "<object>") -> list[Problem]:
    """Every problem of one manifest object (a parsed YAML document)."""
    kind = str(obj.get("kind", "-"))
    name = str((obj.get("metadata") or {}).get("name", "-"))
    api_version = obj.get("apiVersion")

    def problem(check: str, path: str, message: str) -> Problem:
        return Problem(source, kind, name, check, path, message)

    if not isinstance(api_version, str) or "kind" not in obj:
        return [problem("schema", "", "apiVersion and kind are required")]
    if kind == "Kustomization":
        return []  # not an API object; validate_paths checks the files it references
    problems = [problem("policy", p, m) for p, m in policy_problems(obj)]
    problems += [problem("metadata", p, m) for p, m in label_problems(obj)]

    if api_version.split("/")[0] == RAY_GROUP:
        schema = crd_schema(config, api_version, kind)
        if schema is None:
            return [
                *problems,
                problem("schema", "", f"no CRD in {config.crd_dir} serves {api_version} {kind}"),
            ]
        defaulted = apply_defaults(obj, schema)
        problems += [problem("schema", p, m) for p, m in schema_problems(defaulted, schema, config)]
        if config.evaluate_cel:
            problems += [problem("cel", p, m) for p, m in cel_problems(defaulted, schema)]
        problems += [problem(c, p, m) for c, p, m in kuberay_problems(defaulted, config)]
        if config.check_builtin_kinds:
            # The CRD declares metadata as a bare object; the API server still validates it as an
            # ObjectMeta, so check it as the metadata of a built-in kind.
            carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata") or {}}
            problems += [problem("metadata", p, m) for p, m in builtin_problems(carrier, config)]
            for path, template in pod_templates(obj):
                pod_template = {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": "check"},
                    "template": template,
                }
                problems += [
                    problem("builtin", f"{path}.{p.removeprefix('template').lstrip('.')}".rstrip("."), m)
                    for p, m in builtin_problems(pod_template, config)
                ]
        return problems

    problems += [
        problem("name", "metadata.name", m)
        for m in name_problems(kind, (obj.get("metadata") or {}).get("name"))
    ]
    if config.check_builtin_kinds:
        problems += [problem("builtin", p, m) for p, m in builtin_problems(obj, config)]
    if kind == "CronJob":
        spec = obj.get("spec") or {}
        problems += [problem("builtin", "spec.schedule", m) for m in _cron_problems(spec.get("schedule"))]
        problems += [
            problem("builtin", "spec.timeZone", m) for m in _time_zone_problems(spec.get("timeZone"))
        ]
    return problems


def _kustomization_problems(source: str, doc: dict, folder: Path) -> list[Problem]:
    out = []
    referenced = list(doc.get("resources") or [])
    for generator in doc.get("configMapGenerator") or []:
        referenced += [entry.split("=", 1)[-1] for entry in generator.get("files") or []]
    for ref in referenced:
        if not (folder / ref).is_file():
            out.append(
                Problem(
                    source, "Kustomization", "-", "kustomize", "", f"referenced file {ref!r} does not exist"
                )
            )
    return out


def validate_paths(paths: Iterable[Path], config: ValidationConfig) -> list[Problem]:
    """Validate every YAML manifest under ``paths``; returns all problems (empty = valid)."""
    problems: list[Problem] = []
    for file in manifest_files(paths):
        docs, load_problems = load_documents(file, config)
        problems += load_problems
        for source, doc in docs:
            problems += validate_object(doc, config, source)
            if doc.get("kind") == "Kustomization":
                problems += _kustomization_problems(source, doc, file.parent)
    return problems


def assert_valid(paths: Iterable[Path], config: ValidationConfig) -> None:
    """Raise :class:`ManifestValidationError` listing every problem, if any."""
    problems = validate_paths(paths, config)
    if problems:
        raise ManifestValidationError(problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="manifest files or folders")
    parser.add_argument(
        "--crds", type=Path, required=True, help="folder with the KubeRay CRDs (ray.io_*.yaml)"
    )
    parser.add_argument("--kubernetes-version", default="1.33.0")
    parser.add_argument("--feature-gate", action="append", default=[], help="KubeRay feature gate assumed on")
    args = parser.parse_args(argv)
    config = ValidationConfig(
        crd_dir=args.crds,
        kubernetes_version=args.kubernetes_version,
        enabled_feature_gates=frozenset(args.feature_gate),
    )
    problems = validate_paths(args.paths, config)
    for p in problems:
        print(p)
    files = manifest_files(args.paths)
    print(f"{len(files)} files, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
