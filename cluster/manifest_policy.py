"""Label syntax and this project's policy for manifests: no literal credentials, pinned images.

Part of the offline manifest validator (:mod:`cluster.validate_manifests`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from cluster.crd_schemas import field_path
from cluster.kuberay_checks import DNS1123_LABEL

_QUALIFIED_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_CREDENTIAL_ENV = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.IGNORECASE)


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
    if prefix and (len(prefix) > 253 or not all(DNS1123_LABEL.match(part) for part in prefix.split("."))):
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
            out += [(field_path(path), m) for m in _qualified_name_problems(key)]
            if not isinstance(label, str):
                out.append(
                    (field_path((*path, key)), f"label value {label!r} must be a string (quote it in YAML)")
                )
            elif len(label) > 63 or (label and not _QUALIFIED_NAME.match(label)):
                out.append((field_path((*path, key)), f"label value {label!r} is not a valid label value"))
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
                            field_path((*path, i)),
                            f"environment variable {env['name']} has a literal value; "
                            "use valueFrom.secretKeyRef (or IRSA)",
                        )
                    )
        if path[-1] == "image" and isinstance(value, str) and not _image_is_pinned(value):
            out.append(
                (
                    field_path(path),
                    f"image {value!r} is not pinned (use a version tag or a digest, not latest)",
                )
            )
    return out
