"""Tiny language models and prompts shared by the LM tests (test_lm.py, test_lm_decode.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from aigc_dist.models.lm import LMConfig, TransformerLM
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


@pytest.fixture
def make_model() -> Callable[..., TransformerLM]:
    return _make_model


@pytest.fixture
def random_prompts() -> Callable[..., list[list[int]]]:
    return _random_prompts
