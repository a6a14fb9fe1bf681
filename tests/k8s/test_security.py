"""The security of k8s/ as kustomize renders each overlay, checked offline:

- identities: one ServiceAccount per workload, each Ray pod on its own, an IAM role per account in
  prod (IRSA) and no static key there; the IAM policies of k8s/iam/ evaluated against the S3 paths
  the rendered configs use: Serve reads only, only training writes checkpoints and models, only the
  backfill writes outputs (and the interactive cluster, which runs both, the two);
- pods: non-root, no capabilities, no privilege escalation, seccomp, a read-only root with writable
  scratch, no Kubernetes API token in Ray's containers;
- NetworkPolicies, evaluated for pods labelled as KubeRay labels them: each cluster reaches only its own
  workload, outsiders reach named ports from named namespaces only, egress is listed and never
  reaches the instance metadata service;
- the prod image by digest, and the Dockerfile's base too.
"""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from aigc_dist.config import load_config
from aigc_dist.train.export import artifact_uri
from tests.k8s.test_manifests import (
    KUSTOMIZATIONS,
    REPO,
    check_entrypoint,
    config_files,
    pod_templates,
    ray_cluster_specs,
    render,
)

IAM = REPO / "k8s" / "iam"
METADATA = [ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")]  # IMDS, v4 and v6
TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
WORKLOADS = {"RayCluster/aigc-dist": "interactive", "RayJob/aigc-train": "train",
             "RayJob/aigc-backfill": "backfill", "RayService/aigc-serve": "serve"}
READ_ACTIONS = {"s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation"}
WRITE_ACTIONS = ["s3:PutObject", "s3:DeleteObject"]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


@pytest.fixture(scope="module", params=[k for k in KUSTOMIZATIONS if k != "base"])
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def ray_pods(docs: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(workload, where, template, the Ray cluster spec) of every head and worker group."""
    pods = []
    for doc, cluster in ray_cluster_specs(docs):
        workload = WORKLOADS[f"{doc['kind']}/{doc['metadata']['name']}"]
        for where, template in pod_templates([doc]):
            pods.append((workload, where, template, cluster))
    return pods


# --- identities and IAM ---------------------------------------------------------------------------

def policy(workload: str) -> dict[str, Any]:
    return json.loads((IAM / f"{workload}-policy.json").read_text())


def allows(document: dict[str, Any], action: str, uri: str) -> bool:
    """Whether an identity-based policy allows `action` on the object `uri` (s3://bucket/key), or on its
    bucket with the key as s3:prefix for s3:ListBucket. Explicit Deny wins, as in IAM."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    arn = f"arn:aws:s3:::{bucket}" if action == "s3:ListBucket" else f"arn:aws:s3:::{bucket}/{key}"

    def matches(statement: dict[str, Any]) -> bool:
        if not any(fnmatchcase(action.lower(), a.lower()) for a in as_list(statement["Action"])):
            return False
        if not any(fnmatchcase(arn, r) for r in as_list(statement["Resource"])):
            return False
        prefixes = statement.get("Condition", {}).get("StringLike", {}).get("s3:prefix")
        return prefixes is None or any(fnmatchcase(key, p) for p in as_list(prefixes))

    statements = document["Statement"]
    return (not any(s["Effect"] == "Deny" and matches(s) for s in statements)
            and any(s["Effect"] == "Allow" and matches(s) for s in statements))


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def s3_paths(docs: list[dict[str, Any]], tmp_path: Path) -> dict[str, dict[str, str]]:
    """What each workload reads and writes, from the rendered configs, entrypoint overrides and user_config."""
    jobs = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "RayJob"}
    head = lambda doc, key: doc["spec"][key]["headGroupSpec"]["template"]  # noqa: E731
    train = check_entrypoint(jobs["aigc-train"]["spec"]["entrypoint"],
                             config_files(docs, head(jobs["aigc-train"], "rayClusterSpec")), tmp_path)
    backfill = check_entrypoint(jobs["aigc-backfill"]["spec"]["entrypoint"],
                                config_files(docs, head(jobs["aigc-backfill"], "rayClusterSpec")), tmp_path)
    (service,) = [doc for doc in docs if doc["kind"] == "RayService"]
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    local = tmp_path / "serve.toml"
    local.write_text(config_files(docs, head(service, "rayClusterConfig"))[app["args"]["config"]])
    serve = load_config(str(local))
    model = artifact_uri(train.train.storage_path, train.model.name, train.model.version)
    return {
        "train": {"checkpoint": f"{train.train.storage_path}/{train.train.run_name}/checkpoint_00000200/"
                                "trainer_state.json",
                  "model": f"{model}/model.safetensors", "dataset": train.train.dataset,
                  "users": train.data.users, "items": train.data.items},
        "backfill": {"output": f"{backfill.backfill.output}/{backfill.backfill.run_id}/data/part-00000.parquet",
                     "model": f"{backfill.backfill.artifact}/model.safetensors", "users": backfill.data.users,
                     "items": backfill.data.items, "candidates": backfill.data.candidates},
        "serve": {"model": f"{serve.serve.artifact}/config.json",
                  "live model": f"{app['deployments'][0]['user_config']['artifact']}/config.json",
                  "users": serve.data.users, "items": serve.data.items},
    }


def test_every_workload_runs_as_its_own_service_account_with_its_own_role_in_prod(overlay):
    name, docs = overlay
    accounts = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "ServiceAccount"}
    used: dict[str, str] = {}
    for workload, where, template, _ in ray_pods(docs):
        account = template["spec"].get("serviceAccountName")
        assert account in accounts, f"k8s/{name}: {where} runs as {account!r}, not a ServiceAccount of k8s/"
        assert used.setdefault(workload, account) == account, f"k8s/{name}: {where}: one account per workload"
        assert (IAM / f"{workload}-policy.json").is_file(), f"{workload}: no IAM policy in k8s/iam/"
    assert len(set(used.values())) == len(WORKLOADS), f"k8s/{name}: workloads share an account: {used}"
    roles = {account: accounts[account]["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn")
             for account in used.values()}
    if name == "overlays/prod":
        for account, role in roles.items():
            assert role and re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", role), f"{account}: {role}"
        assert len(set(roles.values())) == len(roles), f"k8s/{name}: accounts share a role: {roles}"


def test_prod_takes_s3_credentials_from_its_roles_alone(overlay):
    name, docs = overlay
    for _, where, template, _ in ray_pods(docs):
        for container in template["spec"]["containers"]:
            secrets = [source for source in container.get("envFrom", []) if "secretRef" in source]
            env = {var["name"] for var in container.get("env", [])}
            if name == "overlays/prod":  # a key in the environment would win over the pod's role
                assert not secrets and not env & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, f"k8s/{name}: {where}"
            else:  # dev: the static-key component, for clusters without IRSA
                assert secrets == [{"secretRef": {"name": "aigc-s3-credentials"}}], f"k8s/{name}: {where}"


def test_iam_policies_name_their_actions_and_resources():
    for path in sorted(IAM.glob("*-policy.json")):
        document = json.loads(path.read_text())
        for statement in document["Statement"]:
            assert set(statement) <= {"Sid", "Effect", "Action", "Resource", "Condition"}, f"{path.name}: {statement}"
            assert set(statement.get("Condition", {})) <= {"StringLike"}, f"{path.name}: {statement}"
            for action in as_list(statement["Action"]):
                assert re.fullmatch(r"s3:[A-Za-z]+", action), f"{path.name}: action {action!r}"
            for resource in as_list(statement["Resource"]):
                assert re.fullmatch(r"arn:aws:s3:::[a-z0-9.-]+(/[^*]+\*?)?", resource), f"{path.name}: {resource!r}"
    assert {path.name for path in IAM.glob("*-policy.json")} == {f"{w}-policy.json" for w in WORKLOADS.values()}


def test_each_role_writes_only_what_its_workload_writes(overlay, tmp_path):
    name, docs = overlay
    paths = s3_paths(docs, tmp_path)
    writers = {what: {w for w in WORKLOADS.values() if allows(policy(w), "s3:PutObject", uri)}
               for what, uri in [("checkpoint", paths["train"]["checkpoint"]), ("model", paths["train"]["model"]),
                                 ("output", paths["backfill"]["output"])]}
    assert writers == {"checkpoint": {"train", "interactive"}, "model": {"train", "interactive"},
                       "output": {"backfill", "interactive"}}, f"k8s/{name}"
    for workload, uris in paths.items():  # and each reads what it needs
        for what, uri in uris.items():
            assert allows(policy(workload), "s3:GetObject", uri), f"k8s/{name}: {workload} cannot read its {what} {uri}"
    for workload in WORKLOADS.values():  # nobody deletes a trained model
        assert not allows(policy(workload), "s3:DeleteObject", paths["train"]["model"]), workload
    serve = policy("serve")
    actions = {a for s in serve["Statement"] if s["Effect"] == "Allow" for a in as_list(s["Action"])}
    assert actions <= READ_ACTIONS, f"serve may {actions - READ_ACTIONS}"
    for uri in [*paths["serve"].values(), paths["train"]["checkpoint"], paths["backfill"]["output"]]:
        assert not any(allows(serve, action, uri) for action in WRITE_ACTIONS), uri
    assert not allows(serve, "s3:GetObject", paths["train"]["checkpoint"]), "serve loads artifacts, not checkpoints"


# --- pods -----------------------------------------------------------------------------------------

def check_container_security(context: dict[str, Any], where: str) -> None:
    assert context.get("allowPrivilegeEscalation") is False, where
    assert context.get("capabilities") == {"drop": ["ALL"]}, where
    assert context.get("readOnlyRootFilesystem") is True, where
    assert not context.get("privileged") and context.get("runAsUser", 1) != 0, where


def test_every_ray_container_runs_unprivileged_on_a_read_only_root(rendered):
    name, docs = rendered
    for _, where, template, cluster in ray_pods(docs):
        spec, where = template["spec"], f"k8s/{name}: {where}"
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) > 0, where  # the image's USER is a name
        assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        for container in spec["containers"]:
            check_container_security(container.get("securityContext", {}), f"{where} {container['name']}")
            scratch = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", []) if not m.get("readOnly")}
            for path in ("/tmp", "/home/ray/.cache"):  # where Ray, torch and Hugging Face write
                assert "emptyDir" in volumes.get(scratch.get(path), {}), f"{where}: {path} is not writable scratch"
        if cluster.get("enableInTreeAutoscaling"):  # KubeRay's autoscaler container in the head pod
            check_container_security(cluster["autoscalerOptions"].get("securityContext", {}), f"{where} autoscaler")


