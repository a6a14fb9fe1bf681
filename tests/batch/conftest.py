"""Shared pieces of the backfill tests: a tiny synthetic world, tiny artifacts, configs, driver runs."""

from __future__ import annotations

import http.client
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import tomli_w
import torch

from aigc_dist.batch.layout import RunLayout, read_output
from aigc_dist.config import BackfillConfig, DataConfig
from aigc_dist.data.prompts import PromptTemplate
from aigc_dist.demo.world import CATEGORIES, WorldConfig, write_world
from aigc_dist.engine.text import prompt_conditioning
from aigc_dist.models.artifact import save_artifact, save_text_artifact
from aigc_dist.models.cgan import CGANConfig, Generator
from aigc_dist.models.llama import LlamaLM, LMConfig
from aigc_dist.storage import Storage, join_uri

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = PromptTemplate(max_field_chars=24, max_prompt_tokens=128)
# Small on purpose: the machine has 2 cores; 16 new tokens of a 2-layer, 32-wide LM per row.
BACKFILL_DEFAULTS: dict[str, Any] = {"batch_size": 32, "max_new_tokens": 16, "temperature": 0.8, "min_actors": 1,
                                     "max_actors": 2, "progress_interval_s": 1.0}


class BackfillKit:
    """Helpers of the backfill tests (a fixture, since test modules cannot import conftest)."""

    template = TEMPLATE

    @staticmethod
    def save_lm_artifact(uri: str, storage: Storage | None = None) -> str:
        """An untrained tiny LM with the byte tokenizer and the test prompt template."""
        torch.manual_seed(0)
        model = LlamaLM(LMConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=88,
                                 max_position_embeddings=192))
        save_text_artifact(uri, model, storage or Storage(), conditioning=prompt_conditioning(TEMPLATE),
                           metadata={"name": "copy-test", "version": "v1"})
        return uri

    @staticmethod
    def save_cgan_artifact(uri: str) -> str:
        """An untrained 16x16 cGAN with one class per item category (labels = category names)."""
        torch.manual_seed(0)
        model = Generator(CGANConfig(image_size=16, num_classes=len(CATEGORIES)))
        save_artifact(uri, "cgan", model, Storage(), conditioning={"labels": list(CATEGORIES)},
                      metadata={"name": "banner-test", "version": "v1"})
        return uri

    @staticmethod
    def world_data(root: str) -> DataConfig:
        return DataConfig(users=join_uri(root, "users.parquet"), items=join_uri(root, "items.parquet"),
                          candidates=join_uri(root, "candidates.parquet"))

    @staticmethod
    def config(output: str, artifact: str, **overrides: Any) -> BackfillConfig:
        return BackfillConfig(output=output, artifact=artifact, **{**BACKFILL_DEFAULTS, **overrides})

    @staticmethod
    def write_config(path: Path, backfill: BackfillConfig, data: DataConfig) -> Path:
        """A TOML config file a driver subprocess can be started with."""
        sections = {"backfill": backfill.model_dump(mode="json", exclude_none=True),
                    "data": data.model_dump(mode="json", exclude_none=True)}
        path.write_text(tomli_w.dumps(sections))
        return path

    @staticmethod
    def outputs(root: Path) -> dict[str, Any]:
        """Everything a reader of a run sees, keyed by request_id, minus created_at (the wall clock of the
        attempt that finished the shard: the one column a regenerated shard may differ in)."""
        data, errors = read_output(str(root))
        rows = {r["request_id"]: {k: v for k, v in r.items() if k != "created_at"} for r in data.to_pylist()}
        bad = {(e["request_id"], e["stage"]): e["error"] for e in errors.to_pylist()}
        assert len(rows) == data.num_rows and len(bad) == errors.num_rows  # no request_id twice
        return {"data": rows, "errors": bad}

    @staticmethod
    def unlisted_files(root: Path) -> set[str]:
        """Files of data/ and errors/ the manifest does not list, and listed files that are missing."""
        manifest = Storage().read_json(RunLayout(str(root)).manifest)
        listed = {e["path"] for kind in ("data", "errors") for e in manifest["files"][kind]}
        present = {str(p.relative_to(root)) for d in ("data", "errors") for p in (root / d).glob("*")}
        return present ^ listed

    @staticmethod
    def wait_for(condition: Any, driver: subprocess.Popen, timeout_s: float = 240) -> None:
        """Poll `condition()` until it holds, the driver process ends, or the timeout passes."""
        deadline = time.monotonic() + timeout_s
        while not condition() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)

    @staticmethod
    def start_driver(config: Path, log: Path, **env: str) -> subprocess.Popen:
        """`python jobs/backfill.py --config FILE` as its own process (what `ray job submit` runs),
        joined to the session's Ray rather than starting another."""
        import ray

        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, **env}
        return subprocess.Popen([sys.executable, str(REPO / "jobs" / "backfill.py"), "--config", str(config)],
                                env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO)


