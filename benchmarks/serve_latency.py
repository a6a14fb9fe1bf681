"""Benchmark: what Ray Serve adds to a request, and what dynamic batching buys at saturation.

One local Ray and Serve, one artifact, one replica with 1 CPU (torch at 1 thread, as the benchmark
process's direct engine calls):

- overhead: the same request, sent one at a time, through HTTP (proxy -> FastAPI ingress ->
  @serve.batch -> engine) and through `TextEngine.generate` in this process, interleaved request
  by request so both see the same machine load. Overhead = the percentiles of each request's HTTP
  latency minus the direct call's right after it, p50 and p99 (goal: p50 <= 5 ms on this machine).
  Also interleaved: the same POST to a bare Serve app (FastAPI ingress, no middleware, a constant
  answer): what Ray Serve itself costs a POST, with none of our code.
- batching gain: requests/s of a saturating closed-loop load (many concurrent clients, each sending
  its next request when the previous one is answered) against the app with `max_batch_size` N and
  against the same app with `max_batch_size` 1, in the order batched, unbatched, unbatched, batched
  (goal >= 3x).

    .venv/bin/python benchmarks/serve_latency.py [--requests 200] [--clients 32] [--seconds 20]

Prints a table and writes benchmarks/results/serve_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests
import torch
from fastapi import FastAPI
from ray import serve

from aigc_dist.config import AigcConfig
from aigc_dist.data.prompts import PromptTemplate
from aigc_dist.engine.text import SamplingParams, TextEngine, TextRequest, prompt_conditioning
from aigc_dist.models.artifact import load_artifact, save_text_artifact
from aigc_dist.models.llama import LlamaLM, lm_config_from_preset
from aigc_dist.storage import Storage

RESULTS = Path(__file__).resolve().parent / "results" / "serve_latency.json"
OVERHEAD_GOAL_MS = 5.0
BATCHING_GOAL = 3.0
USER = {"segment": "trail runner", "locale": "en-US"}
ITEM = {"title": "Ridge trail shoe", "category": "shoes"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


bare_api = FastAPI()


@serve.deployment(name="Bare")
@serve.ingress(bare_api)
class BareApp:
    """Ray Serve with nothing of ours: a FastAPI ingress without middlewares whose POST route answers a
    constant (the floor any Serve app pays for a POST with this body on this machine). No parameters:
    with this module's string annotations FastAPI would take a `Request` parameter for a query field."""

    @bare_api.post("/echo")
    async def echo(self):  # noqa: ANN201 - FastAPI reads annotations at run time (see the docstring)
        return {"ok": True}


def overhead(url: str, floor_url: str, engine: TextEngine, count: int, max_new_tokens: int) -> dict[str, Any]:
    body = {"requests": [{"user": USER, "item": ITEM, "seed": 7, "max_new_tokens": max_new_tokens,
                          "temperature": 0}]}
    request = TextRequest(USER, ITEM, 7, SamplingParams(max_new_tokens=max_new_tokens, temperature=0))
    http_ms, direct_ms, floor_ms = [], [], []
    with requests.Session() as session:
        for _ in range(10):  # warm both paths (connections, allocator, caches)
            session.post(f"{url}/v1/generate", json=body, timeout=60).raise_for_status()
            engine.generate([request])
        for _ in range(count):
            started = time.perf_counter()
            answer = session.post(f"{url}/v1/generate", json=body, timeout=60)
            http_ms.append((time.perf_counter() - started) * 1000)
            answer.raise_for_status()
            started = time.perf_counter()
            direct = engine.generate([request])[0]
            direct_ms.append((time.perf_counter() - started) * 1000)
            # Ray Serve's own floor for a POST: the same body to the bare app (no code of ours at all).
            started = time.perf_counter()
            session.post(f"{floor_url}/echo", json=body, timeout=60).raise_for_status()
            floor_ms.append((time.perf_counter() - started) * 1000)
    assert answer.json()["results"][0]["content"] == direct.text, "Serve and the engine disagree"
    # Each HTTP request is paired with the direct call right after it (same load): the overhead's
    # percentiles are those of the per-request differences, not differences of two percentiles.
    added = [h - d for h, d in zip(http_ms, direct_ms, strict=True)]
    return {"requests": count, "tokens_per_request": direct.num_tokens,
            "http_p50_ms": statistics.median(http_ms), "http_p99_ms": _percentile(http_ms, 0.99),
            "direct_p50_ms": statistics.median(direct_ms), "direct_p99_ms": _percentile(direct_ms, 0.99),
            "serve_floor_p50_ms": statistics.median(floor_ms), "serve_floor_p99_ms": _percentile(floor_ms, 0.99),
            "overhead_p50_ms": statistics.median(added), "overhead_p99_ms": _percentile(added, 0.99)}


