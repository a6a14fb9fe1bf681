"""`aigc-dist submit` / `aigc-dist jobs` before any cluster is involved: what the job is sent, and the
errors a user meets (tests/jobs/ runs them against a real Ray cluster)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path
from zipfile import ZipFile

import pytest
from ray._private.runtime_env.packaging import create_package, get_excludes_from_ignore_files
from ray._private.runtime_env.working_dir import upload_working_dir_if_needed
from ray._private.thirdparty.pathspec import PathSpec  # the matcher Ray applies to excludes and .rayignore

from aigc_dist.cli import EXIT_CONFIG_ERROR, EXIT_FAILED, main
from aigc_dist.config.loader import SECRET_FIELDS
from aigc_dist.submit import (
    SECRET_FILE_PATTERNS,
    UPLOAD_EXCLUDES,
    JobSubmissionError,
    dashboard_address,
    environment_variables,
    export_run_id,
    job_arguments,
    runtime_env,
    secret_fields,
)

REPO = Path(__file__).resolve().parents[1]
AIGC_DIST = Path(sys.executable).parent / "aigc-dist"
# A working directory as a user's checkout may hold it: code, and credentials lying beside it.
CODE_FILES = ["jobs/backfill.py", "aigc_dist/model.py", "README.md", "docs/keys.md"]
SECRET_FILES = [".env", ".env.production", ".envrc", "key.pem", "aigc_dist/.env", ".aws/credentials", ".aws/config",
                ".ssh/id_ed25519", "credentials.json", "jobs/tls.key", ".netrc"]


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
        sample = REPO / pattern.replace("**/", "aigc_dist/").replace("*", "x")
        sample = sample / "file" if pattern.endswith("/") else sample  # a file in a directory, or the file
        assert any(match(sample) for match in ignored), f"{pattern} is uploaded by plain `ray job submit`"
    assert not any(match(REPO / "jobs" / "backfill.py") for match in ignored)


def test_the_rayignore_holds_exactly_the_secret_file_patterns():
    """One list: what `aigc-dist submit` leaves out as secret is what plain `ray job submit` does, in the
    file Ray reads even with RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1."""
    lines = (REPO / ".rayignore").read_text().splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith("# Secret files"))
    block = [line for line in lines[start:] if line and not line.startswith("#")]
    assert block == SECRET_FILE_PATTERNS
    assert set(SECRET_FILE_PATTERNS) <= set(UPLOAD_EXCLUDES)


def test_no_file_of_the_repository_is_left_out_as_a_secret():
    """The patterns are wide (credentials*, *.key): none of them may drop code the job needs."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    spec = PathSpec.from_lines("gitwildmatch", SECRET_FILE_PATTERNS)
    assert tracked.strip() and not [path for path in tracked.splitlines() if spec.match_file(path)]


def uploaded_files(env: dict, scratch: Path) -> set[str]:
    """The files of the package Ray's JobSubmissionClient uploads for runtime_env `env`: Ray's own calls
    (`upload_working_dir_if_needed`, then `create_package` as the client's `_upload_package` makes it),
    with the zip kept here instead of being PUT to a dashboard."""
    names: set[str] = set()

    def keep(working_dir: str, excludes: list[str], is_file: bool = False) -> None:
        package = scratch / "package.zip"
        create_package(working_dir, package, include_gitignore=True, excludes=excludes)
        with ZipFile(package) as archive:
            names.update(archive.namelist())
        package.unlink()

    upload_working_dir_if_needed(dict(env), include_gitignore=True, upload_fn=keep)
    return names


@pytest.mark.parametrize("how", ["aigc-dist submit", "ray job submit"])
def test_secret_files_are_not_uploaded(how, tmp_path):
    """A `.env`, keys and `.aws/credentials` beside the code stay here, whether the working dir is sent
    by `aigc-dist submit` (its runtime_env's excludes) or by plain `ray job submit --working-dir .` in a
    checkout (the repository's .rayignore)."""
    work, scratch = tmp_path / "work", tmp_path / "scratch"
    scratch.mkdir()
    for name in CODE_FILES + SECRET_FILES:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text("AWS_SECRET_ACCESS_KEY=hunter2\n" if name in SECRET_FILES else "print('ok')\n")
    if how == "aigc-dist submit":
        env = runtime_env(work, [], {})
    else:
        shutil.copy(REPO / ".rayignore", work / ".rayignore")
        env = {"working_dir": str(work)}
    uploaded = uploaded_files(env, scratch)
    assert uploaded - {".rayignore"} == set(CODE_FILES)


