"""LoRA in plain torch (models/lora.py) and adapter directories in PEFT's layout (models/hf_adapter.py):
a wrapped model computes base + (alpha/r) B A, trains only A and B, merges into the same function, and
its adapter directory loads, through our loader and through peft itself, as the same model."""

from __future__ import annotations

import json
import os

import pytest
import torch

from aigc_dist.models.hf_adapter import save_adapter
from aigc_dist.models.hf_format import (
    CheckpointError,
    load_checkpoint,
    model_config_json,
    save_checkpoint,
    weights_digest,
)
from aigc_dist.models.llama import LlamaLM, LMConfig
from aigc_dist.models.lora import LoRALinear, adapter_state_dict, add_lora, merge_adapter_weights, merge_lora
from aigc_dist.models.tokenizer import byte_level_tokenizer
from aigc_dist.storage import Storage

TARGETS = ["q_proj", "v_proj", "down_proj"]


def qwen2_config(**overrides) -> LMConfig:
    """GQA, q/k/v bias, untied head: the parts a Qwen2 checkpoint has that the presets lack."""
    fields = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}  # fmt: skip
    return LMConfig(**{**fields, **overrides})


def lora_model(seed: int = 0, **config) -> LlamaLM:
    """A model with adapters whose B is random, so the update is not zero (a fresh B is)."""
    torch.manual_seed(seed)
    model = add_lora_to(LlamaLM(qwen2_config(**config)))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.weight.normal_(std=0.2)
    return model.eval()


def add_lora_to(model: LlamaLM) -> LlamaLM:
    add_lora(model, TARGETS, rank=4, alpha=8.0)
    return model


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 264, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_fresh_adapters_start_from_the_base_model_and_only_they_train():
    torch.manual_seed(0)
    base = LlamaLM(qwen2_config()).eval()
    expected = base(tokens())[0]
    wrapped = add_lora(base, TARGETS, rank=4, alpha=8.0)
    assert len(wrapped) == 2 * 3 and "model.layers.0.self_attn.q_proj" in wrapped
    assert torch.equal(base(tokens())[0], expected)  # B = 0: the update is zero
    trainable = {name for name, p in base.named_parameters() if p.requires_grad}
    assert trainable == {f"{path}.lora_{ab}.weight" for path in wrapped for ab in "AB"}
    layer = base.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.lora_A.weight.shape == (4, 32)
    assert layer.lora_B.weight.shape == (32, 4) and layer.scaling == 2.0
    assert "model.layers.0.self_attn.q_proj.base_layer.bias" in base.state_dict()  # PEFT's names


def test_merged_model_computes_what_the_adapters_do():
    model = lora_model()
    batch = tokens()
    unmerged = model(batch)[0]
    update = model.model.layers[1].mlp.down_proj
    expected_weight = update.base_layer.weight + 2.0 * update.lora_B.weight @ update.lora_A.weight
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert torch.allclose(merged.model.layers[1].mlp.down_proj.weight, expected_weight)
    assert torch.allclose(merged(batch)[0], unmerged, atol=1e-5)
    assert set(merged.state_dict()) == set(LlamaLM(qwen2_config()).state_dict())  # a plain model again


def test_saved_adapter_weights_merge_into_a_plain_model_like_merge_lora():
    model = lora_model()
    state = adapter_state_dict(model)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in state and len(state) == 12
    plain = LlamaLM(qwen2_config())
    plain.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
                           if ".lora_" not in k})  # fmt: skip
    assert merge_adapter_weights(plain, state, scaling=2.0)[0] == "model.layers.0.mlp.down_proj"
    assert torch.allclose(plain(tokens())[0], merge_lora(model)(tokens())[0], atol=1e-5)
    with pytest.raises(ValueError, match="does not have"):
        merge_adapter_weights(plain, {"base_model.model.model.nope.lora_A.weight": torch.zeros(1, 1),
                                      "base_model.model.model.nope.lora_B.weight": torch.zeros(1, 1)}, 1.0)


def test_targets_that_match_nothing_or_a_tied_head_are_refused():
    with pytest.raises(ValueError, match=r"match no Linear layer.*q_proj"):
        add_lora(LlamaLM(qwen2_config()), ["qproj"], rank=2, alpha=2.0)
    with pytest.raises(ValueError, match="shares its weight with the token embedding"):
        add_lora(LlamaLM(qwen2_config(tie_word_embeddings=True)), ["lm_head"], rank=2, alpha=2.0)
    add_lora(LlamaLM(qwen2_config()), ["lm_head"], rank=2, alpha=2.0)  # an untied head is a Linear like any


