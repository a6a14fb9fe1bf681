"""Benchmark: the aigc-dist backfill (native and vLLM engines) against Ray Data LLM, side by side in one run.

All three generate copy for the same (user, item) pairs of one synthetic world, from the same checkpoint (the
`mini` preset, random weights, a Hugging Face directory), the same prompt token ids, greedy decoding to the
same `--new-tokens`, 2 engine instances of 1 logical CPU and 1 thread each, in one local Ray:

- native: `run_backfill`, engine.backend = "native" (aigc-dist's own engine in each generator actor);
- vllm: `run_backfill`, engine.backend = "vllm" (vLLM's offline engine in-process in each generator actor);
- rdllm: Ray Data LLM (`ray.data.llm.build_processor` on a `vLLMEngineProcessorConfig`), fed the prompt token
  ids the backfill renders (aigc-dist's `encode_prompt`, tokenize and chat-template stages off), its output
  written with `Dataset.write_parquet`.

Each side is timed from the call to its last file written: the backfill from `run_backfill` to its manifest
(partition, actor start, read, join, render, generate, evaluate, write, commit), Ray Data LLM from building
its dataset of pre-rendered prompts to `write_parquet` returning (rendering them is timed apart, not charged
to it). Ratio: the best aigc-dist backend's rows/s / Ray Data LLM's rows/s (goal >= 2), truncated to 2
decimals. The backfill's outputs are read back to show exactly-once still holds (each request_id once, all
of them, the manifest's ok/error counts); both sides' prompt token counts are checked against each other.

    .venv/bin/python benchmarks/backfill_vs_ray_data_llm.py [--rows 20000] [--new-tokens 64] [--quick]

Prints a table and writes benchmarks/results/backfill_vs_ray_data_llm.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from backfill_pipeline import pipeline

from aigc_dist.batch.inputs import stable_request_id
from aigc_dist.batch.layout import read_manifest, read_output
from aigc_dist.config import BackfillConfig, DataConfig, EngineConfig
from aigc_dist.data.prompts import PromptTemplate, encode_prompt, template_digest
from aigc_dist.demo.world import WorldConfig, make_world, write_world
from aigc_dist.engine.text import prompt_conditioning, prompt_template_of
from aigc_dist.models.artifact import load_artifact, save_text_artifact
from aigc_dist.models.llama import LlamaLM, lm_config_from_preset
from aigc_dist.models.tokenizer import byte_level_tokenizer
from aigc_dist.storage import Storage

RESULTS = Path(__file__).resolve().parent / "results" / "backfill_vs_ray_data_llm.json"
GOAL = 2.0
SIDES = ("native", "vllm", "rdllm")
TEMPLATE = PromptTemplate(user_fields=("segment", "locale"), item_fields=("title", "category"),
                          max_prompt_tokens=160)
KV_CACHE_GIB = 1


def truncate(x: float) -> float:
    """Two decimals, never rounded up (so 1.999 reads 1.99, not 2.00)."""
    return math.floor(x * 100) / 100


def build_inputs(work: Path, rows: int) -> tuple[str, DataConfig, list[dict[str, Any]], float]:
    """The checkpoint, the world on disk, and each candidate's prompt ids rendered by aigc-dist's own code."""
    torch.manual_seed(0)
    model = LlamaLM(lm_config_from_preset("mini"))  # head_dim 32: vLLM's CPU attention needs >= 32
    artifact = str(work / "copy-lm")
    save_text_artifact(artifact, model.eval(), Storage(), tokenizer=byte_level_tokenizer(),
                       conditioning=prompt_conditioning(TEMPLATE),
                       metadata={"name": "bench-rdllm", "version": "v1"})
    world = make_world(WorldConfig(num_users=max(1, math.ceil(rows / 10)), num_items=200, candidates_per_user=10,
                                   seed=0))
    world = dataclasses.replace(world, candidates=world.candidates.slice(0, rows))
    write_world(world, work / "world")
    data = DataConfig(users=str(work / "world/users.parquet"), items=str(work / "world/items.parquet"),
                      candidates=str(work / "world/candidates.parquet"))
    loaded = load_artifact(artifact, Storage())  # the template and tokenizer the engines read
    template, tokenizer = prompt_template_of(loaded), loaded.tokenizer
    users = {u["user_id"]: u for u in world.users.to_pylist()}
    items = {i["item_id"]: i for i in world.items.to_pylist()}
    salt, started = template_digest(template), time.perf_counter()
    prompts = [{"request_id": stable_request_id(c["user_id"], c["item_id"], salt), "user_id": c["user_id"],
                "item_id": c["item_id"],
                "tokenized_prompt": encode_prompt(users[c["user_id"]], items[c["item_id"]], template, tokenizer)}
               for c in world.candidates.to_pylist()]
    return artifact, data, prompts, time.perf_counter() - started


def eos_ids(artifact: str) -> list[int]:
    """The ids the backfill's engines stop at (TextEngine.eos_ids): the checkpoint's and the tokenizer's EOS."""
    loaded = load_artifact(artifact, Storage())
    eos = loaded.tokenizer.eos_id
    return sorted(set(loaded.model_config.eos_token_id) | ({eos} if eos is not None else set()))


