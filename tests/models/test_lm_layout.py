"""The CPU decode layout (prepare_for_decode): oneDNN-packed Linears give the plain model's tokens, keep
its weights, follow in-place weight changes, and leave training and pickling working."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable

import pytest
import torch

from aigc_dist.models.lm import LMConfig, TransformerLM, lm_config_from_preset
from aigc_dist.models.lm_decode import DecodeRequest
from aigc_dist.models.lm_layout import BATCHED_ROWS, PackedLinear, prepare_for_decode

# The tests' tiny models are below the size where packing pays; these settings pack them anyway.
EVERYWHERE = {"min_elements": 0, "streamed_bytes": 0}


def plain_logits(config: LMConfig, state: dict, idx: torch.Tensor) -> torch.Tensor:
    """Logits of a plain (unprepared) model holding `state`."""
    plain = TransformerLM(config).eval()
    plain.load_state_dict(state)
    return plain(idx)[0]


def block_sensitive_model(seed: int) -> TransformerLM:
    """A tiny model whose greedy tokens depend on every block: all matrices scaled up from GPT-2 init.

    (The shared tiny test model scales the embedding, which then decides most tokens by itself: a
    wrong block output could go unnoticed there.) Checked below: 1% off one MLP matrix changes tokens.
    """
    torch.manual_seed(seed)
    model = TransformerLM(LMConfig(n_layer=2, n_head=2, d_model=32, max_seq_len=64)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and ".ln_" not in name and not name.startswith("ln_f"):
                p.mul_(6.0)
    return model


def test_prepared_model_decodes_the_plain_models_greedy_tokens(
    random_prompts: Callable, decode_all: Callable, reference: Callable
) -> None:
    plain = block_sensitive_model(seed=11)
    prepared = prepare_for_decode(copy.deepcopy(plain), **EVERYWHERE)
    lengths = [3, 30, 1, 12, 25, 2, 7, 40]
    requests = [DecodeRequest(p, n, temperature=0) for p, n in zip(random_prompts(11, 8), lengths, strict=True)]
    expected = [reference(plain, r) for r in requests]
    assert len({t for tokens in expected for t in tokens}) >= 10  # not one token repeated
    assert decode_all(prepared, requests, slots=3) == expected
    assert decode_all(prepared, requests[-1:], slots=1) == expected[-1:]  # one row: the matrix-vector path

    with torch.no_grad():
        prepared.blocks[1].mlp.c_fc.weight.mul_(1.01)
    assert decode_all(prepared, requests, slots=3) != expected  # the check above can see a wrong block


def test_layout_keeps_the_parameters_and_follows_in_place_changes(make_model: Callable,
                                                                  random_prompts: Callable) -> None:  # fmt: skip
    model, other = make_model(seed=12), make_model(seed=13)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepare_for_decode(model, **EVERYWHERE)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 4 * model.config.n_layer  # qkv, attention out, MLP in and out of every block
    assert model.lm_head.weight is model.wte.weight  # the tied embedding keeps its rows
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    idx = torch.tensor(random_prompts(12, 1, max_len=12))
    with torch.inference_mode():
        logits = model(idx)[0]  # packs the weights
        assert torch.allclose(logits, plain_logits(model.config, before, idx), atol=1e-4)
        model.load_state_dict(other.state_dict())  # in place: the packed copies must not go stale
        assert torch.allclose(model(idx)[0], other(idx)[0], atol=1e-4)
        assert not torch.allclose(logits, other(idx)[0], atol=1e-2)


def test_a_prepared_model_still_trains_and_pickles(
    make_model: Callable, random_prompts: Callable, decode_all: Callable
) -> None:
    model = prepare_for_decode(make_model(seed=14), **EVERYWHERE)
    requests = [DecodeRequest(p, 6, temperature=0) for p in random_prompts(14, 2)]
    expected = decode_all(model, requests, slots=2)
    model.train()
    idx = torch.tensor([requests[0].prompt * 2])
    logits, loss = model(idx, targets=idx)
    loss.backward()
    with torch.no_grad():
        assert torch.allclose(logits, plain_logits(model.config, model.state_dict(), idx), atol=1e-4)
    assert model.blocks[0].mlp.c_fc.weight.grad is not None  # plain F.linear with autograd
    clone = pickle.loads(pickle.dumps(model.eval()))  # e.g. shipped to a Ray actor
    assert decode_all(clone, requests, slots=2) == expected


@pytest.mark.parametrize(("preset", "packed_per_block", "min_rows"), [
    ("small", 4, 1),  # 42 MB of block weights: streamed from memory, so packed from one row on
    ("mini", 3, BATCHED_ROWS),  # 1.6 MB stays in the cache; attention out (16k weights) stays plain
    ("tiny", 0, None),  # every matrix under 32k weights: oneDNN's per-call cost would not pay
])  # fmt: skip
def test_packing_is_chosen_by_size(preset: str, packed_per_block: int, min_rows: int | None) -> None:
    model = prepare_for_decode(TransformerLM(lm_config_from_preset(preset)))
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == packed_per_block * model.config.n_layer
    assert {m.min_rows for m in packed} == ({min_rows} if packed else set())
    # The MLP's GELU moves into its first product (and is applied exactly once).
    fused = [getattr(b.mlp.c_fc, "gelu", False) and isinstance(b.mlp.act, torch.nn.Identity) for b in model.blocks]
    assert fused == [bool(packed)] * model.config.n_layer
