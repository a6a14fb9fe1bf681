"""Checkpoint directories in the Hugging Face format (save_checkpoint / load_checkpoint): the files,
metadata.json's digests, sharding, and the refusals that name the file and the field.

That transformers opens what is written here, and that a checkpoint transformers writes loads here,
is tested in tests/engine/test_hf_parity.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from aigc_dist.models.hf_format import (
    CheckpointError,
    config_from_hf,
    hf_config,
    load_checkpoint,
    save_checkpoint,
)
from aigc_dist.models.llama import LlamaLM, LMConfig
from aigc_dist.models.tokenizer import byte_level_tokenizer
from aigc_dist.storage import Storage
from tests.engine.reference import tiny_model

STORE = Storage()
TOK = byte_level_tokenizer()
FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
         "metadata.json"}  # fmt: skip


def saved(tmp_path: Path, model: LlamaLM | None = None, name: str = "ckpt", **kwargs) -> tuple[str, LlamaLM]:
    model = model if model is not None else tiny_model(seed=1)
    uri = str(tmp_path / name)
    save_checkpoint(uri, model, TOK, STORE, **kwargs)
    return uri, model


def edit_json(path: Path, **changes: object) -> None:
    """Change fields of one of a checkpoint's JSON files, as a user bringing their own checkpoint may: its
    metadata.json goes too (its digests would refuse the change; such checkpoints have none)."""
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    if path.name != "metadata.json":
        (path.parent / "metadata.json").unlink(missing_ok=True)


def test_round_trip_files_and_digests(tmp_path: Path) -> None:
    model = tiny_model(seed=1, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    uri, _ = saved(tmp_path, model, metadata={"name": "copy-lm", "version": "v3", "run": "r1"})
    assert {p.name for p in Path(uri).iterdir()} == FILES
    loaded = load_checkpoint(uri, STORE)
    assert loaded.config == model.config
    assert loaded.model.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in model.state_dict().items())
    assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight  # tied again, stored once
    assert "lm_head.weight" not in safetensors.torch.load_file(Path(uri) / "model.safetensors")
    assert loaded.tokenizer.encode("为您 🎉") == TOK.encode("为您 🎉") and not loaded.model.training
    meta = json.loads((Path(uri) / "metadata.json").read_text())
    assert meta == loaded.metadata
    assert (meta["name"], meta["version"], meta["run"], meta["kind"]) == ("copy-lm", "v3", "r1", "lm")
    assert meta["num_parameters"] == model.num_parameters()
    # Every other file's sha256, and the directory's digest over them: the same content, the same digest.
    assert meta["files"] == {n: hashlib.sha256((Path(uri) / n).read_bytes()).hexdigest() for n in FILES - {
        "metadata.json"}}  # fmt: skip
    assert meta["digest"] == hashlib.sha256(json.dumps(meta["files"], sort_keys=True).encode()).hexdigest()
    again, _ = saved(tmp_path, model, name="again", metadata={"name": "other-name"})
    assert load_checkpoint(again, STORE).digest == loaded.digest and loaded.label == f"copy-lm:v3@{meta['digest'][:12]}"


def test_an_untied_head_is_stored_and_loaded_untied(tmp_path: Path) -> None:
    uri, model = saved(tmp_path, tiny_model(seed=2, model_type="qwen2", tie_word_embeddings=False))
    loaded = load_checkpoint(uri, STORE).model
    assert "lm_head.weight" in safetensors.torch.load_file(Path(uri) / "model.safetensors")
    assert loaded.lm_head.weight is not loaded.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(loaded.layers[1].self_attn.v_proj.bias, model.layers[1].self_attn.v_proj.bias)


def test_large_weights_are_sharded_with_an_index(tmp_path: Path) -> None:
    uri, model = saved(tmp_path, max_shard_bytes=40_000)  # the tiny model's ~160 kB: a few shards
    names = {p.name for p in Path(uri).iterdir()}
    shards = sorted(n for n in names if n.startswith("model-"))
    assert len(shards) >= 3 and "model.safetensors" not in names
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((Path(uri) / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict()) - {"lm_head.weight"}
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in model.model.state_dict().values())
    meta = json.loads((Path(uri) / "metadata.json").read_text())
    assert set(shards) | {"model.safetensors.index.json"} <= set(meta["files"])
    loaded = load_checkpoint(uri, STORE).model
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "generation_config.json", "model-00002-of-"])
def test_a_changed_file_is_refused_naming_it(tmp_path: Path, name: str) -> None:
    uri, _ = saved(tmp_path, max_shard_bytes=100_000)
    path = next(p for p in Path(uri).iterdir() if p.name.startswith(name))
    path.write_bytes(path.read_bytes() + b" ")  # still valid JSON / safetensors: only the digest can tell
    with pytest.raises(CheckpointError, match=rf"{path.name} does not match metadata.json's sha256"):
        load_checkpoint(uri, STORE)


def test_incomplete_directories_are_refused_naming_the_missing_file(tmp_path: Path) -> None:
    uri, _ = saved(tmp_path)
    (Path(uri) / "metadata.json").unlink()  # written last: a directory without it is half written
    with pytest.raises(CheckpointError, match="is not a complete checkpoint: metadata.json is missing"):
        load_checkpoint(uri, STORE)
    assert load_checkpoint(uri, STORE, require_metadata=False).metadata == {}  # a checkpoint the user brings
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        (Path(uri) / name).unlink()
        with pytest.raises(CheckpointError, match=f"is not a complete checkpoint: {name} is missing"):
            load_checkpoint(uri, STORE, require_metadata=False)
        (Path(uri) / name).write_bytes((Path(saved(tmp_path, name="fresh")[0]) / name).read_bytes())


def test_an_old_format_artifact_is_refused_with_the_conversion_to_run(tmp_path: Path) -> None:
    uri, _ = saved(tmp_path)
    edit_json(Path(uri) / "metadata.json", format=1)
    with pytest.raises(CheckpointError, match=r"format 1 is not 'aigc-dist/hf-1'.*aigc-dist export --to-hf"):
        load_checkpoint(uri, STORE)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "gpt2"}, r"config.json: model_type 'gpt2' is not supported \(supported: llama, qwen2, mistral"),
        ({"hidden_act": "gelu"}, "config.json: hidden_act 'gelu' is not supported"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "config.json: use_sliding_window True is not supported"),
        ({"model_type": "mistral", "sliding_window": 16}, "config.json: sliding_window 16 is shorter than the context"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "config.json: rope_scaling.rope_type 'yarn' is not"),
        ({"rope_scaling": None, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
         "config.json: rope_parameters.rope_type 'dynamic' is not supported"),
        ({"hidden_size": None}, "config.json: LMConfig.hidden_size must be an int >= 1"),
        ({"num_attention_heads": 3, "head_dim": None}, "config.json: LMConfig.hidden_size must be divisible"),
    ],
)
def test_configs_this_package_cannot_run_are_refused_naming_the_field(tmp_path: Path, changes: dict,
                                                                      message: str) -> None:  # fmt: skip
    uri, _ = saved(tmp_path)
    edit_json(Path(uri) / "config.json", **changes)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(uri, STORE, require_metadata=False)


def test_a_missing_required_field_is_named() -> None:
    d = hf_config(LMConfig())
    del d["vocab_size"]
    with pytest.raises(CheckpointError, match="src/config.json: required field 'vocab_size' is missing"):
        config_from_hf(d, "src")


@pytest.mark.parametrize("config", [
    LMConfig(),
    LMConfig(model_type="qwen2", tie_word_embeddings=False, num_key_value_heads=1, eos_token_id=[258, 259]),
    LMConfig(rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=5e5, attention_bias=True, head_dim=16),
])  # fmt: skip
def test_config_json_round_trips(config: LMConfig) -> None:
    d = hf_config(config)
    assert config_from_hf(d, "src") == config
    assert d["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[config.model_type]]
    # Both generations of transformers' rope fields, so either reads it.
    assert d["rope_parameters"]["rope_theta"] == d["rope_theta"] == config.rope_theta
    if config.model_type == "llama":  # Mistral without a sliding window is Llama
        assert config_from_hf({**d, "model_type": "mistral", "sliding_window": None}, "src") == config


def test_generation_config_eos_list_wins_and_the_tokenizer_fills_a_missing_eos(tmp_path: Path) -> None:
    uri, _ = saved(tmp_path, tiny_model(seed=3, eos_token_id=[258, 259]))
    generation = json.loads((Path(uri) / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [258, 259]  # a list when there are several, as Qwen2 ships
    edit_json(Path(uri) / "config.json", eos_token_id=258)
    assert load_checkpoint(uri, STORE, require_metadata=False).config.eos_token_id == [258, 259]
    edit_json(Path(uri) / "config.json", eos_token_id=None)
    edit_json(Path(uri) / "generation_config.json", eos_token_id=None)
    assert load_checkpoint(uri, STORE, require_metadata=False).config.eos_token_id == [TOK.eos_id]


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path: Path) -> None:
    small = tiny_model(vocab_size=200, bos_token_id=1, eos_token_id=[2], pad_token_id=0)
    with pytest.raises(CheckpointError, match="the tokenizer has 264 tokens but the model only vocab_size=200"):
        save_checkpoint(str(tmp_path / "x"), small, TOK, STORE)
    uri, _ = saved(tmp_path)
    edit_json(Path(uri) / "config.json", vocab_size=200, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    (Path(uri) / "generation_config.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json has 264 tokens, more than config.json's vocab_size=200"):
        load_checkpoint(uri, STORE, require_metadata=False)


def test_dtype_is_kept_or_cast_on_load(tmp_path: Path) -> None:
    uri, model = saved(tmp_path, tiny_model(seed=4).to(torch.bfloat16))
    assert json.loads((Path(uri) / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_checkpoint(uri, STORE).model.embed_tokens.weight.dtype == torch.bfloat16
    as_float = load_checkpoint(uri, STORE, dtype=torch.float32).model
    assert as_float.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(as_float.embed_tokens.weight, model.embed_tokens.weight.float())


def test_a_chat_template_is_kept_in_tokenizer_config(tmp_path: Path) -> None:
    template = "{% for m in messages %}{{ m['content'] }}<eos>{% endfor %}"
    tok = byte_level_tokenizer()
    tok.config["chat_template"] = template
    uri = str(tmp_path / "chat")
    save_checkpoint(uri, tiny_model(), tok, STORE)
    assert json.loads((Path(uri) / "tokenizer_config.json").read_text())["chat_template"] == template
    assert load_checkpoint(uri, STORE).tokenizer.chat_template == template