def test_only_the_autoscaler_gets_a_kubernetes_api_token(rendered):
    name, docs = rendered
    for doc in docs:
        if doc["kind"] == "ServiceAccount":
            assert doc.get("automountServiceAccountToken") is False, f"k8s/{name}: {doc['metadata']['name']}"
    for _, where, template, _ in ray_pods(docs):
        spec, where = template["spec"], f"k8s/{name}: {where}"
        assert spec.get("automountServiceAccountToken") is False, where
        for container in spec["containers"]:
            assert TOKEN_PATH not in {m["mountPath"] for m in container.get("volumeMounts", [])}, where
    for doc, cluster in ray_cluster_specs(docs):  # the autoscaler runs in the head pod, with its volumes
        autoscaler = {m["mountPath"]: m["name"] for m in cluster.get("autoscalerOptions", {}).get("volumeMounts", [])}
        where = f"k8s/{name}: {doc['kind']}/{doc['metadata']['name']}"
        if cluster.get("enableInTreeAutoscaling"):
            volumes = {v["name"]: v for v in cluster["headGroupSpec"]["template"]["spec"]["volumes"]}
            sources = [next(iter(source)) for source in volumes[autoscaler[TOKEN_PATH]]["projected"]["sources"]]
            assert "serviceAccountToken" in sources and "configMap" in sources, f"{where}: {sources}"
        else:
            assert TOKEN_PATH not in autoscaler, where


