"""Shared test harness: real local Ray, a real S3 API server on 127.0.0.1, markers.

Nothing here fakes a component: the S3 fixture is moto's HTTP server in its own process, reached
through boto3 and pyarrow exactly as AWS is; the Ray fixture is a real local Ray instance.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# More logical CPUs than this 2-core machine has: a Ray Data actor pool of N one-CPU actors needs
# spare CPUs for its read tasks, or the pipeline deadlocks (see DEVELOPERS.md). Tests keep the real
# load small; torch threads are pinned per actor.
RAY_LOGICAL_CPUS = 8
S3_TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "aigc-test-key",
    "AWS_SECRET_ACCESS_KEY": "aigc-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests where CUDA is absent; nothing else is ever skipped."""
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout_s: float = 30.0) -> None:
    """Poll `url` until it answers any HTTP status, or fail the test with what went wrong."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # the server answered; the status is not our concern here
        except OSError as exc:
            last_error = exc
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout_s}s: {last_error}")


@dataclass
class S3Server:
    """A running moto S3 server; `new_bucket()` gives each test a bucket of its own."""

    endpoint_url: str
    process: subprocess.Popen

    def new_bucket(self) -> str:
        from aigc_dist.storage import Storage

        name = f"aigc-test-{uuid.uuid4().hex[:12]}"
        Storage().s3_client.create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 API server on 127.0.0.1 at a free port; AWS_* env vars point boto3/pyarrow at it.

    The variables are set for the whole session, before Ray starts, so Ray workers inherit them
    exactly as pods inherit them from a Secret in a real deployment.
    """
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_TEST_CREDENTIALS, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_TEST_CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
    try:
        wait_for_http(f"{endpoint}/moto-api/")
        yield S3Server(endpoint, process)
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket on the S3 server; returns its `s3://` URI."""
    return f"s3://{s3_server.new_bucket()}"


@pytest.fixture(scope="session")
def ray_local(s3_server: S3Server) -> Iterator[None]:
    """One real local Ray instance for the whole session (starting Ray costs seconds)."""
    import ray

    ray_tmp = Path("/tmp") / f"ray-aigc-{os.getpid()}"  # short: Ray's socket paths have a length limit
    ray.init(
        num_cpus=RAY_LOGICAL_CPUS,
        include_dashboard=False,
        object_store_memory=512 * 1024**2,
        _temp_dir=str(ray_tmp),
        log_to_driver=False,
        configure_logging=False,
        # Actors report their metrics to the node's metrics port every second (10 s by default), so the
        # Prometheus tests see a run's figures soon after it ends.
        _system_config={"metrics_report_interval_ms": 1000},
    )
    try:
        yield
    finally:
        ray.shutdown()


@dataclass
class ServeCluster:
    """Ray Serve on the session's Ray, its HTTP proxy on 127.0.0.1:`port`; each test deploys its own app
    under its own route prefix, so tests never see each other's replicas or settings."""

    url: str

    def deploy(self, name: str, cfg: Any) -> str:
        """Run the aigc-dist application for `cfg` (an AigcConfig) as app `name`; returns its base URL."""
        from ray import serve

        from aigc_dist.serve.app import application

        serve.run(application(cfg), name=name, route_prefix=f"/{name}")
        return f"{self.url}/{name}"

    def delete(self, name: str) -> None:
        from ray import serve

        serve.delete(name)


