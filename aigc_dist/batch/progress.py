"""Counting a run: the periodic progress line, `_progress.json`, the manifest, and `status`.

Commit markers are the source of truth for counts (a shard counts once, whoever committed it);
`_progress.json` adds what only the running driver knows: its session's throughput and the ETA.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from aigc_dist.batch.layout import MANIFEST_FORMAT, RunLayout, read_commits
from aigc_dist.batch.lock import describe_holder, lock_is_stale
from aigc_dist.metrics import DriverMetrics
from aigc_dist.storage import Storage

log = logging.getLogger(__name__)


def sum_counts(markers: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Rows by status and by failing stage, generated tokens and per-stage seconds over commit markers."""
    totals: dict[str, Any] = {"total": 0, "ok": 0, "quarantined": 0, "filtered": 0, "by_stage": {},
                              "profiles": {"users": 0, "items": 0}, "tokens": 0, "prompt_tokens": 0, "seconds": {}}
    for marker in markers:
        counts = marker["counts"]
        for key in ("total", "ok", "quarantined", "filtered"):
            totals[key] += counts[key]
        for table, n in counts.get("profiles", {}).items():  # bad rows of the users and items tables
            totals["profiles"][table] += n
        for stage, n in counts["by_stage"].items():
            totals["by_stage"][stage] = totals["by_stage"].get(stage, 0) + n
        totals["tokens"] += marker["tokens"]["generated"]
        totals["prompt_tokens"] += marker["tokens"]["prompt"]
        for stage, s in marker["seconds"].items():
            totals["seconds"][stage] = totals["seconds"].get(stage, 0.0) + s
    return totals


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """The driver's running count of committed shards; reports on a timer and refreshes the lock."""

    def __init__(self, layout: RunLayout, storage: Storage, run_id: str, plan: dict[str, Any],
                 committed: dict[int, dict[str, Any]], session_started: float, metrics: DriverMetrics | None = None):
        self.layout, self.storage, self.run_id, self.plan = layout, storage, run_id, plan
        self.markers = dict(committed)
        self.session_started = session_started  # when this driver started: its partition pass counts too
        self.session_rows = self.session_tokens = 0
        self.failure: BaseException | None = None
        self._lock = threading.Lock()
        self.metrics = metrics
        if metrics is not None:
            metrics.set("aigc_backfill_input_rows", plan["total_rows"])
            self._export_ratio()

    def add(self, marker: dict[str, Any]) -> None:
        with self._lock:
            new = marker["shard"] not in self.markers
            if new:
                self.session_rows += marker["counts"]["total"]
                self.session_tokens += marker["tokens"]["generated"]
            self.markers[marker["shard"]] = marker
            if new and self.metrics is not None:
                self._export(marker)

    def _export(self, marker: dict[str, Any]) -> None:
        """Counters get what this session committed; the ratio counts every session of the run."""
        counts = marker["counts"]
        for status in ("ok", "quarantined", "filtered"):
            self.metrics.inc("aigc_backfill_rows_total", counts[status], status=status)
        self.metrics.inc("aigc_backfill_tokens_total", marker["tokens"]["generated"])
        for entry in marker["files"]:
            self.metrics.inc("aigc_storage_written_bytes_total", entry["bytes"], kind=entry["kind"])
        self._export_ratio()

    def _export_ratio(self) -> None:
        total = self.plan["total_rows"]
        done = sum(m["counts"]["total"] for m in self.markers.values())
        self.metrics.set("aigc_backfill_progress_ratio", done / total if total else 1.0)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            counts = sum_counts(self.markers.values())
            shards_done = len(self.markers)
            session_rows, session_tokens = self.session_rows, self.session_tokens
        elapsed = max(time.time() - self.session_started, 1e-9)
        rate = session_rows / elapsed
        remaining = self.plan["total_rows"] - counts["total"]
        return {
            "run_id": self.run_id, "state": "running", "updated_at": time.time(),
            "session_started_at": self.session_started, "num_shards": self.plan["num_shards"],
            "shards_committed": shards_done, "total_rows": self.plan["total_rows"], "rows_done": counts["total"],
            "ok": counts["ok"], "quarantined": counts["quarantined"], "filtered": counts["filtered"],
            "tokens": counts["tokens"], "rows_per_s": rate, "tokens_per_s": session_tokens / elapsed,
            "eta_s": remaining / rate if rate > 0 else None,
        }

    def report(self) -> dict[str, Any]:
        snap = self.snapshot()
        self.storage.write_json(self.layout.progress, snap)
        log.info("%s", progress_line(snap))
        return snap

    @contextmanager
    def reporting(self, check_lock: Any, interval_s: float) -> Iterator[Progress]:
        """Report every `interval_s` on a thread while the body runs, once the lock is confirmed ours
        (`check_lock`); once more at the end. The lock's heartbeat runs on its own thread (lock.py)."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval_s):
                try:
                    check_lock()
                    self.report()
                except Exception as exc:  # surfaced to the driver by check()
                    self.failure = exc
                    return

        thread = threading.Thread(target=loop, name="backfill-progress", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
        self.check()
        self.report()

    def check(self) -> None:
        """Raise what the reporting thread hit (e.g. the lock taken over by another driver)."""
        if self.failure is not None:
            raise self.failure


def progress_line(snap: dict[str, Any]) -> str:
    """One line a person can read: shards, rows, statuses, throughput, ETA."""
    total = snap["total_rows"]
    share = 100.0 * snap["rows_done"] / total if total else 100.0
    return (f"backfill {snap['run_id']}: {snap['state']}, {snap['shards_committed']}/{snap['num_shards']} shards, "
            f"{snap['rows_done']:,}/{total:,} rows ({share:.1f}%), ok {snap['ok']:,}, "
            f"quarantined {snap['quarantined']:,}, filtered {snap['filtered']:,}, "
            f"{snap.get('rows_per_s') or 0:.1f} rows/s, {snap.get('tokens_per_s') or 0:.0f} tokens/s, "
            f"ETA {format_duration(snap.get('eta_s'))}")


def build_manifest(layout: RunLayout, run_info: dict[str, Any], plan: dict[str, Any],
                   markers: dict[int, dict[str, Any]], progress: Progress) -> dict[str, Any]:
    """The manifest of a run whose every shard is committed; it lists only committed files."""
    counts = sum_counts(markers.values())
    if counts["total"] != plan["total_rows"]:
        raise RuntimeError(f"the committed shards hold {counts['total']} rows but the input has "
                           f"{plan['total_rows']}; the output of {layout.root} is inconsistent")
    files: dict[str, list[dict[str, Any]]] = {"data": [], "errors": []}
    for shard in sorted(markers):
        for entry in markers[shard]["files"]:
            files[entry["kind"]].append({"path": entry["path"], "shard": shard, "rows": entry["rows"],
                                         "bytes": entry["bytes"]})
    finished = time.time()
    session_s = max(finished - progress.session_started, 1e-9)
    data_files = len(files["data"])
    return {
        "format_version": MANIFEST_FORMAT, "run_id": run_info["run_id"], "state": "complete", "root": layout.root,
        "mode": run_info["mode"], "model": run_info["model"], "config_digest": run_info["config_digest"],
        "output_digest": run_info["output_digest"], "inputs": plan["inputs"],
        "num_shards": plan["num_shards"], "rows_per_file": plan["rows_per_file"],
        "counts": {k: counts[k] for k in ("total", "ok", "quarantined", "filtered", "by_stage", "profiles")},
        "files": files,
        "bytes": {kind: sum(f["bytes"] for f in entries) for kind, entries in files.items()},
        "objects_per_million_rows": 1e6 * (data_files + len(files["errors"])) / max(counts["total"], 1),
        "tokens": {"generated": counts["tokens"], "prompt": counts["prompt_tokens"]},
        "timings": {"started_at": run_info["started_at"], "finished_at": finished,
                    "elapsed_s": finished - run_info["started_at"], "last_session_s": session_s,
                    "last_session_rows": progress.session_rows, "stage_seconds": counts["seconds"]},
        "throughput": {"rows_per_s": progress.session_rows / session_s,
                       "tokens_per_s": progress.session_tokens / session_s,
                       "generate_rows_per_actor_s": counts["total"] / max(counts["seconds"].get("generate", 0), 1e-9)},
    }


def run_status(root: str, storage: Storage, stale_after_s: float = 300.0) -> dict[str, Any]:
    """State, counts, progress, throughput and ETA of a run, from its manifest or its in-progress files."""
    layout = RunLayout(root)
    try:
        manifest = storage.read_json(layout.manifest)
    except FileNotFoundError:
        manifest = None
    if manifest is not None:
        counts = manifest["counts"]
        return {"run_id": manifest["run_id"], "state": "complete", "num_shards": manifest["num_shards"],
                "shards_committed": manifest["num_shards"], "total_rows": counts["total"],
                "rows_done": counts["total"], **{k: counts[k] for k in ("ok", "quarantined", "filtered")},
                "tokens": manifest["tokens"]["generated"], "rows_per_s": manifest["throughput"]["rows_per_s"],
                "tokens_per_s": manifest["throughput"]["tokens_per_s"], "eta_s": 0.0,
                "files": {k: len(v) for k, v in manifest["files"].items()}}
    if not storage.exists(layout.run_info):
        return {"run_id": root.rsplit("/", 1)[-1], "state": "not started", "detail": f"nothing at {root}"}
    run_info = storage.read_json(layout.run_info)
    try:
        plan = storage.read_json(layout.plan)
    except FileNotFoundError:
        plan = {"num_shards": 0, "total_rows": 0}
    commits = read_commits(layout, storage)
    counts = sum_counts(commits.values())
    try:
        lock = storage.read_json(layout.lock)
    except FileNotFoundError:
        lock = None
    stale = lock_is_stale(lock, stale_after_s) if lock is not None else "no driver holds the run"
    state = ("partitioning input" if plan["num_shards"] == 0 else "running") if stale is None else "interrupted"
    try:
        session = storage.read_json(layout.progress)
    except FileNotFoundError:
        session = {}
    rate = session.get("rows_per_s") if stale is None else None
    remaining = plan["total_rows"] - counts["total"]
    status = {"run_id": run_info["run_id"], "state": state, "num_shards": plan["num_shards"],
              "shards_committed": len(commits), "total_rows": plan["total_rows"],
              "rows_done": counts["total"], **{k: counts[k] for k in ("ok", "quarantined", "filtered")},
              "tokens": counts["tokens"], "rows_per_s": rate, "tokens_per_s": session.get("tokens_per_s"),
              "eta_s": remaining / rate if rate else None}
    if lock is not None and stale is None:
        status["driver"] = describe_holder(lock)
    elif stale:
        status["detail"] = f"{stale}; run the same config again to resume"
    return status


def format_status(status: dict[str, Any]) -> str:
    if status["state"] == "not started":
        return f"backfill {status['run_id']}: not started ({status['detail']})"
    lines = [progress_line(status)]
    if status.get("driver"):
        lines.append(f"  driver: {status['driver']}")
    if status.get("files"):
        lines.append(f"  files: {status['files']['data']} data, {status['files']['errors']} errors")
    if status.get("detail"):
        lines.append(f"  {status['detail']}")
    return "\n".join(lines)
