"""Benchmark: continuous against static batching, side by side in one run.

The same requests go through the engine's decode loop (`lm_decode.decode_stream`, what `TextEngine`
runs) twice: with iteration-level scheduling (a slot freed by a finished request takes the next one
at once; `TextEngine(scheduling="continuous")`) and with static batching (batches of `--slots`
requests in arrival order, each run until its longest request ends; `scheduling="static"`, which is
also what Hugging Face's `generate()` does with a batch).

Output lengths are heavy-tailed like real copy: drawn from a log-normal (sigma 1) scaled to a mean of
about 180 tokens and cut at 1024; every request ends exactly at its drawn length (max_new_tokens, no
EOS, greedy), so both sides do the same useful work. Useful tokens/s = generated tokens / seconds.
Model: the `small` preset (random weights) with its context raised to prompt + 1024 (rope: no new
parameters). Seconds are the process's CPU seconds (`time.process_time`; with one thread, tokens
per CPU second is tokens/s per core), so other users' load on the shared machine does not count;
wall-clock seconds are in the JSON too. One run each, static first; `--repeats 2` runs static,
continuous, continuous, static (cancels a drift in the machine's load) and sums each side's figures.

    .venv/bin/python benchmarks/engine_batching.py [--requests 96] [--slots 32] [--threads 1]

Prints a table and writes benchmarks/results/engine_batching.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from aigc_dist.engine.cpu_layout import prepare_for_decode
from aigc_dist.engine.decode import DecodeRequest, decode_stream
from aigc_dist.models.llama import LlamaLM, lm_config_from_preset

RESULTS = Path(__file__).resolve().parent / "results" / "engine_batching.json"
GOAL = 1.5
MAX_NEW = 1024


def heavy_tailed_lengths(n: int, mean: float, seed: int) -> list[int]:
    """Log-normal (sigma 1) lengths with the given mean before the cut at MAX_NEW, at least 1."""
    g = torch.Generator().manual_seed(seed)
    sigma = 1.0
    mu = math.log(mean) - sigma**2 / 2
    draws = torch.exp(mu + sigma * torch.randn(n, generator=g, dtype=torch.float64))
    return [int(min(MAX_NEW, max(1, round(x)))) for x in draws.tolist()]


def run(model: LlamaLM, requests: list[DecodeRequest], slots: int, refill: bool) -> dict[str, float]:
    tokens = 0
    started, cpu = time.perf_counter(), time.process_time()
    for index, out in decode_stream(model, requests, slots=slots, refill=refill,
                                    max_len=max(len(r.prompt) + r.max_new_tokens for r in requests)):
        assert len(out) == requests[index].max_new_tokens
        tokens += len(out)
    seconds, wall = time.process_time() - cpu, time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "wall_seconds": wall, "tokens_per_s": tokens / seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--slots", type=int, default=32, help="batch size (decode slots)")
    parser.add_argument("--mean", type=float, default=180.0, help="mean output length before the cut")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the actor's CPU share)")
    parser.add_argument("--repeats", type=int, default=1, choices=[1, 2])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = prepare_for_decode(LlamaLM(lm_config_from_preset("small", max_position_embeddings=args.prompt + MAX_NEW)))
    lengths = heavy_tailed_lengths(args.requests, args.mean, seed=1)
    g = torch.Generator().manual_seed(2)
    requests = [DecodeRequest([1, *torch.randint(0, 256, (args.prompt - 1,), generator=g).tolist()], n,
                              temperature=0) for n in lengths]  # fmt: skip
    run(model, requests[:4], 4, True)  # warm-up
    runs: dict[str, list[dict[str, float]]] = {"static": [], "continuous": []}
    order = ("static", "continuous", "continuous", "static")[: 2 * args.repeats]
    for side in order:
        runs[side].append(run(model, requests, args.slots, refill=side == "continuous"))
        print(f"  {side:<10} {runs[side][-1]['seconds']:7.1f} CPU s ({runs[side][-1]['wall_seconds']:.1f} s wall)  "
              f"{runs[side][-1]['tokens_per_s']:7.0f} tokens per CPU second", flush=True)

    def total(side: str) -> dict[str, float]:
        seconds = sum(r["seconds"] for r in runs[side])
        return {"seconds": seconds, "tokens_per_s": sum(r["tokens"] for r in runs[side]) / seconds}

    static, continuous = total("static"), total("continuous")
    ratio = continuous["tokens_per_s"] / static["tokens_per_s"]
    # Static batching's wasted row-steps: every batch runs as long as its longest request.
    batches = [lengths[i : i + args.slots] for i in range(0, len(lengths), args.slots)]
    static_row_steps = sum(len(b) * max(b) for b in batches)
    print(f"\ncontinuous vs static batching: {args.requests} requests, {args.slots} slots, prompt {args.prompt}, "
          f"output lengths log-normal mean {sum(lengths) / len(lengths):.0f} (median "
          f"{sorted(lengths)[len(lengths) // 2]}, max {max(lengths)}), small LM, {args.threads} thread(s)\n")
    print("| batching | CPU seconds | useful tokens/s (per CPU second) | ratio | goal | met |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| static (batch runs to its longest row) | {static['seconds']:.1f} | {static['tokens_per_s']:,.0f} | "
          f"1.00 | | |")
    print(f"| continuous (slots refill at once) | {continuous['seconds']:.1f} | {continuous['tokens_per_s']:,.0f} | "
          f"{ratio:.2f} | >= {GOAL:g} | {'yes' if ratio >= GOAL else 'no'} |")
    print(f"\nstatic batching keeps {sum(lengths) / static_row_steps:.0%} of its row-steps useful; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    result = {
        "model": "lm small preset (Llama, GQA 6/2 heads, random weights), context prompt + 1024",
        "requests": args.requests,
        "slots": args.slots, "prompt": args.prompt, "threads": args.threads,
        "lengths": {"distribution": "log-normal sigma 1, cut at [1, 1024]", "mean": sum(lengths) / len(lengths),
                    "max": max(lengths), "values": lengths},
        "order": ", ".join(order), "static": static, "continuous": continuous,
        "runs": runs, "static_useful_row_step_share": sum(lengths) / static_row_steps,
        "ratio": ratio, "goal": GOAL, "meets_goal": ratio >= GOAL,
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
