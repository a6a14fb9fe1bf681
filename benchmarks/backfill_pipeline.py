"""Benchmark: the whole backfill pipeline against the bare engine, side by side in one run.

Both sides generate copy for the same candidates of one synthetic world with the same artifact,
sampling, batch size and number of 1-CPU generator actors:

- engine only: plain Ray actors with the artifact already loaded, fed pre-joined requests held in
  memory, timed from the first call to the last result (no reading, joining, evaluating, writing);
- pipeline: `run_backfill` timed from call to manifest: partition pass, item broadcast, actor start,
  prepare, generate, evaluate, write parquet, commit, manifest.

Each side runs twice, in the order engine, pipeline, pipeline, engine (the machine is shared and its
load drifts); each side's rows/s is its total rows over its total seconds.

The ratio pipeline rows/s / engine rows/s is the share of the engine's throughput the pipeline
keeps (goal >= 0.85). Also reported: rows/s, tokens/s and output objects per million rows.

    .venv/bin/python benchmarks/backfill_pipeline.py [--users 2000] [--actors 2] [--max-new-tokens 48]

Prints a table and writes benchmarks/results/backfill_pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from aigc_dist.batch.inputs import stable_request_id
from aigc_dist.batch.pipeline import run_backfill
from aigc_dist.batch.shards import row_seed
from aigc_dist.config import BackfillConfig, DataConfig, StorageConfig
from aigc_dist.data.prompts import PromptTemplate, template_digest
from aigc_dist.demo.world import WorldConfig, make_world, write_world
from aigc_dist.engine.text import SamplingParams, TextEngine, TextRequest, prompt_conditioning
from aigc_dist.models.artifact import load_artifact, save_text_artifact
from aigc_dist.models.llama import LlamaLM, lm_config_from_preset
from aigc_dist.storage import Storage

RESULTS = Path(__file__).resolve().parent / "results" / "backfill_pipeline.json"
GOAL = 0.85


class EngineActor:
    """The baseline: the shared engine in a 1-CPU actor, nothing around it."""

    def __init__(self, artifact: str, batch_size: int):
        torch.set_num_threads(1)
        self.engine = TextEngine(load_artifact(artifact, Storage()), max_batch_size=batch_size)

    def generate(self, requests: list[TextRequest]) -> tuple[int, int]:
        results = self.engine.generate(requests)
        return len(results), sum(r.num_tokens for r in results)


def engine_only(artifact: str, requests: list[TextRequest], actors: int, batch_size: int, chunk: int) -> dict:
    import ray
    from ray.util import ActorPool

    remote = ray.remote(num_cpus=1)(EngineActor)
    pool_actors = [remote.remote(artifact, batch_size) for _ in range(actors)]
    ray.get([a.__ray_ready__.remote() for a in pool_actors])  # artifacts loaded before the clock starts
    chunks = [requests[i : i + chunk] for i in range(0, len(requests), chunk)]
    started = time.perf_counter()
    done = list(ActorPool(pool_actors).map_unordered(lambda a, c: a.generate.remote(c), chunks))
    seconds = time.perf_counter() - started
    for actor in pool_actors:
        ray.kill(actor)
    rows, tokens = sum(d[0] for d in done), sum(d[1] for d in done)
    return {"rows": rows, "tokens": tokens, "seconds": seconds, "rows_per_s": rows / seconds,
            "tokens_per_s": tokens / seconds}


def engine_requests(world: Any, template: PromptTemplate, max_new_tokens: int) -> list[TextRequest]:
    """The world's candidates as the backfill generates them: joined, with the backfill's per-row seeds."""
    users = {u["user_id"]: u for u in world.users.to_pylist()}
    items = {i["item_id"]: i for i in world.items.to_pylist()}
    salt, sampling = template_digest(template), SamplingParams(max_new_tokens, 0.8)
    return [TextRequest(users[c["user_id"]], items[c["item_id"]],
                        row_seed(0, stable_request_id(c["user_id"], c["item_id"], salt)), sampling)
            for c in world.candidates.to_pylist()]


def pipeline(backfill: BackfillConfig, data: DataConfig) -> dict:
    started = time.perf_counter()
    manifest = run_backfill(backfill, data, StorageConfig())
    seconds = time.perf_counter() - started
    rows, tokens = manifest["counts"]["total"], manifest["tokens"]["generated"]
    return {"rows": rows, "tokens": tokens, "seconds": seconds, "rows_per_s": rows / seconds,
            "tokens_per_s": tokens / seconds, "objects_per_million_rows": manifest["objects_per_million_rows"],
            "data_files": len(manifest["files"]["data"]), "stage_seconds": manifest["timings"]["stage_seconds"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=2000, help="users x 10 candidates = rows")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--shards-per-actor", type=int, default=4, help="rows_per_file = rows / (actors x this)")
    args = parser.parse_args(argv)

    import ray

    work = Path(tempfile.mkdtemp(prefix="backfill-bench-"))
    world = make_world(WorldConfig(num_users=args.users, num_items=500, candidates_per_user=10, seed=0))
    write_world(world, work / "world")
    template = PromptTemplate(max_field_chars=32, max_prompt_tokens=160)
    torch.manual_seed(0)
    model = LlamaLM(lm_config_from_preset("tiny"))
    artifact = str(work / "copy-lm")
    save_text_artifact(artifact, model, Storage(), conditioning=prompt_conditioning(template),
                       metadata={"name": "bench", "version": "v1"})
    rows = world.candidates.num_rows
    shard_rows = max(1, rows // (args.actors * args.shards_per_actor))
    backfill = BackfillConfig(run_id="bench", output=str(work / "out"), artifact=artifact, batch_size=args.batch_size,
                              min_actors=args.actors, max_actors=args.actors, max_new_tokens=args.max_new_tokens,
                              temperature=0.8, rows_per_file=shard_rows, min_chars=0, progress_interval_s=30)
    data = DataConfig(users=str(work / "world/users.parquet"), items=str(work / "world/items.parquet"),
                      candidates=str(work / "world/candidates.parquet"))
    requests = engine_requests(world, template, args.max_new_tokens)

    needed = args.actors * 2 + 3  # generators + preparers + tasks: never starve the read tasks
    ray.init(num_cpus=max(needed, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    # A-B-B-A: the machine is shared and its load drifts; this order cancels a linear drift.
    runs: dict[str, list[dict]] = {"engine_only": [], "pipeline": []}
    for k, side in enumerate(("engine_only", "pipeline", "pipeline", "engine_only")):
        if side == "engine_only":
            runs[side].append(engine_only(artifact, requests, args.actors, args.batch_size, shard_rows))
        else:
            runs[side].append(pipeline(backfill.model_copy(update={"run_id": f"bench-{k}"}), data))
        print(f"  {side:<12} {runs[side][-1]['seconds']:7.1f} s  {runs[side][-1]['rows_per_s']:7.1f} rows/s",
              flush=True)
    ray.shutdown()

    def total(side: str) -> dict[str, float]:
        seconds = sum(r["seconds"] for r in runs[side])
        return {"seconds": seconds, "rows_per_s": sum(r["rows"] for r in runs[side]) / seconds,
                "tokens_per_s": sum(r["tokens"] for r in runs[side]) / seconds}

    engine, full = total("engine_only"), total("pipeline")
    objects = runs["pipeline"][0]["objects_per_million_rows"]
    ratio = full["rows_per_s"] / engine["rows_per_s"]
    result = {
        "rows": rows, "actors": args.actors, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "rows_per_file": shard_rows, "model": "lm tiny preset (untrained)",
        "order": "engine, pipeline, pipeline, engine",
        "engine_only": engine, "pipeline": {**full, "objects_per_million_rows": objects}, "runs": runs,
        "ratio": ratio, "goal": GOAL, "meets_goal": ratio >= GOAL,
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "torch": torch.__version__,
                    "ray": ray.__version__, "python": platform.python_version()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    print(f"backfill pipeline vs engine only: {rows:,} rows, {args.actors} actors x 1 CPU, batch {args.batch_size}, "
          f"{args.max_new_tokens} new tokens, rows_per_file {shard_rows:,}; two runs each, A-B-B-A")
    print(f"{'':<14}{'seconds':>9}{'rows/s':>9}{'tokens/s':>10}{'objects/1M rows':>17}")
    print(f"{'engine only':<14}{engine['seconds']:>9.1f}{engine['rows_per_s']:>9.1f}{engine['tokens_per_s']:>10.0f}"
          f"{'-':>17}")
    print(f"{'pipeline':<14}{full['seconds']:>9.1f}{full['rows_per_s']:>9.1f}{full['tokens_per_s']:>10.0f}"
          f"{objects:>17.0f}")
    print(f"ratio pipeline / engine = {ratio:.3f} (goal >= {GOAL}) {'MET' if ratio >= GOAL else 'NOT MET'}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
