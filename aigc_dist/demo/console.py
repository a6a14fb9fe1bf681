"""What the person running the demo sees: one progress line per stage, not a wall of Ray logs.

`routed_output` points file descriptors 1 and 2 at the demo's log file for the whole run, so
everything Ray, DeepSpeed and our own loggers print (and every process they start) lands there,
while `Console` keeps writing to the terminal the demo was started from.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

# What a stage's watcher returns: the progress detail, and the seconds it estimates are left (None: unknown).
Reading = tuple[str, float | None]


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds} s"


class Console:
    """Progress on the terminal: a line rewritten in place on a TTY, a new line every `every_s` elsewhere."""

    def __init__(self, stream: TextIO, every_s: float = 10.0):
        self.stream = stream
        self.tty = stream.isatty()
        self.every_s = every_s
        self._open = ""  # the status line being rewritten, if any
        self._last_line = 0.0
        self._lock = threading.Lock()

    def status(self, text: str) -> None:
        """A transient progress line."""
        with self._lock:
            if self.tty:
                self.stream.write("\r" + text.ljust(len(self._open)))
                self._open = text
            elif time.monotonic() - self._last_line >= self.every_s:
                self.stream.write(text + "\n")
                self._last_line = time.monotonic()
            self.stream.flush()

    def line(self, text: str = "") -> None:
        """A line that stays (ends any status line)."""
        with self._lock:
            if self.tty and self._open:
                self.stream.write("\r" + text.ljust(len(self._open)) + "\n")
            else:
                self.stream.write(text + "\n")
            self._open = ""
            self._last_line = time.monotonic()
            self.stream.flush()


class Stage:
    """One numbered stage: `[2/5] training   step 250/600  loss 0.41   38 s, ~55 s left`."""

    def __init__(self, console: Console, number: int, total: int, name: str):
        self.console, self.prefix = console, f"[{number}/{total}] {name:<9}"
        self.started = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def show(self, detail: str, left_s: float | None = None) -> None:
        left = f", ~{format_seconds(left_s)} left" if left_s is not None else ""
        self.console.status(f"{self.prefix} {detail}   {format_seconds(self.elapsed)}{left}")

    def done(self, detail: str) -> float:
        """The stage's final line; returns its seconds."""
        seconds = self.elapsed
        self.console.line(f"{self.prefix} {detail}   done in {format_seconds(seconds)}")
        return seconds

    @contextmanager
    def watching(self, read: Callable[[], Reading], interval_s: float = 1.0) -> Iterator[None]:
        """Call `read` every `interval_s` on a thread while the body runs, showing what it returns.
        A watcher that fails says so in the log and tries again: it must never break the stage."""
        stop = threading.Event()

        def loop() -> None:
            failures = 0
            while not stop.wait(interval_s):
                try:
                    self.show(*read())
                except Exception:
                    failures += 1
                    if failures == 1:
                        logging.getLogger(__name__).exception("progress watcher of %s failed", self.prefix)

        thread = threading.Thread(target=loop, name="demo-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


@contextmanager
def routed_output(log_path: str) -> Iterator[Console]:
    """Send fds 1 and 2 (and Python's logging) to `log_path` while the body runs; yields the terminal."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    try:
        yield Console(terminal)
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        root.setLevel(level)
        terminal.close()
