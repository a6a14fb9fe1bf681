"""A new run's partition pass runs while the generator actors start (backfill.startup_overlap), and the
overlap changes nothing a reader sees: the same output, and a pass that fails still says why."""

from __future__ import annotations

import re
import shutil
import time

import psutil
import pyarrow.parquet as pq
import pytest

from aigc_dist.batch.layout import RunLayout
from aigc_dist.batch.pipeline import FAILPOINT_ENV, run_backfill
from aigc_dist.batch.progress import run_status
from aigc_dist.config import StorageConfig
from aigc_dist.storage import Storage

pytestmark = pytest.mark.slow
GENERATOR_TITLE = "ShardGenerator"  # Ray titles an actor's process ray::MapWorker(MapBatches(<class>))...


def _generator_processes() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("ray::") and GENERATOR_TITLE in cmdline[0]:
            found.append(process)
    return found


def _no_generators_left(timeout_s: float = 30) -> None:
    """Actor pools of earlier tests' runs are gone (Ray ends them as their dataset finishes)."""
    deadline = time.monotonic() + timeout_s
    while _generator_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _generator_processes(), "generator actors of an earlier run are still alive"


@pytest.mark.timeout(600)
def test_generators_start_while_the_pass_runs_and_the_output_is_the_same(ray_local, tmp_path, kit, world_dir,
                                                                          lm_artifact):
    """The driver is held after the pass has written the input, before the plan: generator actors are
    already running then. Released, the run's every row equals a run with the overlap off."""
    release = tmp_path / "release"
    data = kit.world_data(world_dir)
    backfill = kit.config(str(tmp_path), lm_artifact, run_id="overlap", rows_per_file=100, startup_overlap="on")
    config = kit.write_config(tmp_path / "overlap.toml", backfill, data)
    root = str(tmp_path / "overlap")
    _no_generators_left()
    driver = kit.start_driver(config, tmp_path / "driver.log", **{FAILPOINT_ENV: f"partitioned=wait:{release}"})
    try:
        kit.wait_for(lambda: bool(_generator_processes()), driver)
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        assert _generator_processes(), "no generator actor started while the partition pass ran"
        assert not Storage().exists(RunLayout(root).plan)  # the pass is still held: no plan yet
        assert run_status(root, Storage())["state"] == "partitioning input"
    finally:
        release.touch()
    assert driver.wait(timeout=300) == 0, (tmp_path / "driver.log").read_text()[-3000:]

    run_backfill(kit.config(str(tmp_path), lm_artifact, run_id="sequential", rows_per_file=100,
                            startup_overlap="off"), data, StorageConfig())
    overlapped, sequential = kit.outputs(tmp_path / "overlap"), kit.outputs(tmp_path / "sequential")
    assert len(overlapped["data"]) > 250
    assert overlapped == sequential  # every row, every column but created_at


@pytest.mark.timeout(600)
def test_a_pass_that_fails_beside_starting_actors_fails_the_run_with_its_own_error(ray_local, tmp_path, kit,
                                                                                    world_dir, lm_artifact):
    """The candidates change while the pass reads them: the run stops with the error that names the file,
    not a traceback of the preparers that waited for the pass, and no plan is written."""
    world = tmp_path / "world"
    shutil.copytree(world_dir, world)
    release = tmp_path / "release"
    backfill = kit.config(str(tmp_path), lm_artifact, run_id="changed", rows_per_file=100, startup_overlap="on")
    config = kit.write_config(tmp_path / "changed.toml", backfill, kit.world_data(str(world)))
    driver = kit.start_driver(config, tmp_path / "driver.log", **{FAILPOINT_ENV: f"partitioned=wait:{release}"})
    log = tmp_path / "driver.log"
    try:
        kit.wait_for(lambda: "failpoint partitioned=wait" in log.read_text(), driver)
        assert driver.poll() is None, log.read_text()[-3000:]
        candidates = pq.read_table(world / "candidates.parquet")
        pq.write_table(candidates.slice(0, candidates.num_rows - 1), world / "candidates.parquet")
    finally:
        release.touch()
    assert driver.wait(timeout=300) != 0
    text = log.read_text()
    # The driver's own last line (Ray forwards its processes' late log lines, "(pid=...) ...", after it).
    own = [line for line in text.strip().splitlines() if not re.match(r"(\x1b\[[0-9;]*m)?\((pid|raylet|gcs)", line)]
    last = own[-1]
    assert last.startswith("aigc-dist backfill: the input changed since run changed started"), text[-3000:]
    assert "candidates.parquet" in last
    assert "Traceback" not in text, text[-3000:]  # the pass's error, not a wall of Ray Data's
    assert not Storage().exists(RunLayout(str(tmp_path / "changed")).plan)