def run_aigc(backend: str, work: Path, artifact: str, data: DataConfig, args: argparse.Namespace,
             prompts: list[dict[str, Any]]) -> dict[str, Any]:
    rows = len(prompts)
    backfill = BackfillConfig(
        run_id=f"bench-{backend}", output=str(work / "out"), artifact=artifact, batch_size=args.batch_size,
        min_actors=args.engines, max_actors=args.engines, cpus_per_actor=1, max_new_tokens=args.new_tokens,
        temperature=0.0, rows_per_file=max(1, rows // (args.engines * 4)), min_chars=0, progress_interval_s=30,
        engine=EngineConfig(backend=backend, vllm_kv_cache_gib=KV_CACHE_GIB))
    result = pipeline(backfill, data)  # benchmarks/backfill_pipeline.py: run_backfill, timed call to manifest
    root = str(work / "out" / backfill.run_id)
    manifest, (out, errors) = read_manifest(root, Storage()), read_output(root, Storage())
    ids = out.column("request_id").to_pylist()
    expected = {p["request_id"] for p in prompts}
    want = {(p["user_id"], p["item_id"]): len(p["tokenized_prompt"]) for p in prompts}
    got = {(r["user_id"], r["item_id"]): r["prompt_tokens"] for r in out.select(
        ["user_id", "item_id", "prompt_tokens"]).to_pylist()}
    counts = manifest["counts"]
    result.update(
        counts={k: counts[k] for k in ("total", "ok", "quarantined", "filtered")},
        exactly_once=len(ids) == len(set(ids)) == rows and set(ids) == expected and errors.num_rows == 0
        and counts["ok"] == rows,
        prompt_tokens_match=got == want, prompt_tokens=sum(got.values()),
        content={(r["user_id"], r["item_id"]): r["content"] for r in out.select(
            ["user_id", "item_id", "content"]).to_pylist()})
    return result


def _row(row: dict[str, Any]) -> dict[str, Any]:
    return {"request_id": row["aigc_request_id"], "user_id": row["user_id"], "item_id": row["item_id"],
            "content": row["generated_text"], "num_tokens": row["num_generated_tokens"],
            "prompt_tokens": row["num_input_tokens"]}


def run_rdllm(work: Path, artifact: str, args: argparse.Namespace, prompts: list[dict[str, Any]],
              stop_ids: list[int]) -> dict[str, Any]:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        model_source=artifact,
        engine_kwargs={"dtype": "float32", "max_model_len": lm_config_from_preset("mini").max_position_embeddings,
                       "max_num_seqs": args.batch_size, "enforce_eager": True, "seed": 0},
        batch_size=args.batch_size,
        concurrency=(args.engines, args.engines),  # a fixed pool of 2, as the backfill's min = max actors
        placement_group_config={"bundles": [{"CPU": 1}]},  # CPU only: else the engine stage waits for a GPU
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                                  "OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "WARNING"}},
        chat_template_stage=False, tokenize_stage=False,  # the prompts come as aigc-dist's token ids
        detokenize_stage=False,  # the engine detokenizes (sampling detokenize=True): text as the backfill has it
        log_engine_metrics=False,
    )
    sampling = {"temperature": 0.0, "max_tokens": args.new_tokens, "stop_token_ids": stop_ids, "detokenize": True}
    out_dir = work / "rdllm-out"
    # Ray Data LLM's engine stage writes its own `request_id` column (vLLM's per-batch counter) over the input's,
    # so the pair's id travels under another name and comes back in postprocess.
    table = pa.Table.from_pylist([{"aigc_request_id": p["request_id"], **{k: v for k, v in p.items()
                                                                         if k != "request_id"}} for p in prompts])
    started = time.perf_counter()
    processor = build_processor(config, preprocess=lambda row: {**row, "sampling_params": sampling},
                                postprocess=_row)
    blocks = [table.slice(i, args.batch_size) for i in range(0, table.num_rows, args.batch_size)]
    processor(ray.data.from_arrow(blocks)).write_parquet(str(out_dir))
    seconds = time.perf_counter() - started
    out = pq.read_table(out_dir)
    rows, tokens = out.num_rows, pc.sum(out["num_tokens"]).as_py() or 0
    ids = out.column("request_id").to_pylist()
    want = {(p["user_id"], p["item_id"]): len(p["tokenized_prompt"]) for p in prompts}
    got = {(r["user_id"], r["item_id"]): r["prompt_tokens"] for r in out.select(
        ["user_id", "item_id", "prompt_tokens"]).to_pylist()}
    return {"rows": rows, "tokens": tokens, "seconds": seconds, "rows_per_s": rows / seconds,
            "tokens_per_s": tokens / seconds, "data_files": len(list(out_dir.glob("*.parquet"))),
            "each_request_once": len(ids) == len(set(ids)) == len(prompts),
            "prompt_tokens_match": got == want, "prompt_tokens": sum(got.values()),
            "content": {(r["user_id"], r["item_id"]): r["content"] for r in out.select(
                ["user_id", "item_id", "content"]).to_pylist()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000, help="(user, item) pairs; >= 20,000 for a real run")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per row")
    parser.add_argument("--batch-size", type=int, default=64, help="backfill batch_size = vLLM max_num_seqs = "
                        "Ray Data LLM batch_size")
    parser.add_argument("--engines", type=int, default=2, help="engine instances of 1 CPU each, per side")
    parser.add_argument("--order", default="native,vllm,rdllm", help="comma-separated order of the sides")
    parser.add_argument("--quick", action="store_true", help="smoke run: 400 rows, 16 new tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.new_tokens = 400, 16
    order = [s.strip() for s in args.order.split(",")]
    if sorted(order) != sorted(SIDES):
        parser.error(f"--order must name each of {', '.join(SIDES)} once")

    import ray
    import vllm

    work = Path(tempfile.mkdtemp(prefix="bench-rdllm-"))
    ray_tmp = Path("/tmp") / f"ray-bench-{os.getpid()}"  # short: Ray's socket paths have a length limit
    try:
        artifact, data, prompts, render_seconds = build_inputs(work, args.rows)
        stop_ids = eos_ids(artifact)
        # Logical CPUs beyond the engines: Ray Data's read and map tasks need their own, or it deadlocks.
        ray.init(num_cpus=max(2 * args.engines + 3, 4), include_dashboard=False, log_to_driver=False,
                 _temp_dir=str(ray_tmp))
        runs: dict[str, dict[str, Any]] = {}
        for side in order:
            if side == "rdllm":
                runs[side] = run_rdllm(work, artifact, args, prompts, stop_ids)
            else:
                runs[side] = run_aigc(side, work, artifact, data, args, prompts)
            print(f"  {side:<7} {runs[side]['seconds']:7.1f} s  {runs[side]['rows_per_s']:7.1f} rows/s", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    contents = {side: runs[side].pop("content") for side in SIDES}
    same = {side: sum(contents[side].get(k) == v for k, v in contents["native"].items()) / len(prompts)
            for side in ("vllm", "rdllm")}
    best = max(("native", "vllm"), key=lambda s: runs[s]["rows_per_s"])
    ratio = runs[best]["rows_per_s"] / runs["rdllm"]["rows_per_s"]
    ratios = {s: truncate(runs[s]["rows_per_s"] / runs["rdllm"]["rows_per_s"]) for s in ("native", "vllm")}
    met = truncate(ratio) >= GOAL
    prompt_match = runs["native"]["prompt_tokens"] == runs["vllm"]["prompt_tokens"] == runs["rdllm"]["prompt_tokens"]
    result = {
        "rows": len(prompts), "new_tokens": args.new_tokens, "batch_size": args.batch_size, "engines": args.engines,
        "cpus_per_engine": 1, "threads_per_engine": 1, "sampling": "greedy (temperature 0), EOS stops",
        "model": "lm mini preset (random weights, torch.manual_seed(0))", "order": order, "quick": args.quick,
        "runs": runs, "rdllm_prompt_render_seconds_not_timed": render_seconds,
        "same_copy_as_native": same, "prompt_tokens_match_across_sides": prompt_match,
        "best_aigc_backend": best, "ratio": truncate(ratio), "ratios_vs_rdllm": ratios, "goal": GOAL,
        "meets_goal": met,
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "torch": torch.__version__,
                    "ray": ray.__version__, "vllm": vllm.__version__, "python": platform.python_version()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    print(f"aigc-dist backfill vs Ray Data LLM: {len(prompts):,} rows, {args.engines} engines x 1 CPU x 1 thread "
          f"per side, batch {args.batch_size}, greedy, {args.new_tokens} new tokens; order {', '.join(order)}")
    print(f"{'':<22}{'seconds':>9}{'rows/s':>9}{'tokens/s':>10}{'tokens':>10}{'ok/err':>12}{'once':>6}"
          f"{'x rdllm':>9}")
    labels = {"native": "backfill native", "vllm": "backfill vllm", "rdllm": "Ray Data LLM"}
    for side in SIDES:
        r = runs[side]
        counts = f"{r['counts']['ok']}/{r['counts']['quarantined'] + r['counts']['filtered']}" if "counts" in r \
            else f"{r['rows']}/-"
        once = r.get("exactly_once", r.get("each_request_once"))
        times = f"{ratios[side]:.2f}" if side in ratios else "1.00"
        print(f"{labels[side]:<22}{r['seconds']:>9.1f}{r['rows_per_s']:>9.1f}{r['tokens_per_s']:>10.0f}"
              f"{r['tokens']:>10}{counts:>12}{'yes' if once else 'NO':>6}{times:>9}")
    print(f"ratio best aigc-dist ({best}) / Ray Data LLM rows/s = {truncate(ratio):.2f} (goal >= {GOAL:.0f}) "
          f"{'met' if met else 'not met'}; prompt tokens match: {'yes' if prompt_match else 'NO'}; "
          f"same copy as native: vllm {same['vllm']:.1%}, rdllm {same['rdllm']:.1%}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
