"""One writer per run: a lock object taken by conditional writes, heart-beaten from acquire to release,
and a fencing token that every commit and delete checks.

`<run>/_lock` holds the owner (a random id, host and pid), a `generation` (the fencing token: 1 when
created, +1 at every takeover) and a heartbeat time. The protocol:

- **acquire**: create the object exclusively (S3 `If-None-Match: *`, a hard link locally). If it is
  there and live, stop at once with an error naming the holder. If it is stale, take it over with a
  conditional overwrite of the version that was read (S3 `If-Match: <etag>`, locally a compare and
  rename under a flock of the run directory): of any number of takers, exactly one wins; the others
  find the winner's fresh lock and stop. S3's 409 ConditionalRequestConflict is retried by storage.py.
- **heartbeat**, on a thread from acquire to release (the partition pass and the final sweep
  included): every `heartbeat_s`, a conditional overwrite of our own last version. If the object is
  no longer ours the write fails, and the driver is fenced.
- **fencing**: `Fence` (owner + generation, picklable) travels to the finish tasks; before a commit
  marker is written and before anything is deleted, the lock is read and must still be ours. The
  driver's own checks (`RunLock.check`) also renew the heartbeat whenever it is older than half the
  stale time, so the driver never acts on a lock that another driver may already consider stale.

A lock is stale when its process is gone (same host: what a resume right after a crash meets) or
its heartbeat is older than `lock_stale_after_s`. What remains: a finish task reads the lock and
then writes its marker; a takeover between the two needs the owner to have been silent for
`lock_stale_after_s` in those milliseconds, and even then the marker is an exclusive write, so no
shard is committed twice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aigc_dist.errors import EXIT_RUN_LOCKED, UserError
from aigc_dist.storage import AlreadyExistsError, ConditionFailedError, Storage, StorageError

log = logging.getLogger(__name__)
_ACQUIRE_ROUNDS = 8  # create / read / take over rounds before giving up on a lock that keeps changing


class RunLockedError(UserError, RuntimeError):
    """Another live driver holds the run (or took it over from this one)."""

    exit_code = EXIT_RUN_LOCKED


class FencedError(RunLockedError):
    """This driver's lock was taken over: it may no longer commit or delete anything in the run."""


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


def _parse(data: bytes) -> dict[str, Any]:
    try:
        held = json.loads(data)
    except ValueError:  # a torn or foreign object: nobody's, so stale by any rule
        return {}
    return held if isinstance(held, dict) else {}


@dataclass(frozen=True)
class Fence:
    """The fencing token of one lock holder: what a commit or a delete checks first."""

    uri: str
    owner: str
    generation: int

    def check(self, storage: Storage) -> None:
        """Raise FencedError unless the lock at `uri` is still this holder's."""
        try:
            held = _parse(storage.read_bytes(self.uri))
        except FileNotFoundError:
            held = {}
        if held.get("owner") != self.owner or held.get("generation") != self.generation:
            holder = describe_holder(held) if held else "nobody (the lock is gone)"
            raise FencedError(f"lost the run lock {self.uri} to {holder}: this driver commits and deletes nothing "
                              f"more (its generation {self.generation}, the lock's {held.get('generation', '-')})")


class RunLock:
    """The exclusive right to write one run; use as a context manager."""

    def __init__(self, uri: str, storage: Storage, stale_after_s: float, heartbeat_s: float | None = None):
        self.uri, self.storage, self.stale_after_s = uri, storage, stale_after_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else stale_after_s / 4
        self.owner = uuid.uuid4().hex
        self.started_at = time.time()
        self.generation = 0
        self.version: str | None = None  # of our last write: what the next heartbeat's If-Match names
        self.confirmed = 0.0  # time.monotonic() of our last write known to have landed
        self.failure: BaseException | None = None
        self._write = threading.Lock()  # the heartbeat thread and check() both renew
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def fence(self) -> Fence:
        return Fence(self.uri, self.owner, self.generation)

    def _body(self) -> dict[str, Any]:
        return {"owner": self.owner, "generation": self.generation, "host": socket.gethostname(),
                "pid": os.getpid(), "started_at": self.started_at, "heartbeat_at": time.time()}

    def _take(self) -> bool:
        """One round of acquire: True when the lock is ours; RunLockedError when a live driver has it."""
        try:
            self.generation = 1
            self.version = self.storage.write_json(self.uri, self._body(), if_absent=True)
            return True
        except AlreadyExistsError:
            pass
        try:
            data, version = self.storage.read_versioned(self.uri)
        except FileNotFoundError:  # released in between: create it again
            return False
        held = _parse(data)
        if held.get("owner") == self.owner:  # a retried write whose first try landed (its answer lost)
            self.generation, self.version = held["generation"], version
            return True
        reason = lock_is_stale(held, self.stale_after_s)
        if reason is None:
            raise RunLockedError(
                f"run {self.uri.rsplit('/', 1)[0]} is in use by {describe_holder(held)}; two drivers must not "
                f"write one run. Wait for it, or if it is gone its lock goes stale after "
                f"{self.stale_after_s:g}s without a heartbeat (backfill.lock_stale_after_s)")
        self.generation = int(held.get("generation") or 0) + 1
        try:
            self.version = self.storage.write_json(self.uri, self._body(), if_match=version)
        except ConditionFailedError:  # another taker won, or our answer was lost: the next round tells
            return False
        log.warning("took over the stale lock of %s: %s (generation %d)", describe_holder(held), reason,
                    self.generation)
        return True

    def acquire(self) -> None:
        """Take the lock (creating it, or taking over a stale one) and start heart-beating it."""
        if not any(self._take() for _ in range(_ACQUIRE_ROUNDS)):
            raise RunLockedError(f"the run lock {self.uri} kept changing while this driver tried to take it")
        self.confirmed = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def renew(self) -> None:
        """Write a fresh heartbeat over our own last version; FencedError if the lock is no longer ours."""
        with self._write:
            for _ in range(3):
                try:
                    self.version = self.storage.write_json(self.uri, self._body(), if_match=self.version)
                    self.confirmed = time.monotonic()
                    return
                except ConditionFailedError:
                    pass
                try:
                    data, version = self.storage.read_versioned(self.uri)
                except FileNotFoundError:
                    data, version = b"{}", None
                held = _parse(data)
                if held.get("owner") != self.owner or held.get("generation") != self.generation:
                    self.fence.check(self.storage)  # raises, naming the new holder
                self.version = version  # ours: an earlier write landed with its answer lost; write again
            raise RunLockedError(f"the run lock {self.uri} keeps changing under this driver")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except RunLockedError as exc:
                self.failure = exc
                log.error("%s", exc)
                return
            except StorageError as exc:  # transient: check() renews or fails once the lease runs short
                log.warning("run lock heartbeat failed (%s); retrying", exc)

    def check(self) -> None:
        """Raise if this driver may no longer write the run; renew first when the heartbeat is getting old."""
        if self.failure is not None:
            raise self.failure
        if time.monotonic() - self.confirmed > self.stale_after_s / 2:
            self.renew()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            held = _parse(self.storage.read_bytes(self.uri))
        except FileNotFoundError:
            return
        if held.get("owner") == self.owner and held.get("generation") == self.generation:
            self.storage.delete(self.uri)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