# --- NetworkPolicies ------------------------------------------------------------------------------

class Pod(NamedTuple):
    namespace: str
    labels: dict[str, str]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against a set of labels."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if {"Exists": key not in labels, "DoesNotExist": key in labels, "In": labels.get(key) not in values,
                "NotIn": key in labels and labels[key] in values}[operator]:
            return False
    return True


def peer_matches(peer: dict[str, Any], pod: Pod, policy_namespace: str) -> bool:
    """Whether a from/to peer names `pod` (ipBlocks are for traffic from and to outside the cluster)."""
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        in_namespace = selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": pod.namespace})
    else:
        in_namespace = pod.namespace == policy_namespace
    return in_namespace and selects(peer.get("podSelector", {}), pod.labels)


def kuberay_pods(docs: list[dict[str, Any]], namespace: str) -> list[tuple[str, Pod]]:
    """(workload, pod) with the labels KubeRay gives the pods: ray.io/cluster is the RayCluster's name,
    for a RayJob's or RayService's cluster one KubeRay generates (<name>-<random suffix>)."""
    pods = []
    for doc, cluster in ray_cluster_specs(docs):
        name = doc["metadata"]["name"] if doc["kind"] == "RayCluster" else f"{doc['metadata']['name']}-x7k2p"
        workload = WORKLOADS[f"{doc['kind']}/{doc['metadata']['name']}"]
        groups = [("head", cluster["headGroupSpec"])] + [("worker", group) for group in cluster["workerGroupSpecs"]]
        for node_type, group in groups:
            labels = {**group["template"]["metadata"]["labels"], "ray.io/cluster": name, "ray.io/node-type": node_type}
            pods.append((workload, Pod(namespace, labels)))
    return pods


