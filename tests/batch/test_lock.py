"""The run lock: exclusive, fails fast against a live holder, taken over when stale by exactly one taker."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from aigc_dist.batch.lock import RunLock, RunLockedError
from aigc_dist.config import StorageConfig
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
    again = RunLock(lock_uri, storage, stale_after_s=60)
    again.acquire()  # released on exit
    again.release()


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
        lock.release()
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


def test_concurrent_takeovers_of_a_stale_lock_leave_exactly_one_owner(lock_uri):
    """The race the takeover exists for: every taker sees the same stale lock; one conditional write wins."""
    Storage().write_json(lock_uri, {**_held(socket.gethostname(), _dead_pid(), 0), "generation": 1})
    takers = [RunLock(lock_uri, Storage(), stale_after_s=60, heartbeat_s=3600) for _ in range(8)]
    start = threading.Barrier(len(takers))
    outcomes: dict[int, str] = {}

    def take(k: int) -> None:
        start.wait()
        try:
            takers[k].acquire()
            outcomes[k] = "owner"
        except RunLockedError as exc:
            outcomes[k] = str(exc)

    threads = [threading.Thread(target=take, args=(k,)) for k in range(len(takers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    owners = [k for k, outcome in outcomes.items() if outcome == "owner"]
    assert len(owners) == 1, outcomes
    held = Storage().read_json(lock_uri)
    assert held["owner"] == takers[owners[0]].owner and held["generation"] == 2
    assert all("is in use by" in outcome for k, outcome in outcomes.items() if k != owners[0])
    for taker in takers:
        taker.release()
    assert not Storage().exists(lock_uri)


def test_s3_409_conflicts_on_conditional_writes_are_retried_not_read_as_taken(s3_bucket, faulty_s3):
    """S3 answers 409 ConditionalRequestConflict to a conditional write racing another; AWS says retry."""
    faulty_s3.slow_down_every = faulty_s3.drop_every = 10**9  # only the faults this test asks for
    storage = Storage(StorageConfig(endpoint_url=faulty_s3.endpoint_url))
    uri = s3_bucket + "/run/_lock"
    lock = RunLock(uri, storage, stale_after_s=60, heartbeat_s=3600)

    faulty_s3.conflicts = 2
    lock.acquire()  # If-None-Match: 409, 409, then created
    faulty_s3.conflicts = 2
    lock.renew()  # If-Match: 409, 409, then written

    assert faulty_s3.faults["409 ConditionalRequestConflict"] == 4
    held = Storage().read_json(uri)
    assert held["owner"] == lock.owner and held["generation"] == 1
    lock.release()
    assert not Storage().exists(uri)
