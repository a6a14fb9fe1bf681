"""Benchmark: what Ray Serve adds to a request, and what dynamic batching buys at saturation.

One local Ray and Serve, one artifact, one replica with 1 CPU (torch at 1 thread, as the benchmark
process's direct engine calls):

- overhead: the same request, sent one at a time, through HTTP (proxy -> FastAPI ingress ->
  @serve.batch -> engine) and through `TextEngine.generate` in this process, interleaved request
  by request so both see the same machine load. Overhead = the percentiles of each request's HTTP
  latency minus the direct call's right after it, p50 and p99 (goal: p50 <= 5 ms on this machine).
  Also interleaved: the same POST to a bare Serve app (FastAPI ingress, no middleware, a constant
  answer): what Ray Serve itself costs a POST, with none of our code.
  The OpenAI routes in the same interleaving: POST /v1/completions and /v1/chat/completions with the
  aigc extension (the same prompt, seed and sampling, so the same copy), each against the same
  direct call. Time to first token when streaming: from the POST to the first chunk with text of a
  streamed chat completion, against the direct `TextEngine.stream` call's first delta with text.
- batching gain: requests/s of a saturating closed-loop load (many concurrent clients, each sending
  its next request when the previous one is answered) against the app with `max_batch_size` N and
  against the same app with `max_batch_size` 1, in the order batched, unbatched, unbatched, batched
  (goal >= 3x); for /v1/generate and for /v1/chat/completions (non-streamed and streamed).

    .venv/bin/python benchmarks/serve_latency.py [--requests 200] [--clients 32] [--seconds 15]

Prints a table and writes benchmarks/results/serve_latency.json (`--output` elsewhere: a short check
run must not replace the recorded result).
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


ROUTES = ("generate", "completions", "chat")  # measured against the same direct call


def _call(route: str, seed: int, max_new_tokens: int, temperature: float, stream: bool = False
          ) -> tuple[str, dict[str, Any]]:
    """(path, body) of one request for the benchmark's (user, item) on `route`: the same prompt everywhere."""
    if route == "generate":
        return "/v1/generate", {"requests": [{"user": USER, "item": ITEM, "seed": seed,
                                              "max_new_tokens": max_new_tokens, "temperature": temperature}]}
    body: dict[str, Any] = {"model": "bench", "seed": seed, "max_tokens": max_new_tokens, "temperature": temperature,
                            "aigc": {"user": USER, "item": ITEM}, "stream": stream}
    if route == "chat":
        return "/v1/chat/completions", {**body, "messages": []}
    return "/v1/completions", body


def _text(route: str, answer: requests.Response) -> str:
    body = answer.json()
    if route == "generate":
        return body["results"][0]["content"]
    choice = body["choices"][0]
    return choice["message"]["content"] if route == "chat" else choice["text"]


FIRST_TOKEN_SEED, FIRST_TOKEN_TEMPERATURE = 7, 0.8  # sampled: the untrained model's greedy copy here is empty


def _first_token_ms(session: requests.Session, url: str, max_new_tokens: int) -> float:
    """From the POST of a streamed chat completion to its first chunk with text (or its end, if it has none)."""
    path, body = _call("chat", FIRST_TOKEN_SEED, max_new_tokens, FIRST_TOKEN_TEMPERATURE, stream=True)
    started = time.perf_counter()
    first = None
    with session.post(f"{url}{path}", json=body, stream=True, timeout=60) as answer:
        answer.raise_for_status()
        for line in answer.iter_lines():
            choices = json.loads(line[6:])["choices"] if first is None and line.startswith(b"data: {") else []
            if choices and (choices[0]["delta"].get("content") or choices[0]["finish_reason"]):
                first = (time.perf_counter() - started) * 1000
    assert first is not None, "the stream ended without a last chunk"
    return first


def _direct_first_token_ms(engine: TextEngine, max_new_tokens: int) -> float:
    """The same in this process: `TextEngine.stream` up to its first delta (one with text, or the last)."""
    request = TextRequest(USER, ITEM, FIRST_TOKEN_SEED, SamplingParams(max_new_tokens=max_new_tokens,
                                                                       temperature=FIRST_TOKEN_TEMPERATURE))
    started = time.perf_counter()
    next(iter(engine.stream([request])))
    return (time.perf_counter() - started) * 1000


def _percentiles(name: str, values: list[float]) -> dict[str, float]:
    return {f"{name}_p50_ms": statistics.median(values), f"{name}_p99_ms": _percentile(values, 0.99)}


