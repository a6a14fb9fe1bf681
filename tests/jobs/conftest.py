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
from contextlib import ExitStack, contextmanager
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
    """A running cluster: its dashboard address, its nodes' metrics ports, its auth token, its GCS."""

    address: str  # the dashboard, what `ray job submit --address` and `aigc-dist submit --address` take
    metrics_ports: list[int]  # head's, then the workers'
    token: str
    gcs_address: str  # what a driver's RAY_ADDRESS names to join the cluster
    node_manager_ports: list[int]  # the workers': how `kill_node` finds a node's raylet

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


@contextmanager
def ray_cluster(logs: Path, worker_cpus: list[int], env: dict[str, str] | None = None) -> Iterator[RayHead]:
    """A head (no CPUs: it runs drivers only) and one worker node per entry of `worker_cpus`, each with
    its own ports, under one temp dir; every process of it is stopped on exit. The nodes get no AWS_*
    or RAY_* variables of this process, only `env` (as pods get a Secret's)."""
    temp_dir = f"/tmp/aigc-head-{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths have a length limit
    gcs, dashboard, client_server, head_metrics, *agent_ports = free_ports(4 + 3 + 5 * len(worker_cpus))
    token = secrets.token_hex(16)
    node_env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "RAY_"))}
    node_env.update(PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY=str(VENV_BIN / "ray"),
                    RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, **(env or {}))
    common = ["--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", f"--object-store-memory={256 * 1024**2}"]
    # Metrics exported every second (10 s by default): a training job's rank 0 waits one export before it
    # ends (ActorMetrics.flush). Ray takes the system config from the head only.
    nodes = [("head", ["bash", str(REPO / "cluster" / "start-head.sh"), *common, "--num-cpus=0",
                       '--system-config={"metrics_report_interval_ms": 1000}',
                       f"--ray-client-server-port={client_server}", f"--dashboard-agent-listen-port={agent_ports[0]}",
                       f"--dashboard-agent-grpc-port={agent_ports[1]}", f"--runtime-env-agent-port={agent_ports[2]}"],
              {"AIGC_GCS_PORT": gcs, "AIGC_DASHBOARD_PORT": dashboard, "AIGC_METRICS_EXPORT_PORT": head_metrics})]
    metrics_ports, manager_ports = [head_metrics], []
    for k, cpus in enumerate(worker_cpus):
        metrics, manager, listen, grpc, runtime_env = agent_ports[3 + 5 * k: 8 + 5 * k]
        metrics_ports.append(metrics)
        manager_ports.append(manager)
        nodes.append((f"worker-{k}", ["bash", str(REPO / "cluster" / "start-worker.sh"), f"127.0.0.1:{gcs}", *common,
                                      f"--num-cpus={cpus}", f"--node-manager-port={manager}",
                                      f"--dashboard-agent-listen-port={listen}",
                                      f"--dashboard-agent-grpc-port={grpc}", f"--runtime-env-agent-port={runtime_env}"],
                      {"AIGC_METRICS_EXPORT_PORT": metrics}))
    try:
        for name, argv, env in nodes:
            log = logs / f"start-{name}.log"
            with log.open("w") as out:  # the nodes run on after `ray start` returns
                started = subprocess.run(argv, cwd=logs, env={**node_env, **{k: str(v) for k, v in env.items()}},
                                         stdout=out, stderr=subprocess.STDOUT, timeout=180)
            assert started.returncode == 0, f"{name} did not start:\n{log.read_text()[-3000:]}"
        yield RayHead(f"http://127.0.0.1:{dashboard}", metrics_ports, token, f"127.0.0.1:{gcs}", manager_ports)
    finally:
        _stop(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def kill_node(node_manager_port: int) -> int:
    """SIGKILL a worker node as a lost machine dies: its raylet and every process under it (workers,
    agents), nothing stopped in order. Returns how many processes were killed."""
    flag = f"--node_manager_port={node_manager_port}"
    raylets = [p for p in psutil.process_iter(["cmdline"]) if flag in (p.info["cmdline"] or [])]
    assert raylets, f"no raylet with {flag}"
    victims = [proc for raylet in raylets for proc in [raylet, *raylet.children(recursive=True)]]
    for process in victims:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=10)
    return len(victims)


@pytest.fixture(scope="module")  # stopped after the module that uses it: no later test shares the machine with it
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    with ray_cluster(tmp_path_factory.mktemp("ray-head"), [WORKER_CPUS]) as head:
        yield head


@dataclass(frozen=True)
class ClusterKit:
    """What a test that starts its own cluster needs (a fixture, since test modules cannot import conftest)."""

    repo: Path = REPO
    cluster = staticmethod(ray_cluster)
    kill_node = staticmethod(kill_node)


@pytest.fixture(scope="session")
def cluster_kit() -> ClusterKit:
    return ClusterKit()
