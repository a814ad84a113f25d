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

Entry function: :func:`validate_paths`. CLI, from the repository root (needs the ``cluster`` extra):
``python -m cluster.validate_manifests cluster/ --crds tests/data/kuberay-crds``.

A development tool, not part of the ``tokenskip`` package: the checks live in
:mod:`cluster.crd_schemas` (CRD schemas, defaults, CEL), :mod:`cluster.kuberay_checks` (names,
KubeRay operator checks, built-in kinds) and :mod:`cluster.manifest_policy` (labels, this project's
policy); this module loads the manifests and runs them.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, Field

from cluster.crd_schemas import apply_defaults, cel_problems, crd_schema, schema_problems
from cluster.kuberay_checks import (
    RAY_GROUP,
    builtin_problems,
    cron_problems,
    kuberay_problems,
    name_problems,
    pod_templates,
    time_zone_problems,
)
from cluster.manifest_policy import label_problems, policy_problems

_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

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
        problems += [problem("builtin", "spec.schedule", m) for m in cron_problems(spec.get("schedule"))]
        problems += [problem("builtin", "spec.timeZone", m) for m in time_zone_problems(spec.get("timeZone"))]
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
