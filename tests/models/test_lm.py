import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from aigc_dist.models.lm import (
    KVCache,
    LMConfig,
    TransformerLM,
    left_pad,
    lm_config_from_preset,
)
from aigc_dist.models.lm_decode import sample_tokens
from aigc_dist.models.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
POS_ENCODINGS = ["rope", "learned"]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the thread
    hand-offs made the training test 30x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_forward_shapes_and_loss(make_model: Callable) -> None:
    model = make_model()
    idx = torch.randint(0, 264, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 10, 264) and loss is None
    logits, loss = model(idx, targets=torch.randint(0, 264, (3, 10)))
    assert loss is not None and loss.shape == () and torch.isfinite(loss)


def test_forward_rejects_mismatched_shapes_and_too_long_input(make_model: Callable) -> None:
    model = make_model()
    idx = torch.randint(0, 264, (2, 8))
    with pytest.raises(ValueError, match="loss_mask shape"):
        model(idx, targets=idx, loss_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_future_tokens_do_not_change_earlier_logits(pos_encoding: str, make_model: Callable) -> None:
    model = make_model(pos_encoding=pos_encoding)
    idx = torch.randint(0, 256, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 256
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_loss_mask_scores_only_selected_positions(make_model: Callable) -> None:
    model = make_model()
    idx, targets = torch.randint(0, 264, (2, 2, 9))
    loss_mask = torch.zeros(2, 9, dtype=torch.bool)
    loss_mask[0, 5:] = True
    loss_mask[1, 2:4] = True
    logits, loss = model(idx, targets=targets, loss_mask=loss_mask)
    expected = F.cross_entropy(logits[loss_mask], targets[loss_mask])
    torch.testing.assert_close(loss, expected)
    # A float mask means the same, and targets outside the mask can be anything.
    junk = torch.where(loss_mask, targets, TOK.pad_id)
    torch.testing.assert_close(model(idx, targets=junk, loss_mask=loss_mask.float())[1], expected)


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_output_does_not_depend_on_padding(pos_encoding: str, make_model: Callable) -> None:
    model = make_model(pos_encoding=pos_encoding)
    prompt = [TOK.bos_id, *TOK.encode("为您推荐")]
    alone = model(torch.tensor([prompt]))[0][0]  # [T, vocab]
    for pad in (1, 5, 20):
        # Left padding, as generate builds batches: the next-token logits must not move.
        idx, mask = left_pad([prompt, [TOK.bos_id] * (len(prompt) + pad)], TOK.pad_id)
        left = model(idx, attention_mask=mask)[0][0, pad:]
        torch.testing.assert_close(left, alone, rtol=0, atol=1e-5)
        # Right padding, as a training batch may be laid out.
        idx = torch.tensor([prompt + [TOK.pad_id] * pad])
        mask = torch.tensor([[1] * len(prompt) + [0] * pad])
        right = model(idx, attention_mask=mask)[0][0, : len(prompt)]
        torch.testing.assert_close(right, alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_prefill_and_decode_step_logits_match_forward(
    pos_encoding: str,
    make_model: Callable,
    random_prompts: Callable,
) -> None:
    model = make_model(pos_encoding=pos_encoding)
    prompts = random_prompts(1, 3)
    idx, mask = left_pad(prompts, TOK.pad_id)
    cache = KVCache(model.config, 3, idx.size(1) + 4)
    buffers = [t.data_ptr() for t in cache.k + cache.v]
    logits = model.prefill(idx, mask, cache)
    for _ in range(4):
        torch.testing.assert_close(logits, model(idx, attention_mask=mask)[0][:, -1], rtol=0, atol=1e-5)
        token = logits.argmax(-1)
        idx = torch.cat([idx, token[:, None]], dim=1)
        mask = F.pad(mask, (0, 1), value=True)
        logits = model.decode_step(token, cache)
    assert [t.data_ptr() for t in cache.k + cache.v] == buffers  # written in place, never reallocated
    with pytest.raises(ValueError, match="full"):
        model.decode_step(token, cache)


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kv_cache_greedy_equals_full_recompute(
    pos_encoding: str,
    seed: int,
    make_model: Callable,
    random_prompts: Callable,
) -> None:
    model = make_model(seed=seed, pos_encoding=pos_encoding)
    prompts = random_prompts(seed, 5)
    cached = model.generate(prompts, max_new_tokens=24, greedy=True)
    reference = model.generate(prompts, max_new_tokens=24, greedy=True, use_cache=False)
    assert cached == reference
    assert [len(row) for row in cached] == [24] * 5


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_kv_cache_sampling_equals_full_recompute(
    pos_encoding: str,
    make_model: Callable,
    random_prompts: Callable,
) -> None:
    model = make_model(seed=3, pos_encoding=pos_encoding)
    prompts = random_prompts(3, 4)
    kwargs = dict(max_new_tokens=16, temperature=0.8, top_k=40, top_p=0.95, seeds=[5, 6, 7, 8])
    assert model.generate(prompts, **kwargs) == model.generate(prompts, use_cache=False, **kwargs)


def test_seeded_sampling_is_reproducible_and_seed_dependent(make_model: Callable, random_prompts: Callable) -> None:
    model = make_model(seed=4)
    prompts = random_prompts(4, 3)
    sample = dict(max_new_tokens=20, temperature=2.0)  # flat enough that seeds matter at every step
    first = model.generate(prompts, seeds=[1, 2, 3], **sample)
    assert model.generate(prompts, seeds=[1, 2, 3], **sample) == first
    other = model.generate(prompts, seeds=[11, 12, 13], **sample)
    assert all(a != b for a, b in zip(first, other, strict=True))
    # The same request and seed gives the same copy whatever its batch-mates and their padding.
    for row, (prompt, seed) in enumerate(zip(prompts, [1, 2, 3], strict=True)):
        assert model.generate([prompt], seeds=[seed], **sample) == [first[row]]
    # Without seeds, torch's global seed makes the call reproducible.
    torch.manual_seed(9)
    unseeded = model.generate(prompts, **sample)
    torch.manual_seed(9)
    assert model.generate(prompts, **sample) == unseeded


def test_generate_in_train_mode_is_deterministic_and_restores_mode(
    make_model: Callable,
    random_prompts: Callable,
) -> None:
    model = make_model(dropout=0.5).train()
    prompts = random_prompts(5, 2)
    assert model.generate(prompts, 10, seeds=[1, 2]) == model.generate(prompts, 10, seeds=[1, 2])
    assert model.training


def test_top_k_1_and_tiny_top_p_are_greedy(make_model: Callable, random_prompts: Callable) -> None:
    model = make_model(seed=6)
    prompts = random_prompts(6, 3)
    greedy = model.generate(prompts, 12, greedy=True)
    assert model.generate(prompts, 12, temperature=0) == greedy
    assert model.generate(prompts, 12, top_k=1, seeds=[1, 2, 3]) == greedy
    assert model.generate(prompts, 12, top_p=1e-6, seeds=[1, 2, 3]) == greedy


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


def test_rows_stop_at_eos_which_is_not_returned(make_model: Callable, random_prompts: Callable) -> None:
    model = make_model(seed=7)
    prompts = random_prompts(7, 4)
    full = model.generate(prompts, 24, greedy=True)
    eos = full[0][5]  # pretend a token row 0 emits mid-way is the EOS
    stopped = model.generate(prompts, 24, greedy=True, eos_id=eos)
    assert stopped == [row[: row.index(eos)] if eos in row else row for row in full]
    assert len(stopped[0]) <= 5


def test_generation_ends_early_when_every_row_stopped(
    monkeypatch: pytest.MonkeyPatch,
    make_model: Callable,
    random_prompts: Callable,
) -> None:
    model = make_model(seed=8)
    prompt = random_prompts(8, 1)[0]
    first = model.generate([prompt], 1, greedy=True)[0][0]
    calls: list[int] = []
    decode_step = model.decode_step
    monkeypatch.setattr(model, "decode_step", lambda *a: calls.append(1) or decode_step(*a))
    assert model.generate([prompt, prompt], 50, greedy=True, eos_id=first) == [[], []]
    assert calls == []  # both rows stopped on the prefill's token: no decode step ran


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
        (dict(prompts=[[1, 999]]), "prompt 0 has token ids outside"),
        (dict(prompts=[[1] * 60], max_new_tokens=10), "max_seq_len=64"),
        (dict(seeds=[1]), "1 seeds for 2 prompts"),
        (dict(seeds=[1, -1]), r"seeds\[1\]"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs: dict, message: str, make_model: Callable) -> None:
    args = dict(prompts=[[1, 2], [3]], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=message):
        make_model().generate(**args)


def test_generate_edge_cases(make_model: Callable) -> None:
    model = make_model()
    assert model.generate([], 5) == []
    assert model.generate([[1, 2], [3]], 0) == [[], []]


def test_presets_sizes() -> None:
    assert 50_000 <= TransformerLM(lm_config_from_preset("tiny")).num_parameters() <= 200_000
    with torch.device("meta"):  # shapes only: no memory, no init time
        small = TransformerLM(lm_config_from_preset("small")).num_parameters()
        base = TransformerLM(lm_config_from_preset("base")).num_parameters()
    assert 5_000_000 <= small <= 20_000_000
    assert base >= 100_000_000
    assert lm_config_from_preset("tiny", dropout=0.1).dropout == 0.1
    with pytest.raises(ValueError, match="unknown LM preset 'huge'.*tiny, small, base"):
        lm_config_from_preset("huge")
    with pytest.raises(ValueError, match="n_layers"):
        lm_config_from_preset("tiny", n_layers=3)


def test_tied_weights_share_one_matrix(make_model: Callable) -> None:
    tied = make_model()
    untied = make_model(tie_weights=False)
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.num_parameters() == tied.num_parameters() + 264 * 32


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(n_head=3), "LMConfig.d_model must be divisible by n_head.*d_model=32, n_head=3"),
        (dict(n_head=32), "rope"),
        (dict(n_layer=0), r"LMConfig.n_layer must be an int >= 1 \(got 0\)"),
        (dict(vocab_size=2.5), "LMConfig.vocab_size"),
        (dict(dropout=1.0), "LMConfig.dropout"),
        (dict(pos_encoding="alibi"), "LMConfig.pos_encoding.*'alibi'"),
        (dict(tie_weights="yes"), "LMConfig.tie_weights"),
    ],
)
def test_config_errors_name_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LMConfig(**dict(n_layer=2, n_head=2, d_model=32) | overrides)