def rules(policies: list[dict[str, Any]], pod: Pod, direction: str) -> list[tuple[dict[str, Any], str]]:
    """(rule, the policy's namespace) of every `direction` rule that applies to `pod`."""
    key = {"Ingress": "ingress", "Egress": "egress"}[direction]
    found = []
    for policy in policies:
        namespace = policy["metadata"].get("namespace", "default")
        if (direction in policy["spec"]["policyTypes"] and namespace == pod.namespace
                and selects(policy["spec"]["podSelector"], pod.labels)):
            found += [(rule, namespace) for rule in policy["spec"].get(key, [])]
    return found


def reaches(policies: list[dict[str, Any]], source: Pod, target: Pod) -> bool:
    """Whether `source` may open a connection to `target`: the target's ingress and the source's egress."""
    ingress = any(not rule.get("from") or any(peer_matches(p, source, ns) for p in rule["from"])
                  for rule, ns in rules(policies, target, "Ingress"))
    egress = any(not rule.get("to") or any(peer_matches(p, target, ns) for p in rule["to"])
                 for rule, ns in rules(policies, source, "Egress"))
    return ingress and egress


def test_network_policies_keep_each_cluster_to_itself(rendered):
    name, docs = rendered
    policies = [doc for doc in docs if doc["kind"] == "NetworkPolicy"]
    namespace = next(iter(doc["metadata"].get("namespace", "default") for doc in policies))
    pods = kuberay_pods(docs, namespace)
    for workload, pod in pods:
        for direction in ("Ingress", "Egress"):
            assert rules(policies, pod, direction), f"k8s/{name}: no {direction} policy selects {workload} {pod.labels}"
        for other, peer in pods:
            assert reaches(policies, peer, pod) == (other == workload), f"k8s/{name}: {other} -> {workload}"
    intruders = [Pod(namespace, {"app.kubernetes.io/part-of": "aigc-dist"}),
                 Pod("elsewhere", {"app.kubernetes.io/part-of": "aigc-dist", "ray.io/cluster": "aigc-dist"})]
    for intruder in intruders:
        for rule, ns in [r for _, pod in pods for r in rules(policies, pod, "Ingress")]:
            assert not any(peer_matches(peer, intruder, ns) for peer in rule.get("from", [{}])), \
                f"k8s/{name}: {rule} admits {intruder}"


def test_outside_traffic_is_named_namespaces_and_ports(rendered):
    name, docs = rendered
    for policy in (doc for doc in docs if doc["kind"] == "NetworkPolicy"):
        for key, peers_key in (("ingress", "from"), ("egress", "to")):
            for rule in policy["spec"].get(key, []):
                peers = rule.get(peers_key, [])
                assert peers, f"k8s/{name}: {policy['metadata']['name']} {key} rule without peers: everyone"
                if all(set(peer) == {"podSelector"} for peer in peers):
                    continue  # the cluster's own pods, on Ray's many dynamic ports
                ports = {port["port"] for port in rule.get("ports", [])}
                assert ports and not ports & {6379, 10001}, f"k8s/{name}: {rule} opens GCS, Ray Client or all ports"
                for peer in peers:
                    if "namespaceSelector" in peer:
                        selector = peer["namespaceSelector"]
                        named = selector.get("matchLabels", {}).keys() == {"kubernetes.io/metadata.name"} or [
                            e for e in selector.get("matchExpressions", [])
                            if e["key"] == "kubernetes.io/metadata.name" and e["operator"] == "In"]
                        assert named, f"k8s/{name}: {peer} is not a list of namespaces by name"


