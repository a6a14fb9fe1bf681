"""`aigc-dist submit` and `aigc-dist jobs`: Ray jobs on a cluster, through Ray's `JobSubmissionClient`.

A submitted job runs exactly what plain `ray job submit --working-dir . -- python jobs/<command>.py ...`
runs: the working directory is uploaded (Ray puts it first on the job's PYTHONPATH, so the job runs
the code you have, not what the cluster image holds) and the entrypoint script re-reads the same
config file with the same overrides. The config is validated here first, so a bad value stops before
anything reaches the cluster.

Submission ids derive from the run (`backfill-<run_id>`, `train-<run_name>`, then `-attempt2`, ...),
found through the job metadata this module writes; a run with a job still pending or running is not
submitted twice (exit 4), since the same run id resumes where the last attempt stopped.

Nothing secret travels with a submission: a secret config value (a field typed `SecretStr`) is
refused, whether an override (it would be the job's entrypoint) or in the config file (uploaded);
secret files are left out of every upload (`SECRET_FILE_PATTERNS`, also the repository's
.rayignore); `--env` names that look secret get a warning, since runtime_env is shown to anyone who
can open the dashboard. Credentials reach jobs through the nodes' own environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, SecretStr

from aigc_dist.config import AigcConfig
from aigc_dist.errors import EXIT_CONFIG_ERROR, EXIT_FAILED, EXIT_RUN_LOCKED, UserError

# The command -> the script under the working directory that `ray job submit` runs for it.
JOB_ENTRYPOINTS: dict[str, str] = {"train": "jobs/train.py", "backfill": "jobs/backfill.py", "export": "jobs/export.py"}
# Command-line options of each command forwarded to its entrypoint (argparse dest names).
FORWARDED_OPTIONS: dict[str, tuple[str, ...]] = {"train": ("resume_from",), "backfill": (),
                                                 "export": ("checkpoint", "output")}
# Files that hold credentials (gitignore patterns, at any depth): never uploaded, by `aigc-dist submit`
# (UPLOAD_EXCLUDES) nor by plain `ray job submit --working-dir .`, through the repository's .rayignore,
# which holds the same lines (tests/test_submit.py keeps them equal). Ray reads .rayignore even when
# RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 turns .gitignore off, and a working dir's package is readable by
# every job of the cluster.
SECRET_FILE_PATTERNS: list[str] = [
    ".env", ".env.*", ".envrc",  # dotenv / direnv files
    "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*",
    "credentials*", ".netrc", ".git-credentials", ".pypirc", ".npmrc",  # AWS/GCP, git, package registries
    ".aws/", ".ssh/", ".gnupg/", ".kube/", ".docker/", "**/.config/gcloud/"]  # tools' credential directories
# Never uploaded with the working directory (on top of the directory's .gitignore and .rayignore):
# environments, VCS data, local outputs (Ray refuses a package over 512 MiB), and secret files.
UPLOAD_EXCLUDES: list[str] = [".git/", ".venv/", "**/__pycache__/", "*.egg-info/", ".pytest_cache/",
                              ".ruff_cache/", ".hypothesis/", "aigc-demo/", "aigc-output/", "aigc-runs/",
                              *SECRET_FILE_PATTERNS]
# `--env` names that look like they carry a secret (one `_`-separated word of the name). A name ending
# in _ID is an identifier, not a secret (AWS_ACCESS_KEY_ID names a key and grants nothing without
# AWS_SECRET_ACCESS_KEY, which is matched), so it is not warned about.
_SECRET_WORDS = re.compile(r"(?:^|_)(?:SECRETS?|PASSWORD|PASSWD|TOKEN|KEY|APIKEY|CREDENTIALS?|PRIVATE|AUTH)(?:_|$)",
                           re.IGNORECASE)
METADATA_COMMAND, METADATA_RUN = "aigc_dist_command", "aigc_dist_run"
ACTIVE_STATES = {"PENDING", "RUNNING"}
# Ray's job supervisor sends a stopped job's driver SIGTERM, then SIGKILL after $RAY_JOB_STOP_WAIT_TIME_S
# (3 s by default; read from the job's env_vars). A training driver uses that time to abort its run
# (trainer._sigterm_aborts_run), which takes longer than 3 s on a busy cluster.
STOP_GRACE_VARIABLE, STOP_GRACE_S = "RAY_JOB_STOP_WAIT_TIME_S", 30
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class JobSubmissionError(UserError, RuntimeError):
    """The cluster cannot be reached, refuses us, or has no such job."""


class SecretOnSubmitError(JobSubmissionError):
    """A secret config value given to `submit`: it would be shown or uploaded with the job."""

    exit_code = EXIT_CONFIG_ERROR


class RunActiveError(JobSubmissionError):
    """The run already has a pending or running job: a second one would race it."""

    exit_code = EXIT_RUN_LOCKED


def dashboard_address(address: str | None) -> str:
    """The Ray dashboard's HTTP address: `--address`, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise JobSubmissionError("no cluster given: pass --address http://HEAD:8265 (the Ray dashboard) "
                                 "or set RAY_ADDRESS")
    if address.startswith("ray://"):
        raise JobSubmissionError(f"--address {address} is a Ray Client address; jobs are submitted to the "
                                 "dashboard's HTTP address, http://HEAD:8265")
    return (address if "://" in address else f"http://{address}").rstrip("/")


