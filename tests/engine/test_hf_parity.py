"""The native engine against Hugging Face transformers, on the very same checkpoint directories.

Both ways: what `save_checkpoint` writes opens in transformers (AutoModelForCausalLM, AutoTokenizer),
and what transformers' `save_pretrained` writes opens here (`load_checkpoint(require_metadata=False)`).
On ragged prompts, greedy tokens of our engine (decode_stream on a `prepare_for_decode`d model, and
TextEngine end to end) equal `generate()`'s (left padding with an attention mask, KV cache on, fp32)
token for token. Weights are random with initializer_range 0.1 (presets: 0.02) so the logits are not
near-ties that float rounding would decide (the two sides sum in different orders). What this package
cannot run (yarn rope, gpt2, a missing tokenizer.json) is refused naming the file and the field.
CPU, fp32, small sizes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from aigc_dist.data.prompts import PromptTemplate, encode_prompt
from aigc_dist.demo.world import WorldConfig, make_world
from aigc_dist.engine.cpu_layout import prepare_for_decode
from aigc_dist.engine.decode import DecodeRequest
from aigc_dist.engine.text import SamplingParams, TextEngine, TextRequest, prompt_conditioning
from aigc_dist.models.artifact import load_artifact, save_text_artifact
from aigc_dist.models.hf_format import CheckpointError, load_checkpoint, save_checkpoint
from aigc_dist.models.llama import LlamaLM, lm_config_from_preset
from aigc_dist.models.tokenizer import TextTokenizer, byte_level_tokenizer
from aigc_dist.storage import Storage
from tests.engine.reference import decode_all, random_prompts, torch_threads
from tests.models.bpe import bpe_tokenizer

transformers = pytest.importorskip("transformers")  # a dev dependency: installed wherever the tests run
STORE = Storage()
TOK = byte_level_tokenizer()


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def world() -> Any:
    return make_world(WorldConfig(num_users=20, num_items=15, candidates_per_user=3, seed=3))


def hf_generate(hf: Any, prompts: list[list[int]], max_new_tokens: int, pad_id: int,
                eos_ids: list[int]) -> list[list[int]]:  # fmt: skip
    """transformers' greedy generate() on left-padded ragged prompts: each row's new tokens, cut before
    its first EOS (rows that ended are padded after it). `eos_ids` are passed explicitly: unset, generate()
    falls back to the checkpoint's generation_config.json."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = transformers.GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                           pad_token_id=pad_id, eos_token_id=eos_ids)  # fmt: skip
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, width:].tolist()
    stop = set(eos_ids)
    return [row[: next((k for k, t in enumerate(row) if t in stop), len(row))] for row in out]


def open_in_transformers(uri: str) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(uri, dtype=torch.float32).eval()


def ours(model: LlamaLM, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int] | None = None,
         slots: int = 4) -> list[list[int]]:  # fmt: skip
    """Greedy tokens of the engine's decode loop on the TextEngine layout (fewer slots than prompts, so
    finished rows are refilled mid-run)."""
    requests = [DecodeRequest(p, max_new_tokens, temperature=0) for p in prompts]
    return decode_all(prepare_for_decode(model), requests, slots=slots, eos_ids=eos_ids or ())


def make_it_say(model: LlamaLM, token: int, instead: int) -> None:
    """Make the (untied) head emit `instead` where it would emit `token`: its row becomes 1.05 times the
    other's, so its logit tops a positive winning one (and wins nowhere else unless `token` came within 5%
    of the top). How a random model is made to stop on an EOS."""
    assert not model.config.tie_word_embeddings
    with torch.no_grad():
        model.lm_head.weight[instead] = 1.05 * model.lm_head.weight[token]


def write_tokenizer(directory: Path, tokenizer: TextTokenizer) -> None:
    for name, data in tokenizer.files().items():
        (directory / name).write_bytes(data)


def preset_model(preset: str) -> LlamaLM:
    torch.manual_seed(0)
    return LlamaLM(lm_config_from_preset(preset, initializer_range=0.1)).eval()


