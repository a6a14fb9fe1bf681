"""Exactly once, by shard: write the shard's files, then claim the shard with an exclusive marker.

An attempt writes `data/` and `errors/` files under names no other attempt uses (a random attempt
id), then creates `_commits/shard-SSSSS.json` with `if_absent=True`. The marker is the commit: it
names the files and their row counts (a shard over `backfill.max_file_bytes` is several files, in
row order). Whatever happens around it:

- a crash before the marker leaves files no marker names; they are never read (the manifest lists
  committed files only) and the sweep at the end of the run deletes them;
- two attempts at one shard (a retried task, a zombie worker of a killed driver, two drivers): one
  marker write wins, the loser deletes its own files and reports the winner's marker.

Files are written whole or not at all (`Storage.write_bytes`), so a marker never names a partial file.
A driver whose run lock was taken over is fenced (lock.py): its attempts write no marker and delete
nothing, not even their own files (the sweep of the driver that holds the run removes them).
"""

from __future__ import annotations

import io
import logging
import math
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from aigc_dist.batch.layout import OUTPUT_DIRS, RunLayout
from aigc_dist.batch.lock import Fence
from aigc_dist.batch.run_state import CommitMarker, OutputFile, ShardStats, read_marker, write_marker
from aigc_dist.storage import AlreadyExistsError, Storage

log = logging.getLogger(__name__)


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def file_parts(table: pa.Table, max_file_bytes: int | None) -> list[pa.Table]:
    """A shard's rows cut into consecutive parts of about `max_file_bytes` of Arrow data each (parquet
    compresses, so a part's file is at most about that); one part when it fits or no limit is set."""
    if max_file_bytes is None or table.nbytes <= max_file_bytes or table.num_rows <= 1:
        return [table]
    rows = math.ceil(table.num_rows / math.ceil(table.nbytes / max_file_bytes))
    return [table.slice(start, rows) for start in range(0, table.num_rows, rows)]


def commit_shard(layout: RunLayout, storage: Storage, shard: int, outputs: dict[str, pa.Table | list[str]],
                 stats: ShardStats, fence: Fence, max_file_bytes: int | None = None) -> CommitMarker:
    """Write `outputs` ({"data": table, "errors": table}, and JSON lines by kind: layout.JSONL_KINDS) as the
    shard's files and commit them (a table over `max_file_bytes` as several files, in row order).

    Returns the shard's commit marker: ours, or the one that won if another attempt committed first.
    FencedError (nothing committed, nothing deleted) when `fence` is no longer the run's lock holder.
    """
    attempt = uuid.uuid4().hex[:12]
    files = []
    for kind, table in outputs.items():
        if isinstance(table, list):  # JSON lines: one file (text lines are small beside a shard's parquet)
            if table:
                relative = layout.output_file(kind, shard, attempt)
                body = "".join(f"{line}\n" for line in table).encode("utf-8", "backslashreplace")
                storage.write_bytes(layout.uri(relative), body)
                files.append(OutputFile(relative, kind, len(table), len(body)))
            continue
        if table.num_rows == 0:
            continue
        parts = file_parts(table, max_file_bytes)
        for number, part in enumerate(parts):
            relative = layout.output_file(kind, shard, attempt, number if len(parts) > 1 else None)
            body = parquet_bytes(part)
            storage.write_bytes(layout.uri(relative), body)
            files.append(OutputFile(relative, kind, part.num_rows, len(body)))
    marker = CommitMarker(shard, attempt, utc_now(), tuple(files), stats)
    fence.check(storage)
    try:
        write_marker(layout, storage, marker)
        return marker
    except AlreadyExistsError:
        winner = read_marker(layout, storage, shard)
    # A retried PUT whose first try did land (the connection dropped after the write) finds our own
    # marker: that is our commit, and its files must stay.
    if winner.attempt != attempt:
        fence.check(storage)
        log.warning("shard %d was committed by attempt %s; discarding attempt %s", shard, winner.attempt, attempt)
        for entry in files:
            storage.delete(layout.uri(entry.path))
    return winner


def sweep_uncommitted(layout: RunLayout, storage: Storage, committed: dict[int, CommitMarker],
                      fence: Fence) -> list[str]:
    """Delete the output files (data/, errors/, openai/) that no marker of `committed` names; returns what
    was deleted.

    `committed` is the marker set the caller checked complete (every shard) and builds the manifest
    from: listing the markers again could miss one, and its files, listed in the manifest, would go.
    Run only when every shard is committed: then no attempt can commit again, so a file no marker
    names now never will be named. The lock is checked before every delete.
    """
    listed = [uri for directory in OUTPUT_DIRS for uri in storage.list(layout.uri(directory))]
    kept = {layout.uri(entry.path) for marker in committed.values() for entry in marker.files}
    orphans = [uri for uri in listed if uri not in kept]
    for uri in orphans:
        fence.check(storage)
        storage.delete(uri)
    if orphans:
        log.info("deleted %d files of attempts that never committed", len(orphans))
    return orphans
