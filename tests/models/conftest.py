"""Tiny language models and prompts shared by the LM tests (test_lm.py, test_lm_decode.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from aigc_dist.models.lm import LMConfig, TransformerLM
from aigc_dist.models.lm_decode import DecodeRequest, decode_stream
from aigc_dist.models.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _make_model(seed: int = 0, pos_encoding: str = "rope", **overrides: object) -> TransformerLM:
    """A tiny model with spread-out logits and position-sensitive attention.

    At GPT-2 init the logits are nearly uniform, so greedy argmax ties would be decided by float
    rounding, and attention is nearly uniform, so wrong positions would go unnoticed. Scaling the
    embeddings and the query/key projections fixes both.
    """
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=2, d_model=32, max_seq_len=64, pos_encoding=pos_encoding) | overrides
    model = TransformerLM(LMConfig(**cfg)).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("wte.weight", "wpe.weight") or name.endswith("c_attn.weight"):
                p.mul_(25.0)
    return model


def _random_prompts(seed: int, n: int, max_len: int = 12) -> list[list[int]]:
    """n prompts of 1..max_len tokens: <bos> and random bytes."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g).tolist()
    return [[TOK.bos_id, *torch.randint(0, 256, (k - 1,), generator=g).tolist()] for k in lengths]


def _decode_all(model: TransformerLM, requests: list[DecodeRequest], slots: int, **kwargs: object) -> list[list[int]]:
    """decode_stream's results put back in request order (each request answered exactly once)."""
    out: dict[int, list[int]] = {}
    for index, tokens in decode_stream(model, requests, slots, **kwargs):  # type: ignore[arg-type]
        assert index not in out, f"request {index} finished twice"
        out[index] = tokens
    assert sorted(out) == list(range(len(requests)))
    return [out[i] for i in range(len(requests))]


def _reference(model: TransformerLM, request: DecodeRequest, eos_id: int | None = None,
               use_cache: bool = False) -> list[int]:  # fmt: skip
    """The request alone through TransformerLM.generate (full recompute by default)."""
    return model.generate([request.prompt], request.max_new_tokens, temperature=request.temperature,
                          top_k=request.top_k, top_p=request.top_p, eos_id=eos_id, seeds=[request.seed],
                          use_cache=use_cache)[0]  # fmt: skip


@pytest.fixture
def decode_all() -> Callable[..., list[list[int]]]:
    return _decode_all


@pytest.fixture
def reference() -> Callable[..., list[int]]:
    return _reference


@pytest.fixture
def make_model() -> Callable[..., TransformerLM]:
    return _make_model


@pytest.fixture
def random_prompts() -> Callable[..., list[list[int]]]:
    return _random_prompts
