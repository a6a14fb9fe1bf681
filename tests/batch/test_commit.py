"""Commits and deletes of a run: fenced once the lock is lost; the sweep keeps what the checked markers list."""

from __future__ import annotations

import time

import pyarrow as pa
import pytest

from aigc_dist.batch.commit import commit_shard, parquet_bytes, sweep_uncommitted
from aigc_dist.batch.lock import FencedError, RunLock
from aigc_dist.batch.run_state import Counts, ShardStats, read_commits
from aigc_dist.storage import Storage

OUTPUTS = {"data": pa.table({"request_id": ["r1", "r2"], "content": ["a", "b"]}),
           "errors": pa.table({"request_id": ["r3"], "error": ["bad"]})}
STATS = ShardStats(Counts(total=3, ok=2, quarantined=1, by_stage={"validate": 1}), 0, 0, {}, {}, 1)


def test_a_driver_whose_lock_was_taken_commits_and_deletes_nothing(layout):
    storage = Storage()
    hung = RunLock(layout.lock, storage, stale_after_s=1, heartbeat_s=3600)  # a driver that stopped beating
    hung.acquire()
    time.sleep(1.5)  # its lock goes stale
    holder = RunLock(layout.lock, storage, stale_after_s=1)  # one run, one lock_stale_after_s
    holder.acquire()  # takes it over

    with pytest.raises(FencedError, match="lost the run lock"):
        commit_shard(layout, storage, 0, OUTPUTS, STATS, hung.fence)
    assert not storage.exists(layout.commit_marker(0))
    with pytest.raises(FencedError):
        hung.check()  # the driver side learns it too, and stops

    marker = commit_shard(layout, storage, 0, OUTPUTS, STATS, holder.fence)
    committed = [layout.uri(entry.path) for entry in marker.files]
    with pytest.raises(FencedError):
        sweep_uncommitted(layout, storage, {0: marker}, hung.fence)
    files = storage.list(layout.uri("data")) + storage.list(layout.uri("errors"))
    leftovers = [uri for uri in files if uri not in committed]
    assert len(leftovers) == 2  # the fenced attempt's own files: not deleted by it, but by the holder's sweep
    assert sweep_uncommitted(layout, storage, {0: marker}, holder.fence) == leftovers
    assert all(storage.exists(uri) for uri in committed)

    hung.release()  # never deletes the lock it lost
    assert storage.read_json(layout.lock)["owner"] == holder.owner
    holder.release()


def test_the_sweep_keeps_every_file_of_the_checked_markers_even_when_a_listing_misses_one(layout):
    storage = Storage()
    with RunLock(layout.lock, storage, stale_after_s=60) as lock:
        markers = {k: commit_shard(layout, storage, k, OUTPUTS, STATS, lock.fence) for k in range(3)}
        orphan = layout.uri(layout.output_file("data", 1, "crashed0attempt"))
        storage.write_bytes(orphan, parquet_bytes(OUTPUTS["data"]))
        checked = read_commits(layout, storage)
        assert checked == markers
        # What a listing that misses shard 1's marker would see: re-listing here would lose its files.
        storage.delete(layout.commit_marker(1))
        assert 1 not in read_commits(layout, storage)

        deleted = sweep_uncommitted(layout, storage, checked, lock.fence)

    assert deleted == [orphan]
    listed_by_manifest = [layout.uri(entry.path) for marker in checked.values() for entry in marker.files]
    assert len(listed_by_manifest) == 6 and all(storage.exists(uri) for uri in listed_by_manifest)
