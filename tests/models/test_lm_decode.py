"""Continuous batching (decode_stream): the same tokens as the full-recompute reference, whatever the
schedule, the neighbours or the slot a request lands in; slots refill as soon as a request ends."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from aigc_dist.models.lm_decode import DecodeRequest, decode_stream
from aigc_dist.models.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("pos_encoding", ["rope", "learned"])
@pytest.mark.parametrize("refill", [True, False])
def test_greedy_equals_full_recompute_with_ragged_prompts_and_lengths(
    pos_encoding: str, refill: bool, make_model: Callable, random_prompts: Callable, decode_all: Callable,
    reference: Callable,
) -> None:
    model = make_model(seed=1, pos_encoding=pos_encoding)
    lengths = [3, 30, 1, 12, 25, 2, 7, 40, 5, 9]  # more requests than slots, very uneven outputs
    requests = [DecodeRequest(p, n, temperature=0) for p, n in zip(random_prompts(1, 10), lengths, strict=True)]
    outputs = decode_all(model, requests, slots=3, refill=refill)
    assert outputs == [reference(model, r) for r in requests]
    assert [len(o) for o in outputs] == lengths


def test_a_request_is_the_same_alone_in_a_static_batch_and_in_a_continuous_batch(
    make_model: Callable, random_prompts: Callable, decode_all: Callable, reference: Callable
) -> None:
    model = make_model(seed=2)
    prompts = random_prompts(2, 12)
    sampled = dict(temperature=2.0, top_k=100, top_p=0.97)  # flat enough that the seed matters at every step
    target = DecodeRequest(prompts[0], 20, seed=7, **sampled)
    alone = reference(model, target, use_cache=True)
    assert alone == reference(model, target)  # cached == full recompute, sampled
    static = model.generate(prompts[:4], 20, seeds=[7, 1, 2, 3], **sampled)[0]
    # Different neighbours, other lengths and sampling parameters, and the target admitted mid-stream
    # into a slot another request has just freed.
    neighbours = [DecodeRequest(p, n, temperature=t, seed=s) for p, n, t, s in
                  zip(prompts[1:8], [2, 15, 3, 30, 1, 8, 4], [0, 1.0, 0.5, 0, 2.0, 0, 1.0], range(100, 107),
                      strict=True)]  # fmt: skip
    continuous = decode_all(model, [*neighbours[:3], target, *neighbours[3:]], slots=3)[3]
    other_mix = decode_all(model, [*neighbours[4:], target, *neighbours[:2]], slots=2)[3]
    assert alone == static == continuous == other_mix
    assert decode_all(model, [DecodeRequest(prompts[0], 20, seed=8, **sampled)], slots=1)[0] != alone


def test_greedy_and_sampled_rows_share_a_batch(
    make_model: Callable, random_prompts: Callable, decode_all: Callable, reference: Callable
) -> None:
    model = make_model(seed=3)
    requests = [DecodeRequest(p, 16, temperature=t, top_k=k, top_p=q, seed=i) for i, (p, t, k, q) in
                enumerate(zip(random_prompts(3, 6), [0, 0.8, 1.5, 0, 1.0, 2.0], [None, 40, None, 5, 1, None],
                              [None, None, 0.9, None, None, 1e-6], strict=True))]  # fmt: skip
    assert decode_all(model, requests, slots=4) == [reference(model, r) for r in requests]


def test_rows_stop_at_eos_and_free_their_slot_at_once(
    make_model: Callable, random_prompts: Callable, decode_all: Callable, reference: Callable
) -> None:
    model = make_model(seed=4)
    prompts = random_prompts(4, 6)
    eos = model.generate(prompts[:1], 6, greedy=True)[0][3]  # a token request 0 emits at its 4th step
    requests = [DecodeRequest(p, 24, temperature=0) for p in prompts]
    outputs = decode_all(model, requests, slots=2, eos_id=eos)
    assert outputs == [reference(model, r, eos_id=eos) for r in requests]
    assert len(outputs[0]) <= 3 and eos not in sum(outputs, [])


def test_a_freed_slot_takes_the_next_request_at_once(make_model: Callable, random_prompts: Callable) -> None:
    """Uneven lengths: static batching waits for each batch's longest row (4 batches x 40 steps);
    continuous batching refills the slot of every short request at once (about half the steps)."""
    model = make_model(seed=5, max_seq_len=128)
    lengths = [40, 2] * 4
    requests = [DecodeRequest(p, n, temperature=0) for p, n in zip(random_prompts(5, 8), lengths, strict=True)]
    steps: dict[bool, int] = {True: 0, False: 0}
    order: dict[bool, list[int]] = {}
    hidden = model.hidden
    for refill in (True, False):

        def counting(idx, *args, _refill=refill):
            steps[_refill] += idx.size(1) == 1  # decode steps (prefills have the prompt's width)
            return hidden(idx, *args)

        model.hidden = counting
        order[refill] = [i for i, _ in decode_stream(model, requests, slots=2, refill=refill)]
    del model.hidden
    assert order[False] == [1, 0, 3, 2, 5, 4, 7, 6]  # static: request 2 starts after request 0 ends
    assert sorted(order[True]) == list(range(8))
    assert steps[False] >= 4 * 39 and steps[True] < 0.6 * steps[False]


def test_batch_shrinks_to_the_live_rows_when_the_stream_runs_dry(
    make_model: Callable, random_prompts: Callable, decode_all: Callable, reference: Callable
) -> None:
    model = make_model(seed=6)
    requests = [DecodeRequest(p, n, temperature=0) for p, n in zip(random_prompts(6, 4), [40, 1, 2, 3], strict=True)]
    widths: list[int] = []
    hidden = model.hidden
    model.hidden = lambda idx, *a: widths.append(idx.size(0)) or hidden(idx, *a)
    outputs = decode_all(model, requests, slots=4)
    del model.hidden
    assert widths[-1] == 1  # the long request finishes alone, not in a batch of 4 mostly empty rows
    assert outputs == [reference(model, r) for r in requests]


def test_requests_are_pulled_lazily_and_the_cache_grows(
    make_model: Callable, random_prompts: Callable, reference: Callable
) -> None:
    model = make_model(seed=7)
    prompts = random_prompts(7, 5)
    pulled: list[int] = []

    def source():
        for i, p in enumerate(prompts):
            pulled.append(i)
            yield DecodeRequest(p, 10 + 10 * i, temperature=0)

    stream = decode_stream(model, source(), slots=2, max_len=8)  # too short: grows on the way
    first, _ = next(stream)
    assert first == 0 and len(pulled) <= 3
    rest = dict(stream)
    assert len(rest) == 4
    assert rest[4] == reference(model, DecodeRequest(prompts[4], 50, temperature=0))


def test_bad_requests_and_edge_cases(make_model: Callable, decode_all: Callable) -> None:
    model = make_model()
    assert decode_all(model, [], slots=2) == []
    assert decode_all(model, [DecodeRequest([1], 0), DecodeRequest([1, 2], 3, temperature=0)], slots=1)[0] == []
    with pytest.raises(ValueError, match="request 1 is empty"):
        decode_all(model, [DecodeRequest([1], 2), DecodeRequest([], 2)], slots=2)
    with pytest.raises(ValueError, match="request 0 has 60 tokens.*max_seq_len=64"):
        decode_all(model, [DecodeRequest([1] * 60, 10)], slots=1)
    with pytest.raises(ValueError, match="top_p"):
        decode_all(model, [DecodeRequest([1], 2, top_p=0.0)], slots=1)
    with pytest.raises(ValueError, match="slots must be an int >= 1"):
        decode_all(model, [DecodeRequest([1], 2)], slots=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_stream_on_cuda(
    dtype: torch.dtype, make_model: Callable, random_prompts: Callable, decode_all: Callable, reference: Callable
) -> None:
    model = make_model(seed=8).to("cuda", dtype)
    requests = [DecodeRequest(p, n, temperature=0) for p, n in zip(random_prompts(8, 6), [5, 20, 3, 9, 14, 2],
                                                                    strict=True)]  # fmt: skip
    outputs = decode_all(model, requests, slots=3)
    assert [len(o) for o in outputs] == [5, 20, 3, 9, 14, 2]
    if dtype == torch.float32:
        assert outputs == [reference(model, r) for r in requests]
    else:  # bf16 rounding differs between batch shapes, so sequences may drift apart; first tokens may not
        assert [o[0] for o in outputs] == [reference(model, r)[0] for r in requests]
