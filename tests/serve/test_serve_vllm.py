"""Serve with serve.engine.backend = "vllm": the replica decodes with vLLM's engine and keeps Serve's rules
(batching, 503 over capacity, reconfigure without a failed request) and the native engine's greedy copy.

The model is the session's trained `mini` checkpoint (vLLM's CPU attention needs head_dim >= 32, which the
Serve kit's 32-wide LMs lack); the reconfigure target is the same architecture, untrained, as version v2.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from aigc_dist.demo.world import make_world
from aigc_dist.engine.text import SamplingParams, TextEngine, TextRequest
from aigc_dist.models.artifact import load_artifact
from aigc_dist.storage import Storage

pytestmark = pytest.mark.slow
VLLM = {"backend": "vllm"}


def _stats(url: str) -> dict[str, int]:
    return requests.get(f"{url}/v1/models", timeout=30).json()["stats"]


def _held_out_bodies(model: Any, n: int, **sampling: Any) -> list[dict[str, Any]]:
    world = make_world(model.world)
    users = {u["user_id"]: u for u in world.users.to_pylist()}
    items = {i["item_id"]: i for i in world.items.to_pylist()}
    pairs = [c for c in world.candidates.to_pylist() if c["user_id"] in model.held_out_users][:n]
    return [{"user": users[c["user_id"]], "item": items[c["item_id"]], "seed": k, **sampling}
            for k, c in enumerate(pairs)]


def _streamed_text(url: str, model_id: str, body: dict[str, Any]) -> str:
    """The text of a streamed greedy completion of `body`'s (user, item), its SSE chunks joined."""
    answer = requests.post(f"{url}/v1/completions", stream=True, timeout=120, json={
        "model": model_id, "max_tokens": body["max_new_tokens"], "temperature": 0, "seed": body["seed"],
        "stream": True, "aigc": {"user": body["user"], "item": body["item"]}})
    assert answer.status_code == 200, answer.text[:300]
    events = [line[len(b"data: "):] for line in answer.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    return "".join(choice["text"] for event in events[:-1] for choice in json.loads(event)["choices"])


@pytest.fixture(scope="module")
def untrained_v2(trained_copy_model, tmp_path_factory: pytest.TempPathFactory) -> str:
    import torch

    from aigc_dist.engine.text import prompt_conditioning
    from aigc_dist.models.artifact import save_text_artifact
    from aigc_dist.models.llama import LlamaLM, lm_config_from_preset
    from aigc_dist.models.tokenizer import byte_level_tokenizer

    torch.manual_seed(1)
    uri = str(Path(tmp_path_factory.mktemp("vllm-serve")) / "copy-v2")
    save_text_artifact(uri, LlamaLM(lm_config_from_preset("mini")).eval(), Storage(), tokenizer=byte_level_tokenizer(),
                       conditioning=prompt_conditioning(trained_copy_model.template),
                       metadata={"name": "copy-trained", "version": "v2"})
    return uri


def test_a_vllm_replica_batches_and_answers_with_the_native_greedy_copy(serve_cluster, serve_kit, trained_copy_model):
    url = serve_cluster.deploy("vllm-batching", serve_kit.config(
        artifact=trained_copy_model.artifact, engine=VLLM, max_batch_size=16, batch_wait_timeout_s=0.25,
        max_new_tokens_cap=256))
    try:
        bodies = _held_out_bodies(trained_copy_model, 32, max_new_tokens=64, temperature=0.0)
        before = _stats(url)
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda b: serve_kit.post(f"{url}/v1/generate", {"requests": [b]}, timeout=120),
                                    bodies))
        after = _stats(url)
        assert [a.status_code for a in answers] == [200] * len(bodies), [a.text[:200] for a in answers]
        decoded = after.get("text_requests", 0) - before.get("text_requests", 0)
        batches = after.get("text_batches", 0) - before.get("text_batches", 0)
        assert decoded == len(bodies) and decoded / batches >= 4, f"{decoded} requests in {batches} batches"

        native = TextEngine(load_artifact(trained_copy_model.artifact, Storage()))
        expected = native.generate([TextRequest(b["user"], b["item"], b["seed"], SamplingParams(64, 0.0))
                                    for b in bodies])
        served = [a.json()["results"][0] for a in answers]
        differ = [(e.text, s["content"]) for e, s in zip(expected, served, strict=True) if e.text != s["content"]]
        assert len(differ) <= 0.05 * len(bodies), differ  # greedy, fp32: the native copy but for near-ties
        assert all(s["num_tokens"] == e.num_tokens for e, s in zip(expected, served, strict=True)
                   if e.text == s["content"])

        # Streams on a vLLM replica (the OpenAI route, the same prompt through the aigc extension): the chunks
        # of each reassemble to its /v1/generate copy; they decode step by step on vLLM's engine (run_live).
        model_id = requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        streamed_before = _stats(url)
        with ThreadPoolExecutor(4) as pool:
            streamed = list(pool.map(lambda b: _streamed_text(url, model_id, b), bodies[:4]))
        assert streamed == [s["content"] for s in served[:4]]
        streamed_after = _stats(url)
        steps = streamed_after["stream_steps"] - streamed_before.get("stream_steps", 0)
        rows = streamed_after["stream_rows"] - streamed_before.get("stream_rows", 0)
        tokens = [s["num_tokens"] for s in served[:4]]
        assert steps >= max(tokens) and rows >= sum(tokens), (steps, rows, tokens)  # a step per token of each

        # A request the engine refuses (over the model's context) is a 422 naming it, as on the native engine.
        too_long = serve_kit.post(f"{url}/v1/generate", {"requests": [{**bodies[0], "max_new_tokens": 250}]})
        assert too_long.status_code == 422 and "context" in too_long.text, too_long.text
    finally:
        serve_cluster.delete("vllm-batching")


