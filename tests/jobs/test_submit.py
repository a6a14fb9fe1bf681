"""Ray jobs as users run them, on a real two-node cluster with token auth (conftest.py) and S3 (moto):
plain `ray job submit` of jobs/train.py, `aigc-dist submit backfill --wait` with the artifact it
exported, `aigc-dist jobs status|logs|stop`, and a run that is never submitted twice."""

from __future__ import annotations

import json
import os
import time
import uuid

import psutil
import pytest

from aigc_dist.demo.world import WorldConfig, write_world
from aigc_dist.errors import EXIT_RUN_LOCKED
from aigc_dist.storage import Storage, join_uri
from aigc_dist.train.loop import POLL_INTERVAL_ENV

S3_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
WORLD = WorldConfig(num_users=60, num_items=40, candidates_per_user=5, seed=1)  # 300 candidates


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    """A bucket holding the synthetic world under world/ (users, items, candidates, copy)."""
    bucket = f"s3://{s3_server.new_bucket()}"
    fs, path = Storage().filesystem(join_uri(bucket, "world"))
    write_world(WORLD, path, fs)
    return bucket


def train_overrides(bucket: str, run: str, max_steps: int) -> list[str]:
    """jobs/configs/train_lm_tiny.toml, pointed at the bucket and cut to a few tiny steps."""
    world = join_uri(bucket, "world")
    return [f"--train.run_name={run}", f"--train.storage_path={bucket}/runs", f"--train.dataset={world}/copy.parquet",
            f"--data.users={world}/users.parquet", f"--data.items={world}/items.parquet", f"--model.name={run}",
            f"--train.max_steps={max_steps}", "--train.warmup_steps=1", f"--train.checkpoint_every_steps={max_steps}",
            "--train.log_every_steps=2", "--train.micro_batch_size=8", "--train.max_failures=0",
            "--model.max_seq_len=128", "--data.max_prompt_tokens=80", "--data.max_field_chars=24"]


def ray_list(ray_head, kind: str, *filters: str, detail: bool = False) -> list[dict]:
    """`ray list KIND --filter F ...` on the cluster (the state API, through its dashboard), as records."""
    listed = ray_head.run("ray", "list", kind, "--address", ray_head.address, "--format", "json", "--limit", "10000",
                          *(["--detail"] if detail else []), *[arg for f in filters for arg in ("--filter", f)],
                          timeout=60)
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


def live_actors_of(ray_head, job: str) -> list[str]:
    """The actors that submitted job `job`'s driver (its Ray job id) started and that are not dead, as
    `class state pid`; named detached ones aside (cluster services any job uses: Ray Data's coordinator)."""
    [driver] = ray_list(ray_head, "jobs", f"submission_id={job}")
    if driver["job_id"] is None:  # its driver never joined the cluster, so it started nothing
        return []
    return [f"{actor['class_name']} {actor['state']} {actor['pid']}"
            for actor in ray_list(ray_head, "actors", f"job_id={driver['job_id']}", detail=True)
            if actor["state"] != "DEAD" and not (actor["is_detached"] and actor["name"])]