def test_config_dict_round_trip_and_unknown_keys() -> None:
    cfg = LMConfig(n_layer=3, d_model=48, pos_encoding="learned")
    assert LMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="colour, d_ff"):
        LMConfig.from_dict(cfg.to_dict() | {"d_ff": 1, "colour": 2})


@pytest.mark.slow
def test_tiny_model_learns_a_copy_and_generates_it() -> None:
    """Training works end to end: loss on the copy only drops, and greedy decoding then writes the copy."""
    prompt = [TOK.bos_id, TOK.item_id, *TOK.encode("laptop"), TOK.sep_id]
    copy = TOK.encode("为您推荐：轻薄笔记本")
    seq = torch.tensor([prompt + copy + [TOK.eos_id]])
    idx, targets = seq[:, :-1], seq[:, 1:]
    loss_mask = torch.arange(idx.size(1)) >= len(prompt) - 1  # targets from the first copy token on
    torch.manual_seed(0)
    model = TransformerLM(LMConfig(n_layer=2, n_head=2, d_model=32, max_seq_len=64))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        _, loss = model(idx, targets=targets, loss_mask=loss_mask[None])
        if loss.item() < 0.02:  # well below the bar: stop early to keep the test fast
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    assert model.generate([prompt], 40, greedy=True, eos_id=TOK.eos_id) == [copy]
    assert TOK.decode(copy) == "为您推荐：轻薄笔记本"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_on_cuda(dtype: torch.dtype, make_model: Callable, random_prompts: Callable) -> None:
    model = make_model(seed=9).to("cuda", dtype)
    prompts = random_prompts(9, 4)
    cached = model.generate(prompts, 16, greedy=True)
    assert [len(row) for row in cached] == [16] * 4
    if dtype == torch.float32:
        assert cached == model.generate(prompts, 16, greedy=True, use_cache=False)
    assert math.isfinite(model(torch.tensor(prompts[:1], device="cuda"))[0].float().sum().item())