@pytest.fixture(scope="session")
def kit() -> BackfillKit:
    return BackfillKit()


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """300 candidates (60 users x 5) over 40 items, as parquet."""
    root = tmp_path_factory.mktemp("world")
    write_world(WorldConfig(num_users=60, num_items=40, candidates_per_user=5, seed=1), root)
    return str(root)


@pytest.fixture(scope="session")
def lm_artifact(tmp_path_factory: pytest.TempPathFactory) -> str:
    return BackfillKit.save_lm_artifact(str(tmp_path_factory.mktemp("artifacts") / "copy-lm"))


@pytest.fixture(scope="session")
def uninterrupted_run(ray_local: None, tmp_path_factory: pytest.TempPathFactory, kit: BackfillKit, world_dir: str,
                      lm_artifact: str) -> dict[str, Any]:
    """One uninterrupted in-process run of world_dir (6 shards of 50): what crashed, resumed or
    contested runs of the same input and settings must equal."""
    from aigc_dist.batch.pipeline import run_backfill
    from aigc_dist.config import StorageConfig

    out = tmp_path_factory.mktemp("uninterrupted")
    run_backfill(kit.config(str(out), lm_artifact, run_id="reference", rows_per_file=50), kit.world_data(world_dir),
                 StorageConfig())
    return {"root": out / "reference", "outputs": kit.outputs(out / "reference")}


class FaultyS3Proxy(ThreadingHTTPServer):
    """An HTTP proxy in front of the S3 server that fails on purpose, like S3 under load does.

    - every `slow_down_every`-th request is answered 503 SlowDown without reaching S3;
    - every `drop_every`-th request reaches S3, then its connection is closed without an answer;
    - the first exclusive PUT (If-None-Match) of every key reaches S3 and loses its answer too, so
      every commit marker and lock is created by a retry that finds the object already there;
    - the next `conflicts` conditional PUTs (If-None-Match or If-Match) are answered 409
      ConditionalRequestConflict without reaching S3, as S3 answers one that races another.
    """

    daemon_threads = True

    def __init__(self, upstream: str, slow_down_every: int = 25, drop_every: int = 31):
        super().__init__(("127.0.0.1", 0), _FaultyS3Handler)
        self.upstream = urlsplit(upstream)
        self.slow_down_every, self.drop_every = slow_down_every, drop_every
        self.conflicts = 0
        self.faults: Counter[str] = Counter()
        self._count = itertools.count(1)
        self._exclusive_seen: set[str] = set()
        self._lock = threading.Lock()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def fault_for(self, method: str, path: str, exclusive: bool, conditional: bool) -> str | None:
        with self._lock:
            n = next(self._count)
            if method == "PUT" and conditional and self.conflicts > 0:
                self.conflicts -= 1
                kind = "409 ConditionalRequestConflict"
            elif method == "PUT" and exclusive and path not in self._exclusive_seen:
                self._exclusive_seen.add(path)
                kind = "lost answer of exclusive PUT"
            elif n % self.slow_down_every == 0:
                kind = "503 SlowDown"
            elif n % self.drop_every == 0:
                kind = "dropped connection"
            else:
                return None
            self.faults[kind] += 1
            return kind


class _FaultyS3Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultyS3Proxy

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            body = b""
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return body
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _relay(self) -> None:
        body = self._body()
        fault = self.server.fault_for(self.command, self.path, "If-None-Match" in self.headers,
                                      "If-None-Match" in self.headers or "If-Match" in self.headers)
        answers = {"503 SlowDown": (503, b"SlowDown", b"Please reduce your request rate."),
                   "409 ConditionalRequestConflict": (409, b"ConditionalRequestConflict",
                                                      b"A conflicting operation is in progress; retry.")}
        if fault in answers:
            status, code, message = answers[fault]
            payload = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>' + code + b"</Code><Message>" + message
                       + b"</Message></Error>")
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        upstream = http.client.HTTPConnection(self.server.upstream.hostname, self.server.upstream.port, timeout=60)
        upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for key, value in self.headers.items():
            if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                upstream.putheader(key, value)
        upstream.putheader("Content-Length", str(len(body)))
        upstream.endheaders(body)
        response = upstream.getresponse()
        data = response.read()
        upstream.close()
        if fault is not None:  # it happened on S3; the client never hears of it
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(key, value)
        length = response.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay


@pytest.fixture
def faulty_s3(s3_server: Any) -> Iterator[FaultyS3Proxy]:
    proxy = FaultyS3Proxy(s3_server.endpoint_url)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()


@pytest.fixture(params=["local", "s3"])
def layout(request, tmp_path) -> RunLayout:
    """A run's layout on a local path, then on the S3 server (moto over HTTP): run-file tests run on both."""
    if request.param == "local":
        return RunLayout(str(tmp_path / "run"))
    return RunLayout(request.getfixturevalue("s3_bucket") + "/run")