def job_status(ray_head, job: str) -> dict:
    done = ray_head.run("aigc-dist", "jobs", "status", job, "--json", "--address", ray_head.address, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_with_ray_job_submit_then_backfill_with_aigc_dist_submit(ray_head, bucket):
    run = f"lm-{uuid.uuid4().hex[:6]}"
    env_vars = {name: os.environ[name] for name in S3_VARIABLES} | {POLL_INTERVAL_ENV: "0.25"}
    trained = ray_head.run(
        "ray", "job", "submit", "--address", ray_head.address, "--working-dir", ".",
        "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--",
        "python", "jobs/train.py", "--config", "jobs/configs/train_lm_tiny.toml", *train_overrides(bucket, run, 6),
        timeout=600)
    assert trained.returncode == 0, trained.stdout[-5000:] + trained.stderr[-3000:]
    assert f"train {run}: 6 steps" in trained.stdout  # the driver's last line, streamed back by `ray job submit`
    artifact = f"{bucket}/runs/models/{run}/v1"
    trained_meta = Storage().read_json(join_uri(artifact, "metadata.json"))
    assert trained_meta["step"] == 6

    # `submit export` of the run's newest checkpoint, as a job: the same model the run itself exported.
    exported_uri = f"{bucket}/exports/{run}"
    exported = ray_head.run(
        "aigc-dist", "submit", "export", "--address", ray_head.address, "--checkpoint", f"{bucket}/runs/{run}",
        "--output", exported_uri, "--wait", *[f"--env={name}" for name in S3_VARIABLES], timeout=600)
    assert exported.returncode == 0, exported.stdout[-5000:] + exported.stderr[-3000:]
    assert f"as job export-runs-{run}" in exported.stderr and "SUCCEEDED" in exported.stderr
    exported_meta = Storage().read_json(join_uri(exported_uri, "metadata.json"))
    assert exported_meta["step"] == 6 and exported_meta["digest"] == trained_meta["digest"]

    # The same artifact backfilled on the cluster: S3 settings reach the job only through --env.
    run_id, output = f"copy-{run}", join_uri(bucket, "backfills")
    world = join_uri(bucket, "world")
    backfilled = ray_head.run(
        "aigc-dist", "submit", "backfill", "--address", ray_head.address, "--config", "jobs/configs/backfill.toml",
        "--wait", *[f"--env={name}" for name in S3_VARIABLES],
        f"--backfill.run_id={run_id}", f"--backfill.output={output}", f"--backfill.artifact={artifact}",
        f"--data.users={world}/users.parquet", f"--data.items={world}/items.parquet",
        f"--data.candidates={world}/candidates.parquet", "--backfill.rows_per_file=100", "--backfill.max_actors=1",
        "--backfill.batch_size=32", "--backfill.max_new_tokens=16", "--backfill.progress_interval_s=1",
        "--metrics.port=0", timeout=600)
    job = f"backfill-{run_id}"
    assert backfilled.returncode == 0, backfilled.stdout[-5000:] + backfilled.stderr[-3000:]
    assert f"as job {job}" in backfilled.stderr and f"job {job}: SUCCEEDED" in backfilled.stderr
    assert f"backfill {run_id}: complete, 300 rows" in backfilled.stdout  # the job's log, streamed by --wait

    manifest = Storage().read_json(join_uri(output, run_id, "_manifest.json"))
    counts = manifest["counts"]
    assert counts["total"] == 300 and counts["ok"] + counts["quarantined"] + counts["filtered"] == 300
    assert manifest["model"]["uri"] == artifact

    status = job_status(ray_head, job)
    assert status["status"] == "SUCCEEDED" and status["driver_exit_code"] == 0
    assert status["entrypoint"].startswith("python jobs/backfill.py --config jobs/configs/backfill.toml")
    assert status["metadata"] == {"aigc_dist_command": "backfill", "aigc_dist_run": run_id}
    logs = ray_head.run("aigc-dist", "jobs", "logs", job, "--address", ray_head.address, timeout=60)
    assert logs.returncode == 0 and f"backfill {run_id}: complete" in logs.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_submit_wait_on_a_job_that_fails_exits_with_the_drivers_status_and_error(ray_head, bucket):
    """A backfill of an artifact that is not there: the job fails; `submit --wait` streams the driver's
    error, says FAILED and exits with the driver's own status (as `jobs status` reports it)."""
    run_id = f"missing-{uuid.uuid4().hex[:6]}"
    missing = f"{bucket}/models/none/v1"
    world = join_uri(bucket, "world")
    failed = ray_head.run(
        "aigc-dist", "submit", "backfill", "--address", ray_head.address, "--config", "jobs/configs/backfill.toml",
        "--wait", *[f"--env={name}" for name in S3_VARIABLES], f"--backfill.run_id={run_id}",
        f"--backfill.output={bucket}/backfills", f"--backfill.artifact={missing}",
        f"--data.users={world}/users.parquet", f"--data.items={world}/items.parquet",
        f"--data.candidates={world}/candidates.parquet", "--metrics.port=0", timeout=600)
    job = f"backfill-{run_id}"
    status = job_status(ray_head, job)
    assert status["status"] == "FAILED" and status["driver_exit_code"] not in (None, 0), status
    assert failed.returncode == status["driver_exit_code"], failed.stderr[-3000:]
    assert f"job {job}: FAILED (exit {failed.returncode})" in failed.stderr
    assert f"backfill.artifact: {missing} is not a complete artifact" in failed.stdout + failed.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_running_job_is_not_submitted_twice_and_jobs_stop_stops_it(ray_head, bucket):
    run = f"long-{uuid.uuid4().hex[:6]}"
    submit = ["aigc-dist", "submit", "train", "--address", ray_head.address, "--config",
              "jobs/configs/train_lm_tiny.toml", *[f"--env={name}" for name in S3_VARIABLES],
              *train_overrides(bucket, run, 100_000)]
    first = ray_head.run(*submit, timeout=120)
    job = f"train-{run}"
    assert first.returncode == 0, first.stderr
    assert f"as job {job}" in first.stderr and f"aigc-dist jobs stop {job}" in first.stderr

    deadline = time.monotonic() + 120
    while (status := job_status(ray_head, job))["status"] == "PENDING" and time.monotonic() < deadline:
        time.sleep(1)
    assert status["status"] == "RUNNING", status

    second = ray_head.run(*submit, timeout=120)
    assert second.returncode == EXIT_RUN_LOCKED
    assert f"already has job {job} RUNNING" in second.stderr

    # Stopped while it trains: its controller and both workers are up.
    while sum(actor.startswith("RayTrainWorker ALIVE") for actor in live_actors_of(ray_head, job)) < 2:
        assert time.monotonic() < deadline + 180, live_actors_of(ray_head, job)
        time.sleep(1)

    stopped = ray_head.run("aigc-dist", "jobs", "stop", job, "--address", ray_head.address, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.startswith(f"{job}: STOPPED")
    assert job_status(ray_head, job)["status"] == "STOPPED"
    drivers = [p for p in psutil.process_iter(["cmdline"])
               if any(f"--train.run_name={run}" in part for part in p.info["cmdline"] or [])]
    assert not [p for p in drivers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]  # the driver is gone
    assert live_actors_of(ray_head, job) == []  # and so is all it started: controller, workers, Ray Data's actors

    # The run is free again: its next job is a new attempt of the same run (which resumes it).
    again = ray_head.run(*submit, timeout=120)
    assert again.returncode == 0 and f"as job {job}-attempt2" in again.stderr
    assert ray_head.run("aigc-dist", "jobs", "stop", f"{job}-attempt2", "--address", ray_head.address,
                        timeout=120).returncode == 0
    assert live_actors_of(ray_head, f"{job}-attempt2") == []


def test_cluster_nodes_export_metrics_and_refuse_clients_without_the_token(ray_head):
    for node in (0, 1):  # cluster/start-head.sh and start-worker.sh set the metrics export port
        assert "ray_" in ray_head.metrics(node)

    refused = ray_head.run("aigc-dist", "jobs", "status", "any", "--address", ray_head.address, token=False)
    assert refused.returncode == 1 and "refused us" in refused.stderr and "token" in refused.stderr

    missing = ray_head.run("aigc-dist", "jobs", "status", "no-such-job", "--address", ray_head.address)
    assert missing.returncode == 1
    assert f"no job 'no-such-job' on the Ray cluster at {ray_head.address}" in missing.stderr