@contextlib.contextmanager
def _dashboard_errors(address: str, job: str | None = None) -> Iterator[None]:
    """Turn the client's connection, authentication and 404 errors into messages that say what to do."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        raise JobSubmissionError(f"the Ray cluster at {address} refused us: {exc}") from None
    except ConnectionError as exc:
        raise JobSubmissionError(f"cannot reach the Ray dashboard at {address} ({exc}); is the cluster up, and is "
                                 "this its dashboard address (port 8265 by default)?") from None
    except RuntimeError as exc:
        if job is not None and "status code 404" in str(exc):
            raise JobSubmissionError(f"no job {job!r} on the Ray cluster at {address}") from None
        raise


def connect(address: str | None) -> Any:
    """A `JobSubmissionClient` for the dashboard at `address` (token auth: $RAY_AUTH_TOKEN, as Ray's CLI)."""
    from ray.job_submission import JobSubmissionClient

    address = dashboard_address(address)
    with _dashboard_errors(address):
        return JobSubmissionClient(address)


def secret_fields(model: type[BaseModel] = AigcConfig, prefix: str = "") -> dict[str, str | None]:
    """Every secret of the config tree, dotted (`storage.secret_access_key`), and the environment variable
    it is read from when unset (the first `$NAME` its description names; None when it names none).

    A secret is a field typed `SecretStr`: the schema's own mark, the one config dumps and errors mask.
    """
    found: dict[str, str | None] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found |= secret_fields(annotation, f"{prefix}{name}.")
        elif SecretStr in (annotation, *get_args(annotation)):
            variable = re.search(r"\$([A-Z][A-Z0-9_]*)", field.description or "")
            found[f"{prefix}{name}"] = variable.group(1) if variable else None
    return found


def _secret_refused(field: str, variable: str | None, given_as: str, shown_by: str) -> str:
    instead = f"${variable}" if variable else "the value"
    return (f"{field} is a secret and {given_as} would put it {shown_by}: leave it out and give the job "
            f"{instead} in the cluster nodes' own environment (a Kubernetes Secret in the pods' env, or an "
            "instance role in place of keys; docs/operations.md, Submitting jobs)")


def refuse_secret_overrides(overrides: list[str]) -> None:
    """Refuse `--section.key=value` overrides of secret fields, before anything parses or echoes their
    values: an override becomes the job's entrypoint, which the dashboard, `ray job list`, `aigc-dist jobs
    status` and `ps` on the head show to anyone."""
    secrets = secret_fields()
    named = [arg[2:].split("=", 1)[0] for arg in overrides if arg.startswith("--")]
    problems = [_secret_refused(name, secrets[name], f"--{name}", "in the job's entrypoint, shown in the Ray "
                                "dashboard, `jobs status` and `ps`") for name in named if name in secrets]
    if problems:
        raise SecretOnSubmitError("; ".join(problems))


def refuse_config_file_secrets(cfg: AigcConfig, config: str | None) -> None:
    """Refuse a config whose file sets a secret field: the file is uploaded with the working directory
    (overrides are refused before: see `refuse_secret_overrides`)."""
    problems = [_secret_refused(name, variable, f"setting it in --config {config}", "in the package uploaded "
                                "to the cluster") for name, variable in secret_fields().items()
                if functools.reduce(getattr, name.split("."), cfg) is not None]
    if problems:
        raise SecretOnSubmitError("; ".join(problems))


def warn_secret_like_env(env_vars: dict[str, str]) -> None:
    """Say on stderr (names only, never values) which `--env` variables look secret: runtime_env is kept
    with the job and shown to anyone who can open the dashboard or run `ray job list`."""
    names = [name for name in env_vars if _SECRET_WORDS.search(name) and not name.upper().endswith("_ID")]
    if names:
        kind = "a name" if len(names) == 1 else "names"
        print(f"warning: --env {', '.join(names)}: {kind} like a secret's; the job's runtime_env, values "
              "included, is shown to anyone with access to the Ray dashboard or `ray job list`: on a shared "
              "cluster give them to the nodes' own environment instead (a Kubernetes Secret, an instance role)",
              file=sys.stderr)


def export_run_id(checkpoint: str) -> str:
    """A run id for an export job: the checkpoint's last two path parts (run and checkpoint)."""
    parts = [part for part in re.split(r"[/\\]", checkpoint.split("://", 1)[-1]) if part][-2:]
    return _ID_UNSAFE.sub("-", "-".join(parts)).strip("-.") or "checkpoint"


def job_arguments(command: str, config: str | None, working_dir: Path, options: dict[str, str | None],
                  overrides: list[str]) -> list[str]:
    """The entrypoint's command line: `python jobs/<command>.py --config REL ...options --overrides`.

    The config file travels with the working directory, so it must be inside it; its path is given
    relative to it, as the job sees it.
    """
    argv = ["python", JOB_ENTRYPOINTS[command]]
    if config is not None:
        path, root = Path(config).resolve(), working_dir.resolve()
        if not path.is_relative_to(root):
            raise JobSubmissionError(f"--config {config} is outside the working directory {root}, which is all the "
                                     "job receives: move the file into it or pass --working-dir")
        argv += ["--config", path.relative_to(root).as_posix()]
    for name in FORWARDED_OPTIONS[command]:
        if options.get(name) is not None:
            argv += [f"--{name.replace('_', '-')}", str(options[name])]
    return [*argv, *overrides]


def environment_variables(specs: list[str]) -> dict[str, str]:
    """`NAME=VALUE` as given, `NAME` with its value in this environment (so secrets stay off the command line)."""
    env = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep:
            if name not in os.environ:
                raise JobSubmissionError(f"--env {name}: {name} is not set here; pass --env {name}=VALUE")
            value = os.environ[name]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):  # the value is never echoed: it may be a secret
            raise JobSubmissionError(f"--env {name!r}: not a variable name")
        env[name] = value
    return env


