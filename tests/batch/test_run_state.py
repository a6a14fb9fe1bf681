"""The run's plan and commit markers: one reader and writer each, in the JSON earlier runs were written in."""

from __future__ import annotations

import pytest

from aigc_dist.batch.run_state import (
    CommitMarker,
    Counts,
    OutputFile,
    Plan,
    ShardStats,
    read_commits,
    read_marker,
    read_plan,
    sum_counts,
    write_marker,
    write_plan,
)
from aigc_dist.storage import AlreadyExistsError, Storage

# A marker as the backfill wrote them before these classes (and before actors, tasks and quality sums).
OLD_MARKER = {"shard": 3, "attempt": "a1b2c3", "committed_at": "2026-11-30T10:00:00Z",
              "files": [{"path": "data/shard-00003-a1b2c3.parquet", "kind": "data", "rows": 9, "bytes": 1200}],
              "counts": {"total": 10, "ok": 9, "quarantined": 1, "filtered": 0, "by_stage": {"validate": 1}},
              "tokens": {"generated": 90, "prompt": 300}, "seconds": {"prepare": 0.5, "generate": 2.0}}


def marker(shard: int, quality: dict | None = None) -> CommitMarker:
    stats = ShardStats(Counts(total=5, ok=4, filtered=1, by_stage={"filter": 1}, profiles={"users": 1, "items": 0}),
                       40, 100, {"generate": 1.5}, {"10.0.0.1:42": 5}, 2, quality)
    return CommitMarker(shard, f"attempt{shard}", "2026-12-07T00:00:00Z",
                        (OutputFile(f"data/shard-{shard:05d}-x.parquet", "data", 4, 800),), stats)


def test_a_marker_of_an_earlier_run_reads_with_the_defaults_it_stood_for(layout):
    storage = Storage()
    storage.write_json(layout.commit_marker(3), OLD_MARKER)
    old = read_marker(layout, storage, 3)
    assert (old.stats.tasks, old.stats.actors, old.stats.quality) == (1, {}, None)
    assert old.stats.counts.profiles == {"users": 0, "items": 0}
    assert old.files[0].path == OLD_MARKER["files"][0]["path"]
    # Written again, it is the same document plus the fields it lacked: a resumed run reads its own markers.
    again = old.to_json()
    assert {k: again[k] for k in OLD_MARKER} == {**OLD_MARKER, "counts": {**OLD_MARKER["counts"],
                                                                          "profiles": {"users": 0, "items": 0}}}


def test_markers_commit_once_and_sum_over_the_run(layout):
    storage = Storage()
    written = [marker(0, {"scored": 4, "grounded": 3}), marker(1), marker(2, {"scored": 1, "grounded": 1})]
    for m in written:
        write_marker(layout, storage, m)
    with pytest.raises(AlreadyExistsError):  # the commit is exclusive: a second attempt's marker loses
        write_marker(layout, storage, marker(1))
    assert read_commits(layout, storage) == {m.shard: m for m in written}
    totals = sum_counts(read_commits(layout, storage).values())
    assert (totals["total"], totals["ok"], totals["filtered"], totals["tasks"]) == (15, 12, 3, 6)
    assert totals["by_stage"] == {"filter": 3} and totals["profiles"] == {"users": 3, "items": 0}
    assert totals["actors"] == {"10.0.0.1:42": 15} and totals["tokens"] == 120


def test_the_plan_is_written_once_and_read_back_whole(layout):
    storage = Storage()
    assert read_plan(layout, storage) is None  # before the partition pass
    plan = Plan(4, 1000, 250, [["candidates", "s3://b/c.parquet", 1000, "etag"]], "pass01", planned_at=1.5)
    write_plan(layout, storage, plan)
    assert read_plan(layout, storage) == plan
    with pytest.raises(AlreadyExistsError):
        write_plan(layout, storage, Plan(1, 1, 1, [], "other"))