@pytest.mark.parametrize("preset", ["tiny", "mini", "small", "base"])
def test_a_saved_preset_opens_in_transformers_and_decodes_the_same_tokens(preset: str, tmp_path: Path) -> None:
    model = preset_model(preset)
    uri = str(tmp_path / preset)
    save_checkpoint(uri, model, TOK, STORE)
    hf = open_in_transformers(uri)
    assert type(hf).__name__ == "LlamaForCausalLM"
    ours_state, theirs = model.state_dict(), hf.state_dict()
    assert theirs.keys() == ours_state.keys()  # the same tensor names: a state dict moves unchanged
    assert all(torch.equal(ours_state[k], v) for k, v in theirs.items())
    prompts = random_prompts(1, 6, max_len=30)
    # The logits of a ragged, left-padded batch first (any difference shows here before argmax hides it).
    width = max(map(len, prompts))
    idx = torch.tensor([[TOK.pad_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width) >= width - torch.tensor([len(p) for p in prompts])[:, None]).long()
    with torch.no_grad():
        expected = hf(input_ids=idx, attention_mask=mask).logits
        torch.testing.assert_close(model(idx, attention_mask=mask)[0][mask.bool()], expected[mask.bool()],
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
    theirs_tokens = hf_generate(hf, prompts, 20, TOK.pad_id, [TOK.eos_id])
    assert ours(model, prompts, 20, [TOK.eos_id]) == theirs_tokens
    assert len({t for row in theirs_tokens for t in row}) >= 10  # not one token repeated


@pytest.mark.parametrize("preset", ["tiny", "mini"])
def test_text_engine_writes_what_transformers_generates(preset: str, tmp_path: Path, world: Any) -> None:
    template = PromptTemplate(max_field_chars=24, max_prompt_tokens=128)
    uri = str(tmp_path / preset)
    save_text_artifact(uri, preset_model(preset), STORE, conditioning=prompt_conditioning(template))
    engine = TextEngine(load_artifact(uri, STORE), max_batch_size=3)
    users = {u["user_id"]: u for u in world.users.to_pylist()}
    items = {i["item_id"]: i for i in world.items.to_pylist()}
    requests = [TextRequest(users[c["user_id"]], items[c["item_id"]], sampling=SamplingParams(16, temperature=0))
                for c in world.candidates.slice(0, 7).to_pylist()]  # fmt: skip
    results = engine.generate(requests)
    hf_tok = transformers.AutoTokenizer.from_pretrained(uri)
    prompts = [encode_prompt(r.user, r.item, template, engine.tokenizer) for r in requests]
    theirs = hf_generate(open_in_transformers(uri), prompts, 16, TOK.pad_id, engine.eos_ids)
    assert [r.num_tokens for r in results] == [len(t) for t in theirs]
    assert [r.text for r in results] == [hf_tok.decode(t, skip_special_tokens=True) for t in theirs]
    assert all(r.error is None and r.prompt_tokens == len(p) for r, p in zip(results, prompts, strict=True))


def qwen2_by_transformers(directory: Path, tokenizer: TextTokenizer, **overrides: Any) -> Any:
    """A Qwen2 checkpoint as transformers writes it (GQA 4:2, q/k/v bias, untied head, Qwen2's rope
    base), random weights and random q/k/v biases (they start at zero, which would test nothing)."""
    config = transformers.Qwen2Config(**{
        "vocab_size": tokenizer.vocab_size, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "tie_word_embeddings": False,
        "initializer_range": 0.1, "use_sliding_window": False, "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id, **overrides})  # fmt: skip
    torch.manual_seed(1)
    hf = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(std=0.1)
    hf.save_pretrained(directory)
    write_tokenizer(directory, tokenizer)
    return hf


def test_a_qwen2_checkpoint_made_by_transformers_decodes_the_same(tmp_path: Path) -> None:
    bpe = bpe_tokenizer()
    hf = qwen2_by_transformers(tmp_path, bpe)
    checkpoint = load_checkpoint(str(tmp_path), STORE, require_metadata=False)
    config = checkpoint.config
    assert (config.model_type, config.num_key_value_heads, config.tie_word_embeddings) == ("qwen2", 2, False)
    assert config.rope_theta == 1e6 and config.eos_token_id == [bpe.eos_id] and checkpoint.metadata == {}
    assert checkpoint.tokenizer.encode("为您推荐 a tent") == bpe.encode("为您推荐 a tent")
    prompts = random_prompts(2, 6, max_len=30, vocab=bpe.vocab_size)
    expected = hf_generate(hf, prompts, 20, bpe.pad_id, config.eos_token_id)
    assert ours(checkpoint.model, prompts, 20, config.eos_token_id) == expected
    # One row alone: no mask, SDPA's fused causal kernel.
    assert ours(checkpoint.model, prompts[:1], 20, config.eos_token_id, slots=1) == expected[:1]
    # This model is below the size where TextEngine's layout packs; packed anyway, the biases must still add.
    fresh = load_checkpoint(str(tmp_path), STORE, require_metadata=False).model
    packed = prepare_for_decode(fresh, min_elements=0, streamed_bytes=0)
    assert all(layer.self_attn.qkv_fused.packed for layer in packed.layers)
    greedy = [DecodeRequest(p, 20, temperature=0) for p in prompts]
    assert decode_all(packed, greedy, slots=4, eos_ids=config.eos_token_id) == expected

    # Sampled: a request's seed alone decides its tokens, whatever its batch-mates and slot.
    sampled = [DecodeRequest(p, 16, temperature=1.5, top_p=0.95, seed=40 + i) for i, p in enumerate(prompts)]
    together = decode_all(checkpoint.model, sampled, slots=3)
    assert decode_all(checkpoint.model, sampled[::-1], slots=2)[::-1] == together
    assert [decode_all(checkpoint.model, [r], slots=1)[0] for r in sampled[:2]] == together[:2]
    assert together != expected  # sampling, not greedy decoding


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "linear", "factor": 4.0},
])  # fmt: skip
def test_a_llama_checkpoint_with_rope_scaling_decodes_the_same(rope: dict, tmp_path: Path) -> None:
    config = transformers.LlamaConfig(
        vocab_size=TOK.vocab_size, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=128, rope_parameters={**rope, "rope_theta": 10000.0},
        initializer_range=0.1, tie_word_embeddings=True, bos_token_id=TOK.bos_id, eos_token_id=TOK.eos_id,
        pad_token_id=TOK.pad_id)  # fmt: skip
    torch.manual_seed(2)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    write_tokenizer(tmp_path, TOK)
    checkpoint = load_checkpoint(str(tmp_path), STORE, require_metadata=False)
    assert checkpoint.config.rope_scaling["rope_type"] == rope["rope_type"]
    prompts = random_prompts(3, 5, max_len=40)  # positions up to 60: past llama3's original 16
    eos = checkpoint.config.eos_token_id
    expected = hf_generate(hf, prompts, 20, TOK.pad_id, eos)
    assert ours(checkpoint.model, prompts, 20, eos) == expected
    # The scaling matters here: without it the same weights decode other tokens.
    unscaled = LlamaLM(type(checkpoint.config)(**{**checkpoint.config.to_dict(), "rope_scaling": None}))
    unscaled.load_state_dict(checkpoint.model.state_dict())
    assert ours(unscaled.eval(), prompts, 20, eos) != expected


def test_what_this_package_cannot_run_is_refused_naming_the_file_and_field(tmp_path: Path) -> None:
    yarn = tmp_path / "yarn"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=128, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                      "original_max_position_embeddings": 32})).save_pretrained(yarn)
    write_tokenizer(yarn, TOK)
    with pytest.raises(CheckpointError, match=rf"{yarn}/config.json: rope_parameters.rope_type 'yarn' is not "
                                              r"supported \(supported: default, linear, llama3\)"):  # fmt: skip
        load_checkpoint(str(yarn), STORE, require_metadata=False)

    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=264, n_positions=64, n_embd=32, n_layer=1,
                                                         n_head=2)).save_pretrained(gpt2)  # fmt: skip
    write_tokenizer(gpt2, TOK)
    with pytest.raises(CheckpointError, match=rf"{gpt2}/config.json: model_type 'gpt2' is not supported"):
        load_checkpoint(str(gpt2), STORE, require_metadata=False)

    no_tokenizer = tmp_path / "no-tokenizer"
    qwen2_by_transformers(no_tokenizer, TOK)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="is not a complete checkpoint: tokenizer.json is missing"):
        load_checkpoint(str(no_tokenizer), STORE, require_metadata=False)


