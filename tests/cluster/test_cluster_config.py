"""The cluster launcher config (cluster/aws-gpu.yaml) and the node start scripts, checked offline.

The scripts themselves start the real cluster of tests/jobs/ (head and worker, metrics port set)."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "cluster" / "aws-gpu.yaml"
IMAGE_ROOT = "/home/ray/aigc-dist"  # k8s/Dockerfile's WORKDIR


def launcher_config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


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
    assert scripts == {f"{IMAGE_ROOT}/cluster/start-head.sh", f"{IMAGE_ROOT}/cluster/start-worker.sh"}
    for script in scripts:
        path = REPO / script.removeprefix(f"{IMAGE_ROOT}/")
        assert path.stat().st_mode & 0o111, f"{path} is not executable"
        assert "--metrics-export-port" in path.read_text()


def test_start_worker_without_a_head_address_says_how_to_call_it():
    done = subprocess.run(["bash", str(REPO / "cluster" / "start-worker.sh")], capture_output=True, text=True)
    assert done.returncode == 2 and "usage:" in done.stderr and "HEAD_HOST:GCS_PORT" in done.stderr
