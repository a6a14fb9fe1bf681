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

        def live(self, first: list[TextRequest], later: list[TextRequest], cancel_first: bool = False) -> Any:
            """run_live: `first` put at once, `later` from the engine's thread at the first one's first
            delta (while it decodes); each request's deltas, and the order their last ones came."""
            import threading

            from aigc_dist.engine.live import LiveRequest, RequestFeed

            feed, rows, order = RequestFeed(), [], []
            deltas: list[list[Any]] = [[] for _ in first + later]
            cancel = threading.Event()

            def deliver(k: int) -> Any:
                def on_delta(delta: Any) -> None:
                    deltas[k].append(delta)
                    if k == 0 and len(deltas[0]) == 1:
                        if cancel_first:
                            cancel.set()  # asked at the next step
                        for j, request in enumerate(later, start=len(first)):
                            feed.put(LiveRequest(request, deliver(j)))
                    if getattr(delta, "result", None) is not None or isinstance(delta, BaseException):
                        order.append(k)
                        if len(order) == len(deltas):
                            feed.close()
                return on_delta

            for k, request in enumerate(first):
                feed.put(LiveRequest(request, deliver(k), cancel.is_set if k == 0 else (lambda: False)))
            self.engine.run_live(feed, on_step=rows.append)
            return deltas, order, rows

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


def test_live_requests_stream_token_by_token_and_join_the_running_batch(vllm_host, trained_copy_model):
    """run_live on vLLM's engine (what a replica runs): requests put while one decodes get their text in
    several deltas, equal to generate()'s (errors, stop strings, sampled copy by seed), and a short one
    put mid-decode ends before the long one that was running."""
    import ray

    greedy = SamplingParams(max_new_tokens=120, temperature=0.0)
    good = held_out_requests(trained_copy_model, 6, greedy)
    long = TextRequest(prompt="Fresh picks for you: ", sampling=SamplingParams(200, 0.0))
    short = dataclasses.replace(good[0], sampling=SamplingParams(max_new_tokens=4, temperature=0.0))
    sampled = dataclasses.replace(good[1], seed=99, sampling=SamplingParams(60, temperature=1.0, top_k=20))
    stopped = dataclasses.replace(good[2], stop=(" ",))
    too_long = dataclasses.replace(good[3], sampling=SamplingParams(max_new_tokens=250))
    later = [short, sampled, stopped, too_long, good[4]]
    expected = ray.get(vllm_host.generate.remote([long, *later]))
    deltas, order, rows = ray.get(vllm_host.live.remote([long], later))
    for k, want in enumerate(expected):
        got = deltas[k]
        assert got[-1].result == want, k
        assert "".join(d.text for d in got) == want.text
    assert len(deltas[0]) > 10  # the long one streamed, not one delta at its end
    assert expected[0].finish_reason == "length" and order.index(1) < order.index(0)
    assert expected[3].finish_reason == "stop" and " " not in expected[3].text and expected[4].error
    assert max(rows) >= 4  # the ones put later decoded beside the long one


def test_a_cancelled_live_request_is_aborted_in_vllm(vllm_host, trained_copy_model):
    import ray

    long = TextRequest(prompt="Fresh picks for you: ", sampling=SamplingParams(200, 0.0))
    after = held_out_requests(trained_copy_model, 1, SamplingParams(max_new_tokens=30, temperature=0.0))
    deltas, order, _ = ray.get(vllm_host.live.remote([long], after, cancel_first=True))
    cancelled = deltas[0][-1].result
    assert cancelled.finish_reason == "cancelled" and cancelled.num_tokens < 200
    assert cancelled.text == "".join(d.text for d in deltas[0])
    assert deltas[1][-1].result.error is None and deltas[1][-1].result.num_tokens > 0
