"""cluster/: every manifest validates offline (KubeRay v1.7.0 CRDs, Kubernetes OpenAPI schemas, CEL,
KubeRay's own checks); the validator catches what it should; the manifests have the shape the
project needs; the refresh launcher works against a fake Kubernetes API."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import re
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from cluster import crd_schemas, kuberay_checks, manifest_policy
from cluster import validate_manifests as kv

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER = REPO_ROOT / "cluster"
CRD_DIR = REPO_ROOT / "tests" / "data" / "kuberay-crds"


def _require(module: str):
    """The validator's dependencies (the `cluster` extra): missing is a failure, never a skip."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(
            f"{module} is not installed (needed by cluster/validate_manifests.py: pip install -e '.[cluster]')"
        )


@pytest.fixture(scope="module")
def config() -> kv.ValidationConfig:
    for module in ("kubernetes_validate", "celpy", "croniter"):
        _require(module)
    if not (CRD_DIR / "ray.io_rayjobs.yaml.gz").is_file():
        pytest.fail(f"KubeRay CRDs not found at {CRD_DIR}")
    return kv.ValidationConfig(crd_dir=CRD_DIR)


def load(name: str, config: kv.ValidationConfig) -> list[dict]:
    docs, problems = kv.load_documents(CLUSTER / name, config)
    assert problems == []
    return [doc for _, doc in docs]


def one(name: str, config: kv.ValidationConfig) -> dict:
    (doc,) = load(name, config)
    return doc


def checks(problems: list[kv.Problem]) -> set[tuple[str, str]]:
    return {(p.check, p.path) for p in problems}


# ---------------------------------------------------------------------------------------------
# Every manifest in cluster/ is valid


def test_every_manifest_in_cluster_is_valid(config):
    problems = kv.validate_paths([CLUSTER], config)
    assert problems == [], "\n".join(map(str, problems))


def test_the_validation_covers_every_expected_object(config):
    # Guards the test above against passing on an empty or partly unparsed folder.
    kinds = sorted(doc["kind"] for file in kv.manifest_files([CLUSTER]) for doc in load(file.name, config))
    assert kinds == sorted(
        [
            "CronJob",
            "Kustomization",
            "RayCluster",
            "RayCronJob",
            "RayJob",
            "RayJob",
            "RayJob",
            "Role",
            "RoleBinding",
        ]
        + ["ServiceAccount", "ServiceAccount"]
    )


def test_cli_reports_success_and_failure(config, tmp_path, capsys):
    assert kv.main([str(CLUSTER), "--crds", str(config.crd_dir)]) == 0
    bad = one("rayjob-train.yaml", config)
    bad["spec"]["entrypointt"] = "x"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert kv.main([str(tmp_path), "--crds", str(config.crd_dir)]) == 1
    assert "entrypointt" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Negative tests: a copy of a real manifest, mutated


KUBERAY_MANIFESTS = [
    "raycluster.yaml",
    "rayjob-build-dataset.yaml",
    "rayjob-train.yaml",
    "raycronjob-refresh.yaml",
]


def cluster_spec(obj: dict) -> dict:
    return {
        "RayCluster": lambda: obj["spec"],
        "RayJob": lambda: obj["spec"]["rayClusterSpec"],
        "RayCronJob": lambda: obj["spec"]["jobTemplate"]["rayClusterSpec"],
    }[obj["kind"]]()


def cluster_path(obj: dict) -> str:
    return {
        "RayCluster": "spec",
        "RayJob": "spec.rayClusterSpec",
        "RayCronJob": "spec.jobTemplate.rayClusterSpec",
    }[obj["kind"]]


@pytest.mark.parametrize("manifest", KUBERAY_MANIFESTS)
def test_misspelt_field_is_rejected(config, manifest):
    obj = one(manifest, config)
    head = cluster_spec(obj)["headGroupSpec"]
    head["rayStartParam"] = head.pop("rayStartParams")  # misspelt
    problems = kv.validate_object(obj, config)
    assert ("schema", f"{cluster_path(obj)}.headGroupSpec") in checks(problems)
    assert any("rayStartParam' was unexpected" in p.message for p in problems)


@pytest.mark.parametrize("manifest", KUBERAY_MANIFESTS)
def test_wrong_type_is_rejected(config, manifest):
    obj = one(manifest, config)
    cluster_spec(obj)["workerGroupSpecs"][0]["maxReplicas"] = "four"
    problems = kv.validate_object(obj, config)
    assert ("schema", f"{cluster_path(obj)}.workerGroupSpecs[0].maxReplicas") in checks(problems)