def test_egress_has_dns_and_never_the_metadata_address(rendered):
    name, docs = rendered
    policies = [doc for doc in docs if doc["kind"] == "NetworkPolicy"]
    dns = Pod("kube-system", {"k8s-app": "kube-dns"})
    for workload, pod in kuberay_pods(docs, policies[0]["metadata"].get("namespace", "default")):
        egress = [rule for rule, _ in rules(policies, pod, "Egress")]
        to_dns = {(p["port"], p["protocol"]) for rule in egress if any(peer_matches(x, dns, "") for x in rule["to"])
                  for p in rule.get("ports", [])}
        assert {(53, "UDP"), (53, "TCP")} <= to_dns, f"k8s/{name}: {workload} has no DNS"
        assert any(443 in {p["port"] for p in rule.get("ports", [])} and any("ipBlock" in x for x in rule["to"])
                   for rule in egress), f"k8s/{name}: {workload} cannot reach S3 (HTTPS)"
    for policy in policies:
        for rule in policy["spec"].get("egress", []):
            for block in (peer["ipBlock"] for peer in rule["to"] if "ipBlock" in peer):
                network = ipaddress.ip_network(block["cidr"])
                excepted = [ipaddress.ip_network(cidr) for cidr in block.get("except", [])]
                for address in METADATA:
                    if address.version == network.version and address in network:
                        assert any(address in ex for ex in excepted if ex.version == address.version), \
                            f"k8s/{name}: {policy['metadata']['name']} reaches {address} through {block}"


# --- images ---------------------------------------------------------------------------------------

def test_prod_runs_its_image_by_digest():
    docs = render("overlays/prod")
    images = {c["image"] for _, _, template, _ in ray_pods(docs) for c in template["spec"]["containers"]}
    for _, cluster in ray_cluster_specs(docs):
        if cluster.get("autoscalerOptions", {}).get("image"):
            images.add(cluster["autoscalerOptions"]["image"])
    assert images and all(re.fullmatch(r"[^\s@:]+(:[\w.-]+)?@sha256:[0-9a-f]{64}", image) for image in images), images


def test_the_dockerfile_builds_on_a_base_pinned_by_digest():
    lines = (REPO / "k8s" / "Dockerfile").read_text().splitlines()
    (base,) = [line for line in lines if line.startswith("FROM ")]
    assert base == "FROM ${BASE}@${BASE_DIGEST}", base
    assert "ARG BASE_DIGEST" in lines, "BASE_DIGEST has a default: the build must pass the digest it pulls"


# --- the online API --------------------------------------------------------------------------------

def test_the_online_api_asks_for_a_key_from_a_secret_and_bounds_every_call(overlay):
    """The RayService's serve config turns bearer auth on with a variable every pod that can hold a
    replica fills from a Secret (not a value in the manifest), and the proxy's request timeout that
    only serveConfigV2 can set equals the config's."""
    name, docs = overlay
    service = next(doc for doc in docs if doc["kind"] == "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    templates = [template for where, template in pod_templates([service])]
    config_path = serve_config["applications"][0]["args"]["config"]
    text = config_files(docs, templates[0])[config_path]
    serve = tomllib.loads(text)["serve"]
    variable = serve.get("api_keys_env")
    assert variable, f"k8s/{name}: serve.api_keys_env is not set: the API would take calls from anyone"
    for template in templates:
        container = template["spec"]["containers"][0]
        entries = [e for e in container.get("env", []) if e["name"] == variable]
        assert len(entries) == 1 and "value" not in entries[0], f"k8s/{name}: {container['name']}: {entries}"
        assert entries[0]["valueFrom"]["secretKeyRef"]["name"], entries
    assert serve_config["http_options"]["request_timeout_s"] == serve["request_timeout_s"] > 0
    assert 0 < serve["body_read_timeout_s"] < serve["request_timeout_s"]
