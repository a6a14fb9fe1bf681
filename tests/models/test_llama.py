"""The Llama-family LM as a module: shapes, causality, padding, loss mask, GQA, rope scaling, presets, config.

Decoding (KV cache, sampling, batching) is the engine's and is tested in tests/engine/; equality with
transformers' own implementation in tests/engine/test_hf_parity.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from aigc_dist.engine.decode import DecodeRequest
from aigc_dist.models.llama import (
    BYTE_BOS_ID,
    BYTE_EOS_ID,
    BYTE_PAD_ID,
    LM_PRESETS,
    LlamaLM,
    LMConfig,
    inverse_frequencies,
    lm_config_from_preset,
)
from aigc_dist.models.tokenizer import byte_level_tokenizer
from tests.engine.reference import reference_decode, tiny_model, torch_threads

TOK = byte_level_tokenizer()


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def logits_of(model: LlamaLM, idx: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx, **kwargs)[0]


def test_forward_shapes_and_loss() -> None:
    model = tiny_model()
    idx = torch.randint(0, 264, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 10, 264) and loss is None
    logits, loss = model(idx, targets=torch.randint(0, 264, (3, 10)))
    assert loss is not None and loss.shape == () and torch.isfinite(loss)


def test_forward_rejects_mismatched_shapes() -> None:
    model = tiny_model()
    idx = torch.randint(0, 264, (2, 8))
    for name in ("targets", "loss_mask", "attention_mask"):
        with pytest.raises(ValueError, match=rf"{name} shape \(2, 7\) must match idx shape \(2, 8\)"):
            model(idx, **{"targets": idx, name: torch.ones(2, 7, dtype=torch.long)})


@pytest.mark.parametrize("overrides", [{}, {"model_type": "qwen2", "tie_word_embeddings": False}])
def test_future_tokens_do_not_change_earlier_logits(overrides: dict) -> None:
    model = tiny_model(**overrides)
    idx = torch.randint(0, 256, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 256
    a, b = logits_of(model, idx), logits_of(model, changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_positions_matter() -> None:
    """Rotary positions are relative: shifting every position alike changes nothing, spreading them does."""
    model = tiny_model(seed=1)
    idx = torch.randint(0, 256, (1, 10))
    positions = torch.arange(10)[None]
    logits = logits_of(model, idx)
    torch.testing.assert_close(logits_of(model, idx, positions=positions + 7), logits, rtol=0, atol=1e-4)
    assert not torch.allclose(logits_of(model, idx, positions=positions * 2)[:, 1:], logits[:, 1:], atol=1e-3)


def test_loss_mask_scores_only_selected_positions() -> None:
    model = tiny_model()
    idx, targets = torch.randint(0, 264, (2, 2, 9))
    loss_mask = torch.zeros(2, 9, dtype=torch.bool)
    loss_mask[0, 5:] = True
    loss_mask[1, 2:4] = True
    logits, loss = model(idx, targets=targets, loss_mask=loss_mask)
    expected = F.cross_entropy(logits[loss_mask], targets[loss_mask])
    torch.testing.assert_close(loss, expected)
    # A float mask means the same, and targets outside the mask can be anything.
    junk = torch.where(loss_mask, targets, BYTE_PAD_ID)
    torch.testing.assert_close(model(idx, targets=junk, loss_mask=loss_mask.float())[1], expected)
    assert model(idx, targets=targets, loss_mask=torch.zeros_like(loss_mask))[1].item() == 0.0  # none selected


def test_output_does_not_depend_on_padding() -> None:
    model = tiny_model(seed=2)
    prompt = [BYTE_BOS_ID, *TOK.encode("为您推荐")]
    alone = logits_of(model, torch.tensor([prompt]))[0]  # [T, vocab]
    for pad in (1, 5, 20):
        # Left padding, as a batch of ragged prompts is laid out for generate(): the logits must not move.
        idx = torch.tensor([[BYTE_PAD_ID] * pad + prompt, [BYTE_BOS_ID] * (len(prompt) + pad)])
        mask = torch.tensor([[0] * pad + [1] * len(prompt), [1] * (len(prompt) + pad)])
        torch.testing.assert_close(logits_of(model, idx, attention_mask=mask)[0, pad:], alone, rtol=0, atol=1e-5)
        # Right padding, as a training batch may be laid out.
        idx = torch.tensor([prompt + [BYTE_PAD_ID] * pad])
        mask = torch.tensor([[1] * len(prompt) + [0] * pad])
        right = logits_of(model, idx, attention_mask=mask)[0, : len(prompt)]
        torch.testing.assert_close(right, alone, rtol=0, atol=1e-5)


def test_grouped_query_attention_equals_attention_with_repeated_key_value_heads() -> None:
    """4 query heads sharing 2 key/value heads is 4 heads whose k/v weights repeat (query head h reads
    key/value head h // 2, transformers' repeat_kv order)."""
    gqa = tiny_model(seed=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    mha = tiny_model(seed=4, num_attention_heads=4, num_key_value_heads=4, head_dim=8)
    state = gqa.state_dict()
    for key, value in state.items():
        if ".k_proj." in key or ".v_proj." in key:  # [2 * 8, C] -> [4 * 8, C]: each head's rows twice
            state[key] = value.view(2, 8, -1).repeat_interleave(2, dim=0).reshape(32, -1)
    mha.load_state_dict(state)
    idx = torch.randint(0, 256, (2, 11))
    torch.testing.assert_close(logits_of(mha, idx), logits_of(gqa, idx), rtol=0, atol=1e-5)


def test_linear_rope_scaling_divides_positions_by_its_factor() -> None:
    plain = tiny_model(seed=5)
    scaled = tiny_model(seed=5, rope_scaling={"rope_type": "linear", "factor": 4.0})
    idx = torch.randint(0, 256, (1, 9))
    positions = torch.arange(9)[None]
    torch.testing.assert_close(logits_of(scaled, idx, positions=positions * 4), logits_of(plain, idx),
                               rtol=0, atol=1e-4)  # fmt: skip
    assert not torch.allclose(logits_of(scaled, idx), logits_of(plain, idx), atol=1e-3)


def test_llama3_rope_scaling_keeps_short_wavelengths_and_slows_long_ones() -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # fmt: skip
    config = LMConfig(hidden_size=64, num_attention_heads=1, num_key_value_heads=1, rope_theta=10000.0)
    plain = inverse_frequencies(config)
    scaled = inverse_frequencies(LMConfig(**{**config.to_dict(), "rope_scaling": scaling}))
    wavelength = 2 * math.pi / plain
    short, long = wavelength < 64 / 4, wavelength > 64 / 1  # original / high_freq_factor, original / low_freq_factor
    assert short.any() and long.any() and (~short & ~long).any()
    torch.testing.assert_close(scaled[short], plain[short])
    torch.testing.assert_close(scaled[long], plain[long] / 8)
    between = ~short & ~long  # smoothly in between
    assert bool(((scaled[between] < plain[between]) & (scaled[between] > plain[between] / 8)).all())


def test_qkv_bias_follows_the_architecture() -> None:
    def biases(model: LlamaLM) -> dict[str, bool]:
        attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
        return {name: getattr(attn, name).bias is not None for name in ("q_proj", "k_proj", "v_proj", "o_proj")} | {
            "mlp": mlp.gate_proj.bias is not None}

    assert biases(tiny_model()) == {"q_proj": False, "k_proj": False, "v_proj": False, "o_proj": False, "mlp": False}
    qwen2 = {"q_proj": True, "k_proj": True, "v_proj": True, "o_proj": False, "mlp": False}
    assert biases(tiny_model(model_type="qwen2")) == qwen2  # Qwen2: q/k/v only, never o_proj
    assert all(biases(tiny_model(attention_bias=True, mlp_bias=True)).values())


def expected_parameters(c: LMConfig) -> int:
    """Parameter count from the architecture: embeddings (+ an untied head), per layer q/k/v/o and the
    three SwiGLU matrices and two norms, the final norm."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attention = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + (q + 2 * kv) * c.qkv_bias
    mlp = 3 * c.hidden_size * c.intermediate_size
    layer = attention + mlp + 2 * c.hidden_size
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    return c.vocab_size * c.hidden_size + head + c.num_hidden_layers * layer + c.hidden_size


# Computed by expected_parameters and the module alike; docs/models.md quotes them.
PRESET_PARAMETERS = {"tiny": 117_568, "mini": 435_840, "small": 9_543_552, "base": 100_891_392}


@pytest.mark.parametrize("name", LM_PRESETS)
def test_preset_sizes(name: str) -> None:
    config = lm_config_from_preset(name)
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = LlamaLM(config)
    assert model.num_parameters() == expected_parameters(config) == PRESET_PARAMETERS[name]
    untied = lm_config_from_preset(name, tie_word_embeddings=False, model_type="qwen2")
    with torch.device("meta"):
        assert LlamaLM(untied).num_parameters() == expected_parameters(untied)


def test_presets_are_data_and_overridable() -> None:
    assert list(LM_PRESETS) == ["tiny", "mini", "small", "base"]
    assert lm_config_from_preset("tiny", max_position_embeddings=512).max_position_embeddings == 512
    assert lm_config_from_preset("small").num_key_value_heads == 2  # GQA: a third of the KV cache
    with pytest.raises(ValueError, match="unknown LM preset 'huge'; choose one of: tiny, mini, small, base"):
        lm_config_from_preset("huge")
    with pytest.raises(ValueError, match="LMConfig has no field.*n_layer"):
        lm_config_from_preset("tiny", n_layer=3)


def test_tied_weights_share_one_matrix() -> None:
    tied, untied = tiny_model(), tiny_model(tie_word_embeddings=False)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert untied.num_parameters() == tied.num_parameters() + 264 * 32


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_attention_heads": 3}, r"LMConfig.hidden_size must be divisible by num_attention_heads \(got 32 and 3\)"),
        ({"num_attention_heads": 32}, "LMConfig.head_dim must be an even int >= 2 for rotary positions"),
        ({"num_key_value_heads": 3}, r"num_attention_heads \(2\) must be a multiple of num_key_value_heads \(3\)"),
        ({"num_hidden_layers": 0}, r"LMConfig.num_hidden_layers must be an int >= 1 \(got 0\)"),
        ({"vocab_size": 2.5}, "LMConfig.vocab_size"),
        ({"attention_dropout": 1.0}, "LMConfig.attention_dropout"),
        ({"model_type": "gpt2"}, "LMConfig.model_type must be 'llama' or 'qwen2'.*'gpt2'"),
        ({"eos_token_id": [258, 300]}, r"LMConfig.eos_token_id has ids outside 0..263: \[300\]"),
        ({"bos_token_id": -1}, "LMConfig.bos_token_id must be a token id in 0..263"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "LMConfig.rope_scaling: rope_type 'yarn' is not"),
    ],
)
def test_config_errors_name_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LMConfig(**{"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2} | overrides)


def test_config_dict_round_trip_and_unknown_keys() -> None:
    config = LMConfig(num_hidden_layers=3, hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                      eos_token_id=BYTE_EOS_ID, rope_scaling={"rope_type": "linear", "factor": 2.0})  # fmt: skip
    assert config.eos_token_id == [BYTE_EOS_ID] and config.head_dim == 12  # one id becomes a list; head_dim derived
    assert LMConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="LMConfig has no field.*colour, d_ff"):
        LMConfig.from_dict(config.to_dict() | {"d_ff": 1, "colour": 2})


def test_bfloat16_forward_stays_close_to_float32() -> None:
    model = tiny_model(seed=6)
    idx = torch.randint(0, 256, (2, 10))
    expected = logits_of(model, idx)
    low = logits_of(model.to(torch.bfloat16), idx)
    assert low.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits: within 10% of the logits' range, and mostly the same argmax.
    assert (low.float() - expected).abs().max() <= 0.1 * expected.abs().max()
    assert (low.float().argmax(-1) == expected.argmax(-1)).float().mean() >= 0.8


@pytest.mark.slow
def test_tiny_model_learns_a_copy_and_generates_it() -> None:
    """Training works end to end: loss on the copy only drops, and greedy decoding then writes the copy."""
    prompt = [BYTE_BOS_ID, TOK.special_id("<item>"), *TOK.encode("laptop"), TOK.special_id("<sep>")]
    copy = TOK.encode("为您推荐：轻薄笔记本")
    seq = torch.tensor([prompt + copy + [BYTE_EOS_ID]])
    idx, targets = seq[:, :-1], seq[:, 1:]
    loss_mask = torch.arange(idx.size(1)) >= len(prompt) - 1  # targets from the first copy token on
    torch.manual_seed(0)
    model = LlamaLM(LMConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=88, max_position_embeddings=64))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        _, loss = model(idx, targets=targets, loss_mask=loss_mask[None])
        if loss.item() < 0.02:  # well below the bar: stop early to keep the test fast
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    assert reference_decode(model, DecodeRequest(prompt, 40, temperature=0), [BYTE_EOS_ID]) == copy
    assert TOK.decode(copy) == "为您推荐：轻薄笔记本"