@pytest.fixture(scope="session")
def serve_cluster(ray_local: None) -> Iterator[ServeCluster]:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield ServeCluster(f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()


@dataclass
class PrometheusServer:
    """Debian's `prometheus` on 127.0.0.1, scraping every second: Ray's metrics port (job `ray`), a
    job driver's /metrics at `driver_port` (job `aigc-driver`, every 250 ms, up only while a test's
    driver runs) and a Pushgateway (job `pushgateway`, honor_labels: pushed series keep their job)."""

    url: str
    driver_port: int
    pushgateway_url: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The result vector of an instant query (Prometheus's HTTP API)."""
        import json
        import urllib.parse

        with urllib.request.urlopen(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}",
                                    timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The single value `expr` evaluates to now, or None when it has no result."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} has {len(result)} series: {result}"
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, check: Callable[[float | None], bool], timeout_s: float = 90.0) -> float | None:
        """Poll `expr` until `check(value)` holds (scrapes and Ray's reports take seconds); returns the last value.
        On a timeout it prints every target's scrape health, which pytest shows beside the failure."""
        deadline = time.monotonic() + timeout_s
        value = self.value(expr)
        while not check(value) and time.monotonic() < deadline:
            time.sleep(0.5)
            value = self.value(expr)
        if not check(value):
            print(f"{expr} = {value} after {timeout_s}s; scrape targets: {self.target_health()}")
        return value

    def target_health(self) -> list[dict[str, Any]]:
        """Each scrape target's job, health, last error and last scrape duration (Prometheus's targets API)."""
        import json

        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as response:
            targets = json.load(response)["data"]["activeTargets"]
        return [{key: target.get(key) for key in ("scrapePool", "health", "lastError", "lastScrapeDuration")}
                for target in targets]

    def wait_for_value(self, expr: str, expected: float, timeout_s: float = 90.0) -> float | None:
        """Poll until `expr` equals `expected`; returns the last value."""
        return self.wait_for(expr, lambda value: value == expected, timeout_s)


def _binary(name: str) -> str:
    import shutil

    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: `apt-get install -y prometheus prometheus-pushgateway` (make test "
                    "does it when run as root)")
    return found


def _wait_until_ready(url: str, timeout_s: float = 30.0) -> None:
    """Poll a readiness URL until it answers 200 (Prometheus answers 503 until its storage is open)."""
    deadline = time.monotonic() + timeout_s
    problem: object = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
                problem = f"HTTP {response.status}"
        except OSError as exc:  # refused, or an HTTP error status
            problem = exc
        time.sleep(0.2)
    raise RuntimeError(f"{url} was not ready within {timeout_s}s: {problem}")


@pytest.fixture(scope="session")
def prometheus(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    import ray

    root = tmp_path_factory.mktemp("prometheus")
    ray_port = ray.nodes()[0]["MetricsExportPort"]
    gateway_port, driver_port, port = free_port(), free_port(), free_port()
    (root / "prometheus.yml").write_text(f"""\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: ray
    # Ray's agent can take seconds to answer on a loaded 2-core machine: a timed-out scrape records
    # nothing, so this job gets more time than the others.
    scrape_interval: 3s
    scrape_timeout: 3s
    static_configs: [{{targets: ["127.0.0.1:{ray_port}"]}}]
  - job_name: aigc-driver
    scrape_interval: 250ms
    scrape_timeout: 250ms
    static_configs: [{{targets: ["127.0.0.1:{driver_port}"]}}]
  - job_name: pushgateway
    honor_labels: true
    static_configs: [{{targets: ["127.0.0.1:{gateway_port}"]}}]
""")
    processes = []
    try:
        for name, args in (
            ("prometheus-pushgateway", [f"--web.listen-address=127.0.0.1:{gateway_port}"]),
            ("prometheus", [f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
                            f"--web.listen-address=127.0.0.1:{port}"]),
        ):
            log = (root / f"{name}.log").open("w")
            processes.append(subprocess.Popen([_binary(name), *args], stdout=log, stderr=subprocess.STDOUT))
            log.close()
        for url in (f"http://127.0.0.1:{gateway_port}/-/ready", f"http://127.0.0.1:{port}/-/ready"):
            _wait_until_ready(url)
        yield PrometheusServer(f"http://127.0.0.1:{port}", driver_port, f"http://127.0.0.1:{gateway_port}")
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)


# The copy LM several tests share (training it costs ~80 s on 2 threads, once per session): the
# backfill writes its copy to S3, the quality test judges it on pairs of users it never saw.
COPY_WORLD_USERS, COPY_HELD_OUT_USERS = 500, 100  # the last 100 users' 1,000 pairs are never trained on


@dataclass(frozen=True)
class CopyWorld:
    """The world the shared copy LM learns from, and the users it never sees (no training needed to read)."""

    world: Any  # a WorldConfig: 5,000 (user, item) pairs
    template: Any  # the PromptTemplate of its prompts
    held_out_users: frozenset[str]


@dataclass(frozen=True)
class TrainedCopyModel(CopyWorld):
    artifact: str = ""  # a local Hugging Face directory (save_text_artifact)
    losses: tuple[float, ...] = ()  # every training step's loss
    train_seconds: float = 0.0


@pytest.fixture(scope="session")
def copy_world() -> CopyWorld:
    """500 users x 10 candidates over 120 items; the prompt keeps only the fields the copy needs (segment and
    locale pick the phrase and language, title and category ground it): ~75 tokens instead of ~125."""
    from aigc_dist.data.prompts import PromptTemplate
    from aigc_dist.demo.world import WorldConfig, make_world

    config = WorldConfig(num_users=COPY_WORLD_USERS, num_items=120, candidates_per_user=10, seed=0)
    users = make_world(config).users.to_pylist()
    return CopyWorld(config, PromptTemplate(user_fields=("segment", "locale"), item_fields=("title", "category")),
                     frozenset(u["user_id"] for u in users[-COPY_HELD_OUT_USERS:]))


@pytest.fixture(scope="session")
def trained_copy_model(copy_world: CopyWorld, tmp_path_factory: pytest.TempPathFactory) -> TrainedCopyModel:
    """The `mini` LM trained with plain PyTorch (600 steps of 32 on 2 threads) on the 4,000 pairs of the
    copy world's first 400 users."""
    import torch

    from aigc_dist.data.prompts import encode_example
    from aigc_dist.demo.world import make_world
    from aigc_dist.engine.text import prompt_conditioning
    from aigc_dist.models.artifact import save_text_artifact
    from aigc_dist.models.llama import LlamaLM, lm_config_from_preset
    from aigc_dist.models.tokenizer import byte_level_tokenizer
    from aigc_dist.storage import Storage
    from aigc_dist.train.local import train_lm

    template, held_out = copy_world.template, copy_world.held_out_users
    tokenizer, config = byte_level_tokenizer(), lm_config_from_preset("mini")
    examples = [encode_example(u, i, copy, template, tokenizer, config.max_position_embeddings)
                for u, i, copy in make_world(copy_world.world).training_records() if u["user_id"] not in held_out]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        model = LlamaLM(config)
        start = time.perf_counter()
        losses = train_lm(model, examples, steps=600, batch_size=32, lr=3e-3, pad_id=tokenizer.pad_id, seed=0)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    uri = str(tmp_path_factory.mktemp("trained") / "copy-lm")
    save_text_artifact(uri, model.eval(), Storage(), conditioning=prompt_conditioning(template),
                       metadata={"name": "copy-trained", "version": "v1"})
    return TrainedCopyModel(copy_world.world, template, held_out, uri, tuple(losses), seconds)