def test_the_secret_fields_are_the_schemas_secrets():
    fields = secret_fields()
    assert fields.items() >= {"storage.access_key_id": "AWS_ACCESS_KEY_ID",  # and any secret added since
                              "storage.secret_access_key": "AWS_SECRET_ACCESS_KEY",
                              "storage.session_token": "AWS_SESSION_TOKEN"}.items()
    assert {name.rsplit(".", 1)[-1] for name in fields} >= SECRET_FIELDS  # every field the loader masks


def test_submit_refuses_a_secret_override_before_reaching_for_the_cluster(dead_address):
    """The real command line: exit 2 naming the fields and where the secrets go instead, no value echoed,
    and nothing sent (the address is dead: reaching for it would be a connection error). A value that
    the config parser would quote in its error (broken JSON) is refused before it is parsed."""
    secret, token = "wJalrXUtnFEMI-K7MDENG-bPxRfiCY", "[FwoGZXIvYXdzEJr"
    done = subprocess.run([str(AIGC_DIST), "submit", "backfill", "--config", "jobs/configs/backfill.toml",
                           "--address", dead_address, f"--storage.secret_access_key={secret}",
                           f"--storage.session_token={token}", "--backfill.batch_size=0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_CONFIG_ERROR, done.stderr
    assert "storage.secret_access_key is a secret" in done.stderr and "$AWS_SECRET_ACCESS_KEY" in done.stderr
    assert "storage.session_token is a secret" in done.stderr and "$AWS_SESSION_TOKEN" in done.stderr
    assert secret not in done.stdout + done.stderr and token not in done.stdout + done.stderr
    assert "cannot reach" not in done.stderr and "submitted" not in done.stderr


def test_submit_refuses_a_config_file_that_holds_a_secret(dead_address, tmp_path, capsys):
    """The --config file travels in the uploaded working directory, so a secret in it is refused too."""
    (tmp_path / "jobs").mkdir()
    config = tmp_path / "jobs" / "backfill.toml"
    config.write_text('[backfill]\nrun_id = "r1"\n\n[storage]\naccess_key_id = "AKIAIOSFODNN7EXAMPLE"\n')
    assert main(["submit", "backfill", "--config", str(config), "--working-dir", str(tmp_path),
                 "--address", dead_address]) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert f"storage.access_key_id is a secret and setting it in --config {config}" in err
    assert "$AWS_ACCESS_KEY_ID" in err and "AKIAIOSFODNN7EXAMPLE" not in err and "cannot reach" not in err


def test_secret_like_env_names_are_warned_about_without_their_values(dead_address, monkeypatch, capsys):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-K7MDENG")
    assert main(["submit", "backfill", "--config", "jobs/configs/backfill.toml", "--address", dead_address,
                 "--env", "AWS_SECRET_ACCESS_KEY", "--env", "AWS_ACCESS_KEY_ID=AKIAEXAMPLE", "--env", "HF_TOKEN=hf_x1",
                 "--env", "AWS_DEFAULT_REGION=eu-west-1"]) == EXIT_FAILED  # warned, then the dead cluster
    err = capsys.readouterr().err
    assert "warning: --env AWS_SECRET_ACCESS_KEY, HF_TOKEN: names like a secret's" in err
    assert "shown to anyone with access to the Ray dashboard" in err and "cannot reach the Ray dashboard" in err
    assert not any(value in err for value in ("wJalrXUtnFEMI", "AKIAEXAMPLE", "hf_x1"))
    with pytest.raises(JobSubmissionError) as refused:
        environment_variables(["MY KEY=hunter2"])
    assert "not a variable name" in str(refused.value) and "hunter2" not in str(refused.value)


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
