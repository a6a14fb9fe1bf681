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

from aigc_dist.demo.world import make_world
from aigc_dist.engine.text import SamplingParams, TextEngine, TextRequest, TextResult
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

        def call(self, script: Any, *args: Any) -> Any:
            """script(engine, *args) in the actor: run_live's threads and events stay on the engine's side."""
            return script(self.engine, *args)

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


# run_live: vLLM's engine stepped one step at a time. Each script runs in the actor (`VLLMHost.call`) with the
# native live tests' harness: the loop on a thread, requests put from the engine's thread at a delta (an event,
# so the request they join cannot have ended), every wait bounded.


def _joined_live(engine: Any, requests: list[TextRequest]) -> tuple[list[TextResult], list[Any], list[int]]:
    from tests.engine.test_text_live import Live, Received

    expected = engine.generate(requests)  # offline, on the same engine
    live = Live(engine)
    got = [Received() for _ in requests]
    got[0].on_first.append(lambda: [live.put(r, g) for r, g in zip(requests[1:], got[1:], strict=True)])
    live.put(requests[0], got[0])
    answers = [(g.result, g.text, [d.text for d in g.deltas]) for g in got]
    live.close()
    return expected, answers, live.rows


def _late_cancelled_and_bad(engine: Any, long: TextRequest, late: TextRequest, cancelled: TextRequest,
                            bad: TextRequest) -> dict[str, Any]:  # fmt: skip
    from tests.engine.test_text_live import Live, Received

    requests = [long, late, cancelled, bad]
    expected = engine.generate(requests)
    order: list[str] = []
    live = Live(engine)
    got = [Received(order=order, name=name) for name in ("long", "late", "cancelled", "bad")]
    got[2].on_first.append(got[2].stop_now.set)  # cancelled() is true from its first delta on
    got[0].on_first.append(lambda: [live.put(r, g) for r, g in zip(requests[1:], got[1:], strict=True)])
    live.put(long, got[0])
    answers = [(g.result, g.text) for g in got]
    live.close()
    return {"expected": expected, "answers": answers, "order": order, "rows": live.rows,
            "unfinished": engine.model.llm_engine.has_unfinished_requests()}


def test_live_requests_join_the_running_vllm_batch_and_get_generates_text(vllm_host, trained_copy_model):
    """Requests put while the first decodes join its steps; each one's deltas add up to the text and result
    `generate` gives it on the same engine."""
    import ray

    requests = held_out_requests(trained_copy_model, 6, SamplingParams(max_new_tokens=120, temperature=0.0))
    requests[1] = dataclasses.replace(requests[1], stop=("e",))  # a stop string, applied on the streamed text
    expected, answers, rows = ray.get(vllm_host.call.remote(_joined_live, requests))
    for want, (result, text, _) in zip(expected, answers, strict=True):
        assert result == want and text == want.text
    assert expected[1].finish_reason == "stop" and "e" not in expected[1].text
    assert max(rows) >= 2  # they shared vLLM's steps


def test_a_late_live_request_runs_at_once_a_cancelled_one_stops_a_bad_one_fails_alone(vllm_host, trained_copy_model):
    import ray

    greedy = SamplingParams(max_new_tokens=120, temperature=0.0)
    long, late, cancelled, bad = held_out_requests(trained_copy_model, 4, greedy)
    late = dataclasses.replace(late, sampling=SamplingParams(max_new_tokens=3, temperature=0.0))
    bad = dataclasses.replace(bad, sampling=SamplingParams(max_new_tokens=250))  # prompt + 250 > the context
    run = ray.get(vllm_host.call.remote(_late_cancelled_and_bad, long, late, cancelled, bad))
    expected, answers = run["expected"], run["answers"]
    assert expected[0].num_tokens > 4 and expected[2].num_tokens > 2  # long enough to be overtaken, cancelled
    (long_got, _), (late_got, _), (cancelled_got, cancelled_text), (bad_got, _) = answers
    assert long_got == expected[0] and late_got == expected[1]
    assert run["order"].index("late") < run["order"].index("long")  # it did not wait for the long one
    assert cancelled_got.finish_reason == "cancelled" and cancelled_got.num_tokens < expected[2].num_tokens
    assert cancelled_text == cancelled_got.text and expected[2].text.startswith(cancelled_got.text)
    assert bad_got.error == expected[3].error and "exceeds the model's context" in (bad_got.error or "")
    assert not run["unfinished"]  # the cancelled one was aborted in vLLM, nothing left running


def test_a_live_stream_arrives_token_by_token(vllm_host, trained_copy_model):
    import ray

    request = held_out_requests(trained_copy_model, 1, SamplingParams(max_new_tokens=120, temperature=0.0))[0]
    expected, answers, rows = ray.get(vllm_host.call.remote(_joined_live, [request]))
    result, text, pieces = answers[0]
    assert result == expected[0] and text == expected[0].text and result.num_tokens > 4
    assert len(pieces) > result.num_tokens // 2  # a delta per step, not one chunk at the end
    assert all(pieces[:-1])  # no empty delta but the last
    assert set(rows) == {1}
