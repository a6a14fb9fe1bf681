"""The cluster launcher config (cluster/aws-gpu.yaml), its security group and IAM policies, and the node
start scripts, checked offline: what `ray up` would do with them, and that none of it leaves the cluster
open the ShadowRay way (CVE-2023-48022: a reachable Ray dashboard runs anyone's jobs).

The start scripts themselves start the real cluster of tests/jobs/ (head and worker, metrics port set)."""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import secrets
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import boto3
import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "cluster" / "aws-gpu.yaml"
IMAGE_ROOT = "/home/ray/aigc-dist"  # k8s/Dockerfile's WORKDIR
SECURITY_GROUP = REPO / "cluster" / "aws-security-group.json"
IAM = REPO / "cluster" / "iam"
EVERYWHERE = {"0.0.0.0", "::"}


def launcher_config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def docker_env(config: dict) -> dict[str, str]:
    """The variables `docker.run_options` give every node's container (and so every `docker exec`)."""
    words = shlex.split(" ".join(config["docker"].get("run_options", [])))
    pairs = [words[k + 1] for k, word in enumerate(words[:-1]) if word in ("-e", "--env")]
    pairs += [word.split("=", 1)[1] for word in words if word.startswith("--env=")]
    return dict(pair.split("=", 1) for pair in pairs if "=" in pair)


def statements(policy_file: str) -> list[dict]:
    return json.loads((IAM / policy_file).read_text())["Statement"]


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def setting_strings(tree: object) -> list[str]:
    """Every string a config or template sets (keys and values), its prose (descriptions) left out."""
    if isinstance(tree, dict):
        return [text for key, value in tree.items() if not key.endswith("Description")
                for text in [key, *setting_strings(value)]]
    if isinstance(tree, list):
        return [text for value in tree for text in setting_strings(value)]
    return [tree] if isinstance(tree, str) else []


def test_launcher_config_validates_against_rays_cluster_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(launcher_config(), schema)


def test_ray_up_would_accept_it():
    """What `ray up` does before it calls AWS: fill in the provider's defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(launcher_config()))
    validate_config(config)
    gpu = config["available_node_types"]["gpu-worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] == config["max_workers"] == 8
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}


def test_s3_access_by_instance_profile_only():
    config = launcher_config()
    for node in config["available_node_types"].values():
        profile = node["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/.+", profile)
    assert not re.search(r"(?i)aws_(access_key_id|secret_access_key|session_token)|\b(AKIA|ASIA)[0-9A-Z]{16}\b",
                         CONFIG.read_text())


def test_start_commands_run_the_scripts_the_image_holds():
    config = launcher_config()
    dockerfile = (REPO / "k8s" / "Dockerfile").read_text()
    assert f"WORKDIR {IMAGE_ROOT}" in dockerfile and re.search(r"^COPY .*\bcluster \./cluster$", dockerfile, re.M)
    scripts = set()
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        scripts.update(word for word in shlex.split(command.replace(";", " ")) if word.startswith(IMAGE_ROOT))
    assert scripts == {f"{IMAGE_ROOT}/cluster/{name}" for name in ("start-head.sh", "start-worker.sh",
                                                                    "fetch-ray-token.sh")}
    for script in scripts:
        path = REPO / script.removeprefix(f"{IMAGE_ROOT}/")
        assert path.stat().st_mode & 0o111, f"{path} is not executable"
        assert "start-" not in path.name or "--metrics-export-port" in path.read_text()


def test_start_worker_without_a_head_address_says_how_to_call_it():
    done = subprocess.run(["bash", str(REPO / "cluster" / "start-worker.sh")], capture_output=True, text=True)
    assert done.returncode == 2 and "usage:" in done.stderr and "HEAD_HOST:GCS_PORT" in done.stderr


def test_every_node_starts_ray_with_token_auth_and_the_token_from_the_secret():
    config = launcher_config()
    assert docker_env(config).get("RAY_AUTH_MODE") == "token", "docker.run_options must set RAY_AUTH_MODE=token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = config[key]
        fetch = [k for k, command in enumerate(commands) if "/cluster/fetch-ray-token.sh" in command]
        start = [k for k, command in enumerate(commands) if "/cluster/start-" in command]
        assert fetch and start and fetch[0] < start[0], f"{key}: the token must be fetched before Ray starts"
        assert shlex.split(commands[fetch[0]])[1:], f"{key}: fetch-ray-token.sh needs the secret's name"
    for text in setting_strings(config):
        assert not re.search(r"RAY_AUTH_TOKEN\b|RAY_AUTH_MODE=disabled", text), f"no token in the YAML: {text}"


def test_fetch_ray_token_writes_the_secret_to_rays_token_file_for_the_node_user_only(s3_server, tmp_path):
    """moto's server answers Secrets Manager as AWS does: the script runs as a node runs it, by boto3."""
    client = boto3.client("secretsmanager")
    token = secrets.token_hex(32)
    name = f"aigc-dist/ray-token-test-{secrets.token_hex(4)}"
    client.create_secret(Name=name, SecretString=token)
    env = {**os.environ, "HOME": str(tmp_path), "PYTHON": sys.executable}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    done = subprocess.run([str(REPO / "cluster" / "fetch-ray-token.sh"), name], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    written = tmp_path / ".ray" / "auth_token"  # Ray's default token file
    assert written.read_text() == token and token not in done.stdout + done.stderr
    assert stat.S_IMODE(written.stat().st_mode) == 0o600

    client.create_secret(Name=f"{name}-weak", SecretString="changeme")
    weak = subprocess.run([str(REPO / "cluster" / "fetch-ray-token.sh"), f"{name}-weak"],
                          env={**env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "weak")}, capture_output=True,
                          text=True, timeout=60)
    assert weak.returncode != 0 and ">= 32" in weak.stderr and not (tmp_path / "weak").exists()


