"""The reference every fast decoding path is held to, and the tiny models and prompts it is applied to.

`reference_decode` is nanoGPT's `generate()`: no KV cache, no batching, no layout, no padding; the
whole sequence goes through the model's plain forward for every new token. It shares only the
sampler (`sample_tokens`, tested on its own against known distributions) and the per-request random
draws (`row_uniforms`) with the engine, so a seeded request must give the very same tokens both ways.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from aigc_dist.engine.decode import DecodeRequest, decode_stream, row_uniforms, sample_tokens
from aigc_dist.models.llama import BYTE_BOS_ID, LlamaLM, LMConfig


@torch.no_grad()
def reference_decode(model: LlamaLM, request: DecodeRequest, eos_ids: Iterable[int] = ()) -> list[int]:
    """The request's new tokens by full recompute of its sequence per token (the EOS that ends it excluded)."""
    was_training = model.training
    model.eval()
    stop = set(eos_ids)
    greedy = request.temperature == 0
    draws = None if greedy else row_uniforms([request.seed], 1, request.max_new_tokens)  # [1, max_new_tokens]
    ids = list(request.prompt)
    for step in range(request.max_new_tokens):
        logits = model(torch.tensor([ids]))[0][:, -1].float()  # [1, vocab]: the last position's next token
        if greedy:
            token = int(logits.argmax())
        else:
            token = int(sample_tokens(logits, draws[:, step], request.temperature, request.top_k, request.top_p))
        if token in stop:
            break
        ids.append(token)
    model.train(was_training)
    return ids[len(request.prompt) :]


def decode_all(model: LlamaLM, requests: list[DecodeRequest], slots: int, **kwargs: Any) -> list[list[int]]:
    """decode_stream's results put back in request order (and each request answered exactly once)."""
    out: dict[int, list[int]] = {}
    for index, tokens in decode_stream(model, requests, slots, **kwargs):
        assert index not in out, f"request {index} finished twice"
        out[index] = tokens
    assert sorted(out) == list(range(len(requests)))
    return [out[i] for i in range(len(requests))]


def tiny_model(seed: int = 0, **overrides: Any) -> LlamaLM:
    """A tiny Llama (GQA: 2 query heads, 1 key/value head) whose greedy tokens depend on every weight.

    At the usual init (std 0.02) the logits are nearly uniform, so argmax ties would be decided by
    float rounding, and attention is nearly uniform, so wrong positions would go unnoticed. std 0.3
    spreads both: over 8 prompts x 30 tokens the smallest top-1/top-2 logit gap is ~5e-3 (rounding
    is ~1e-6), and scaling any one matrix by 1.01 changes some row's tokens (checked where it matters).
    """
    torch.manual_seed(seed)
    config = dict(hidden_size=32, intermediate_size=88, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.3) | overrides
    return LlamaLM(LMConfig(**config)).eval()


def random_prompts(seed: int, n: int, max_len: int = 12, vocab: int = 256) -> list[list[int]]:
    """n prompts of 1..max_len tokens: <bos> and random ids below `vocab`."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g).tolist()
    return [[BYTE_BOS_ID, *torch.randint(0, vocab, (k - 1,), generator=g).tolist()] for k in lengths]


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the thread hand-offs
    made single tests many times slower; the previous setting comes back afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
