"""A backfill on a three-node cluster on this machine (a head and two worker nodes started with `ray start`)
loses a worker node to SIGKILL mid-run: it completes, at once or on resume, with every row once."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest
import tomli_w
import torch

from aigc_dist.batch.inputs import stable_request_id
from aigc_dist.batch.layout import read_output
from aigc_dist.config import BackfillConfig, DataConfig
from aigc_dist.data.prompts import PromptTemplate, template_digest
from aigc_dist.demo.world import WorldConfig, make_world, write_world
from aigc_dist.engine.text import prompt_conditioning
from aigc_dist.models.artifact import save_text_artifact
from aigc_dist.models.llama import LlamaLM, LMConfig
from aigc_dist.storage import Storage, join_uri

S3_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
WORLD = WorldConfig(num_users=300, num_items=60, candidates_per_user=10, seed=3)  # 3,000 candidates
SHARDS = 6
TEMPLATE = PromptTemplate(max_field_chars=24, max_prompt_tokens=128)


def generator_nodes(ports: list[int]) -> list[int]:
    """The node manager ports of the worker nodes running a generator actor (its process title says so)."""
    found = []
    for port in ports:
        flag = f"--node_manager_port={port}"
        for raylet in (p for p in psutil.process_iter(["cmdline"]) if flag in (p.info["cmdline"] or [])):
            titles = [" ".join(child.cmdline()) for child in raylet.children(recursive=True)]
            if any("ShardGenerator" in title for title in titles):
                found.append(port)
    return found


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_worker_node_killed_mid_run_loses_no_row_and_duplicates_none(s3_bucket, tmp_path, cluster_kit):
    storage = Storage()
    world_uri = join_uri(s3_bucket, "world")
    fs, path = storage.filesystem(world_uri)
    world = make_world(WORLD)
    write_world(world, path, filesystem=fs)
    torch.manual_seed(0)
    artifact = join_uri(s3_bucket, "models/copy/v1")
    save_text_artifact(artifact, LlamaLM(LMConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=88,
                                                  max_position_embeddings=192)), storage,
                       conditioning=prompt_conditioning(TEMPLATE), metadata={"name": "copy-test", "version": "v1"})
    backfill = BackfillConfig(run_id="multinode", output=join_uri(s3_bucket, "backfills"), artifact=artifact,
                              rows_per_file=len(world.candidates) // SHARDS, rows_per_task=50, batch_size=32,
                              max_new_tokens=16, min_actors=2, max_actors=2, progress_interval_s=1.0)
    data = DataConfig(users=join_uri(world_uri, "users.parquet"), items=join_uri(world_uri, "items.parquet"),
                      candidates=join_uri(world_uri, "candidates.parquet"))
    config = tmp_path / "backfill.toml"
    config.write_text(tomli_w.dumps({"backfill": backfill.model_dump(mode="json", exclude_none=True),
                                     "data": data.model_dump(mode="json", exclude_none=True)}))
    run = join_uri(backfill.output, backfill.run_id)
    s3_env = {name: os.environ[name] for name in S3_VARIABLES}

    # 4 CPUs a worker: 2 generators, a preparer and the tasks fit on the survivor alone.
    with cluster_kit.cluster(tmp_path, [4, 4], env=s3_env) as cluster:
        driver_env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
                      "RAY_ADDRESS": cluster.gcs_address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster.token}

        def start_driver(log_name: str) -> subprocess.Popen:
            entrypoint = [sys.executable, str(cluster_kit.repo / "jobs" / "backfill.py"), "--config", str(config)]
            return subprocess.Popen(entrypoint, env=driver_env, cwd=cluster_kit.repo,
                                    stdout=(tmp_path / log_name).open("w"), stderr=subprocess.STDOUT)

        driver = start_driver("driver.log")
        deadline = time.monotonic() + 400
        while (driver.poll() is None and time.monotonic() < deadline
               and not storage.list(join_uri(run, "_commits"))):
            time.sleep(0.2)
        log = (tmp_path / "driver.log").read_text
        assert driver.poll() is None, log()[-3000:]
        committed_at_kill = len(storage.list(join_uri(run, "_commits")))
        assert 1 <= committed_at_kill < SHARDS  # the kill comes mid-run: shards were still pending
        victims = generator_nodes(cluster.node_manager_ports)
        assert victims, "no worker node runs a generator actor"
        assert cluster_kit.kill_node(victims[0]) > 1
        code = driver.wait(timeout=600)
        resumed = code != 0
        if resumed:  # Ray could not recover what was lost with the node: the same run_id resumes it
            code = start_driver("resume.log").wait(timeout=600)
        assert code == 0, log()[-3000:] + ((tmp_path / "resume.log").read_text()[-3000:] if resumed else "")

    data_rows, errors = read_output(run, storage)
    ids = data_rows["request_id"].to_pylist() + errors["request_id"].to_pylist()
    salt = template_digest(TEMPLATE)
    expected = {stable_request_id(c["user_id"], c["item_id"], salt) for c in world.candidates.to_pylist()}
    assert len(ids) == len(set(ids)) == len(expected) == 3000  # no row twice
    assert set(ids) == expected  # and none missing
    manifest = storage.read_json(join_uri(run, "_manifest.json"))
    assert manifest["counts"]["total"] == 3000 and len(manifest["files"]["data"]) == SHARDS
    assert not storage.list(join_uri(run, "_work"))
