"""Exactly once under crashes: SIGKILLed drivers resume to the output of an uninterrupted run.

Drivers run as subprocesses (`jobs/backfill.py`, joined to the session's Ray) and are killed with
SIGKILL: by a failpoint at an exact place (AIGC_DIST_FAILPOINT), or by the test from outside.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from aigc_dist.batch.layout import RunLayout
from aigc_dist.batch.pipeline import FAILPOINT_ENV, run_backfill
from aigc_dist.batch.progress import run_status
from aigc_dist.batch.run_state import read_commits
from aigc_dist.cli import EXIT_RUN_LOCKED, main
from aigc_dist.config import StorageConfig
from aigc_dist.storage import Storage

pytestmark = pytest.mark.slow
NUM_SHARDS = 6  # 300 candidates, rows_per_file=50


def _config(kit: Any, tmp: Path, world_dir: str, artifact: str, run_id: str) -> tuple[Any, Any]:
    return kit.config(str(tmp), artifact, run_id=run_id, rows_per_file=50), kit.world_data(world_dir)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_sigkill_at_three_points_then_resume_gives_the_uninterrupted_output(uninterrupted_run, tmp_path, kit,
                                                                             world_dir, lm_artifact):
    before = _snapshot(uninterrupted_run["root"])
    config = kit.write_config(tmp_path / "crashy.toml", *_config(kit, tmp_path, world_dir, lm_artifact, "crashy"))
    root = tmp_path / "crashy"
    layout, storage = RunLayout(str(root)), Storage()

    def killed_at(point: str) -> None:
        driver = kit.start_driver(config, tmp_path / f"{point}.log", **{FAILPOINT_ENV: point})
        assert driver.wait(timeout=240) == -signal.SIGKILL, (tmp_path / f"{point}.log").read_text()[-3000:]
        assert not storage.exists(layout.manifest)

    killed_at("partitioned")  # input partitioned, plan not yet written: the next driver partitions again
    assert not storage.exists(layout.plan) and not read_commits(layout, storage)
    killed_at("shard_committed:2")  # mid-stream: shards in flight in the actors are lost
    assert storage.exists(layout.plan) and 2 <= len(read_commits(layout, storage)) < NUM_SHARDS  # shards pending
    killed_at("before_manifest")  # every shard committed, no manifest yet
    assert len(read_commits(layout, storage)) == NUM_SHARDS

    driver = kit.start_driver(config, tmp_path / "resume.log")
    assert driver.wait(timeout=240) == 0, (tmp_path / "resume.log").read_text()[-3000:]

    assert kit.outputs(root) == uninterrupted_run["outputs"]  # 0 missing, 0 duplicates, identical content
    assert not kit.unlisted_files(root)  # attempts that never committed were swept
    assert not (root / "_work").exists() and not (root / "_lock").exists()
    assert _snapshot(uninterrupted_run["root"]) == before  # another run_id was never touched


def test_second_driver_fails_fast_then_sigkill_from_outside_and_resume(uninterrupted_run, tmp_path, kit,
                                                                        world_dir, lm_artifact, capsys):
    backfill, data = _config(kit, tmp_path, world_dir, lm_artifact, "busy")
    config = kit.write_config(tmp_path / "busy.toml", backfill, data)
    layout, storage = RunLayout(str(tmp_path / "busy")), Storage()
    first = kit.start_driver(config, tmp_path / "first.log")
    kit.wait_for(lambda: storage.exists(layout.lock), first)

    assert main(["backfill", "--config", str(config)]) == EXIT_RUN_LOCKED  # same run_id, first one alive
    # Refused at once, not after waiting for the lock: the first driver is still mid-run.
    assert first.poll() is None and not storage.exists(layout.manifest)
    err = capsys.readouterr().err
    assert "is in use by" in err and f"pid {first.pid}" in err

    kit.wait_for(lambda: read_commits(layout, storage), first)  # mid-stream: some shards committed
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(timeout=30) == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    commits = read_commits(layout, storage)
    assert 1 <= len(commits) < NUM_SHARDS  # the kill came mid-run: shards were pending
    # `backfill status` of a run whose driver is gone: interrupted, its committed rows, how to resume.
    status = run_status(str(tmp_path / "busy"), storage)
    assert status["state"] == "interrupted" and status["shards_committed"] == len(commits)
    assert status["rows_done"] == status["rows_committed"] == sum(m.stats.counts.total for m in commits.values())
    assert status["eta_s"] is None and "run the same config again to resume" in status["detail"]

    manifest = run_backfill(backfill, data, StorageConfig())  # the dead driver's lock is stale at once

    assert manifest["counts"]["total"] == 300
    # and the run_id does not change the content
    assert kit.outputs(tmp_path / "busy") == uninterrupted_run["outputs"]
    assert not kit.unlisted_files(tmp_path / "busy")