def test_head_start_command_keeps_the_dashboard_and_gcs_off_all_interfaces(tmp_path):
    """Run the launcher's head command with the repository's scripts and `echo` for ray: the arguments
    `ray start` would get on the head."""
    config = launcher_config()
    command = next(c for c in config["head_start_ray_commands"] if "/cluster/start-head.sh" in c)
    env = {**os.environ, **docker_env(config), "RAY": "echo"}
    done = subprocess.run(["bash", "-c", command.replace(IMAGE_ROOT, str(REPO))], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    argv = shlex.split(done.stdout)
    hosts = {arg.split("=", 1)[0]: arg.split("=", 1)[1] for arg in argv if re.match(r"--[\w-]*(host|ip)[\w-]*=", arg)}
    assert ipaddress.ip_address(hosts["--dashboard-host"]).is_loopback, hosts
    assert not EVERYWHERE & set(hosts.values()), hosts
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert not EVERYWHERE & set(re.findall(r"(?<![\w.:])(0\.0\.0\.0|::)(?![\w.:])", command)), command


@pytest.mark.parametrize("host, auth_mode, refused", [
    ("0.0.0.0", None, True), ("10.0.0.5", "disabled", True), ("0.0.0.0", "token", False), ("127.0.0.1", None, False),
])
def test_start_head_refuses_a_network_dashboard_without_token_auth(host, auth_mode, refused):
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(RAY="echo", **({"RAY_AUTH_MODE": auth_mode} if auth_mode else {}))
    for argv in ([], [f"--dashboard-host={host}"]):  # from the environment, or among the extra arguments
        done = subprocess.run(["bash", str(REPO / "cluster" / "start-head.sh"), *argv],
                              env={**env, "AIGC_DASHBOARD_HOST": host} if not argv else env,
                              capture_output=True, text=True, timeout=30)
        if refused:
            assert done.returncode == 2 and "RAY_AUTH_MODE=token" in done.stderr and not done.stdout
        else:
            assert done.returncode == 0 and f"--dashboard-host={host}" in done.stdout.split()


def test_nothing_is_open_to_the_internet():
    """Ray's launcher, left to make its own group, admits SSH from 0.0.0.0/0 whatever provider.security_group
    says: so every node type names the cluster's group, made from cluster/aws-security-group.json."""
    config = launcher_config()
    nodes = [node["node_config"] for node in config["available_node_types"].values()]
    groups = {tuple(node.get("SecurityGroupIds", ())) for node in nodes}
    assert len(groups) == 1 and all(groups), "every node type needs SecurityGroupIds, the same group"
    assert all(node.get("SubnetIds") for node in nodes)
    template = json.loads(SECURITY_GROUP.read_text())
    for text in setting_strings(template) + setting_strings(config):
        assert not re.search(r"0\.0\.0\.0/0|::/0|CidrIpv6", text), text
    group = template["Resources"]["ClusterGroup"]
    rules = group["Properties"]["SecurityGroupIngress"] + [
        resource["Properties"] for resource in template["Resources"].values()
        if resource["Type"] == "AWS::EC2::SecurityGroupIngress"]
    for rule in rules:
        if "CidrIp" in rule:  # the one rule from outside: SSH, from the operator's network
            assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
            assert rule["CidrIp"] == {"Ref": "OperatorCidr"}
        else:
            assert rule["SourceSecurityGroupId"] == {"Fn::GetAtt": ["ClusterGroup", "GroupId"]} == rule["GroupId"]
    operator_cidr = re.compile(template["Parameters"]["OperatorCidr"]["AllowedPattern"])
    assert "Default" not in template["Parameters"]["OperatorCidr"], "the operator must name their own network"
    for cidr, allowed in [("0.0.0.0/0", False), ("10.0.0.0/8", False), ("1.2.3.4", False), ("::/0", False),
                          ("198.51.100.0/24", True), ("203.0.113.7/32", True)]:
        assert bool(operator_cidr.fullmatch(cidr)) is allowed, cidr


def test_every_node_type_requires_imdsv2_with_hop_limit_1():
    for name, node in launcher_config()["available_node_types"].items():
        options = node["node_config"].get("MetadataOptions", {})
        assert options.get("HttpTokens") == "required", name
        assert options.get("HttpPutResponseHopLimit") == 1, name
        assert options.get("HttpEndpoint") == "enabled", name


def test_iam_policies_are_least_privilege():
    files = sorted(path.name for path in IAM.glob("*.json"))
    assert {"head-autoscaler-policy.json", "node-policy.json", "ec2-trust-policy.json"} <= set(files)
    for name in files:
        for statement in statements(name):
            assert statement["Effect"] == "Allow" and "NotAction" not in statement and "NotResource" not in statement
            actions = as_list(statement["Action"])
            assert not any("*" in action for action in actions), (name, actions)
            resources = as_list(statement.get("Resource", []))
            if "*" in resources:  # only what AWS cannot scope to a resource
                assert all(action.startswith("ec2:Describe") for action in actions), (name, statement)
            if any(action in ("s3:PutObject", "s3:DeleteObject") for action in actions):
                assert all(re.fullmatch(r"arn:aws:s3:::[a-z0-9.-]+/[\w.-]+/\*", r) for r in resources), resources
                assert not any(r.split(":::", 1)[1].split("/", 1)[1].startswith("data/") for r in resources)


def test_head_policy_launches_only_this_clusters_workers():
    """The head's role is what a job on the head could borrow: it may start only the gpu-worker type,
    from the pinned AMI, in the cluster's group, tagged for this cluster, with the worker role."""
    config = launcher_config()
    worker = config["available_node_types"]["gpu-worker"]["node_config"]
    head = statements("head-autoscaler-policy.json")
    launch = next(s for s in head if s["Action"] == "ec2:RunInstances" and "Condition" in s)
    assert launch["Condition"]["StringEquals"] == {"aws:RequestTag/ray-cluster-name": config["cluster_name"],
                                                   "ec2:InstanceType": worker["InstanceType"]}
    assert launch["Condition"]["ArnEquals"]["ec2:InstanceProfile"] == worker["IamInstanceProfile"]["Arn"]
    launch_with = next(as_list(s["Resource"]) for s in head
                       if s["Action"] == "ec2:RunInstances" and "Condition" not in s)
    assert [r.rsplit("/", 1)[1] for r in launch_with if ":image/" in r] == [worker["ImageId"]]
    assert [r.rsplit("/", 1)[1] for r in launch_with if ":security-group/" in r] == worker["SecurityGroupIds"]
    for statement in head:
        if "ec2:TerminateInstances" in as_list(statement["Action"]):
            tag = {"ec2:ResourceTag/ray-cluster-name": config["cluster_name"]}
            assert statement["Condition"]["StringEquals"] == tag
    passed = [s for s in head if s["Action"] == "iam:PassRole"]
    worker_role = worker["IamInstanceProfile"]["Arn"].replace(":instance-profile/", ":role/")
    assert [s["Resource"] for s in passed] == [worker_role]
    assert passed[0]["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}


def test_ami_and_image_are_pinned():
    config = launcher_config()
    amis = {node["node_config"].get("ImageId", "") for node in config["available_node_types"].values()}
    assert len(amis) == 1, amis
    (ami,) = amis
    assert ami.startswith("ami-") and ami.lower() != "latest_dlami", ami  # Ray resolves latest_dlami at `ray up`
    name, _, digest = config["docker"]["image"].partition("@sha256:")
    assert name and digest, f"docker.image must be pinned by digest (…@sha256:<digest>), not a tag: {name}"
