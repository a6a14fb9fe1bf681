"""`aigc-dist submit` / `aigc-dist jobs` before any cluster is involved: what the job is sent, and the
errors a user meets (tests/jobs/ runs them against a real Ray cluster)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from ray._private.runtime_env.packaging import get_excludes_from_ignore_files

from aigc_dist.cli import EXIT_CONFIG_ERROR, EXIT_FAILED, main
from aigc_dist.submit import (
    UPLOAD_EXCLUDES,
    JobSubmissionError,
    dashboard_address,
    environment_variables,
    export_run_id,
    job_arguments,
    runtime_env,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def dead_address() -> str:
    """A dashboard address where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_job_arguments_name_the_config_as_the_job_sees_it():
    argv = job_arguments("backfill", str(REPO / "jobs/configs/backfill.toml"), REPO, {}, ["--backfill.run_id=r1"])
    assert argv == ["python", "jobs/backfill.py", "--config", "jobs/configs/backfill.toml", "--backfill.run_id=r1"]
    argv = job_arguments("export", None, REPO, {"checkpoint": "s3://b/runs/lm", "output": None}, [])
    assert argv == ["python", "jobs/export.py", "--checkpoint", "s3://b/runs/lm"]
    with pytest.raises(JobSubmissionError, match="outside the working directory"):
        job_arguments("train", "/etc/hosts", REPO, {}, [])


def test_runtime_env_uploads_the_working_dir_without_environments_or_outputs(monkeypatch):
    monkeypatch.setenv("AIGC_TEST_SECRET", "s3cr3t")
    env = runtime_env(REPO, ["requests==2.32.3"], environment_variables(["AIGC_TEST_SECRET", "MODE=prod"]))
    assert env == {"working_dir": str(REPO), "excludes": UPLOAD_EXCLUDES, "pip": ["requests==2.32.3"],
                   "env_vars": {"AIGC_TEST_SECRET": "s3cr3t", "MODE": "prod"}}
    assert {".git/", ".venv/", "aigc-demo/", "aigc-output/", "aigc-runs/"} <= set(UPLOAD_EXCLUDES)
    with pytest.raises(JobSubmissionError, match="AIGC_TEST_UNSET is not set here"):
        environment_variables(["AIGC_TEST_UNSET"])
    with pytest.raises(JobSubmissionError, match="not a variable name"):
        environment_variables(["1X=2"])


def test_plain_ray_job_submit_leaves_out_the_same_paths():
    """Ray applies the working dir's .gitignore and .rayignore to `ray job submit --working-dir .` too."""
    ignored = get_excludes_from_ignore_files(REPO, include_gitignore=True)
    for pattern in UPLOAD_EXCLUDES:
        sample = REPO / pattern.replace("**/", "aigc_dist/").replace("*", "x") / "file"  # all are directories
        assert any(match(sample) for match in ignored), f"{pattern} is uploaded by plain `ray job submit`"
    assert not any(match(REPO / "jobs" / "backfill.py") for match in ignored)


def test_addresses_and_run_ids(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:8265")
    assert dashboard_address(None) == "http://10.0.0.5:8265"
    assert dashboard_address("https://ray.example.com/") == "https://ray.example.com"
    with pytest.raises(JobSubmissionError, match="Ray Client address"):
        dashboard_address("ray://10.0.0.5:10001")
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(JobSubmissionError, match="pass --address"):
        dashboard_address(None)
    assert export_run_id("s3://bucket/runs/copy-lm-tiny/checkpoint_000010") == "copy-lm-tiny-checkpoint_000010"
    assert export_run_id("./aigc-runs/copy lm") == "aigc-runs-copy-lm"


def test_submit_validates_the_config_before_reaching_for_the_cluster(dead_address, capsys):
    assert main(["submit", "backfill", "--config", "jobs/configs/backfill.toml", "--backfill.batch_size=0",
                 "--address", dead_address]) == EXIT_CONFIG_ERROR
    assert "backfill.batch_size" in capsys.readouterr().err
    assert main(["submit", "train", "--config", "/etc/hosts.toml", "--address", dead_address]) == EXIT_CONFIG_ERROR


def test_an_unreachable_cluster_is_named(dead_address, capsys):
    assert main(["submit", "backfill", "--config", "jobs/configs/backfill.toml", "--address", dead_address]) \
        == EXIT_FAILED
    assert f"cannot reach the Ray dashboard at {dead_address}" in capsys.readouterr().err
    assert main(["jobs", "stop", "backfill-x", "--address", dead_address]) == EXIT_FAILED
    assert "cannot reach the Ray dashboard" in capsys.readouterr().err
