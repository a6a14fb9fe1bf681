"""Fault tolerance: SIGKILL a Ray Train worker mid-run. With train.max_failures >= 1 Ray Train starts a
new worker group, which resumes from the newest checkpoint, so the run still finishes, at most one
checkpoint interval of steps is trained twice, and the losses are those of a run without a failure;
with more failures than train.max_failures allows, the run ends with exit 1 and says so.
The run is `jobs/train.py`, as `ray job submit` runs it. The losses of the run without a failure are
recorded in golden/lm_fault_run.json by the same test with AIGC_UPDATE_GOLDEN=1 (no kill)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from aigc_dist.demo.world import WorldConfig, write_world
from aigc_dist.train.checkpoints import STATE_FILE, checkpoint_dir_name

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parent / "golden" / "lm_fault_run.json"
EVERY = 20  # steps between checkpoints
MAX_STEPS = 60
UPDATE_GOLDEN = "AIGC_UPDATE_GOLDEN"  # set: run uninterrupted and record the losses the killed run must match


def our_train_workers() -> list[psutil.Process]:
    """Ray Train worker processes of this session's Ray: descendants of this test process (the local
    Ray's raylet is our child), whose title Ray sets to `ray::RayTrainWorker.<method>`."""
    found = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if proc.cmdline() and proc.cmdline()[0].startswith("ray::RayTrainWorker"):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def committed_step(run_dir: Path) -> int:
    """The step of the newest checkpoint Ray Train has committed (all ranks reported it), from the
    run's checkpoint_manager_snapshot.json; 0 before the first. Files of a checkpoint appear in the
    run directory before the commit, and a restart resumes only from a committed one."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    latest = snapshot.get("latest_checkpoint_result") or {}
    return int(latest.get("checkpoint_dir_name", "checkpoint_0").split("_")[1])


def wait_for(condition, timeout_s: float, what: str, driver: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if driver.poll() is not None:
            pytest.fail(f"the driver exited ({driver.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}:\n{log.read_text()[-3000:]}")


def test_killed_worker_is_replaced_and_training_resumes_from_the_last_checkpoint(
    ray_local, deepspeed_ops, train_kit, tmp_path
):
    world = tmp_path / "world"  # 1,600 examples: the whole run (960) is one pass, no epoch boundary to wait on
    write_world(WorldConfig(num_users=400, num_items=200, candidates_per_user=4), world)
    runs = tmp_path / "runs"
    cfg = train_kit.lm_config(
        str(world), str(runs),
        train={"run_name": "lm-fault", "max_steps": MAX_STEPS, "checkpoint_every_steps": EVERY,
               "log_every_steps": 10, "max_failures": 1},
    )  # fmt: skip
    log = tmp_path / "driver.log"
    driver = train_kit.start_driver("train.py", ["--config", str(train_kit.write_config(tmp_path / "c.toml", cfg))],
                                    log)  # fmt: skip
    update = bool(os.environ.get(UPDATE_GOLDEN))
    try:
        if not update:
            seen = wait_for(lambda: committed_step(runs / "lm-fault"), 240, "the first checkpoint", driver, log)
            victims = wait_for(our_train_workers, 30, "a train worker process", driver, log)
            os.kill(victims[-1].pid, signal.SIGKILL)
        assert driver.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    assert f"train lm-fault: {MAX_STEPS} steps" in log.read_text()

    final = json.loads((runs / "lm-fault" / checkpoint_dir_name(MAX_STEPS) / STATE_FILE).read_text())
    assert final["step"] == MAX_STEPS
    if update:  # the reference: the same run without a failure
        assert final["attempt_starts"] == [0]
        GOLDEN.write_text(json.dumps({
            "what": f"tiny LM, 2 workers, ZeRO-2, {MAX_STEPS} steps on a 400-user world (test_fault.py with "
                    f"{UPDATE_GOLDEN}=1), uninterrupted: loss per progress record",
            "losses": {str(record["step"]): record["loss"] for record in final["history"]}}, indent=2) + "\n")
        return
    start, restart = final["attempt_starts"]  # exactly one restart
    assert start == 0 and restart % EVERY == 0
    assert restart >= seen  # resumed from the newest checkpoint there was when the worker died
    # The resumed run is the uninterrupted run: its data position and optimizer state came back
    # exactly, so every progress record matches one recorded without a failure.
    golden = json.loads(GOLDEN.read_text())["losses"]
    losses = {str(record["step"]): record["loss"] for record in final["history"]}
    assert list(losses) == list(golden)  # each step recorded once: none lost, none repeated
    assert losses == pytest.approx(golden, rel=1e-4)


def test_a_run_whose_workers_fail_more_than_max_failures_allows_exits_1_saying_so(
    ray_local, deepspeed_ops, train_kit, tiny_world, tmp_path
):
    """train.max_failures = 0 and one SIGKILL mid-run: Ray Train gives up instead of restarting, and
    `jobs/train.py` ends, without hanging on the dead rank, with exit 1 and a message that says how
    often the workers failed against what train.max_failures allows, and how to resume."""
    runs = tmp_path / "runs"
    cfg = train_kit.lm_config(
        str(tiny_world), str(runs),
        # A checkpoint every step: the first one is the sign that training runs (and what a rerun resumes).
        train={"run_name": "lm-fails", "max_steps": 200, "checkpoint_every_steps": 1, "max_failures": 0},
    )  # fmt: skip
    log = tmp_path / "driver.log"
    driver = train_kit.start_driver("train.py", ["--config", str(train_kit.write_config(tmp_path / "c.toml", cfg))],
                                    log)  # fmt: skip
    try:
        wait_for(lambda: committed_step(runs / "lm-fails"), 240, "the first checkpoint", driver, log)
        victims = wait_for(our_train_workers, 30, "a train worker process", driver, log)
        os.kill(victims[-1].pid, signal.SIGKILL)
        returncode = driver.wait(timeout=180)
    finally:
        if driver.poll() is None:
            driver.kill()
    output = log.read_text()
    assert returncode == 1, output[-3000:]
    assert "aigc-dist train: failed: train lm-fails: the workers failed 1 time (train.max_failures=0)" in output, \
        output[-3000:]
    assert "(run the same command again to resume run 'lm-fails' from its latest checkpoint)" in output
