"""Starting from a checkpoint the user brings, without a cluster: what the recipe takes from it (config,
weights, tokenizer, prompt layout, pad id), and settings that cannot work stopping on the driver with
the field named, before Ray or any worker starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from aigc_dist.cli import EXIT_CONFIG_ERROR, main
from aigc_dist.config import ConfigError, DataConfig, ModelConfig, StorageConfig, TrainConfig
from aigc_dist.models.hf_format import load_checkpoint
from aigc_dist.storage import Storage
from aigc_dist.train.generators import LMRecipe
from aigc_dist.train.sources import absolute_source, fetch_source, is_hub_id

TEXTS = ["Trail Pack for the weekend hiker.", "游戏热卖：合作模式，让通勤更轻松。"]


@pytest.fixture(scope="module")
def source(tmp_path_factory, train_kit) -> str:
    directory = tmp_path_factory.mktemp("source")
    train_kit.write_hf_checkpoint(directory, TEXTS, vocab_size=300)
    return str(directory)


def recipe(source: str, **model) -> LMRecipe:
    return LMRecipe(ModelConfig(source=source, **model), DataConfig(max_prompt_tokens=128), TrainConfig(),
                    storage=StorageConfig())


def test_the_source_gives_config_weights_tokenizer_and_the_text_layout(source):
    r = recipe(source, max_seq_len=192, preset="base")  # the preset is not used with a source
    assert r.config.model_type == "qwen2" and r.config.num_key_value_heads == 2 and not r.config.tie_word_embeddings
    assert r.config.max_position_embeddings == 192 and r.config.hidden_size == 64
    assert r.template.layout == "text"  # its tokenizer has no <user> / <item> markers
    assert r.tokenizer.pad_id is None and r.pad_id == r.config.eos_token_id[0]  # padding falls back to EOS
    assert r.artifact_spec()["tokenizer"] == r.artifact_spec()["source"] == source and r.lora is None
    model = r.build_modules()["model"]
    expected = load_checkpoint(source, Storage(), require_metadata=False).model.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in model.state_dict().items()) and model.training
    assert all(p.requires_grad for p in model.parameters())


def test_lora_freezes_the_source_and_records_how_to_export(source):
    r = recipe(source, finetune="lora", lora_rank=4, lora_targets=["q_proj", "down_proj"], lora_export="adapter")
    assert r.artifact_spec()["lora"] == {"rank": 4, "alpha": 16.0, "targets": ["q_proj", "down_proj"],
                                         "export": "adapter"}  # fmt: skip
    model = r.build_modules()["model"]
    trainable = sorted({n.split(".lora_")[1] for n, p in model.named_parameters() if p.requires_grad})
    assert trainable == ["A.weight", "B.weight"]
    assert sum(p.requires_grad for p in model.parameters()) == 2 * 2 * 2  # 2 layers x 2 targets x (A, B)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.finetune=lora"], "model.finetune: lora adapts a checkpoint you bring; set model.source"),
        (["--model.source=/nonexistent/ckpt"], "model.source: /nonexistent/ckpt is not a complete checkpoint: "
         "config.json is missing"),
        (["--model.source={source}", "--model.finetune=lora", '--model.lora_targets=["qproj"]'],
         "model.lora_targets: LoRA targets ['qproj'] match no Linear layer of the model (its Linear layers are "
         "named down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)"),
        (["--model.source=Qwen/Qwen2.5-0.5B", "--model.finetune=lora", "--model.lora_export=adapter"],
         "model.lora_export: an adapter names its base, which engines read through storage"),
        (["--model.source={source}", "--data.prompt_layout=markers"],
         "data.prompt_layout: 'markers' needs the project's special tokens"),
        (["--model.source={source}", "--data.prompt_layout=chat"], "data.prompt_layout: {source}: "
         "tokenizer_config.json has no chat_template for the prompt layout 'chat'; use layout 'text'"),
        (["--model.source={source}", "--data.max_prompt_tokens=80"],
         "data.max_prompt_tokens must be >= 90, the markers and names of all fields (got 80) (prompt layout 'text')"),
    ],
)
def test_settings_that_cannot_work_exit_2_naming_the_field(source, args, message, capsys):
    args = [a.format(source=source) for a in args]
    assert main(["train", "--train.dataset=x.parquet", *args]) == EXIT_CONFIG_ERROR
    assert message.format(source=source) in capsys.readouterr().err


def test_hub_ids_are_told_from_paths_and_fetched_only_with_huggingface_hub(source, tmp_path, monkeypatch):
    assert is_hub_id("Qwen/Qwen2.5-0.5B") and not is_hub_id("s3://bucket/qwen") and not is_hub_id(source)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpts" / "qwen").mkdir(parents=True)  # owner/name-shaped, but a local directory
    assert not is_hub_id("ckpts/qwen") and absolute_source("ckpts/qwen") == str(tmp_path / "ckpts" / "qwen")
    assert absolute_source("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B" and fetch_source(source, weights=True) == source
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as where it is not installed
    with pytest.raises(ConfigError, match="names a Hugging Face hub model, but huggingface_hub is not installed"):
        fetch_source("Qwen/Qwen2.5-0.5B", weights=False)


def test_a_hub_id_that_cannot_be_fetched_is_a_config_error(tmp_path):
    """Offline (HF_HUB_OFFLINE) with an empty cache: huggingface_hub's own error, under model.source."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "aigc_dist.cli", "train", "--model.source=aigc-test/absent-model",
                           "--train.dataset=x.parquet"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == EXIT_CONFIG_ERROR, done.stderr[-2000:]
    assert "model.source: 'aigc-test/absent-model' is no local path, so it names a Hugging Face hub model, and " \
        "fetching it failed" in done.stderr