@pytest.mark.parametrize("manifest", KUBERAY_MANIFESTS)
def test_missing_required_field_is_rejected(config, manifest):
    obj = one(manifest, config)
    del cluster_spec(obj)["workerGroupSpecs"][0]["groupName"]
    problems = kv.validate_object(obj, config)
    assert ("schema", f"{cluster_path(obj)}.workerGroupSpecs[0]") in checks(problems)
    assert any("'groupName' is a required property" in p.message for p in problems)


def test_missing_top_level_required_field_is_rejected(config):
    obj = one("raycronjob-refresh.yaml", config)
    del obj["spec"]["schedule"]
    assert ("schema", "spec") in checks(kv.validate_object(obj, config))


def test_misspelt_field_deep_in_a_pod_template_is_rejected_by_both_validators(config):
    obj = one("rayjob-build-dataset.yaml", config)
    toleration = obj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["tolerations"][0]
    toleration["efect"] = toleration.pop("effect")
    path = "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.tolerations[0]"
    assert {("schema", path), ("builtin", path)} <= checks(kv.validate_object(obj, config))


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda o: o["spec"].__setitem__("concurrencyPolicyy", "Forbid"), ""),  # misspelt
        (lambda o: o["spec"].__setitem__("startingDeadlineSeconds", "soon"), "spec.startingDeadlineSeconds"),
        (lambda o: o["spec"].pop("jobTemplate"), ""),  # required
        (lambda o: o["spec"].__setitem__("schedule", "17 3 * *"), "spec.schedule"),
    ],
)
def test_builtin_cronjob_errors_are_caught(config, mutate, path):
    obj = one("cronjob-refresh.yaml", config)
    mutate(obj)
    problems = kv.validate_object(obj, config)
    assert problems and all(p.check == "builtin" for p in problems)
    assert path in {p.path for p in problems} or path == ""


def test_rbac_errors_are_caught(config):
    role = next(d for d in load("rbac.yaml", config) if d["kind"] == "Role")
    role["rules"][0]["verb"] = role["rules"][0].pop("verbs")
    problems = kv.validate_object(role, config)
    assert problems and {p.check for p in problems} == {"builtin"}


def test_metadata_of_a_custom_resource_is_validated_as_object_meta(config):
    obj = one("rayjob-train.yaml", config)
    obj["metadata"]["lables"] = obj["metadata"].pop("labels")  # the CRD leaves metadata open
    problems = kv.validate_object(obj, config)
    assert [(p.check, p.path) for p in problems] == [("metadata", "metadata")]
    assert "'lables' was unexpected" in problems[0].message


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda o: o["metadata"]["labels"].__setitem__("bad key!", "x"), "metadata.labels"),
        (lambda o: o["metadata"]["labels"].__setitem__("ok", "not ok"), "metadata.labels.ok"),
        (lambda o: o["metadata"]["labels"].__setitem__("n", 3), "metadata.labels.n"),
        (
            lambda o: o["spec"]["workerGroupSpecs"][0]["template"]["spec"]["nodeSelector"].__setitem__(
                "gpu", True
            ),
            "spec.workerGroupSpecs[0].template.spec.nodeSelector.gpu",
        ),
    ],
)
def test_invalid_labels_are_rejected(config, mutate, path):
    obj = one("raycluster.yaml", config)
    mutate(obj)
    assert ("metadata", path) in checks(kv.validate_object(obj, config))


@pytest.mark.parametrize("manifest", ["cronjob-refresh.yaml", "raycronjob-refresh.yaml"])
def test_unknown_time_zone_is_rejected(config, manifest):
    obj = one(manifest, config)
    obj["spec"]["timeZone"] = "Mars/Olympus_Mons"
    assert "spec.timeZone" in {p.path for p in kv.validate_object(obj, config)}


def test_every_error_of_a_builtin_kind_is_reported(config):
    role = next(d for d in load("rbac.yaml", config) if d["kind"] == "Role")
    role["rules"][0]["verb"] = role["rules"][0].pop("verbs")
    role["metadata"]["nmae"] = "x"
    messages = [p.message for p in kv.validate_object(role, config)]
    assert len(messages) == 3 and sum("was unexpected" in m for m in messages) == 2


