"""The CPU decode layout (prepare_for_decode): fused q|k|v and gate|up products, oneDNN-packed where it
pays, give the plain model's tokens, keep its weights, follow in-place weight changes, and leave
training and pickling working."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from aigc_dist.engine.cpu_layout import BATCHED_ROWS, FusedLinear, PackedLinear, prepare_for_decode
from aigc_dist.engine.decode import DecodeRequest
from aigc_dist.models.llama import LlamaLM, lm_config_from_preset
from tests.engine.reference import decode_all, random_prompts, reference_decode, tiny_model, torch_threads

# The tests' tiny models are below the size where packing pays; these settings pack them anyway.
EVERYWHERE = {"min_elements": 0, "streamed_bytes": 0}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def plain_logits(model: LlamaLM, state: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """Logits of a plain (unprepared) model of the same config holding `state`."""
    plain = LlamaLM(model.config).eval()
    plain.load_state_dict(state)
    with torch.no_grad():
        return plain(idx)[0]


def fused_products(model: LlamaLM) -> list[FusedLinear]:
    return [m for m in model.modules() if isinstance(m, FusedLinear)]


@pytest.mark.parametrize("overrides", [{}, {"model_type": "qwen2", "tie_word_embeddings": False}])
def test_prepared_model_decodes_the_plain_models_greedy_tokens(overrides: dict) -> None:
    plain = tiny_model(seed=11, **overrides)
    if overrides:  # Qwen2's q/k/v biases start at zero; random ones check that the fused product adds them
        with torch.no_grad():
            for layer in plain.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(std=0.3)
    prepared = prepare_for_decode(copy.deepcopy(plain), **EVERYWHERE)
    assert all(f.packed for f in fused_products(prepared)) and fused_products(prepared)
    lengths = [3, 30, 1, 12, 25, 2, 7, 40]
    requests = [DecodeRequest(p, n, temperature=0) for p, n in zip(random_prompts(11, 8), lengths, strict=True)]
    expected = [reference_decode(plain, r) for r in requests]
    assert len({t for tokens in expected for t in tokens}) >= 20  # not one token repeated
    assert decode_all(prepared, requests, slots=3) == expected
    assert decode_all(prepared, requests[-1:], slots=1) == expected[-1:]  # one row: the matrix-vector path

    # The check above can see a wrong fused product: 1% off one source matrix of each changes tokens.
    for name in ("model.layers.1.mlp.gate_proj.weight", "model.layers.0.self_attn.v_proj.weight"):
        changed = copy.deepcopy(prepared)
        with torch.no_grad():
            changed.get_parameter(name).mul_(1.01)
        assert decode_all(changed, requests, slots=3) != expected, name


def test_layout_keeps_the_parameters_and_follows_in_place_changes() -> None:
    model, other = tiny_model(seed=12), tiny_model(seed=13)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepare_for_decode(model, **EVERYWHERE)
    n_layer = model.config.num_hidden_layers
    products = [(layer.self_attn.qkv_fused, layer.mlp.gate_up_fused) for layer in model.layers]
    assert all(isinstance(f, FusedLinear) and f.packed for pair in products for f in pair)  # q|k|v, gate|up
    assert len([m for m in model.modules() if isinstance(m, PackedLinear)]) == 2 * n_layer  # o_proj, down_proj
    assert model.lm_head.weight is model.embed_tokens.weight  # the tied embedding keeps its rows
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    prepare_for_decode(model, **EVERYWHERE)  # twice: nothing changes
    assert [(layer.self_attn.qkv_fused, layer.mlp.gate_up_fused) for layer in model.layers] == products
    assert len([m for m in model.modules() if isinstance(m, PackedLinear)]) == 2 * n_layer
    assert model.state_dict().keys() == before.keys()

    idx = torch.tensor(random_prompts(12, 1, max_len=12))
    with torch.inference_mode():
        logits = model(idx)[0]  # packs the weights
        torch.testing.assert_close(logits, plain_logits(model, before, idx), rtol=0, atol=1e-4)
        model.load_state_dict(other.state_dict())  # in place: the fused copies must not go stale
        torch.testing.assert_close(model(idx)[0], other(idx)[0], rtol=0, atol=1e-4)
        assert not torch.allclose(logits, other(idx)[0], atol=1e-2)


def test_a_prepared_model_still_trains_and_pickles() -> None:
    model = prepare_for_decode(tiny_model(seed=14), **EVERYWHERE)
    requests = [DecodeRequest(p, 6, temperature=0) for p in random_prompts(14, 2)]
    expected = decode_all(model, requests, slots=2)
    model.train()
    idx = torch.tensor([requests[0].prompt * 2])
    logits, loss = model(idx, targets=idx)
    loss.backward()
    torch.testing.assert_close(logits.detach(), plain_logits(model, model.state_dict(), idx), rtol=0, atol=1e-4)
    layer = model.layers[0]
    for linear in (layer.mlp.gate_proj, layer.mlp.down_proj, layer.self_attn.q_proj, layer.self_attn.o_proj):
        assert linear.weight.grad is not None  # the source Parameters, with autograd
    clone = pickle.loads(pickle.dumps(model.eval()))  # e.g. shipped to a Ray actor
    assert decode_all(clone, requests, slots=2) == expected


@pytest.mark.parametrize(("preset", "packed", "min_rows"), [
    # 38 MB of layer weights: streamed from memory at every step, so packed from one row on.
    ("small", {"qkv": True, "gate_up": True, "o_proj": True, "down_proj": True}, 1),
    # 1.6 MB stays in the cache; o_proj (16k weights) stays plain.
    ("mini", {"qkv": True, "gate_up": True, "o_proj": False, "down_proj": True}, BATCHED_ROWS),
    # Every product under 32k weights: oneDNN's per-call cost would not pay.
    ("tiny", {"qkv": False, "gate_up": False, "o_proj": False, "down_proj": False}, BATCHED_ROWS),
])  # fmt: skip
def test_packing_is_chosen_by_size(preset: str, packed: dict[str, bool], min_rows: int) -> None:
    model = prepare_for_decode(LlamaLM(lm_config_from_preset(preset)))
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert isinstance(attn.qkv_fused, FusedLinear) and isinstance(mlp.gate_up_fused, FusedLinear)
        is_packed = {"qkv": attn.qkv_fused.packed, "gate_up": mlp.gate_up_fused.packed,
                     "o_proj": isinstance(attn.o_proj, PackedLinear),
                     "down_proj": isinstance(mlp.down_proj, PackedLinear)}
        assert is_packed == packed
        assert {f.min_rows for f in (attn.qkv_fused, mlp.gate_up_fused)} == {min_rows}
        assert all(type(m) in (nn.Linear, PackedLinear) for m in (attn.o_proj, mlp.down_proj))
