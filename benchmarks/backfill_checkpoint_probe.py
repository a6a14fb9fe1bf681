"""Probe: does Ray Data's own checkpointing (`ray.data.checkpoint`) survive SIGKILLed drivers?

The backfill needs exactly-once output across driver crashes. Ray Data 2.60 ships row-level
checkpointing (`DataContext.checkpoint_config = CheckpointConfig(id_column=...)`): read tasks filter
out ids already checkpointed, write tasks record the ids of each written file with a two-phase
pending/commit protocol. This probe runs the shape Ray's checkpointing supports (one pre-joined
input with the id column, a map_batches actor pool, one parquet sink) as a driver subprocess,
SIGKILLs it at several points, re-runs it, and counts what a reader of the output directory sees.

    .venv/bin/python benchmarks/backfill_checkpoint_probe.py

Prints a table and writes benchmarks/results/backfill_checkpoint_probe.json. docs/backfill.md
explains how the result decided the backfill's own commit scheme.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROWS, FILES = 4000, 40
RESULTS = Path(__file__).resolve().parent / "results" / "backfill_checkpoint_probe.json"

DRIVER = r'''
import sys, time
import ray
from ray.data.checkpoint import CheckpointConfig

src, out, ckpt, mode = sys.argv[1:5]
ray.init()
ctx = ray.data.DataContext.get_current()
ctx.enable_progress_bars = False
ctx.checkpoint_config = CheckpointConfig(id_column="request_id", checkpoint_path=ckpt,
                                         delete_checkpoint_on_success=mode != "keep-checkpoint")

class Generate:  # stands in for the generator actor: slow per batch, deterministic per row
    def __call__(self, batch):
        if "request_id" not in batch:  # a users row: nothing to generate
            return {"request_id": [], "content": []}
        time.sleep(0.2)
        return {"request_id": batch["request_id"], "content": [f"copy for {r}" for r in batch["request_id"]]}

# 40 small files read as one block; repartition so that, as in a large input, many blocks stream
# through and many write tasks each commit their own file + checkpoint.
ds = ray.data.read_parquet(src).repartition(40)
if mode == "second-read":  # a users table read in the same plan (the backfill joins users)
    users = ray.data.read_parquet(src).map_batches(lambda b: {"user_id": b["title"]})
    ds = ds.union(users)
ds = ds.map_batches(Generate, batch_size=25, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2))
ds.write_parquet(out, min_rows_per_file=100)
print("DONE", flush=True)
'''


def _parquet_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*.parquet") if p.is_file())


def _read_ids(path: Path) -> tuple[list[str], int]:
    """request_ids a reader of the directory sees, and the files it cannot read (partial writes)."""
    ids, unreadable = [], 0
    for f in _parquet_files(path):
        try:
            ids += pq.read_table(f, columns=["request_id"])["request_id"].to_pylist()
        except Exception:
            unreadable += 1
    return ids, unreadable


def _drive(env: dict[str, str], paths: list[str], kill_after_files: int | None, log: Path,
           mode: str = "keep-checkpoint") -> str:
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, *paths, mode], env=env, stdout=log.open("a"),
                              stderr=subprocess.STDOUT)
    if kill_after_files is None:
        return f"exit {driver.wait(timeout=600)}"
    out = Path(paths[1])
    deadline = time.monotonic() + 600
    while driver.poll() is None and time.monotonic() < deadline:
        if out.exists() and len(_parquet_files(out)) >= kill_after_files:
            os.kill(driver.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    return "killed" if driver.wait(timeout=60) == -signal.SIGKILL else f"finished first ({driver.returncode})"


def _experiment(env: dict[str, str], work: Path, name: str, kills: tuple[int | None, ...], mode: str) -> dict:
    """Runs a driver once per entry of `kills` (None = to the end) on one output; what a reader sees after each."""
    src, out, ckpt = work / "requests", work / name / "out", work / name / "checkpoint"
    paths, log = [str(src), str(out), str(ckpt)], work / f"{name}.log"
    steps = []
    for kill_after in kills:
        outcome = _drive(env, paths, kill_after, log, mode)
        ids, unreadable = _read_ids(out)
        steps.append({"kill_after_output_files": kill_after, "outcome": outcome, "files": len(_parquet_files(out)),
                      "rows_seen": len(ids), "distinct": len(set(ids)), "unreadable_files": unreadable})
    ids, _ = _read_ids(out)
    expected = {f"r{i:06d}" for i in range(ROWS)}
    final = {"rows_seen": len(ids), "duplicates": len(ids) - len(set(ids)), "missing": len(expected - set(ids)),
             "output_files": steps[-1]["files"]}
    tail = log.read_text().splitlines()[-400:]
    errors = [line.strip()[:300] for line in tail if "Error" in line or "checkpointing" in line.lower()]
    return {"mode": mode, "steps": steps, "final": final, "driver_messages": errors[-3:], "log": str(log)}


EXPERIMENTS = {
    # SIGKILL three times at growing progress, then run to the end (checkpoints kept until we delete them).
    "kill-and-resume": ((3, 12, 30, None), "keep-checkpoint"),
    # Ray's default deletes the checkpoint when the dataset finishes: a driver killed after that but
    # before the manifest is written re-runs everything on resume.
    "resume-after-success-with-default-delete": ((None, None), "delete-on-success"),
    # The backfill's plan has a second read (users) besides the requests.
    "second-read-in-plan": ((12, None), "second-read"),
}


def main() -> dict:
    import ray

    work = Path(tempfile.mkdtemp(prefix="ckpt-probe-"))
    (work / "requests").mkdir()
    per = ROWS // FILES
    for f in range(FILES):
        ids = [f"r{f * per + i:06d}" for i in range(per)]
        table = pa.table({"request_id": ids, "title": [f"item {i}" for i in ids]})
        pq.write_table(table, work / "requests" / f"part-{f:03d}.parquet")
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    results = {name: _experiment(env, work, name, kills, mode) for name, (kills, mode) in EXPERIMENTS.items()}
    ray.shutdown()
    print(f"{'experiment':<42}{'step':<18}{'outcome':<22}{'files':>6}{'rows seen':>10}{'distinct':>9}")
    for name, result in results.items():
        for s in result["steps"]:
            step = f"kill at {s['kill_after_output_files']} files" if s["kill_after_output_files"] else "to the end"
            print(f"{name:<42}{step:<18}{s['outcome']:<22}{s['files']:>6}{s['rows_seen']:>10}{s['distinct']:>9}")
        f = result["final"]
        print(f"{'':<42}final: {f['duplicates']} duplicates, {f['missing']} missing of {ROWS}")
        for message in result["driver_messages"]:
            print(f"{'':<42}driver: {message}")
    summary = {"input_rows": ROWS, "experiments": results, "ray": ray.__version__,
               "python": platform.python_version(), "cpus": os.cpu_count(),
               "command": " ".join([Path(sys.executable).name, *sys.argv])}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
