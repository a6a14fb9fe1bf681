"""The run lock: exclusive, fails fast against a live holder, taken over when stale."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from aigc_dist.batch.lock import RunLock, RunLockedError
from aigc_dist.storage import Storage


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _held(host: str, pid: int, heartbeat_age_s: float) -> dict:
    return {"owner": "someone", "host": host, "pid": pid, "heartbeat_at": time.time() - heartbeat_age_s}


@pytest.fixture(params=["local", "s3"])
def lock_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run" / "_lock")
    return request.getfixturevalue("s3_bucket") + "/run/_lock"


def test_second_lock_on_a_live_run_fails_naming_the_holder(lock_uri):
    storage = Storage()
    with RunLock(lock_uri, storage, stale_after_s=60):
        with pytest.raises(RunLockedError, match=f"in use by {socket.gethostname()} pid"):
            RunLock(lock_uri, storage, stale_after_s=60).acquire()
    RunLock(lock_uri, storage, stale_after_s=60).acquire()  # released on exit


@pytest.mark.parametrize(
    ("held", "stale"),
    [
        (lambda: _held(socket.gethostname(), _dead_pid(), 0), True),  # crashed driver on this host
        (lambda: _held("another-host", 1, 3600), True),  # no heartbeat for an hour
        (lambda: _held("another-host", 1, 5), False),  # alive elsewhere
        (lambda: _held(socket.gethostname(), 1, 5), False),  # pid 1 is alive here
    ],
)
def test_stale_rule(lock_uri, held, stale):
    storage = Storage()
    storage.write_json(lock_uri, held())
    lock = RunLock(lock_uri, storage, stale_after_s=600)
    if stale:
        lock.acquire()
        assert storage.read_json(lock_uri)["owner"] == lock.owner
    else:
        with pytest.raises(RunLockedError):
            lock.acquire()


def test_heartbeat_notices_a_takeover(lock_uri):
    storage = Storage()
    lock = RunLock(lock_uri, storage, stale_after_s=60)
    lock.acquire()
    lock.renew()
    storage.write_json(lock_uri, _held("another-host", 1, 0))
    with pytest.raises(RunLockedError, match="lost the run lock"):
        lock.renew()
    lock.release()
    assert storage.exists(lock_uri)  # someone else's lock is never released by us
