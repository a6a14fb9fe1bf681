"""A backfill's parallelism and progress do not depend on its shard count: shards are cut into generate
tasks that every actor takes, and rows count as done when generated, before their shard commits."""

from __future__ import annotations

import pytest

from aigc_dist.batch.layout import read_manifest
from aigc_dist.batch.pipeline import FAILPOINT_ENV, run_backfill
from aigc_dist.batch.progress import format_status, run_status
from aigc_dist.config import StorageConfig
from aigc_dist.storage import Storage

pytestmark = pytest.mark.slow


def test_three_actors_all_generate_one_shard_and_its_content_does_not_depend_on_them(ray_local, tmp_path, kit,
                                                                                      world_dir, lm_artifact):
    """300 rows in one shard (one output file), cut into 30 tasks of 10: each of 3 actors generates some,
    and the file holds exactly what one actor alone generates from the same tasks."""
    data = kit.world_data(world_dir)
    spread = run_backfill(kit.config(str(tmp_path), lm_artifact, run_id="three", rows_per_file=1000,
                                     rows_per_task=10, min_actors=3, max_actors=3), data, StorageConfig())
    assert spread["num_shards"] == 1 and len(spread["files"]["data"]) == 1
    generators = spread["generators"]
    assert generators["tasks"] == 30
    assert len(generators["rows_by_actor"]) == 3, generators
    assert all(rows > 0 for rows in generators["rows_by_actor"].values()), generators
    assert sum(generators["rows_by_actor"].values()) == spread["counts"]["total"] == 300

    alone = run_backfill(kit.config(str(tmp_path), lm_artifact, run_id="alone", rows_per_file=1000,
                                    rows_per_task=10, min_actors=1, max_actors=1), data, StorageConfig())
    assert len(alone["generators"]["rows_by_actor"]) == 1
    spread_rows, alone_rows = kit.outputs(tmp_path / "three"), kit.outputs(tmp_path / "alone")
    assert len(spread_rows["data"]) + len(spread_rows["errors"]) == 300 and len(spread_rows["data"]) > 250
    assert spread_rows == alone_rows  # every row, every column but created_at


@pytest.mark.timeout(600)
def test_status_counts_generated_rows_and_gives_an_eta_before_the_first_commit(ray_local, tmp_path, kit, world_dir,
                                                                               lm_artifact):
    """One shard of 300 rows in tasks of 20; the driver holds still after its 4th task report (a failpoint):
    `backfill status` then shows 80 rows done, 0 committed and a finite ETA, from another process's view."""
    release = tmp_path / "release"
    backfill = kit.config(str(tmp_path), lm_artifact, run_id="one-shard", rows_per_file=1000, rows_per_task=20,
                          progress_interval_s=0.5)
    config = kit.write_config(tmp_path / "one-shard.toml", backfill, kit.world_data(world_dir))
    driver = kit.start_driver(config, tmp_path / "driver.log", **{FAILPOINT_ENV: f"task_generated:4=wait:{release}"})
    root = str(tmp_path / "one-shard")
    try:
        kit.wait_for(lambda: (run_status(root, Storage()).get("rows_done") or 0) >= 80, driver)
        status = run_status(root, Storage())
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        assert status["state"] == "running"
        assert status["rows_done"] == 80 and status["total_rows"] == 300
        assert status["rows_committed"] == 0 and status["shards_committed"] == 0
        assert status["rows_per_s"] > 0 and 0 < status["eta_s"] < float("inf")
        line = format_status(status)
        assert "80/300 rows (26.7%), 0 committed in 0/1 shards" in line and "ETA ?" not in line
    finally:
        release.touch()
    assert driver.wait(timeout=300) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    manifest = read_manifest(root, Storage())
    assert manifest["counts"]["total"] == 300 and manifest["generators"]["tasks"] == 15
    assert run_status(root, Storage())["rows_committed"] == 300