@pytest.fixture
def base_and_adapter(tmp_path):
    """A base checkpoint, and an adapter directory on it, as a LoRA run exports them."""
    storage = Storage()
    model = lora_model()
    base = LlamaLM(qwen2_config())
    base.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
                          if ".lora_" not in k})  # fmt: skip
    base_uri, adapter_uri = str(tmp_path / "base"), str(tmp_path / "adapter")
    save_checkpoint(base_uri, base, byte_level_tokenizer(), storage)
    meta = save_adapter(adapter_uri, model, byte_level_tokenizer(), storage, targets=TARGETS, base_uri=base_uri,
                        base_digest=weights_digest(base_uri, storage), metadata={"prompt_template": {"x": 1}})
    return model, base_uri, adapter_uri, meta


def test_adapter_directory_loads_merged_and_peft_opens_it_the_same(base_and_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, base_uri, adapter_uri, meta = base_and_adapter
    config = json.loads(open(f"{adapter_uri}/adapter_config.json").read())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert config["lora_alpha"] == 8.0 and config["target_modules"] == sorted(TARGETS)
    assert config["base_model_name_or_path"] == base_uri
    assert meta["base"]["uri"] == base_uri and set(meta["files"]) >= {"adapter_model.safetensors", "tokenizer.json"}

    loaded = load_checkpoint(adapter_uri, Storage())  # metadata.json required and checked, as engines do
    assert not any(isinstance(m, LoRALinear) for m in loaded.model.modules())
    assert loaded.metadata["prompt_template"] == {"x": 1} and loaded.digest == meta["digest"]
    batch = tokens()
    expected = model(batch)[0]
    assert torch.allclose(loaded.model(batch)[0], expected, atol=1e-5)

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_uri), adapter_uri).eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=batch).logits, expected, atol=1e-4)


def test_an_adapter_is_described_by_its_base_config(base_and_adapter):
    _, base_uri, adapter_uri, _ = base_and_adapter
    assert model_config_json(adapter_uri, Storage()) == model_config_json(base_uri, Storage())
    assert model_config_json(adapter_uri, Storage())["num_key_value_heads"] == 2


def test_adapter_on_a_replaced_base_is_refused(base_and_adapter):
    _, base_uri, adapter_uri, _ = base_and_adapter
    other = LlamaLM(qwen2_config())  # other weights, same shapes
    save_checkpoint(base_uri, other, byte_level_tokenizer(), Storage())
    with pytest.raises(CheckpointError, match="has changed since the adapter was trained"):
        load_checkpoint(adapter_uri, Storage())


def test_an_adapter_saved_by_peft_loads_merged(tmp_path):
    """A PEFT adapter the user brings (no metadata.json, no tokenizer): its base's tokenizer is used."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    storage = Storage()
    torch.manual_seed(0)
    base_uri = str(tmp_path / "base")
    save_checkpoint(base_uri, LlamaLM(qwen2_config()), byte_level_tokenizer(), storage)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_uri),
                                LoraConfig(r=2, lora_alpha=6, target_modules=["k_proj", "up_proj"], use_rslora=True))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = load_checkpoint(str(tmp_path / "peft"), storage, require_metadata=False)
    assert loaded.tokenizer.vocab_size == 264
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=tokens()).logits
    assert torch.allclose(loaded.model(tokens())[0], expected, atol=1e-4)
    assert set(loaded.model.state_dict()) == set(LlamaLM(qwen2_config()).state_dict())  # merged: a plain model


def test_unsupported_adapter_settings_are_named(base_and_adapter):
    _, _, adapter_uri, _ = base_and_adapter
    path = f"{adapter_uri}/adapter_config.json"
    config = json.loads(open(path).read())
    os.remove(f"{adapter_uri}/metadata.json")  # as a PEFT adapter comes: no sha256 to fail first
    with open(path, "w") as fh:
        json.dump({**config, "use_dora": True}, fh)
    with pytest.raises(CheckpointError, match="use_dora=True is not supported"):
        load_checkpoint(adapter_uri, Storage(), require_metadata=False)
