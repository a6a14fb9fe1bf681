"""decode_stream (KV cache, sampling, seeds, continuous batching): the same tokens as the full-recompute
reference, whatever the schedule, the neighbours or the slot a request lands in; slots refill as soon
as a request ends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from aigc_dist.engine.decode import DecodeRequest, SlotCache, decode_stream, row_uniforms, sample_tokens
from aigc_dist.models.llama import LlamaLM
from tests.engine.reference import decode_all, random_prompts, reference_decode, tiny_model, torch_threads

# Llama with grouped-query attention, Llama with one head per key/value head, Qwen2 (q/k/v bias, untied head).
VARIANTS = {
    "llama-gqa": {},
    "llama-mha": {"num_key_value_heads": 2},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": False},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def qwen2_model(seed: int) -> LlamaLM:
    """The Qwen2 variant with non-zero q/k/v biases (they start at zero, which would test nothing)."""
    model = tiny_model(seed, **VARIANTS["qwen2"])
    with torch.no_grad():
        for layer in model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(std=0.3)
    return model


def variant(name: str, seed: int) -> LlamaLM:
    return qwen2_model(seed) if name == "qwen2" else tiny_model(seed, **VARIANTS[name])


def count_forwards(model: LlamaLM) -> list[tuple[int, int]]:
    """(rows, width) of every forward through the model from now on (a hook on the token embedding):
    width 1 is a decode step, wider a prefill."""
    shapes: list[tuple[int, int]] = []
    model.embed_tokens.register_forward_hook(lambda _module, args, _out: shapes.append(tuple(args[0].shape)))
    return shapes


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("refill", [True, False])
def test_greedy_equals_full_recompute_with_ragged_prompts_and_lengths(name: str, refill: bool) -> None:
    model = variant(name, seed=1)
    lengths = [3, 30, 1, 12, 25, 2, 7, 40, 5, 9]  # more requests than slots, very uneven outputs
    requests = [DecodeRequest(p, n, temperature=0) for p, n in zip(random_prompts(1, 10), lengths, strict=True)]
    outputs = decode_all(model, requests, slots=3, refill=refill)
    assert outputs == [reference_decode(model, r) for r in requests]
    assert [len(o) for o in outputs] == lengths
    assert len({t for o in outputs for t in o}) >= 20  # not one token repeated: the check can see a difference


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_decoding_equals_full_recompute(seed: int) -> None:
    model = tiny_model(seed=seed + 3)
    requests = [DecodeRequest(p, 16, temperature=0.8, top_k=40, top_p=0.95, seed=5 + i)
                for i, p in enumerate(random_prompts(seed + 3, 4))]  # fmt: skip
    assert decode_all(model, requests, slots=4) == [reference_decode(model, r) for r in requests]


def test_a_request_is_the_same_alone_in_a_static_batch_and_in_a_continuous_batch() -> None:
    model = tiny_model(seed=2)
    prompts = random_prompts(2, 12)
    sampled = dict(temperature=2.0, top_k=100, top_p=0.97)  # flat enough that the seed matters at every step
    target = DecodeRequest(prompts[0], 20, seed=7, **sampled)
    alone = decode_all(model, [target], slots=1)[0]
    assert alone == reference_decode(model, target)
    static_mates = [DecodeRequest(p, 20, seed=s, **sampled) for p, s in zip(prompts[1:4], [1, 2, 3], strict=True)]
    static = decode_all(model, [target, *static_mates], slots=4, refill=False)[0]
    # Different neighbours, other lengths and sampling parameters, and the target admitted mid-stream
    # into a slot another request has just freed.
    neighbours = [DecodeRequest(p, n, temperature=t, seed=s) for p, n, t, s in
                  zip(prompts[1:8], [2, 15, 3, 30, 1, 8, 4], [0, 1.0, 0.5, 0, 2.0, 0, 1.0], range(100, 107),
                      strict=True)]  # fmt: skip
    continuous = decode_all(model, [*neighbours[:3], target, *neighbours[3:]], slots=3)[3]
    other_mix = decode_all(model, [*neighbours[4:], target, *neighbours[:2]], slots=2)[3]
    assert alone == static == continuous == other_mix
    assert decode_all(model, [DecodeRequest(prompts[0], 20, seed=8, **sampled)], slots=1)[0] != alone


def test_seeds_give_each_row_its_own_reproducible_draws() -> None:
    model = tiny_model(seed=4)
    prompts = random_prompts(4, 3)

    def sample(seeds: list[int]) -> list[list[int]]:  # flat enough (temperature 2) that seeds matter at every step
        return decode_all(model, [DecodeRequest(p, 20, temperature=2.0, seed=s) for p, s in
                                  zip(prompts, seeds, strict=True)], slots=3)  # fmt: skip

    first = sample([1, 2, 3])
    assert sample([1, 2, 3]) == first
    assert all(a != b for a, b in zip(first, sample([11, 12, 13]), strict=True))
    # A row's draws come from its own generator: the same whatever the other rows' seeds or count.
    torch.testing.assert_close(row_uniforms([7, 8], 2, 5)[1], row_uniforms([8], 1, 5)[0], rtol=0, atol=0)


def test_greedy_and_sampled_rows_share_a_batch() -> None:
    model = tiny_model(seed=3)
    requests = [DecodeRequest(p, 16, temperature=t, top_k=k, top_p=q, seed=i) for i, (p, t, k, q) in
                enumerate(zip(random_prompts(3, 6), [0, 0.8, 1.5, 0, 1.0, 2.0], [None, 40, None, 5, 1, None],
                              [None, None, 0.9, None, None, 1e-6], strict=True))]  # fmt: skip
    assert decode_all(model, requests, slots=4) == [reference_decode(model, r) for r in requests]


def test_top_k_1_and_tiny_top_p_are_greedy() -> None:
    model = tiny_model(seed=6)
    prompts = random_prompts(6, 3)
    greedy = decode_all(model, [DecodeRequest(p, 12, temperature=0) for p in prompts], slots=3)
    for options in ({"top_k": 1}, {"top_p": 1e-6}):
        requests = [DecodeRequest(p, 12, seed=i, **options) for i, p in enumerate(prompts)]
        assert decode_all(model, requests, slots=3) == greedy


def test_sample_tokens_follows_the_filtered_distribution() -> None:
    n = 10_000
    logits = torch.tensor([0.5, 0.3, 0.2, 0.0]).log().expand(n, 4)
    uniforms = (torch.arange(n) + 0.5) / n  # evenly spread draws: frequencies equal probabilities
    counts = sample_tokens(logits, uniforms).bincount(minlength=4) / n
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.2, 0.0]), rtol=0, atol=1e-3)
    # top_p=0.7 keeps the smallest set whose mass reaches 0.7 ({0.5, 0.3}), renormalized.
    counts = sample_tokens(logits, uniforms, top_p=0.7).bincount(minlength=4) / n
    torch.testing.assert_close(counts, torch.tensor([0.625, 0.375, 0.0, 0.0]), rtol=0, atol=1e-3)
    counts = sample_tokens(logits, uniforms, top_k=1).bincount(minlength=4) / n
    assert counts.tolist() == [1.0, 0.0, 0.0, 0.0]
    # Temperature 2 flattens: probabilities proportional to sqrt(p).
    expected = torch.tensor([0.5, 0.3, 0.2, 0.0]).sqrt()
    counts = sample_tokens(logits, uniforms, temperature=2.0).bincount(minlength=4) / n
    torch.testing.assert_close(counts, expected / expected.sum(), rtol=0, atol=1e-3)
    # Per-row parameters: row 0 greedy-like (top_k=1), row 1 unfiltered.
    rows = sample_tokens(logits[:2], torch.tensor([0.99, 0.99]), top_k=torch.tensor([1, 4]))
    assert rows.tolist() == [0, 2]


def test_rows_stop_at_any_eos_which_is_not_returned_and_free_their_slot() -> None:
    model = tiny_model(seed=7)
    prompts = random_prompts(7, 6)
    full = decode_all(model, [DecodeRequest(p, 24, temperature=0) for p in prompts], slots=2)
    eos = [full[0][3], full[1][5]]  # tokens rows 0 and 1 emit mid-way play the two EOS ids (as Qwen2 has two)
    outputs = decode_all(model, [DecodeRequest(p, 24, temperature=0) for p in prompts], slots=2, eos_ids=eos)

    def cut(row: list[int]) -> list[int]:
        ends = [k for k, t in enumerate(row) if t in eos]
        return row[: ends[0]] if ends else row

    assert outputs == [cut(row) for row in full]
    assert outputs == [reference_decode(model, DecodeRequest(p, 24, temperature=0), eos) for p in prompts]
    assert len(outputs[0]) <= 3 and len(outputs[1]) <= 5 and not set(eos) & {t for o in outputs for t in o}


def test_decoding_ends_early_when_every_row_stopped() -> None:
    model = tiny_model(seed=8)
    prompt = random_prompts(8, 1)[0]
    first = decode_all(model, [DecodeRequest(prompt, 1, temperature=0)], slots=1)[0][0]
    forwards = count_forwards(model)
    assert decode_all(model, [DecodeRequest(prompt, 50, temperature=0)] * 2, slots=2, eos_ids=[first]) == [[], []]
    assert forwards == [(2, len(prompt))]  # the prefill only: both rows stopped on its token, no decode step ran


def test_a_freed_slot_takes_the_next_request_at_once() -> None:
    """Uneven lengths: static batching waits for each batch's longest row (4 batches x 40 steps);
    continuous batching refills the slot of every short request at once (about half the steps)."""
    model = tiny_model(seed=5, max_position_embeddings=128)
    lengths = [40, 2] * 4
    requests = [DecodeRequest(p, n, temperature=0) for p, n in zip(random_prompts(5, 8), lengths, strict=True)]
    forwards = count_forwards(model)
    steps: dict[bool, int] = {}
    order: dict[bool, list[int]] = {}
    for refill in (True, False):
        forwards.clear()
        order[refill] = [i for i, _ in decode_stream(model, requests, slots=2, refill=refill)]
        steps[refill] = sum(width == 1 for _, width in forwards)
    assert order[False] == [1, 0, 3, 2, 5, 4, 7, 6]  # static: request 2 starts after request 0 ends
    assert sorted(order[True]) == list(range(8))
    assert steps[False] >= 4 * 39 and steps[True] < 0.6 * steps[False]


def test_batch_shrinks_to_the_live_rows_when_the_stream_runs_dry() -> None:
    model = tiny_model(seed=6)
    requests = [DecodeRequest(p, n, temperature=0) for p, n in zip(random_prompts(6, 4), [40, 1, 2, 3], strict=True)]
    forwards = count_forwards(model)
    outputs = decode_all(model, requests, slots=4)
    assert forwards[-1] == (1, 1)  # the long request finishes alone, not in a batch of 4 mostly empty rows
    assert outputs == [reference_decode(model, r) for r in requests]


def test_requests_are_pulled_lazily_and_the_cache_grows() -> None:
    model = tiny_model(seed=7)
    prompts = random_prompts(7, 5)
    pulled: list[int] = []

    def source() -> Iterator[DecodeRequest]:
        for i, p in enumerate(prompts):
            pulled.append(i)
            yield DecodeRequest(p, 10 + 10 * i, temperature=0)

    stream = decode_stream(model, source(), slots=2, max_len=8)  # too short: grows on the way
    first, _ = next(stream)
    assert first == 0 and len(pulled) <= 3
    rest = dict(stream)
    assert len(rest) == 4
    assert rest[4] == reference_decode(model, DecodeRequest(prompts[4], 50, temperature=0))


def test_slot_cache_prefill_and_decode_logits_equal_the_forward_and_write_in_place() -> None:
    model = tiny_model(seed=9)
    prompts = random_prompts(9, 3)
    width = max(map(len, prompts))
    cache = SlotCache(model.config, 3, width + 4, torch.device("cpu"), torch.float32)
    buffers = [t.data_ptr() for t in cache.k + cache.v]
    with torch.inference_mode():
        for slot, prompt in enumerate(prompts):  # one prompt per prefill, into its own slot
            cache.prefill_into(torch.tensor([slot]))
            model.hidden(torch.tensor([prompt]), torch.arange(len(prompt))[None], None, cache)
            cache.lens[slot] = len(prompt)
        seqs = [list(p) for p in prompts]
        for _ in range(4):
            token = torch.tensor([int(model(torch.tensor([s]))[0][0, -1].argmax()) for s in seqs])  # [3]
            for s, t in zip(seqs, token.tolist(), strict=True):
                s.append(t)
            mask = cache.decode_at(int(cache.lens.max()) + 1)  # [3, 1, 1, S]: each row sees its own keys only
            assert mask.shape == (3, 1, 1, int(cache.lens.max()) + 1)
            logits = model.lm_head(model.hidden(token[:, None], cache.lens[:, None], mask, cache))[:, 0]  # [3, V]
            cache.lens += 1
            expected = torch.stack([model(torch.tensor([s]))[0][0, -1] for s in seqs])
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
    assert [t.data_ptr() for t in cache.k + cache.v] == buffers  # written in place, never reallocated


def test_decoding_in_train_mode_is_deterministic_and_restores_the_mode() -> None:
    model = tiny_model(seed=5, attention_dropout=0.5).train()
    requests = [DecodeRequest(p, 10, seed=i) for i, p in enumerate(random_prompts(5, 2))]
    assert decode_all(model, requests, slots=2) == decode_all(model, requests, slots=2)
    assert model.training


def test_bad_requests_and_edge_cases() -> None:
    model = tiny_model()
    assert decode_all(model, [], slots=2) == []
    assert decode_all(model, [DecodeRequest([1], 0), DecodeRequest([1, 2], 3, temperature=0)], slots=1)[0] == []
    with pytest.raises(ValueError, match="request 1 is empty"):
        decode_all(model, [DecodeRequest([1], 2), DecodeRequest([], 2)], slots=2)
    with pytest.raises(ValueError, match="request 0 has token ids outside the model's vocabulary 0..263"):
        decode_all(model, [DecodeRequest([1, 999], 2)], slots=1)
    with pytest.raises(ValueError, match="request 0 has 60 tokens.*max_new_tokens=10.*64 tokens"):
        decode_all(model, [DecodeRequest([1] * 60, 10)], slots=1)
    for bad, message in (({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p"),
                         ({"top_p": 0.0}, "top_p"), ({"seed": -1}, "request 0: seed"),
                         ({"max_new_tokens": -1}, "max_new_tokens")):  # fmt: skip
        request = DecodeRequest(**{"prompt": [1], "max_new_tokens": 2, **bad})
        with pytest.raises(ValueError, match=message):
            decode_all(model, [request], slots=1)
    with pytest.raises(ValueError, match="slots must be an int >= 1"):
        decode_all(model, [DecodeRequest([1], 2)], slots=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_stream_on_cuda(dtype: torch.dtype) -> None:
    model = tiny_model(seed=8)
    on_gpu = tiny_model(seed=8).to("cuda", dtype)
    lengths = [5, 20, 3, 9, 14, 2]
    requests = [DecodeRequest(p, n, temperature=0) for p, n in zip(random_prompts(8, 6), lengths, strict=True)]
    outputs = decode_all(on_gpu, requests, slots=3)
    assert [len(o) for o in outputs] == lengths
    assert outputs == decode_all(on_gpu, requests, slots=3)  # deterministic on the device too
    if dtype == torch.float32:
        assert outputs == [reference_decode(model, r) for r in requests]
    else:  # bf16 rounding differs between batch shapes, so sequences may drift apart; first tokens may not
        assert [o[0] for o in outputs] == [reference_decode(model, r)[0] for r in requests]
    logits = on_gpu(torch.tensor(requests[0].prompt, device="cuda")[None])[0]
    assert bool(torch.isfinite(F.softmax(logits.float(), dim=-1)).all())