def runtime_env(working_dir: Path, pip: list[str], env_vars: dict[str, str]) -> dict[str, Any]:
    """The job's runtime_env: the uploaded working directory, extra pip packages, environment variables."""
    if not working_dir.is_dir():
        raise JobSubmissionError(f"--working-dir {working_dir} is not a directory")
    env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": UPLOAD_EXCLUDES}
    if pip:
        env["pip"] = list(pip)
    if env_vars:
        env["env_vars"] = env_vars
    return env


def next_submission_id(client: Any, command: str, run_id: str) -> str:
    """`<command>-<run_id>` for a run's first job, `...-attemptN` after; refuses while one is still active."""
    every = client.list_jobs()
    mine = {METADATA_COMMAND: command, METADATA_RUN: run_id}
    jobs = [job for job in every if mine.items() <= (job.metadata or {}).items()]
    for job in jobs:
        if str(job.status) in ACTIVE_STATES:
            raise RunActiveError(
                f"{command} run {run_id!r} already has job {job.submission_id} {job.status}: follow it with "
                f"`aigc-dist jobs logs {job.submission_id} --follow`, or `aigc-dist jobs stop {job.submission_id}` "
                "and submit again (the run resumes)")
    taken = {job.submission_id for job in every}
    base, attempt = f"{command}-{run_id}", len(jobs) + 1
    candidate = base if attempt == 1 else f"{base}-attempt{attempt}"
    while candidate in taken:
        attempt += 1
        candidate = f"{base}-attempt{attempt}"
    return candidate


