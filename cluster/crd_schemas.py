"""KubeRay CRD schemas as the API server applies them: JSON schema translation, defaults, CEL rules.

Part of the offline manifest validator (:mod:`cluster.validate_manifests`).
"""

from __future__ import annotations

import copy
import gzip
import re
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import yaml

if TYPE_CHECKING:
    from cluster.validate_manifests import ValidationConfig

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def field_path(parts: Iterable[Any]) -> str:
    """A dotted path with [i] for list items: ``spec.workerGroupSpecs[0].template``."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@lru_cache(maxsize=8)
def load_crd_schemas(crd_dir: str) -> dict[tuple[str, str], dict]:
    """{(apiVersion, kind): openAPIV3Schema} for every served version of every CRD in the folder."""
    schemas: dict[tuple[str, str], dict] = {}
    # The CRDs may be gzipped (tests/data/kuberay-crds keeps them so: 4 MB of YAML, 130 KB gzipped).
    files = sorted([*Path(crd_dir).glob("*.yaml"), *Path(crd_dir).glob("*.yaml.gz")])
    if not files:
        raise FileNotFoundError(f"no CRD files (*.yaml or *.yaml.gz) in {crd_dir}")
    for file in files:
        raw = file.read_bytes()
        text = (gzip.decompress(raw) if file.suffix == ".gz" else raw).decode("utf-8")
        # The C loader: the four v1.7.0 CRDs are 74,000 lines, ~10x slower with the pure-Python one.
        for crd in yaml.load_all(text, Loader=_YAML_LOADER):
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


def schema_problems(obj: dict, schema: dict, config: ValidationConfig) -> list[tuple[str, str]]:
    """(path, message) of every JSON-schema violation of a (defaulted) object."""
    json_schema = to_json_schema(schema, config.reject_unknown_fields)
    validator = jsonschema.Draft202012Validator(json_schema, format_checker=_format_checker())
    errors = sorted(validator.iter_errors(obj), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    return [(field_path(e.absolute_path), e.message) for e in errors]


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
            out.append((field_path(path), f"CEL rule {expression!r} could not be evaluated: {exc}"))
            continue
        if result is not True and not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
            out.append((field_path(path), rule.get("message") or f"failed CEL rule {expression!r}"))
    return out