def test_a_vllm_replica_over_capacity_gets_503_with_retry_after_and_recovers(serve_cluster, serve_kit,
                                                                             trained_copy_model):
    url = serve_cluster.deploy("vllm-overload", serve_kit.config(
        artifact=trained_copy_model.artifact, engine=VLLM, max_ongoing_requests=1, max_queued_requests=1,
        max_batch_size=1, retry_after_s=2))
    try:
        serve_kit.check_sheds_load(url, {"requests": _held_out_bodies(trained_copy_model, 4, max_new_tokens=64,
                                                                      temperature=0.0)})
    finally:
        serve_cluster.delete("vllm-overload")


def test_reconfigure_swaps_vllm_checkpoints_under_load_without_a_failed_request(serve_cluster, serve_kit,
                                                                                 trained_copy_model, untrained_v2):
    url = serve_cluster.deploy("vllm-reconfigure", serve_kit.config(artifact=trained_copy_model.artifact,
                                                                    engine=VLLM))
    body = {"requests": _held_out_bodies(trained_copy_model, 1, max_new_tokens=16)}
    versions: list[str] = []
    failures: list[str] = []
    stop = threading.Event()
    seen = threading.Condition()

    def light_load() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    answer = session.post(f"{url}/v1/generate", json=body, timeout=120)
                except requests.RequestException as exc:
                    failures.append(repr(exc))
                    continue
                with seen:
                    if answer.status_code != 200:
                        failures.append(f"{answer.status_code} {answer.text[:200]}")
                    else:
                        versions.append(answer.json()["model"]["version"])
                    seen.notify_all()

    def wait_for(version: str, count: int) -> None:
        with seen:
            seen.wait_for(lambda: versions.count(version) >= count or bool(failures), timeout=240)

    worker = threading.Thread(target=light_load)
    worker.start()
    try:
        wait_for("v1", 5)  # the load runs against v1 before the swap
        serve_cluster.deploy("vllm-reconfigure", serve_kit.config(artifact=untrained_v2, engine=VLLM))
        wait_for("v2", 5)  # and goes on against v2 after it
    finally:
        stop.set()
        worker.join()
    try:
        assert failures == [], failures
        assert versions[0] == "v1" and versions[-1] == "v2", versions
        assert versions == sorted(versions), "a replica went back to the old checkpoint"
        served = {m["version"] for m in requests.get(f"{url}/v1/models", timeout=30).json()["models"]
                  if m["kind"] == "lm"}
        assert served == {"v2"}
    finally:
        serve_cluster.delete("vllm-reconfigure")