def submit(client: Any, command: str, run_id: str, argv: list[str], env: dict[str, Any],
           submission_id: str | None = None) -> str:
    """Submit `argv` (see `job_arguments`) as a Ray job with runtime_env `env`, its driver given
    `STOP_GRACE_S` to stop unless `env` says otherwise; returns its submission id (derived from the run
    unless given; either way, not while the run has an active job)."""
    env = {**env, "env_vars": {STOP_GRACE_VARIABLE: str(STOP_GRACE_S), **(env.get("env_vars") or {})}}
    with _dashboard_errors(client.get_address()):
        derived = next_submission_id(client, command, run_id)
        return client.submit_job(entrypoint=shlex.join(argv), submission_id=submission_id or derived, runtime_env=env,
                                 metadata={METADATA_COMMAND: command, METADATA_RUN: run_id})


def follow(client: Any, submission_id: str) -> None:
    """Copy the job's log to stdout as it is written, until the job ends."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    with _dashboard_errors(client.get_address(), submission_id):
        asyncio.run(tail())


def wait(client: Any, submission_id: str, timeout_s: float | None = None, poll_s: float = 0.5) -> Any:
    """Poll until the job is in a terminal state (or `timeout_s` passes); returns its JobInfo."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with _dashboard_errors(client.get_address(), submission_id):
        info = client.get_job_info(submission_id)
        while not info.status.is_terminal() and (deadline is None or time.monotonic() < deadline):
            time.sleep(poll_s)
            info = client.get_job_info(submission_id)
    return info


def exit_status(info: Any) -> int:
    """What `submit --wait` exits with: 0 succeeded, the driver's own status if it exited with one, else 1
    (stopped, killed by a signal, or never started)."""
    if str(info.status) == "SUCCEEDED":
        return 0
    code = info.driver_exit_code
    return code if code is not None and 0 < code < 128 else EXIT_FAILED


def submit_job(command: str, run_id: str, *, address: str | None, config: str | None, working_dir: str,
               options: dict[str, str | None], overrides: list[str], pip: list[str], env: list[str],
               submission_id: str | None, follow_logs: bool) -> int:
    """`aigc-dist submit COMMAND`: validate, submit, and with `follow_logs` stream the log and return the
    job's exit status; without it, return 0 once the cluster has accepted the job."""
    root = Path(working_dir)
    argv = job_arguments(command, config, root, options, overrides)
    env_vars = environment_variables(env)
    job_env = runtime_env(root, pip, env_vars)
    warn_secret_like_env(env_vars)
    client = connect(address)
    job = submit(client, command, run_id, argv, job_env, submission_id)
    hint = "" if address is None else f" --address {client.get_address()}"
    print(f"submitted {command} run {run_id!r} to {client.get_address()} as job {job}", file=sys.stderr)
    if not follow_logs:
        print(f"follow: aigc-dist jobs logs {job} --follow{hint}\nstop:   aigc-dist jobs stop {job}{hint}",
              file=sys.stderr)
        return 0
    try:
        follow(client, job)
    except KeyboardInterrupt:
        print(f"\nno longer following; job {job} goes on (stop it: aigc-dist jobs stop {job}{hint})", file=sys.stderr)
        return 130
    info = wait(client, job)
    status = exit_status(info)
    print(f"job {job}: {info.status}" + (f" (exit {status})" if status else ""), file=sys.stderr)
    return status


