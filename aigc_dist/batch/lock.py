"""One driver per run: a lock object created with an exclusive write, kept alive by heartbeats.

`<run>/_lock` holds the owner (a random id, host and pid) and a heartbeat time the owner rewrites
every `progress_interval_s`. A second driver for the same run finds the object and stops at once
with an error that names the holder, unless the lock is stale:

- its process is gone (same host, pid no longer alive): stale at once, which is what a resume right
  after a crash or a SIGKILL meets;
- its heartbeat is older than `lock_stale_after_s` (another host, or a hung driver).

Taking over a stale lock deletes it and creates it again exclusively, so of two drivers that both
see it stale only one wins. Exactly-once does not rest on the lock alone: shard commit markers are
exclusive writes too, so even two drivers racing on one run cannot commit a shard twice.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from typing import Any

from aigc_dist.errors import EXIT_RUN_LOCKED, UserError
from aigc_dist.storage import AlreadyExistsError, Storage

log = logging.getLogger(__name__)


class RunLockedError(UserError, RuntimeError):
    """Another live driver holds the run (or took it over from this one)."""

    exit_code = EXIT_RUN_LOCKED


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def lock_is_stale(lock: dict[str, Any], stale_after_s: float, now: float | None = None) -> str | None:
    """Why `lock` is stale, or None when its holder may still be running."""
    now = time.time() if now is None else now
    if lock.get("host") == socket.gethostname() and isinstance(lock.get("pid"), int) \
            and not _pid_alive(lock["pid"]):
        return f"process {lock['pid']} on this host is gone"
    age = now - float(lock.get("heartbeat_at", 0))
    if age > stale_after_s:
        return f"no heartbeat for {age:.0f}s (lock_stale_after_s={stale_after_s:g})"
    return None


def describe_holder(lock: dict[str, Any], now: float | None = None) -> str:
    age = (time.time() if now is None else now) - float(lock.get("heartbeat_at", 0))
    return f"{lock.get('host', '?')} pid {lock.get('pid', '?')} (last heartbeat {age:.0f}s ago)"


class RunLock:
    """The exclusive right to write one run; use as a context manager."""

    def __init__(self, uri: str, storage: Storage, stale_after_s: float):
        self.uri, self.storage, self.stale_after_s = uri, storage, stale_after_s
        self.owner = uuid.uuid4().hex
        self.started_at = time.time()

    def _body(self) -> dict[str, Any]:
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                "started_at": self.started_at, "heartbeat_at": time.time()}

    def _create(self) -> dict[str, Any] | None:
        """Create the lock exclusively; None when it is ours, else the lock that is there."""
        try:
            self.storage.write_json(self.uri, self._body(), if_absent=True)
            return None
        except AlreadyExistsError:
            pass
        try:
            held = self.storage.read_json(self.uri)
        except FileNotFoundError:  # released in between: it is stale by any rule
            return {"heartbeat_at": 0}
        # A retried PUT whose first try landed (its answer lost with the connection) finds our own lock.
        return None if held.get("owner") == self.owner else held

    def acquire(self) -> None:
        held = self._create()
        if held is None:
            return
        reason = lock_is_stale(held, self.stale_after_s)
        if reason is None:
            raise RunLockedError(
                f"run {self.uri.rsplit('/', 1)[0]} is in use by {describe_holder(held)}; two drivers must not "
                f"write one run. Wait for it, or if it is gone its lock goes stale after "
                f"{self.stale_after_s:g}s without a heartbeat (backfill.lock_stale_after_s)")
        log.warning("taking over the stale lock of %s: %s", describe_holder(held), reason)
        self.storage.delete(self.uri)
        if self._create() is not None:
            raise RunLockedError(f"another driver took over the stale lock {self.uri} first")

    def heartbeat(self) -> None:
        """Refresh the heartbeat; RunLockedError if another driver has taken the lock."""
        try:
            held = self.storage.read_json(self.uri)
        except FileNotFoundError:
            held = {}
        if held.get("owner") != self.owner:
            raise RunLockedError(f"lost the run lock {self.uri} to {describe_holder(held)}")
        self.storage.write_json(self.uri, self._body())

    def release(self) -> None:
        try:
            if self.storage.read_json(self.uri).get("owner") == self.owner:
                self.storage.delete(self.uri)
        except FileNotFoundError:
            pass

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
