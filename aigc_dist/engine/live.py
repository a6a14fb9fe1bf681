"""Requests that join a running decode: the queue between a Serve replica and `TextEngine.run_live`.

A replica's streams arrive one HTTP call at a time. `run_live` decodes them on one thread as one
batch that requests join at the next decode step and leave when they end (continuous batching across
calls, as vLLM's engine does), so a stream that arrives while others decode starts at once instead
of waiting for their batch to end. The caller puts `LiveRequest`s on a `RequestFeed` from any
thread; each gets its deltas through its own `deliver` callback, on the engine's thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aigc_dist.engine.text import TextDelta, TextRequest


class FeedClosed(RuntimeError):
    """The feed takes no more requests (its engine was swapped or stopped): put them on a new one."""


@dataclass
class LiveRequest:
    """One request for `run_live`: its deltas go to `deliver` (the last one carries the result), or the
    exception that stopped the engine's loop; `cancelled()` is asked each step while it decodes."""

    request: TextRequest
    deliver: Callable[[TextDelta | BaseException], None]
    cancelled: Callable[[], bool] = field(default=lambda: False)


_CLOSE = object()


class RequestFeed:
    """A thread-safe queue of `LiveRequest`s; `close()` lets the loop end once what it took has ended."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # a put never lands after the close marker, where no one would take it
        self.closed = False

    def put(self, request: LiveRequest) -> None:
        with self._lock:
            if self.closed:
                raise FeedClosed("this feed's engine takes no more requests")
            self._queue.put(request)

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                self._queue.put(_CLOSE)

    def take(self, block: bool) -> LiveRequest | None:
        """The next request; None when none is waiting (block=False) or the feed has closed (check
        `closed`). block=True waits for one or for the close."""
        try:
            item = self._queue.get(block=block)
        except queue.Empty:
            return None
        if item is _CLOSE:
            self._queue.put(_CLOSE)  # every later take sees the close too
            return None
        return item

    def drain(self) -> list[LiveRequest]:
        """What was put and not taken (after a failure: each is told so)."""
        left = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return left
            if item is not _CLOSE:
                left.append(item)
