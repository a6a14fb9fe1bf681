"""`aigc-dist export --to-hf URI` on artifacts of aigc-dist's earlier format: a text model (GPT-style:
LayerNorm, GELU, fused c_attn) cannot become a Llama-family checkpoint, and the command says why, what
the old model is, and the `aigc-dist train` overrides that retrain one of its size on its prompt fields;
it writes nothing. Image artifacts and Hugging Face checkpoints need nothing."""

from __future__ import annotations

import hashlib
import json

import pytest
import safetensors.torch
import torch

from aigc_dist.cli import EXIT_CONFIG_ERROR, main
from aigc_dist.models.artifact import ArtifactError, load_artifact
from aigc_dist.models.hf_format import save_checkpoint
from aigc_dist.models.llama import LlamaLM, lm_config_from_preset
from aigc_dist.models.tokenizer import byte_level_tokenizer
from aigc_dist.storage import Storage


def write_old_text_artifact(directory) -> None:
    """The files c58706a's save_artifact wrote for its mini LM (weights: a few tensors with its names)."""
    directory.mkdir()
    template = {"user_fields": ["segment", "locale"], "item_fields": ["title", "category"],
                "required_user_fields": ["segment"], "required_item_fields": ["title"], "max_field_chars": 48,
                "max_prompt_tokens": 160}  # fmt: skip
    config = {"format_version": 1, "kind": "lm", "tokenizer": {"kind": "byte"}, "conditioning": {
        "prompt_template": template}, "model": {"vocab_size": 264, "n_layer": 2, "n_head": 4, "d_model": 128,
        "max_seq_len": 384, "dropout": 0.0, "pos_encoding": "rope", "tie_weights": True, "bias": False,
        "mlp_ratio": 4}}  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))
    weights = {"wte.weight": torch.zeros(264, 128), "blocks.0.attn.c_attn.weight": torch.zeros(384, 128)}
    data = safetensors.torch.save(weights)
    (directory / "model.safetensors").write_bytes(data)
    (directory / "metadata.json").write_text(json.dumps({
        "name": "copy-lm", "version": "v3", "run": "copy-lm-mini", "step": 4000, "num_parameters": 431_232,
        "weights_sha256": hashlib.sha256(data).hexdigest(), "digest": "0" * 64}))  # fmt: skip


def test_an_old_text_model_is_refused_with_why_and_how_to_retrain_it(tmp_path, capsys):
    old = tmp_path / "old-lm"
    write_old_text_artifact(old)
    before = sorted(p.name for p in old.iterdir())
    assert main(["export", "--to-hf", str(old), "--output", str(tmp_path / "out")]) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert "cannot be converted" in err and "LayerNorm, GELU MLP, fused c_attn" in err and "RMSNorm, SwiGLU" in err
    assert "2 layers x 128 wide, rope positions, 431232 parameters; run 'copy-lm-mini', step 4000" in err
    # What to run instead: the preset of its size, its context length and its prompt fields.
    assert "aigc-dist train --config YOUR_TRAIN_CONFIG --model.kind=lm --model.preset=mini --model.max_seq_len=384"\
        " --model.name=copy-lm --data.user_fields='[\"segment\", \"locale\"]'" in err
    assert "--data.item_fields='[\"title\", \"category\"]' --data.max_field_chars=48 --data.max_prompt_tokens=160" \
        in err
    assert sorted(p.name for p in old.iterdir()) == before and not (tmp_path / "out").exists()  # nothing written
    # The engines' loader points the way to this command.
    with pytest.raises(ArtifactError, match=f"aigc-dist export --to-hf {old}"):
        load_artifact(str(old), Storage())


def test_checkpoints_and_image_artifacts_need_nothing_and_other_directories_are_named(tmp_path, capsys):
    hf = tmp_path / "hf"
    save_checkpoint(str(hf), LlamaLM(lm_config_from_preset("tiny")), byte_level_tokenizer(), Storage())
    assert main(["export", "--to-hf", str(hf)]) == 0
    assert "is already a Hugging Face checkpoint (aigc-dist/hf-1): nothing to convert" in capsys.readouterr().out

    image = tmp_path / "cvae"
    image.mkdir()
    (image / "config.json").write_text(json.dumps({"format_version": 1, "kind": "cvae", "model": {}}))
    (image / "metadata.json").write_text("{}")
    assert main(["export", "--to-hf", str(image)]) == 0
    assert "image artifacts keep their format" in capsys.readouterr().out

    assert main(["export", "--to-hf", str(tmp_path / "nothing")]) == EXIT_CONFIG_ERROR
    assert "is not an aigc-dist artifact of the earlier format" in capsys.readouterr().err
