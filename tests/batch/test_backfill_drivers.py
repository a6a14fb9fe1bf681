"""One writer per run, and one input per run, with real driver processes.

Drivers run as subprocesses (`jobs/backfill.py`, joined to the session's Ray), slowed or killed at
exact places by the AIGC_DIST_FAILPOINT failpoints.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from aigc_dist.batch.layout import RunLayout
from aigc_dist.batch.pipeline import FAILPOINT_ENV, BackfillError, run_backfill
from aigc_dist.batch.run_state import read_commits
from aigc_dist.cli import EXIT_RUN_LOCKED
from aigc_dist.config import DataConfig, StorageConfig
from aigc_dist.storage import Storage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def candidates_jsonl(tmp_path_factory, world_dir) -> str:
    """The world's 300 candidates as jsonl (a text file is easy to edit in place, same size)."""
    path = tmp_path_factory.mktemp("jsonl") / "candidates.jsonl"
    rows = pq.read_table(Path(world_dir) / "candidates.parquet").to_pylist()
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _data(world_dir: str, candidates: str) -> DataConfig:
    return DataConfig(users=str(Path(world_dir) / "users.parquet"), items=str(Path(world_dir) / "items.parquet"),
                      candidates=candidates)


def test_two_drivers_with_a_slow_partition_pass_only_one_proceeds(uninterrupted_run, tmp_path, kit, world_dir,
                                                                   lm_artifact):
    """The lock is heart-beaten from acquire on: a partition pass much longer than lock_stale_after_s
    keeps it live, so the second driver stops at once instead of taking it over."""
    backfill = kit.config(str(tmp_path), lm_artifact, run_id="two", rows_per_file=50, lock_stale_after_s=1)
    config = kit.write_config(tmp_path / "two.toml", backfill, kit.world_data(world_dir))
    layout = RunLayout(str(tmp_path / "two"))
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    release = tmp_path / "partition-may-end"
    first = kit.start_driver(config, first_log, **{FAILPOINT_ENV: f"partition=wait:{release}"})
    kit.wait_for(lambda: "failpoint partition=wait" in first_log.read_text(), first)
    time.sleep(2)  # twice lock_stale_after_s into the partition pass: without heartbeats the lock is stale now

    second = kit.start_driver(config, second_log)
    assert second.wait(timeout=240) == EXIT_RUN_LOCKED, second_log.read_text()[-3000:]
    assert first.poll() is None and "partitioning" not in first_log.read_text()  # met during the slow pass
    release.touch()
    assert first.wait(timeout=240) == 0, first_log.read_text()[-3000:]

    assert "is in use by" in second_log.read_text() and f"pid {first.pid}" in second_log.read_text()
    assert kit.outputs(tmp_path / "two") == uninterrupted_run["outputs"]
    assert not kit.unlisted_files(tmp_path / "two") and not (tmp_path / "two" / "_lock").exists()
    assert not Storage().exists(layout.progress)


def test_a_resume_is_refused_when_an_input_file_changed_same_size(uninterrupted_run, tmp_path, kit, world_dir,
                                                                  candidates_jsonl, lm_artifact):
    candidates = tmp_path / "candidates.jsonl"
    original = Path(candidates_jsonl).read_bytes()
    candidates.write_bytes(original)
    backfill = kit.config(str(tmp_path), lm_artifact, run_id="edited", rows_per_file=50)
    data = _data(world_dir, str(candidates))
    config = kit.write_config(tmp_path / "edited.toml", backfill, data)
    driver = kit.start_driver(config, tmp_path / "crash.log", **{FAILPOINT_ENV: "planned"})
    assert driver.wait(timeout=240) == -signal.SIGKILL, (tmp_path / "crash.log").read_text()[-3000:]
    layout = RunLayout(str(tmp_path / "edited"))
    assert Storage().exists(layout.plan) and not read_commits(layout, Storage())

    edited = original.replace(b'"rank": 1,', b'"rank": 2,', 1)
    assert edited != original and len(edited) == len(original)
    candidates.write_bytes(edited)
    with pytest.raises(BackfillError, match=rf"data\.candidates: file {candidates} changed \(same size, other "
                                            r"content: sha256:\w+ then, sha256:\w+ now\)"):
        run_backfill(backfill, data, StorageConfig())
    assert not read_commits(layout, Storage())  # refused before anything was written

    candidates.write_bytes(original)  # the input the run started with: it resumes
    run_backfill(backfill, data, StorageConfig())
    assert kit.outputs(tmp_path / "edited") == uninterrupted_run["outputs"]  # the same rows as from parquet
