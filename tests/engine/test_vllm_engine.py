"""engine.backend = "vllm": the same requests through vLLM's engine give the native engine's greedy copy,
its per-request errors and its stop-string rule, and a request's seed decides its sampled copy.

vLLM runs in a Ray actor, as it does in backfill actors and Serve replicas: its in-process engine sets up
torch.distributed and takes over torch.set_num_threads in the process it runs in, which the test
process must keep for the tests that follow.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from aigc_dist.data.synthetic import make_world
from aigc_dist.engine.text import SamplingParams, TextEngine, TextRequest
from aigc_dist.models.artifact import load_artifact
from aigc_dist.storage import Storage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm_host(ray_local, trained_copy_model) -> Any:
    import ray

    @ray.remote(num_cpus=1)
    class VLLMHost:
        def __init__(self, uri: str):
            import torch

            from aigc_dist.engine.vllm_engine import VLLMTextEngine

            torch.set_num_threads(1)
            self.engine = VLLMTextEngine.from_uri(uri, Storage(), max_batch_size=32)

        def generate(self, requests: list[TextRequest]) -> list[Any]:
            return self.engine.generate(requests)

        def stream(self, requests: list[TextRequest]) -> list[Any]:
            return list(self.engine.stream(requests))

    host = VLLMHost.remote(trained_copy_model.artifact)
    yield host
    ray.kill(host)


@pytest.fixture(scope="module")
def native(trained_copy_model) -> TextEngine:
    return TextEngine(load_artifact(trained_copy_model.artifact, Storage()), max_batch_size=32)


def held_out_requests(model, n: int, sampling: SamplingParams) -> list[TextRequest]:
    world = make_world(model.world)
    users = {u["user_id"]: u for u in world.users.to_pylist()}
    items = {i["item_id"]: i for i in world.items.to_pylist()}
    pairs = [c for c in world.candidates.to_pylist() if c["user_id"] in model.held_out_users][:n]
    return [TextRequest(users[c["user_id"]], items[c["item_id"]], seed=k, sampling=sampling)
            for k, c in enumerate(pairs)]


def test_greedy_copy_equals_the_native_engine_on_held_out_pairs(vllm_host, native, trained_copy_model):
    import ray

    requests = held_out_requests(trained_copy_model, 64, SamplingParams(max_new_tokens=120, temperature=0.0))
    requests.append(TextRequest(prompt="Fresh picks for you: ", sampling=SamplingParams(40, 0.0)))
    mine, theirs = native.generate(requests), ray.get(vllm_host.generate.remote(requests))
    differ = [(k, a.text, b.text) for k, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a.text != b.text]
    assert len(differ) <= 0.05 * len(requests), differ  # fp32 on both sides; the rest would be near-ties
    same = [(a, b) for a, b in zip(mine, theirs, strict=True) if a.text == b.text]
    assert all((a.num_tokens, a.prompt_tokens, a.finish_reason) == (b.num_tokens, b.prompt_tokens, b.finish_reason)
               for a, b in same)
    assert sum(a.finish_reason == "stop" for a, _ in same) >= len(same) // 2  # the trained model ends its copy


def test_errors_and_stop_strings_follow_the_native_rules(vllm_host, native, trained_copy_model):
    import ray

    good = held_out_requests(trained_copy_model, 6, SamplingParams(max_new_tokens=120, temperature=0.0))
    no_title = TextRequest(good[0].user, {"category": "books"}, sampling=good[0].sampling)
    too_long = TextRequest(good[0].user, good[0].item, sampling=SamplingParams(max_new_tokens=250))
    chat = TextRequest(messages=[{"role": "user", "content": "hi"}], sampling=good[0].sampling)
    # A stop string from the copy the model writes for the request itself, so it really stops.
    plain = native.generate(good[1:2])[0].text
    stop = plain.split()[2] if len(plain.split()) > 2 else plain[:3]
    stopped = dataclasses.replace(good[1], stop=(stop,))
    requests = [good[0], no_title, too_long, chat, stopped, *good[2:]]
    mine, theirs = native.generate(requests), ray.get(vllm_host.generate.remote(requests))
    for a, b in zip(mine, theirs, strict=True):
        assert (a.error, a.text, a.num_tokens, a.finish_reason) == (b.error, b.text, b.num_tokens, b.finish_reason)
    assert [r.error is not None for r in theirs] == [False, True, True, True, False, False, False, False, False]
    assert stop not in theirs[4].text and theirs[4].finish_reason == "stop" and plain.startswith(theirs[4].text)
    # stream(): one delta per request, its text the whole text, as generate gives it.
    deltas = ray.get(vllm_host.stream.remote(requests))
    assert sorted(d.index for d in deltas) == list(range(len(requests)))
    assert all(d.result is not None and d.text == d.result.text == theirs[d.index].text for d in deltas)


def test_a_requests_seed_decides_its_sampled_copy_whatever_the_batch(vllm_host, trained_copy_model):
    import ray

    sampling = SamplingParams(max_new_tokens=60, temperature=1.0, top_k=20, top_p=0.95)
    requests = held_out_requests(trained_copy_model, 12, sampling)
    big = [dataclasses.replace(r, seed=(2**63 - 1) - k) for k, r in enumerate(requests)]  # a backfill's row seeds
    alone = ray.get(vllm_host.generate.remote(big[:1]))[0]
    together = ray.get(vllm_host.generate.remote(big))
    assert together[0].text == alone.text and together[0].error is None
    reseeded = ray.get(vllm_host.generate.remote([dataclasses.replace(big[0], seed=7)]))[0]
    again = ray.get(vllm_host.generate.remote([dataclasses.replace(big[0], seed=7)]))[0]
    assert reseeded.text == again.text
    assert len({r.text for r in together}) > 1 + len(together) // 2  # sampled, not one copy for everyone
