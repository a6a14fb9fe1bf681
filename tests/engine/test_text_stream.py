"""TextEngine.stream: per-step deltas whose concatenation is generate()'s text and whose last one carries
generate()'s result; cancelling a request ends it at once and hands its slot to the next one."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import pytest

from aigc_dist.engine.text import SamplingParams, TextDelta, TextEngine, TextRequest
from aigc_dist.models.artifact import Artifact
from tests.engine.reference import torch_threads


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def mixed_requests(random_lm: Artifact) -> list[TextRequest]:
    greedy = SamplingParams(max_new_tokens=40, temperature=0)
    free = TextEngine(random_lm).generate([TextRequest(prompt="Hello", sampling=greedy)])[0].text
    stop = next(free[k : k + 2] for k in range(10, 38) if all(" " <= c <= "~" for c in free[k : k + 2]))
    return [
        TextRequest(prompt="Hello", sampling=greedy, stop=(stop, "zzz")),  # ends on a stop string
        TextRequest(prompt="Copy:", seed=3, sampling=SamplingParams(max_new_tokens=48, temperature=1.0, top_p=0.9)),
        TextRequest({"segment": "student"}, {"title": "Tent"}, seed=4, sampling=SamplingParams(max_new_tokens=7)),
        TextRequest({"segment": "student"}, {}),  # fails before decoding: no title
        TextRequest(prompt="A", seed=5, sampling=SamplingParams(max_new_tokens=30, temperature=1.2, top_k=20),
                    stop=("e", "a", "ab", "\x00")),  # fmt: skip
        TextRequest(messages=[{"role": "user", "content": "hi"}]),  # no chat template: an error result
        TextRequest(prompt="Hello", sampling=greedy),
    ]


def collect(deltas: Iterator[TextDelta]) -> tuple[dict[int, list[TextDelta]], list[int]]:
    by_request: dict[int, list[TextDelta]] = defaultdict(list)
    order = []
    for delta in deltas:
        assert not by_request[delta.index] or by_request[delta.index][-1].result is None  # nothing after the last
        by_request[delta.index].append(delta)
        order.append(delta.index)
    return by_request, order


@pytest.mark.parametrize("max_batch_size", [2, 8])
def test_stream_deltas_add_up_to_generate(random_lm: Artifact, max_batch_size: int) -> None:
    requests = mixed_requests(random_lm)
    engine = TextEngine(random_lm, max_batch_size=max_batch_size)
    expected = engine.generate(requests)
    assert expected[0].finish_reason == "stop" and expected[3].error and expected[5].error
    assert {expected[1].finish_reason, expected[6].finish_reason} == {"length"}
    # Random bytes: whole multi-byte characters and U+FFFD for broken ones, both through the stream.
    assert any("\x7f" < c != "\ufffd" for r in expected for c in r.text) and "\ufffd" in expected[1].text
    by_request, order = collect(engine.stream(requests))
    assert sorted(by_request) == list(range(len(requests)))
    for k, request in enumerate(requests):
        deltas = by_request[k]
        assert "".join(d.text for d in deltas) == expected[k].text
        assert deltas[-1].result == expected[k] and all(d.result is None for d in deltas[:-1])
        assert all(d.text for d in deltas[:-1])  # no empty deltas but the last
        shown = ""
        for d in deltas[:-1]:  # never text that could still become a stop string
            shown += d.text
            assert not any(s.startswith(shown[-n:]) for s in request.stop for n in range(1, len(s)))
    assert [len(by_request[k]) for k in (3, 5)] == [1, 1] and by_request[3][0].text == ""
    assert len(by_request[6]) > 5 and len(by_request[1]) > 5  # text arrives while the request decodes
    # ... interleaved with the other requests' text, not in one piece at the end.
    first_end = min(len(order) - 1 - order[::-1].index(k) for k in range(len(requests)) if k not in (3, 5))
    assert len(set(order[: first_end + 1]) - {3, 5}) > 1


def test_same_seed_same_stream_whatever_the_batch(random_lm: Artifact) -> None:
    requests = mixed_requests(random_lm)
    alone = [collect(TextEngine(random_lm).stream([r]))[0][0][-1].result for r in requests]
    together = collect(TextEngine(random_lm, max_batch_size=3).stream(requests[::-1]))[0]
    assert [together[len(requests) - 1 - k][-1].result for k in range(len(requests))] == alone


def test_a_cancelled_request_ends_at_once_and_the_others_are_untouched(random_lm: Artifact) -> None:
    requests = mixed_requests(random_lm)
    engine = TextEngine(random_lm, max_batch_size=4)
    expected = engine.generate(requests)
    seen: dict[int, int] = defaultdict(int)
    polled: list[int] = []

    def cancelled(index: int) -> bool:
        polled.append(index)
        return index == 6 and seen[6] >= 1

    by_request = defaultdict(list)
    for delta in engine.stream(requests, cancelled):
        seen[delta.index] += 1
        by_request[delta.index].append(delta)
    result = by_request[6][-1].result
    assert result.finish_reason == "cancelled" and not result.finished and result.error is None
    assert result.text == "".join(d.text for d in by_request[6]) and expected[6].text.startswith(result.text)
    assert 0 < result.num_tokens < expected[6].num_tokens and len(by_request[6]) == 2
    assert all(by_request[k][-1].result == expected[k] for k in range(len(requests)) if k != 6)
    assert 3 not in polled and 5 not in polled  # only requests that decode are asked


def test_a_cancelled_slot_goes_to_the_next_request(random_lm: Artifact) -> None:
    long = SamplingParams(max_new_tokens=60, temperature=0)
    requests = [TextRequest(prompt=p, sampling=long) for p in ("one", "two", "three")]
    engine = TextEngine(random_lm, max_batch_size=1)
    expected = engine.generate(requests)
    order = []
    by_request = defaultdict(list)
    for delta in engine.stream(requests, cancelled=lambda index: index == 0 and len(by_request[0]) >= 1):
        order.append(delta.index)
        by_request[delta.index].append(delta)
    assert by_request[0][-1].result.finish_reason == "cancelled" and by_request[0][-1].result.num_tokens < 60
    assert [by_request[k][-1].result for k in (1, 2)] == expected[1:]  # both finish, one after the other
    assert order.index(1) > order.index(0) and order.index(2) > max(i for i, k in enumerate(order) if k == 1)