# ---------------------------------------------------------------------------------------------
# Schema translation, defaults, CEL


def test_defaults_are_applied_before_validation(config):
    obj = one("rayjob-build-dataset.yaml", config)
    del obj["spec"]["backoffLimit"]
    schema = crd_schemas.crd_schema(config, "ray.io/v1", "RayJob")
    defaulted = crd_schemas.apply_defaults(obj, schema)
    assert defaulted["spec"]["backoffLimit"] == 0  # the v1.7.0 CRD default
    assert defaulted["spec"]["submissionMode"] == "K8sJobMode"
    assert "backoffLimit" not in obj["spec"]  # the input is not modified


def test_a_default_feeds_the_operator_checks(config):
    # ttlSecondsAfterFinished without shutdownAfterJobFinishes: the CRD defaults shutdown to false,
    # and KubeRay then rejects the TTL.
    obj = one("rayjob-build-dataset.yaml", config)
    del obj["spec"]["shutdownAfterJobFinishes"]
    assert ("kuberay", "spec.ttlSecondsAfterFinished") in checks(kv.validate_object(obj, config))


def test_int_or_string_and_preserve_unknown_fields_are_honoured():
    schema = {
        "type": "object",
        "properties": {
            "port": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
            "free": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {"a": {"type": "string"}},
            },
        },
    }
    cfg = kv.ValidationConfig(crd_dir=Path("."))
    assert crd_schemas.schema_problems({"port": 8080, "free": {"anything": 1}}, schema, cfg) == []
    assert crd_schemas.schema_problems({"port": "http"}, schema, cfg) == []
    assert {p for p, _ in crd_schemas.schema_problems({"port": 1.5, "extra": 1}, schema, cfg)} == {"", "port"}


def test_int32_range_is_checked(config):
    obj = one("rayjob-train.yaml", config)
    obj["spec"]["activeDeadlineSeconds"] = 2**31
    assert ("schema", "spec.activeDeadlineSeconds") in checks(kv.validate_object(obj, config))


def test_cel_rules_are_evaluated(config):
    obj = one("rayjob-build-dataset.yaml", config)
    obj["spec"]["managedBy"] = "someone-else"
    obj["spec"]["deletionStrategy"] = {"onSuccess": {"policy": "DeleteCluster"}}
    problems = [p for p in kv.validate_object(obj, config) if p.check == "cel"]
    assert {p.path for p in problems} == {"spec.managedBy", "spec.deletionStrategy"}
    assert any("requires either BOTH onSuccess and onFailure" in p.message for p in problems)
    # A valid value passes the same rule.
    obj["spec"]["managedBy"] = "kueue.x-k8s.io/multikueue"
    obj["spec"]["deletionStrategy"]["onFailure"] = {"policy": "DeleteCluster"}
    cfg = config.model_copy(update={"enabled_feature_gates": frozenset({"RayJobDeletionPolicy"})})
    assert kv.validate_object(obj, cfg) == []