def test_a_bpe_checkpoint_runs_through_text_engine_with_the_text_layout_and_stops_on_its_eos(
    tmp_path: Path, world: Any
) -> None:
    bpe = bpe_tokenizer()
    template = PromptTemplate(max_field_chars=24, max_prompt_tokens=160, layout="text")
    torch.manual_seed(3)
    model = LlamaLM(lm_config_from_preset("tiny", vocab_size=bpe.vocab_size, tie_word_embeddings=False,
                                          initializer_range=0.1, bos_token_id=None, eos_token_id=[bpe.eos_id],
                                          pad_token_id=bpe.pad_id)).eval()  # fmt: skip
    users = {u["user_id"]: u for u in world.users.to_pylist()}
    items = {i["item_id"]: i for i in world.items.to_pylist()}
    requests = [TextRequest(users[c["user_id"]], items[c["item_id"]], sampling=SamplingParams(24, temperature=0))
                for c in world.candidates.slice(0, 6).to_pylist()]  # fmt: skip
    prompts = [encode_prompt(r.user, r.item, template, bpe) for r in requests]
    specials = {bpe.token_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    assert all(bpe.decode(p).startswith("user: segment=") and not specials & set(p) for p in prompts)  # text only
    free = ours(model, prompts, 24, [bpe.eos_id])
    # Request 0 ends on <|endoftext|> where it would first say a token no other request says.
    step, token = next((k, t) for k, t in enumerate(free[0]) if all(t not in row for row in free[1:]))
    make_it_say(model, token, instead=bpe.eos_id)
    uri = str(tmp_path / "bpe")
    save_text_artifact(uri, model, STORE, tokenizer=bpe, conditioning=prompt_conditioning(template))
    engine = TextEngine(load_artifact(uri, STORE), max_batch_size=4)
    assert engine.eos_ids == [bpe.eos_id]
    results = engine.generate(requests)
    theirs = hf_generate(open_in_transformers(uri), prompts, 24, bpe.pad_id, [bpe.eos_id])
    hf_tok = transformers.AutoTokenizer.from_pretrained(uri)
    assert [r.text for r in results] == [hf_tok.decode(t, skip_special_tokens=True) for t in theirs]
    assert [(r.num_tokens, r.finished) for r in results] == [(len(t), len(t) < 24) for t in theirs]
    assert results[0].finished and results[0].num_tokens <= step  # stopped on <|endoftext|>
    assert not all(r.finished for r in results)


def test_a_checkpoint_with_two_eos_ids_stops_on_either(tmp_path: Path) -> None:
    torch.manual_seed(4)
    model = LlamaLM(lm_config_from_preset("tiny", tie_word_embeddings=False, initializer_range=0.1)).eval()
    prompts = random_prompts(4, 4, max_len=20)
    free = ours(model, prompts, 12)  # no EOS: what each row would say
    im_end = TOK.special_id("<sep>")  # plays Qwen2's <|im_end|>, its second EOS beside <|endoftext|>
    make_it_say(model, free[0][2], instead=TOK.eos_id)  # row 0 now ends on <eos> by step 3,
    make_it_say(model, free[1][4], instead=im_end)  # row 1 on the other id by step 5
    model.config.eos_token_id = [TOK.eos_id, im_end]
    uri = str(tmp_path / "two-eos")
    save_checkpoint(uri, model, TOK, STORE)
    assert json.loads((Path(uri) / "generation_config.json").read_text())["eos_token_id"] == [TOK.eos_id, im_end]
    loaded = load_checkpoint(uri, STORE)
    assert loaded.config.eos_token_id == [TOK.eos_id, im_end]
    unstopped = ours(loaded.model, prompts, 12)
    stopped = ours(loaded.model, prompts, 12, loaded.config.eos_token_id)
    first_end = [next(k for k, t in enumerate(row) if t in (TOK.eos_id, im_end)) for row in unstopped[:2]]
    assert [unstopped[0][first_end[0]], unstopped[1][first_end[1]]] == [TOK.eos_id, im_end]  # each id ends a row
    assert stopped[:2] == [unstopped[0][: first_end[0]], unstopped[1][: first_end[1]]]
    # transformers reads the list from generation_config.json and stops the same rows at the same tokens.
    hf = open_in_transformers(uri)
    assert hf.generation_config.eos_token_id == [TOK.eos_id, im_end]
    assert hf_generate(hf, prompts, 12, TOK.pad_id, hf.generation_config.eos_token_id) == stopped
