"""`aigc-dist serve` as a user runs it: its own local Ray, real HTTP, a clean stop on SIGINT."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from aigc_dist.errors import EXIT_CONFIG_ERROR

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "aigc_dist.cli"]


def test_serve_without_an_artifact_is_a_config_error_naming_the_fields():
    done = subprocess.run([*CLI, "serve"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == EXIT_CONFIG_ERROR
    assert "serve.artifact" in done.stderr and "serve.image_artifact" in done.stderr


@pytest.mark.slow
def test_serve_command_answers_over_http_and_stops_on_sigint(serve_kit, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as on a laptop
    env["RAY_TMPDIR"] = str(Path("/tmp") / f"ray-serve-cli-{os.getpid()}")
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen([*CLI, "serve", "--artifact", serve_kit.lm_v1, f"--serve.port={port}",
                                "--serve.cpus_per_replica=0.5", f"--data.users={serve_kit.users}"],
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
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
