"""`aigc-dist serve` as a user runs it: its own local Ray, real HTTP, a clean stop on SIGINT."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from aigc_dist.errors import EXIT_CONFIG_ERROR

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "aigc_dist.cli"]


def test_serve_without_an_artifact_is_a_config_error_naming_the_fields():
    done = subprocess.run([*CLI, "serve"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == EXIT_CONFIG_ERROR
    assert "serve.artifact" in done.stderr and "serve.image_artifact" in done.stderr


def test_serve_with_its_key_variable_unset_stops_before_starting_naming_field_and_variable():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "AIGC_TEST_NO_SUCH_KEYS")}
    done = subprocess.run([*CLI, "serve", "--artifact", "/nonexistent/lm",
                           "--serve.api_keys_env=AIGC_TEST_NO_SUCH_KEYS"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert done.returncode == EXIT_CONFIG_ERROR, done.stderr[-2000:]
    assert "serve.api_keys_env names $AIGC_TEST_NO_SUCH_KEYS, which is not set" in done.stderr


def _status_of_a_trickled_request(url: str, give_up_s: float) -> bytes:
    """Headers, then a body byte a second until the server answers; its answer."""
    where = urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=give_up_s) as sock:
        sock.sendall(f"POST /v1/generate HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: application/json\r\n"
                     "Content-Length: 1000\r\n\r\n{".encode())
        deadline = time.monotonic() + give_up_s
        while time.monotonic() < deadline and not select.select([sock], [], [], 1)[0]:
            sock.send(b" ")
        answer = b""
        while not answer.endswith(b"\r\n0\r\n\r\n") and (chunk := sock.recv(4096)):  # the proxy's answer is
            answer += chunk                                                              # chunked, kept alive
        return answer


@pytest.mark.slow
def test_serve_command_answers_over_http_and_stops_on_sigint(serve_kit, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as on a laptop
    env["RAY_TMPDIR"] = str(Path("/tmp") / f"ray-serve-cli-{os.getpid()}")
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen([*CLI, "serve", "--artifact", serve_kit.lm_v1, f"--serve.port={port}",
                                "--serve.cpus_per_replica=0.5", f"--data.users={serve_kit.users}",
                                # The proxy's end-to-end timeout bites before the replica's body bound.
                                "--serve.request_timeout_s=3", "--serve.body_read_timeout_s=60"],
                               env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            if f"ready at {url}" in (tmp_path / "serve.log").read_text():
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"serve did not come up: {(tmp_path / 'serve.log').read_text()[-3000:]}")
        assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
        answer = requests.post(f"{url}/v1/generate", json={"requests": [
            {"user_id": "u3", "item": {"title": "Tent", "category": "tents"}, "seed": 1}]}, timeout=60)
        assert answer.status_code == 200 and answer.json()["model"]["version"] == "v1"
        trickled = _status_of_a_trickled_request(url, give_up_s=60)
        assert trickled.startswith(b"HTTP/1.1 408") and b"timed out after 3.0s" in trickled, trickled[:500]
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