def test_deletion_rule_conditions_are_checked_by_cel(config):
    obj = one("rayjob-build-dataset.yaml", config)
    obj["spec"]["shutdownAfterJobFinishes"] = False
    obj["spec"]["ttlSecondsAfterFinished"] = 0
    obj["spec"]["deletionStrategy"] = {
        "deletionRules": [
            {"policy": "DeleteCluster", "condition": {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed"}}
        ]
    }
    cfg = config.model_copy(update={"enabled_feature_gates": frozenset({"RayJobDeletionPolicy"})})
    problems = kv.validate_object(obj, cfg)
    assert [(p.check, p.path) for p in problems] == [
        ("cel", "spec.deletionStrategy.deletionRules[0].condition")
    ]


def test_every_create_time_cel_rule_in_the_crds_compiles(config):
    celpy = _require("celpy")
    rules = set()
    schemas = crd_schemas.load_crd_schemas(str(config.crd_dir))
    assert {kind for _, kind in schemas} == set(kuberay_checks.KUBERAY_KINDS)
    for schema in schemas.values():
        for path, value in manifest_policy._walk(schema):
            if path and path[-1] == "x-kubernetes-validations":
                rules.update(rule["rule"] for rule in value)
    create_time = {r for r in rules if not crd_schemas.is_transition_rule(r)}
    assert rules - create_time == {
        "self == oldSelf"
    }  # the only transition rule in v1.7.0 (skipped on create)
    assert len(create_time) == 5
    env = celpy.Environment()
    for rule in create_time:
        env.program(env.compile(rule))


# ---------------------------------------------------------------------------------------------
# Names, runtime env, policy


@pytest.mark.parametrize(
    ("kind", "limit"),
    [("RayCluster", 53), ("RayJob", 47), ("RayService", 47), ("RayCronJob", 38), ("CronJob", 52)],
)
def test_name_length_limits(kind, limit):
    assert kuberay_checks.name_problems(kind, "a" * limit) == []
    assert len(kuberay_checks.name_problems(kind, "a" * (limit + 1))) == 1


@pytest.mark.parametrize("name", ["Tokenskip", "1tokenskip", "token_skip", "tokenskip-", "token.skip", ""])
def test_kuberay_names_must_be_dns1035_labels(name):
    assert kuberay_checks.name_problems("RayJob", name)


def test_raycluster_name_limit_is_enforced_on_a_manifest(config):
    obj = one("raycluster.yaml", config)
    obj["metadata"]["name"] = "t" * 54
    assert ("name", "metadata.name") in checks(kv.validate_object(obj, config))


@pytest.mark.parametrize(
    ("runtime_env", "fragment"),
    [
        ("env_vars: [A]\n", "env_vars"),
        ("env_vars:\n  A: 1\n", "Dict[str, str]"),
        ("env_var:\n  A: b\n", "unknown field"),
        ("pip: 3\n", "pip"),
        ("- a\n", "mapping"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_invalid_runtime_env_is_rejected(config, runtime_env, fragment):
    obj = one("rayjob-build-dataset.yaml", config)
    obj["spec"]["runtimeEnvYAML"] = runtime_env
    problems = [p for p in kv.validate_object(obj, config) if p.check == "runtime_env"]
    assert len(problems) == 1 and problems[0].path == "spec.runtimeEnvYAML"
    assert fragment in problems[0].message


def test_every_runtime_env_parses_as_a_ray_runtime_env(config):
    from ray.runtime_env import RuntimeEnv

    specs = [
        one(f, config)["spec"]
        for f in ("rayjob-build-dataset.yaml", "rayjob-train.yaml", "rayjob-refresh.yaml")
    ]
    specs.append(one("raycronjob-refresh.yaml", config)["spec"]["jobTemplate"])
    for spec in specs:
        env = RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))
        assert env.env_vars()["TOKENIZERS_PARALLELISM"] == "false"


def test_literal_credentials_and_unpinned_images_are_rejected(config):
    obj = one("raycluster.yaml", config)
    container = obj["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["env"][1] = {"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI"}
    container["image"] = "rayproject/ray:latest"
    problems = {(p.check, p.path) for p in kv.validate_object(obj, config)}
    assert ("policy", "spec.headGroupSpec.template.spec.containers[0].env[1]") in problems
    assert ("policy", "spec.headGroupSpec.template.spec.containers[0].image") in problems
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"}, "stringData": {"k": "v"}}
    assert ("policy", "data") in checks(kv.validate_object(secret, config))


def test_unknown_placeholder_is_reported(config, tmp_path):
    text = (CLUSTER / "rbac.yaml").read_text().replace("${TOKENSKIP_NAMESPACE}", "${TOKENSKIP_NAMESAPCE}", 1)
    (tmp_path / "rbac.yaml").write_text(text)
    problems = kv.validate_paths([tmp_path], config)
    assert [(p.check, p.message.split(" (")[0]) for p in problems if p.check == "placeholder"] == [
        ("placeholder", "unknown placeholder ${TOKENSKIP_NAMESAPCE}")
    ]


def test_kustomization_references_are_checked(config, tmp_path):
    kustomization = yaml.safe_load((CLUSTER / "kustomization.yaml").read_text())
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    problems = kv.validate_paths([tmp_path], config)
    missing = sorted(p.message for p in problems if p.check == "kustomize")
    assert missing == sorted(
        f"referenced file {f!r} does not exist"
        for f in ("rbac.yaml", "cronjob-refresh.yaml", "rayjob-refresh.yaml")
    )


# ---------------------------------------------------------------------------------------------
# The shape this project needs


def all_pod_specs(obj: dict) -> list[dict]:
    return [template["spec"] for _, template in kuberay_checks.pod_templates(obj)]


def test_raycluster_head_has_no_gpus_and_workers_are_gpu_nodes(config):
    obj = one("raycluster.yaml", config)
    spec = obj["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    assert spec["enableInTreeAutoscaling"] is True
    (group,) = spec["workerGroupSpecs"]
    assert (
        0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        and group["minReplicas"] < group["maxReplicas"]
    )
    pod = group["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"]
    head_limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits


@pytest.mark.parametrize(
    ("manifest", "module", "config_file"),
    [
        ("rayjob-build-dataset.yaml", "build_dataset", "build_dataset.yaml"),
        ("rayjob-train.yaml", "train_sft", "train.yaml"),
        ("rayjob-refresh.yaml", "refresh", "refresh.yaml"),
    ],
)
def test_rayjobs_run_the_project_jobs_and_clean_up(config, manifest, module, config_file):
    spec = one(manifest, config)["spec"]
    assert spec["entrypoint"] == f"python -m ray_jobs.{module} --config /etc/tokenskip/{config_file}"
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["ttlSecondsAfterFinished"] <= 3600  # the cluster (GPUs) goes soon after the end
    assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 0
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    volume = next(v for v in head["volumes"] if v["name"] == mounts["/etc/tokenskip"])
    assert volume["configMap"] == {
        "name": "tokenskip-config"
    }  # required: a job without its config must not start


@pytest.mark.parametrize("module", ["build_dataset", "train_sft", "refresh"])
def test_entrypoint_modules_exist(module):
    assert importlib.util.find_spec(f"ray_jobs.{module}") is not None, (
        f"ray_jobs.{module} (a RayJob entrypoint) does not exist"
    )


def test_every_ray_pod_uses_the_image_placeholder_and_the_s3_identity(config):
    objects = [one(f, config) for f in KUBERAY_MANIFESTS] + [one("rayjob-refresh.yaml", config)]
    sa = next(d for d in load("rbac.yaml", config) if d["metadata"]["name"] == "tokenskip-ray")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    raw = (CLUSTER / "raycluster.yaml").read_text()
    assert raw.count("image: ${TOKENSKIP_IMAGE}") == 2
    for obj in objects:
        for pod in all_pod_specs(obj):
            assert pod["serviceAccountName"] == "tokenskip-ray"
            assert pod["securityContext"]["runAsNonRoot"] is True
            for container in pod["containers"]:
                assert container["image"] == config.placeholders["TOKENSKIP_IMAGE"]
                aws = [e for e in container["env"] if e["name"].startswith("AWS_")]
                assert aws and all(
                    "value" not in e and e["valueFrom"]["secretKeyRef"]["optional"] for e in aws
                )


def test_rayjob_clusters_match_the_raycluster_shape(config):
    reference = one("raycluster.yaml", config)["spec"]

    def shape(cluster: dict) -> dict:
        worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
        head = cluster["headGroupSpec"]["template"]["spec"]
        return {
            "rayVersion": cluster["rayVersion"],
            "head": (cluster["headGroupSpec"]["rayStartParams"], head["containers"][0]["resources"]),
            "worker": (worker["nodeSelector"], worker["tolerations"], worker["containers"][0]["resources"]),
        }

    for manifest in ("rayjob-build-dataset.yaml", "rayjob-train.yaml", "rayjob-refresh.yaml"):
        assert shape(one(manifest, config)["spec"]["rayClusterSpec"]) == shape(reference), manifest
    assert (
        one("raycronjob-refresh.yaml", config)["spec"]["jobTemplate"]
        == one("rayjob-refresh.yaml", config)["spec"]
    )


def test_ray_version_matches_the_installed_ray(config):
    import ray

    assert one("raycluster.yaml", config)["spec"]["rayVersion"] == ray.__version__


def test_cronjob_refresh_is_safe_to_schedule(config):
    cron = one("cronjob-refresh.yaml", config)
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] > 0
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "tokenskip-refresh-launcher"
    (container,) = pod["containers"]
    # The launcher path is where the Dockerfile puts it.
    assert f"COPY cluster/launch_rayjob.py {container['command'][1]}" in (CLUSTER / "Dockerfile").read_text()
    # The template ConfigMap it mounts is the one kustomization.yaml generates from rayjob-refresh.yaml.
    kustomization = yaml.safe_load((CLUSTER / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    assert generator["files"] == ["rayjob.yaml=rayjob-refresh.yaml"]
    volume = next(v for v in pod["volumes"] if v["name"] == "rayjob-template")
    assert volume["configMap"]["name"] == generator["name"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "rayjob-template")
    assert f"--template={mount['mountPath']}/rayjob.yaml" in container["args"]
    # The RayJob names it creates fit KubeRay's limit.
    prefix = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--name-prefix="))
    assert len(prefix) + len("-20261122-0317") <= kuberay_checks.MAX_RAYJOB_NAME


def test_launcher_role_allows_exactly_what_it_needs(config):
    docs = {(d["kind"], d["metadata"]["name"]): d for d in load("rbac.yaml", config)}
    role = docs[("Role", "tokenskip-refresh-launcher")]
    verbs = {(r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert verbs == {("rayjobs", "create"), ("rayjobs", "get"), ("rayjobs/status", "get")}
    binding = docs[("RoleBinding", "tokenskip-refresh-launcher")]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == "tokenskip-refresh-launcher"


def test_readme_describes_every_file():
    readme = (CLUSTER / "README.md").read_text()
    for file in sorted(CLUSTER.iterdir()):
        if file.is_file() and file.name != "README.md" and not file.name.startswith("."):
            assert f"`{file.name}`" in readme, file.name


def test_dockerfile_is_pinned_non_root_and_installs_the_gpu_extra():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG CUDA_BASE=(\S+)$", text, re.M).group(1)
    assert base.startswith("nvidia/cuda:") and not base.endswith(":latest")
    assert re.search(r"^FROM \$\{CUDA_BASE\}$", text, re.M)
    for arg in ("VLLM_VERSION", "RAY_VERSION", "UV_VERSION", "KUBERNETES_CLIENT_VERSION"):
        assert re.search(rf"^ARG {arg}=\d+\.\d+\.\d+$", text, re.M), arg
    assert re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M).group(1) == "2.60.0"
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1] not in ("root", "0", "0:0")
    assert '"/opt/tokenskip/src[gpu]"' in text
    assert "latest" not in text.lower()


# ---------------------------------------------------------------------------------------------
# The refresh launcher (cluster/launch_rayjob.py), against a fake API


@pytest.fixture(scope="module")
def launcher():
    spec = importlib.util.spec_from_file_location("launch_rayjob", CLUSTER / "launch_rayjob.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["launch_rayjob"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("launch_rayjob", None)


class FakeRayJobApi:
    """In-memory RayJobs; each get() advances the RayJob through the given status sequence."""

    def __init__(self, launcher, statuses, existing=None, fail=None):
        self.launcher = launcher
        self.statuses = list(statuses)
        self.objects = dict(existing or {})
        self.created = []
        self.gets = 0
        self.fail = list(fail or [])  # exceptions raised by the next calls, in order

    def _maybe_fail(self):
        if self.fail:
            raise self.fail.pop(0)

    def create(self, namespace, body):
        self._maybe_fail()
        key = (namespace, body["metadata"]["name"])
        if key in self.objects:
            raise self.launcher.AlreadyExists("rayjobs.ray.io already exists")
        self.created.append(copy.deepcopy(body))
        self.objects[key] = copy.deepcopy(body)
        return body

    def get(self, namespace, name):
        self._maybe_fail()
        self.gets += 1
        if (namespace, name) not in self.objects:
            raise self.launcher.NotFound(name)
        obj = self.objects[(namespace, name)]
        if self.statuses:
            obj["status"] = self.statuses.pop(0)
        return copy.deepcopy(obj)


@pytest.fixture()
def template(config):
    return one("rayjob-refresh.yaml", config)


WHEN = datetime(2026, 11, 22, 3, 17, tzinfo=timezone.utc)
RUNNING = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}


def run(launcher, api, template, **kwargs):
    sleeps, logs = [], []
    kwargs.setdefault("when", WHEN)
    code = launcher.launch_and_wait(
        api, template, namespace="ml", name_prefix="tokenskip-refresh", poll_seconds=30,
        sleep=sleeps.append, log=logs.append, **kwargs,
    )  # fmt: skip
    return code, sleeps, logs


def test_scheduled_time_comes_from_the_cronjob_job_name(launcher):
    minutes = int(WHEN.timestamp()) // 60
    now = datetime(2026, 11, 22, 9, 41, 27, 5, tzinfo=timezone.utc)
    # A retried pod, hours after the scheduled time, still gets the scheduled time.
    assert launcher.scheduled_time(f"tokenskip-refresh-{minutes}", now) == WHEN
    this_minute = datetime(2026, 11, 22, 9, 41, tzinfo=timezone.utc)
    assert launcher.scheduled_time(None, now) == this_minute
    assert launcher.scheduled_time("manual-run", now) == this_minute
    assert launcher.scheduled_time("refresh-manual-2", now) == this_minute  # digits, but no epoch minutes
    assert launcher.scheduled_time("refresh-20261122", now) == this_minute  # 8 digits, implausible time


def test_rayjob_name_is_date_based_and_valid(launcher):
    name = launcher.rayjob_name("tokenskip-refresh", WHEN)
    assert name == "tokenskip-refresh-20261122-0317"
    assert kuberay_checks.name_problems("RayJob", name) == []
    assert (
        kuberay_checks.name_problems("RayJob", launcher.rayjob_name("r" * 33, WHEN)) == []
    )  # the longest prefix allowed
    with pytest.raises(launcher.LauncherError, match="at most 33 characters"):
        launcher.rayjob_name("r" * 34, WHEN)
    with pytest.raises(launcher.LauncherError, match="DNS-1035"):
        launcher.rayjob_name("Refresh", WHEN)


def test_created_rayjob_is_a_valid_copy_of_the_template(launcher, template, config):
    api = FakeRayJobApi(launcher, [{"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}])
    code, _, _ = run(launcher, api, template)
    assert code == 0
    (body,) = api.created
    assert body["metadata"]["name"] == "tokenskip-refresh-20261122-0317"
    assert body["metadata"]["namespace"] == "ml"
    assert body["metadata"]["annotations"]["tokenskip.io/scheduled-time"] == "2026-11-22T03:17:00+00:00"
    assert body["spec"] == template["spec"]
    assert kv.validate_object(body, config) == []


def test_waits_until_success(launcher, template):
    statuses = [{}, {"jobDeploymentStatus": "Initializing"}, RUNNING, RUNNING,
                {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}]  # fmt: skip
    api = FakeRayJobApi(launcher, statuses)
    code, sleeps, logs = run(launcher, api, template)
    assert code == launcher.EXIT_SUCCEEDED
    assert sleeps == [30, 30, 30, 30] and api.gets == 5
    assert sum("jobStatus=RUNNING" in line for line in logs) == 1  # state changes are logged once
    assert "jobStatus=SUCCEEDED" in logs[-1]


@pytest.mark.parametrize(
    "final",
    [
        {"jobDeploymentStatus": "Complete", "jobStatus": "FAILED"},
        {"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"},
        {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "DeadlineExceeded"},
        {"jobDeploymentStatus": "Failed", "reason": "SubmissionFailed", "message": "submitter pod failed"},
        {"jobDeploymentStatus": "ValidationFailed", "message": "bad spec"},
    ],
)
def test_exit_code_reflects_a_failed_rayjob(launcher, template, final):
    api = FakeRayJobApi(
        launcher, [RUNNING, {"jobDeploymentStatus": "Retrying", "jobStatus": "FAILED"}, final]
    )
    code, sleeps, logs = run(launcher, api, template)
    assert code == launcher.EXIT_FAILED
    assert len(sleeps) == 2  # Retrying (backoffLimit) is not terminal
    for value in final.values():
        assert value in logs[-1]


def test_retried_launcher_attaches_to_the_existing_rayjob(launcher, template):
    name = launcher.rayjob_name("tokenskip-refresh", WHEN)
    existing = {("ml", name): {"metadata": {"name": name}, "status": RUNNING}}
    api = FakeRayJobApi(
        launcher, [RUNNING, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}], existing
    )
    code, _, logs = run(launcher, api, template)
    assert code == 0 and api.created == []
    assert any("already exists" in line for line in logs)


def test_timeout_leaves_the_rayjob_running(launcher, template):
    api = FakeRayJobApi(launcher, [RUNNING] * 100)
    ticks = iter(range(0, 10_000, 30))
    code, sleeps, logs = run(launcher, api, template, timeout_seconds=100, clock=lambda: next(ticks))
    assert code == launcher.EXIT_TIMEOUT
    assert len(sleeps) == 3 and "still running" in logs[-1]


def test_transient_api_errors_are_retried_and_persistent_ones_fail(launcher, template):
    flaky = [launcher.ApiError("HTTP 503", transient=True), launcher.ApiError("HTTP 503", transient=True)]
    api = FakeRayJobApi(launcher, [{"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}], fail=flaky)
    code, sleeps, _ = run(launcher, api, template)
    assert code == 0 and len(api.created) == 1 and sleeps == [2.0, 4.0]

    forbidden = [launcher.ApiError("HTTP 403: Forbidden", transient=False)]
    api = FakeRayJobApi(launcher, [], fail=forbidden)
    code, sleeps, logs = run(launcher, api, template)
    assert code == launcher.EXIT_API_ERROR and sleeps == [] and "403" in logs[-1]


def test_rayjob_deleted_while_waiting_is_a_failure(launcher, template):
    api = FakeRayJobApi(launcher, [RUNNING])
    real_get = api.get

    def get_then_vanish(namespace, name):
        obj = real_get(namespace, name)
        api.objects.clear()
        return obj

    api.get = get_then_vanish
    code, _, logs = run(launcher, api, template)
    assert code == launcher.EXIT_FAILED and "disappeared" in logs[-1]


def test_api_exceptions_are_translated(launcher):
    class FakeApiException(Exception):
        def __init__(self, status, reason):
            super().__init__(reason)
            self.status, self.reason = status, reason

    assert isinstance(
        launcher.translate_api_exception(FakeApiException(409, "Conflict")), launcher.AlreadyExists
    )
    assert isinstance(launcher.translate_api_exception(FakeApiException(404, "Not Found")), launcher.NotFound)
    server = launcher.translate_api_exception(FakeApiException(500, "Internal"))
    assert isinstance(server, launcher.ApiError) and server.transient
    assert launcher.translate_api_exception(FakeApiException(429, "Too Many")).transient
    assert not launcher.translate_api_exception(FakeApiException(403, "Forbidden")).transient
    assert launcher.translate_api_exception(ConnectionRefusedError("refused")).transient


def test_main_end_to_end_with_a_fake_api(launcher, template, tmp_path, capsys):
    path = tmp_path / "rayjob.yaml"
    path.write_text(yaml.safe_dump(template))
    api = FakeRayJobApi(launcher, [{"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}])
    minutes = int(WHEN.timestamp()) // 60
    environ = {"POD_NAMESPACE": "ml", "CRON_JOB_NAME": f"tokenskip-refresh-{minutes}"}
    argv = [f"--template={path}", "--name-prefix=tokenskip-refresh", "--poll-seconds=1"]
    # A pod started (or retried) an hour after its scheduled time names the RayJob by the schedule.
    assert launcher.main(argv, api=api, environ=environ, now=WHEN + timedelta(hours=1)) == 0
    assert [b["metadata"]["name"] for b in api.created] == ["tokenskip-refresh-20261122-0317"]
    assert "finished: jobDeploymentStatus=Complete jobStatus=SUCCEEDED" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "apiVersion: ray.io/v1\nkind: RayJob\nspec:\n  entrypoint: x\n  image: ${TOKENSKIP_IMAGE}\n",
            "placeholders",
        ),
        ("apiVersion: batch/v1\nkind: Job\nspec: {}\n", "must be one ray.io/v1 RayJob"),
        ("apiVersion: ray.io/v1\nkind: RayJob\n", "has no spec"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_template_is_exit_code_2_without_api_calls(launcher, tmp_path, capsys, text, message):
    path = tmp_path / "rayjob.yaml"
    path.write_text(text)
    api = FakeRayJobApi(launcher, [])
    assert (
        launcher.main([f"--template={path}", "--name-prefix=r"], api=api, environ={})
        == launcher.EXIT_BAD_INPUT
    )
    assert message in capsys.readouterr().err and api.created == [] and api.gets == 0


def test_missing_template_and_bad_prefix_are_exit_code_2(launcher, template, tmp_path):
    api = FakeRayJobApi(launcher, [])
    assert (
        launcher.main([f"--template={tmp_path / 'nope.yaml'}", "--name-prefix=r"], api=api, environ={}) == 2
    )
    path = tmp_path / "rayjob.yaml"
    path.write_text(yaml.safe_dump(template))
    assert launcher.main([f"--template={path}", "--name-prefix=Bad_Prefix"], api=api, environ={}) == 2
    assert api.created == []
