"""TextEngine.run_live: requests put on a feed while others decode join the running batch, and each
gets the deltas and result `generate` gives it for the same seed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from aigc_dist.engine.live import FeedClosed, LiveRequest, RequestFeed
from aigc_dist.engine.text import SamplingParams, TextDelta, TextEngine, TextRequest, TextResult
from aigc_dist.models.artifact import Artifact
from tests.engine.reference import torch_threads
from tests.engine.test_text_stream import mixed_requests

WAIT_S = 120  # a bound on a wait that an event ends: only a hang reaches it


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@dataclass
class Received:
    """What one request's `deliver` got, and events a test waits on."""

    deltas: list[TextDelta] = field(default_factory=list)
    failure: BaseException | None = None
    first: threading.Event = field(default_factory=threading.Event)
    last: threading.Event = field(default_factory=threading.Event)
    order: list[str] | None = None  # shared: names in the order their requests ended
    name: str = ""
    stop_now: threading.Event = field(default_factory=threading.Event)
    on_first: list = field(default_factory=list)  # called with no argument at the first delta, on the engine's thread

    def deliver(self, delta: TextDelta | BaseException) -> None:
        if isinstance(delta, BaseException):
            self.failure = delta
            self.last.set()
            return
        assert not self.last.is_set(), "a delta after the last one"
        self.deltas.append(delta)
        if not self.first.is_set():
            self.first.set()
            for call in self.on_first:
                call()
        if delta.result is not None:
            if self.order is not None:
                self.order.append(self.name)
            self.last.set()

    @property
    def result(self) -> TextResult:
        assert self.last.wait(WAIT_S) and self.failure is None, self.failure
        result = self.deltas[-1].result
        assert result is not None
        return result

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)


class Live:
    """An engine's run_live loop on a thread, as a replica runs it."""

    def __init__(self, engine: TextEngine):
        self.feed = RequestFeed()
        self.rows: list[int] = []
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(engine,), daemon=True)
        self.thread.start()

    def _run(self, engine: TextEngine) -> None:
        try:
            engine.run_live(self.feed, on_step=self.rows.append)
        except BaseException as exc:  # noqa: BLE001 - the test asserts on it
            self.failure = exc

    def put(self, request: TextRequest, received: Received | None = None) -> Received:
        received = received or Received()
        self.feed.put(LiveRequest(request, received.deliver, received.stop_now.is_set))
        return received

    def close(self) -> None:
        self.feed.close()
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive() and self.failure is None, self.failure


def test_live_requests_get_generates_deltas_and_results(random_lm: Artifact) -> None:
    """Mixed requests (stop strings, sampled, greedy, feature prompts, refused ones) put one by one while
    the loop decodes: each one's deltas add up to its text, and text and result equal generate()'s."""
    requests = mixed_requests(random_lm)
    engine = TextEngine(random_lm, max_batch_size=4)
    expected = engine.generate(requests)
    live = Live(engine)
    got = [Received() for _ in requests]
    # The others arrive once the first has its first token, while it decodes (put from the engine's thread,
    # so that the first cannot have ended by then).
    got[1].on_first.append(lambda: [live.put(r, g) for r, g in zip(requests[2:], got[2:], strict=True)])
    got[0].on_first.append(lambda: live.put(requests[1], got[1]))
    live.put(requests[0], got[0])
    for request, want, received in zip(requests, expected, got, strict=True):
        assert received.result == want, request
        assert received.text == want.text
        assert all(d.text for d in received.deltas[:-1])  # no empty delta but a last one
    live.close()
    assert max(live.rows) > 1  # they shared decode steps


def test_a_request_that_arrives_mid_decode_starts_at_once(random_lm: Artifact) -> None:
    """A long request decodes; a short one put after its first token ends before it. With batches that
    requests cannot join (Serve's batching of whole calls), the short one would wait for the long one."""
    engine = TextEngine(random_lm, max_batch_size=4)
    order: list[str] = []
    live = Live(engine)
    long, short = Received(order=order, name="long"), Received(order=order, name="short")
    # Put from the engine's thread at the long one's first token: it cannot have ended by then.
    long.on_first.append(lambda: live.put(
        TextRequest(prompt="Copy:", seed=1, sampling=SamplingParams(max_new_tokens=3, temperature=1.0)), short))
    live.put(TextRequest(prompt="Hello", sampling=SamplingParams(max_new_tokens=150, temperature=0)), long)
    assert short.result.num_tokens <= 3 and long.result.finish_reason == "length"
    assert order == ["short", "long"]
    live.close()
    assert max(live.rows) == 2


def test_the_batch_grows_with_the_requests_up_to_max_batch_size(random_lm: Artifact) -> None:
    """One request alone decodes as a batch of one; six at once run four at a time (max_batch_size), and
    each still gets generate()'s text."""
    engine = TextEngine(random_lm, max_batch_size=4)
    alone = TextRequest(prompt="A", sampling=SamplingParams(max_new_tokens=12, temperature=0))
    live = Live(engine)
    assert live.put(alone).result.num_tokens == 12
    assert set(live.rows) == {1}
    requests = [TextRequest(prompt=f"Copy {k}:", seed=k, sampling=SamplingParams(max_new_tokens=20 + 5 * k))
                for k in range(6)]
    received = [live.put(r) for r in requests]
    assert [r.result for r in received] == engine.generate(requests)
    live.close()
    assert max(live.rows) == 4


def test_cancelled_requests_end_and_free_their_slot(random_lm: Artifact) -> None:
    """One slot: a request cancelled mid-decode ends with what it generated ("cancelled"), and the one
    waiting behind it then runs to its end."""
    engine = TextEngine(random_lm, max_batch_size=1)
    live = Live(engine)
    first = Received()
    first.on_first.append(first.stop_now.set)  # cancelled at its first token: asked again at the next step
    live.put(TextRequest(prompt="Hello", sampling=SamplingParams(max_new_tokens=180, temperature=0)), first)
    second = live.put(TextRequest(prompt="A", sampling=SamplingParams(max_new_tokens=5, temperature=0)))
    assert first.result.finish_reason == "cancelled" and first.result.num_tokens < 180
    assert second.result.finish_reason in ("stop", "length")
    live.close()


def test_a_closed_feed_refuses_requests_and_the_loop_ends_after_its_own(random_lm: Artifact) -> None:
    engine = TextEngine(random_lm, max_batch_size=2)
    live = Live(engine)
    running = live.put(TextRequest(prompt="Hello", sampling=SamplingParams(max_new_tokens=60, temperature=0)))
    assert running.first.wait(WAIT_S)
    live.feed.close()
    with pytest.raises(FeedClosed):
        live.put(TextRequest(prompt="late"))
    assert running.result.num_tokens == 60  # what it had taken still ends
    live.close()


def test_a_bad_seed_is_that_requests_error_not_the_loops(random_lm: Artifact) -> None:
    engine = TextEngine(random_lm, max_batch_size=2)
    live = Live(engine)
    bad = live.put(TextRequest(prompt="A", seed=2**64))
    good = live.put(TextRequest(prompt="A", sampling=SamplingParams(max_new_tokens=4, temperature=0)))
    assert "seed must be an int in [0, 2**64)" in (bad.result.error or "")
    assert good.result.error is None and good.result.num_tokens == 4
    live.close()
