"""Benchmark: backfills of growing size, with the default rows_per_file (100,000 rows per shard and file).

For each size (20,000 and 200,000 rows by default; add 1,000,000 with --sizes), one `run_backfill`
of a tiny untrained LM with short copy (8 new tokens, so the pipeline and not the model dominates),
on 2 one-CPU generator actors. Measured per run:

- wall time and rows/s (call to manifest: Ray start is excluded, it happens once before the first run);
- time to the first generated row (the manifest's `first_task_s`: partition pass, actor start, model load);
- driver peak RSS above its level before the run (sampled every 0.2 s from /proc);
- output objects per million rows;
- the ETA's error: `backfill status` is read every 0.5 s from a thread, as an operator would; at the
  first reading past 25/50/75% of the rows, |ETA - true remaining time| / true remaining time.

At the largest size that is not above 200,000 rows the engine alone (the same actors and requests
with the artifact loaded, nothing around it; benchmarks/backfill_pipeline.py's baseline) runs too,
engine, pipeline, engine, so that pipeline / engine rows/s is measured side by side.

Goals (issue 18): rows/s at 1M within 10% of 200k; driver RSS flat; ETA within 20% from 25% on;
first generated row <= 15 s; pipeline / engine >= 0.9 at 200k.

    .venv/bin/python benchmarks/backfill_scale.py [--sizes 20000,200000,1000000]

Prints a table and writes benchmarks/results/backfill_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from backfill_pipeline import engine_only, engine_requests  # this directory is on sys.path when run as a script

from aigc_dist.batch.pipeline import run_backfill
from aigc_dist.batch.progress import run_status
from aigc_dist.config import BackfillConfig, DataConfig, StorageConfig
from aigc_dist.data.prompts import PromptTemplate
from aigc_dist.demo.world import WorldConfig, make_world, write_world
from aigc_dist.engine.text import prompt_conditioning
from aigc_dist.models.artifact import save_text_artifact
from aigc_dist.models.llama import LlamaLM, lm_config_from_preset
from aigc_dist.storage import Storage

RESULTS = Path(__file__).resolve().parent / "results" / "backfill_scale.json"
GOALS = {"rows_per_s_1m_over_200k": 0.9, "eta_error_from_25pct": 0.2, "first_task_s": 15.0,
         "pipeline_over_engine_200k": 0.9, "rss_growth_mb": 100.0}
ITEMS, CANDIDATES_PER_USER = 2000, 10


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


class Watch(threading.Thread):
    """Samples the driver's RSS and the run's status while a backfill runs."""

    def __init__(self, root: str):
        super().__init__(daemon=True)
        self.root, self.stop = root, threading.Event()
        self.peak_rss = rss_mb()
        self.status: list[tuple[float, dict[str, Any]]] = []

    def run(self) -> None:
        storage, next_status = Storage(), 0.0
        while not self.stop.wait(0.2):
            self.peak_rss = max(self.peak_rss, rss_mb())
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + 0.5
                try:
                    self.status.append((time.monotonic(), run_status(self.root, storage)))
                except (OSError, ValueError, KeyError):  # a file mid-write: the next reading will do
                    pass


def eta_errors(readings: list[tuple[float, dict[str, Any]]], ended: float) -> dict[str, float | None]:
    """|ETA - true remaining| / true remaining at the first reading past each share of the rows."""
    errors: dict[str, float | None] = {}
    for share in (0.25, 0.5, 0.75):
        past = [(t, s) for t, s in readings if s.get("state") == "running" and s.get("total_rows")
                and s["rows_done"] >= share * s["total_rows"] and s.get("eta_s") is not None]
        if not past:
            errors[f"{int(share * 100)}%"] = None
            continue
        when, status = past[0]
        truth = ended - when
        errors[f"{int(share * 100)}%"] = abs(status["eta_s"] - truth) / truth if truth > 0 else None
    return errors


def world_of(rows: int, work: Path) -> tuple[Any, DataConfig]:
    world = make_world(WorldConfig(num_users=rows // CANDIDATES_PER_USER, num_items=ITEMS,
                                   candidates_per_user=CANDIDATES_PER_USER, seed=0))
    write_world(world, work / f"world-{rows}")
    base = work / f"world-{rows}"
    return world, DataConfig(users=str(base / "users.parquet"), items=str(base / "items.parquet"),
                             candidates=str(base / "candidates.parquet"))


def pipeline_run(backfill: BackfillConfig, data: DataConfig) -> dict[str, Any]:
    watch = Watch(str(Path(backfill.output) / backfill.run_id))
    before = rss_mb()
    watch.start()
    started = time.perf_counter()
    manifest = run_backfill(backfill, data, StorageConfig())
    seconds, ended = time.perf_counter() - started, time.monotonic()
    watch.stop.set()
    watch.join()
    rows = manifest["counts"]["total"]
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
            "first_task_s": manifest["timings"]["first_task_s"], "rss_before_mb": before,
            "rss_peak_mb": watch.peak_rss, "rss_growth_mb": watch.peak_rss - before,
            "objects_per_million_rows": manifest["objects_per_million_rows"],
            "data_files": len(manifest["files"]["data"]), "num_shards": manifest["num_shards"],
            "rows_by_actor": manifest["generators"]["rows_by_actor"], "eta_error": eta_errors(watch.status, ended),
            "status_readings": len(watch.status)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20000,200000", help="rows per run, comma-separated")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))

    import ray

    work = Path(tempfile.mkdtemp(prefix="backfill-scale-"))
    template = PromptTemplate(max_field_chars=32, max_prompt_tokens=160)
    torch.manual_seed(0)
    artifact = str(work / "copy-lm")
    save_text_artifact(artifact, LlamaLM(lm_config_from_preset("tiny")), Storage(),
                       conditioning=prompt_conditioning(template), metadata={"name": "bench", "version": "v1"})
    ray.init(num_cpus=max(args.actors * 2 + 3, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    baseline_size = max((s for s in sizes if s <= 200_000), default=None)
    runs: dict[str, Any] = {}
    engine: list[dict[str, Any]] = []
    for rows in sizes:
        world, data = world_of(rows, work)
        backfill = BackfillConfig(run_id=f"scale-{rows}", output=str(work / "out"), artifact=artifact,
                                  batch_size=args.batch_size, min_actors=args.actors, max_actors=args.actors,
                                  max_new_tokens=args.max_new_tokens, temperature=0.8, min_chars=0,
                                  progress_interval_s=1.0)
        requests = None
        if rows == baseline_size:
            requests = engine_requests(world, template, args.max_new_tokens)
            engine.append(engine_only(artifact, requests, args.actors, args.batch_size, backfill.task_rows))
            print(f"  engine only {rows:>9,} rows {engine[-1]['seconds']:7.1f} s "
                  f"{engine[-1]['rows_per_s']:8.1f} rows/s", flush=True)
        del world
        runs[str(rows)] = pipeline_run(backfill, data)
        run = runs[str(rows)]
        print(f"  pipeline    {rows:>9,} rows {run['seconds']:7.1f} s {run['rows_per_s']:8.1f} rows/s", flush=True)
        if requests is not None:
            engine.append(engine_only(artifact, requests, args.actors, args.batch_size, backfill.task_rows))
            print(f"  engine only {rows:>9,} rows {engine[-1]['seconds']:7.1f} s "
                  f"{engine[-1]['rows_per_s']:8.1f} rows/s", flush=True)
    ray.shutdown()

    figures: dict[str, Any] = {}
    if baseline_size is not None:
        engine_rate = sum(e["rows"] for e in engine) / sum(e["seconds"] for e in engine)
        figures["pipeline_over_engine"] = {"rows": baseline_size, "engine_rows_per_s": engine_rate,
                                           "ratio": runs[str(baseline_size)]["rows_per_s"] / engine_rate}
    if "200000" in runs and "1000000" in runs:
        figures["rows_per_s_1m_over_200k"] = runs["1000000"]["rows_per_s"] / runs["200000"]["rows_per_s"]
    eta_from_25 = [e for run in runs.values() for e in run["eta_error"].values() if e is not None]
    figures["worst_eta_error_from_25pct"] = max(eta_from_25) if eta_from_25 else None
    figures["worst_first_task_s"] = max(run["first_task_s"] for run in runs.values())
    figures["worst_rss_growth_mb"] = max(run["rss_growth_mb"] for run in runs.values())
    met = {
        "pipeline_over_engine_200k": (figures["pipeline_over_engine"]["ratio"] >= GOALS["pipeline_over_engine_200k"]
                                      if baseline_size == 200_000 else None),
        "rows_per_s_1m_over_200k": (figures["rows_per_s_1m_over_200k"] >= GOALS["rows_per_s_1m_over_200k"]
                                    if "rows_per_s_1m_over_200k" in figures else None),
        "eta_error_from_25pct": (figures["worst_eta_error_from_25pct"] <= GOALS["eta_error_from_25pct"]
                                 if figures["worst_eta_error_from_25pct"] is not None else None),
        "first_task_s": figures["worst_first_task_s"] <= GOALS["first_task_s"],
        "rss_growth_mb": figures["worst_rss_growth_mb"] <= GOALS["rss_growth_mb"],
    }
    result = {
        "sizes": sizes, "actors": args.actors, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "rows_per_file": 100_000, "rows_per_task": 8 * args.batch_size, "model": "lm tiny preset (untrained)",
        "runs": runs, "engine_only": engine, "figures": figures, "goals": GOALS, "met": met,
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "torch": torch.__version__,
                    "ray": ray.__version__, "python": platform.python_version()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.0f}%"

    print(f"backfill scale: {args.actors} actors x 1 CPU, batch {args.batch_size}, {args.max_new_tokens} new tokens, "
          f"rows_per_file 100,000, tasks of {8 * args.batch_size} rows")
    print(f"{'rows':>10}{'seconds':>9}{'rows/s':>9}{'first row s':>12}{'RSS +MB':>9}{'objects/1M':>11}"
          f"{'shards':>7}{'actors busy':>12}{'ETA err 25/50/75%':>19}")
    for size, run in runs.items():
        errors = "/".join(pct(run["eta_error"][k]) for k in ("25%", "50%", "75%"))
        busy = sum(1 for n in run["rows_by_actor"].values() if n > 0)
        print(f"{int(size):>10,}{run['seconds']:>9.1f}{run['rows_per_s']:>9.1f}{run['first_task_s']:>12.1f}"
              f"{run['rss_growth_mb']:>9.0f}{run['objects_per_million_rows']:>11.0f}{run['num_shards']:>7}"
              f"{busy:>12}{errors:>19}")
    for name, ok in met.items():
        print(f"  {name}: {'not run' if ok is None else 'MET' if ok else 'NOT MET'}")
    if "pipeline_over_engine" in figures:
        print(f"  pipeline / engine at {baseline_size:,} rows = {figures['pipeline_over_engine']['ratio']:.3f}")
    print(f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
