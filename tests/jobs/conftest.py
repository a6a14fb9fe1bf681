"""A real Ray cluster for the job tests: a head and a worker node started by cluster/start-head.sh and
cluster/start-worker.sh (`ray start`), token authentication on, every port free and on this machine.

The cluster is apart from the session's `ray_local` (its own --temp-dir, ports and processes) and is
stopped by killing exactly the processes of its temp dir: `ray stop` would stop every Ray on the
machine. The nodes get no AWS_* variables, so S3 reaches a job only through its runtime_env.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
WORKER_CPUS = 8  # logical: room for 2 Ray Train workers or a Ray Data actor pool and its tasks


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that nothing listens on right now."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


@dataclass
class RayHead:
    """A running two-node cluster: its dashboard address, its nodes' metrics ports, its auth token."""

    address: str  # the dashboard, what `ray job submit --address` and `aigc-dist submit --address` take
    metrics_ports: list[int]  # head's, then worker's
    token: str

    def run(self, *argv: str, timeout: float = 300, token: bool = True) -> subprocess.CompletedProcess:
        """A command (aigc-dist or ray, from the venv) as a user runs it in the repository: this
        environment (S3 settings included), plus the cluster's token unless `token` is false."""
        env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
        if token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        return subprocess.run([str(VENV_BIN / argv[0]), *argv[1:]], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=timeout)

    def metrics(self, node: int) -> str:
        """What node `node` (0 = head) serves on its metrics export port: Prometheus text."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_ports[node]}/metrics", timeout=10) as response:
            return response.read().decode()


def _processes_of(temp_dir: str) -> list[psutil.Process]:
    """Every process of the cluster: those whose command line names its temp dir, and their children."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        with_dir = any(temp_dir in part for part in process.info["cmdline"] or [])
        if with_dir and process.pid != os.getpid():
            found[process.pid] = process
            try:
                found.update((child.pid, child) for child in process.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
    return list(found.values())


def _stop(temp_dir: str) -> None:
    processes = _processes_of(temp_dir)
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=5)  # as `ray stop`: SIGTERM, then SIGKILL what lingers
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    temp_dir = f"/tmp/aigc-head-{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths have a length limit
    logs = tmp_path_factory.mktemp("ray-head")
    gcs, dashboard, client_server, head_metrics, worker_metrics, *agent_ports = free_ports(11)
    token = secrets.token_hex(16)
    node_env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "RAY_"))}
    node_env.update(PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY=str(VENV_BIN / "ray"),
                    RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    common = ["--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", f"--object-store-memory={256 * 1024**2}"]
    # Metrics exported every second (10 s by default): a training job's rank 0 waits one export before it
    # ends (ActorMetrics.flush). Ray takes the system config from the head only.
    head = ["bash", str(REPO / "cluster" / "start-head.sh"), *common, "--num-cpus=0",
            '--system-config={"metrics_report_interval_ms": 1000}',
            f"--ray-client-server-port={client_server}", f"--dashboard-agent-listen-port={agent_ports[0]}",
            f"--dashboard-agent-grpc-port={agent_ports[1]}", f"--runtime-env-agent-port={agent_ports[2]}"]
    worker = ["bash", str(REPO / "cluster" / "start-worker.sh"), f"127.0.0.1:{gcs}", *common,
              f"--num-cpus={WORKER_CPUS}", f"--dashboard-agent-listen-port={agent_ports[3]}",
              f"--dashboard-agent-grpc-port={agent_ports[4]}", f"--runtime-env-agent-port={agent_ports[5]}"]
    try:
        for name, argv, env in (
            ("head", head, {"AIGC_GCS_PORT": gcs, "AIGC_DASHBOARD_PORT": dashboard,
                            "AIGC_METRICS_EXPORT_PORT": head_metrics}),
            ("worker", worker, {"AIGC_METRICS_EXPORT_PORT": worker_metrics}),
        ):
            log = logs / f"start-{name}.log"
            with log.open("w") as out:  # the nodes run on after `ray start` returns
                started = subprocess.run(argv, cwd=logs, env={**node_env, **{k: str(v) for k, v in env.items()}},
                                         stdout=out, stderr=subprocess.STDOUT, timeout=180)
            assert started.returncode == 0, f"{name} did not start:\n{log.read_text()[-3000:]}"
        yield RayHead(f"http://127.0.0.1:{dashboard}", [head_metrics, worker_metrics], token)
    finally:
        _stop(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)