def overhead(url: str, floor_url: str, engine: TextEngine, count: int, max_new_tokens: int) -> dict[str, Any]:
    request = TextRequest(USER, ITEM, 7, SamplingParams(max_new_tokens=max_new_tokens, temperature=0))
    http_ms: dict[str, list[float]] = {route: [] for route in ROUTES}
    direct_ms, floor_ms, ttft_ms, direct_ttft_ms = [], [], [], []
    texts: dict[str, str] = {}
    with requests.Session() as session:
        for _ in range(10):  # warm every path (connections, allocator, caches)
            for route in ROUTES:
                path, body = _call(route, 7, max_new_tokens, 0)
                session.post(f"{url}{path}", json=body, timeout=60).raise_for_status()
            engine.generate([request])
        for _ in range(count):
            for route in ROUTES:
                path, body = _call(route, 7, max_new_tokens, 0)
                started = time.perf_counter()
                answer = session.post(f"{url}{path}", json=body, timeout=60)
                http_ms[route].append((time.perf_counter() - started) * 1000)
                answer.raise_for_status()
                texts[route] = _text(route, answer)
            started = time.perf_counter()
            direct = engine.generate([request])[0]
            direct_ms.append((time.perf_counter() - started) * 1000)
            # Ray Serve's own floor for a POST: the same body to the bare app (no code of ours at all).
            started = time.perf_counter()
            session.post(f"{floor_url}/echo", json=_call("generate", 7, max_new_tokens, 0)[1],
                         timeout=60).raise_for_status()
            floor_ms.append((time.perf_counter() - started) * 1000)
            ttft_ms.append(_first_token_ms(session, url, max_new_tokens))
            direct_ttft_ms.append(_direct_first_token_ms(engine, max_new_tokens))
    assert set(texts.values()) == {direct.text}, f"Serve's routes and the engine disagree: {texts} {direct.text!r}"
    result: dict[str, Any] = {"requests": count, "tokens_per_request": direct.num_tokens,
                              **_percentiles("direct", direct_ms), **_percentiles("serve_floor", floor_ms)}
    # Each HTTP request is paired with the direct call of its round (same load): the overhead's
    # percentiles are those of the per-request differences, not differences of two percentiles.
    for route in ROUTES:
        prefix = "" if route == "generate" else f"{route}_"
        result.update(_percentiles(f"{prefix}http", http_ms[route]))
        result.update(_percentiles(f"{prefix}overhead", [h - d for h, d in zip(http_ms[route], direct_ms,
                                                                                   strict=True)]))
    result.update(_percentiles("stream_first_token", ttft_ms), **_percentiles("direct_first_token", direct_ttft_ms),
                  **_percentiles("first_token_overhead", [h - d for h, d in zip(ttft_ms, direct_ttft_ms,
                                                                                strict=True)]))
    return result


def saturate(url: str, clients: int, seconds: float, max_new_tokens: int, route: str = "generate",
             stream: bool = False) -> dict[str, Any]:
    """Closed loop: `clients` threads, each with its own connection, for `seconds`."""
    done, failed = [0] * clients, [0] * clients
    stop = threading.Event()

    def client(index: int) -> None:
        path, body = _call(route, index, max_new_tokens, 0.8, stream)
        with requests.Session() as session:
            while not stop.is_set():
                answer = session.post(f"{url}{path}", json=body, timeout=120)
                if answer.status_code == 200 and (not stream or answer.text.endswith("data: [DONE]\n\n")):
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
    decoded, batches, steps, rows = (last.get(k, 0) - first.get(k, 0)
                                     for k in ("text_requests", "text_batches", "stream_steps", "stream_rows"))
    # Streams decode in the replica's live batch, which they join and leave step by step: its mean is the
    # streams per decode step; whole calls batch per @serve.batch call.
    mean_batch = rows / max(1, steps) if stream else decoded / max(1, batches)
    return {"requests_per_s": answered / elapsed, "answered": answered, "failed": sum(failed),
            "mean_batch": mean_batch}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="sequential requests for the overhead")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients at saturation")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per saturation run")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the JSON goes (short runs: elsewhere)")
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
    loads = {"generate": ("generate", False), "chat": ("chat", False), "chat_stream": ("chat", True)}
    by_load: dict[str, dict[str, Any]] = {}
    for load, (route, stream) in loads.items():
        runs: dict[str, list[dict[str, Any]]] = {"batched": [], "single": []}
        for side in ("batched", "single", "single", "batched"):
            url = batched_url if side == "batched" else single_url
            runs[side].append(saturate(url, args.clients, args.seconds, args.max_new_tokens, route, stream))
            print(f"  {load:<12} {side:<8} {runs[side][-1]['requests_per_s']:7.1f} req/s", flush=True)
        rate = {side: statistics.mean(r["requests_per_s"] for r in runs[side]) for side in runs}
        by_load[load] = {"saturation_runs": runs, "requests_per_s": rate,
                         "batching_gain": rate["batched"] / rate["single"]}
    serve.shutdown()
    ray.shutdown()

    runs, rate, gain = (by_load["generate"][key] for key in ("saturation_runs", "requests_per_s", "batching_gain"))
    result = {
        "model": "lm mini preset (Llama, 2 layers, hidden 128, 436k params, untrained)", "replica_cpus": 1,
        "max_new_tokens": args.max_new_tokens, "overhead": latency, "clients": args.clients,
        "max_batch_size": args.max_batch_size, "saturation_runs": runs, "requests_per_s": rate,
        "batching_gain": gain, "openai_saturation": {k: v for k, v in by_load.items() if k != "generate"},
        "goals": {"overhead_p50_ms": OVERHEAD_GOAL_MS, "batching_gain": BATCHING_GOAL},
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
    for route in ("completions", "chat"):
        print(f"| /v1/{'chat/' if route == 'chat' else ''}completions overhead p50 / p99 (per request, aigc extension; "
              f"HTTP p50 {latency[f'{route}_http_p50_ms']:.1f} ms) | {latency[f'{route}_overhead_p50_ms']:.2f} / "
              f"{latency[f'{route}_overhead_p99_ms']:.2f} ms | - |")
    print(f"| time to first token, streamed chat p50 / p99 (direct stream {latency['direct_first_token_p50_ms']:.1f} "
          f"ms; per-request difference p50 {latency['first_token_overhead_p50_ms']:.2f} ms) | "
          f"{latency['stream_first_token_p50_ms']:.2f} / {latency['stream_first_token_p99_ms']:.2f} ms | - |")
    for load in ("chat", "chat_stream"):
        figures = by_load[load]
        print(f"| {load}: {figures['requests_per_s']['batched']:.1f} req/s batched / "
              f"{figures['requests_per_s']['single']:.1f} unbatched (mean batch "
              f"{figures['saturation_runs']['batched'][-1]['mean_batch']:.1f}) | {figures['batching_gain']:.2f}x | - |")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