def jobs_command(action: str, submission_id: str, *, address: str | None, as_json: bool = False,
                 follow_logs: bool = False, wait_s: float = 60.0) -> int:
    """`aigc-dist jobs status|logs|stop ID`."""
    client = connect(address)
    if action == "logs":
        if follow_logs:
            follow(client, submission_id)
        else:
            with _dashboard_errors(client.get_address(), submission_id):
                sys.stdout.write(client.get_job_logs(submission_id))
        return 0
    if action == "stop":
        deadline = time.monotonic() + wait_s
        with _dashboard_errors(client.get_address(), submission_id):
            client.stop_job(submission_id)
        info = wait(client, submission_id, timeout_s=wait_s)
        if not info.status.is_terminal():
            print(f"job {submission_id}: still {info.status} {wait_s:g} s after the stop request", file=sys.stderr)
            return EXIT_FAILED
        alive = live_actors(client.get_address(), info.job_id)
        while alive and time.monotonic() < deadline:
            time.sleep(0.5)
            alive = live_actors(client.get_address(), info.job_id)
        if alive:
            print(f"job {submission_id}: {info.status}, but {wait_s:g} s after the stop request its actors "
                  f"{', '.join(alive)} still run and hold their resources (`ray list actors --filter "
                  f"job_id={info.job_id}` on the cluster lists them)", file=sys.stderr)
            return EXIT_FAILED
    status = job_status(client, submission_id)
    print(json.dumps(status, indent=2) if as_json else format_job_status(status))
    return 0


def live_actors(address: str, job_id: str | None) -> list[str]:
    """The actors of a job's driver (Ray job id `job_id`) not dead yet, as `Class (pid N)`, from the cluster's
    state API (through its dashboard). Named detached actors are left out: they are services of the cluster,
    found by name and used by every job, such as Ray Data's autoscaling coordinator, and outlive the job
    that happened to start them by design."""
    if job_id is None:  # the driver never joined the cluster, so it started nothing
        return []
    from ray.util.state import list_actors
    from ray.util.state.exception import RayStateApiException

    try:
        actors = list_actors(address=address, filters=[("job_id", "=", job_id), ("state", "!=", "DEAD")],
                             limit=10_000, detail=True, raise_on_missing_output=False)
    except (RayStateApiException, ConnectionError) as exc:
        raise JobSubmissionError(f"cannot list the actors of job {job_id} at {address}: {exc}") from None
    return [f"{actor.class_name} (pid {actor.pid})" for actor in actors if not (actor.is_detached and actor.name)]


def job_status(client: Any, submission_id: str) -> dict[str, Any]:
    """The job's state as plain data (never its runtime_env: it may carry secrets)."""
    with _dashboard_errors(client.get_address(), submission_id):
        info = client.get_job_info(submission_id)
    return {"submission_id": submission_id, "status": str(info.status), "entrypoint": info.entrypoint,
            "started_at": _timestamp(info.start_time), "ended_at": _timestamp(info.end_time),
            "driver_exit_code": info.driver_exit_code, "message": info.message or "",
            "error_type": info.error_type, "metadata": info.metadata or {}}


def format_job_status(status: dict[str, Any]) -> str:
    exit_code = status["driver_exit_code"]
    lines = [f"{status['submission_id']}: {status['status']}" + ("" if exit_code is None else f" (exit {exit_code})"),
             f"  entrypoint: {status['entrypoint']}",
             f"  started: {status['started_at'] or '-'}, ended: {status['ended_at'] or '-'}"]
    if status["message"]:
        lines.append(f"  message: {status['message'].splitlines()[0]}")
    return "\n".join(lines)


def _timestamp(ms: int | None) -> str | None:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ms else None