def saturate(url: str, clients: int, seconds: float, max_new_tokens: int) -> dict[str, Any]:
    """Closed loop: `clients` threads, each with its own connection, for `seconds`."""
    done, failed = [0] * clients, [0] * clients
    stop = threading.Event()

    def client(index: int) -> None:
        body = {"requests": [{"user": USER, "item": ITEM, "seed": index, "max_new_tokens": max_new_tokens,
                              "temperature": 0.8}]}
        with requests.Session() as session:
            while not stop.is_set():
                if session.post(f"{url}/v1/generate", json=body, timeout=120).status_code == 200:
                    done[index] += 1
                else:
                    failed[index] += 1

    first = requests.get(f"{url}/v1/models", timeout=30).json()["stats"]
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)  # let the queue fill before counting
    before, started = sum(done), time.perf_counter()
    time.sleep(seconds)
    answered, elapsed = sum(done) - before, time.perf_counter() - started
    stop.set()
    for thread in threads:
        thread.join()
    last = requests.get(f"{url}/v1/models", timeout=30).json()["stats"]
    decoded, batches = (last.get(k, 0) - first.get(k, 0) for k in ("text_requests", "text_batches"))
    return {"requests_per_s": answered / elapsed, "answered": answered, "failed": sum(failed),
            "mean_batch": decoded / max(1, batches)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="sequential requests for the overhead")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients at saturation")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per saturation run")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    import ray

    from aigc_dist.serve.app import application

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    torch.manual_seed(0)
    template = PromptTemplate(user_fields=("segment", "locale"), item_fields=("title", "category"))
    model = LlamaLM(lm_config_from_preset("mini"))  # the demo's size
    artifact = str(work / "copy-lm")
    save_text_artifact(artifact, model, Storage(), conditioning=prompt_conditioning(template),
                       metadata={"name": "bench", "version": "v1"})
    torch.set_num_threads(1)  # as the replica (1 CPU)
    engine = TextEngine(load_artifact(artifact, Storage()))

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    def deploy(name: str, max_batch_size: int) -> str:
        cfg = AigcConfig.model_validate({"serve": {
            "artifact": artifact, "max_batch_size": max_batch_size, "batch_wait_timeout_s": 0.0,
            "max_ongoing_requests": max(64, args.clients * 2), "max_queued_requests": -1,
            "cpus_per_replica": 1, "max_new_tokens_cap": args.max_new_tokens}})
        serve.run(application(cfg), name=name, route_prefix=f"/{name}")
        return f"http://127.0.0.1:{port}/{name}"

    batched_url, single_url = deploy("batched", args.max_batch_size), deploy("single", 1)
    serve.run(BareApp.options(ray_actor_options={"num_cpus": 1}).bind(), name="bare", route_prefix="/bare")
    latency = overhead(batched_url, f"http://127.0.0.1:{port}/bare", engine, args.requests, args.max_new_tokens)
    print(f"  overhead p50 {latency['overhead_p50_ms']:.2f} ms, p99 {latency['overhead_p99_ms']:.2f} ms", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {"batched": [], "single": []}
    for side in ("batched", "single", "single", "batched"):
        url = batched_url if side == "batched" else single_url
        runs[side].append(saturate(url, args.clients, args.seconds, args.max_new_tokens))
        print(f"  {side:<8} {runs[side][-1]['requests_per_s']:7.1f} req/s", flush=True)
    serve.shutdown()
    ray.shutdown()

    rate = {side: statistics.mean(r["requests_per_s"] for r in runs[side]) for side in runs}
    gain = rate["batched"] / rate["single"]
    result = {
        "model": "lm mini preset (Llama, 2 layers, hidden 128, 436k params, untrained)", "replica_cpus": 1,
        "max_new_tokens": args.max_new_tokens, "overhead": latency, "clients": args.clients,
        "max_batch_size": args.max_batch_size, "saturation_runs": runs, "requests_per_s": rate,
        "batching_gain": gain, "goals": {"overhead_p50_ms": OVERHEAD_GOAL_MS, "batching_gain": BATCHING_GOAL},
        "meets_goals": {"overhead_p50": latency["overhead_p50_ms"] <= OVERHEAD_GOAL_MS,
                        "batching_gain": gain >= BATCHING_GOAL},
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "torch": torch.__version__,
                    "ray": ray.__version__, "python": platform.python_version()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    print(f"serve: 1 replica x 1 CPU, {args.max_new_tokens} new tokens; overhead over {args.requests} sequential "
          f"requests; saturation with {args.clients} clients, {args.seconds:.0f} s per run, A-B-B-A")
    print("| measure | value | goal |\n| --- | --- | --- |")
    print(f"| overhead p50 (per request: HTTP - the direct call after it; HTTP p50 {latency['http_p50_ms']:.1f} ms, "
          f"direct p50 {latency['direct_p50_ms']:.1f} ms) | {latency['overhead_p50_ms']:.2f} ms | "
          f"<= {OVERHEAD_GOAL_MS:.0f} ms |")
    print(f"| overhead p99 (per request) | {latency['overhead_p99_ms']:.2f} ms | - |")
    print(f"| Ray Serve's floor: a POST to a bare FastAPI app (no middleware, constant answer), p50 / p99 | "
          f"{latency['serve_floor_p50_ms']:.2f} / {latency['serve_floor_p99_ms']:.2f} ms | - |")
    print(f"| batching: {rate['batched']:.1f} req/s (max_batch_size {args.max_batch_size}, mean batch "
          f"{runs['batched'][-1]['mean_batch']:.1f}) / {rate['single']:.1f} req/s (max_batch_size 1) "
          f"| {gain:.2f}x | >= {BATCHING_GOAL:.0f}x |")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
