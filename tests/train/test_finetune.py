"""Fine-tuning a checkpoint the user brings (`model.source`) under Ray Train + DeepSpeed on 2 workers.

The checkpoint is made here, as a user's would be (`TrainKit.write_hf_checkpoint`): transformers'
Qwen2ForCausalLM (grouped-query attention, q/k/v bias, an untied head) with random weights, saved by
`save_pretrained`, beside a BPE tokenizer trained on the synthetic world's copy (no project markers:
prompts use the "text" layout; no pad token). Nothing is downloaded. Full fine-tuning under ZeRO-2,
and LoRA under ZeRO-3 (the frozen base partitioned, gathered for the export) with its adapter export:
each export opens in transformers, the adapter in peft. That ZeRO-3 trains as ZeRO-2 does and exports
whole tensors is test_train_zero3.py's, one run for both kinds of start (a source only changes the
weights the engines begin from)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch

from aigc_dist.engine.text import SamplingParams, TextEngine, TextRequest
from aigc_dist.models.artifact import load_artifact
from aigc_dist.models.hf_format import load_checkpoint
from aigc_dist.storage import Storage, join_uri
from aigc_dist.train.checkpoints import download_checkpoint, read_trainer_state
from aigc_dist.train.export import consolidated_state_dict, save_trained_artifact

pytestmark = pytest.mark.slow

LORA_TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"]


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_world, train_kit) -> Path:
    """The user's checkpoint, its tokenizer trained on the world's copy."""
    directory = tmp_path_factory.mktemp("qwen2-source")
    train_kit.write_hf_checkpoint(directory, pq.read_table(tiny_world / "copy.parquet")["copy"].to_pylist())
    return directory


def finetune_config(train_kit, world: Path, storage_path: str, source: str, run: str, **overrides):
    """TrainKit's LM run on the source checkpoint, one checkpoint at the end; the text layout's words need a
    larger prompt budget."""
    model = {"source": source, "name": run, "max_seq_len": 192, **overrides.pop("model", {})}
    train = {"run_name": run, "checkpoint_every_steps": 20, **overrides.pop("train", {})}
    return train_kit.lm_config(str(world), storage_path, model=model, train=train, data={"max_prompt_tokens": 128},
                               **overrides)  # fmt: skip


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.fixture(scope="module")
def zero2_run(ray_local, deepspeed_ops, train_kit, tiny_world, source, tmp_path_factory):
    runs = tmp_path_factory.mktemp("finetune-runs")
    cfg = finetune_config(train_kit, tiny_world, str(runs), str(source), "ft-zero2")
    return SimpleNamespace(cfg=cfg, runs=runs, result=train_kit.run(cfg))


def test_full_finetune_zero2_learns_and_exports_a_checkpoint_transformers_opens(zero2_run, source):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = zero2_run.result
    assert result.step == 20
    assert sum(result.losses[-3:]) / 3 < result.losses[0] - 1.0, result.losses  # ln(384) = 5.95 at the start

    exported = load_artifact(result.artifact_uri, Storage())
    assert exported.conditioning["prompt_template"]["layout"] == "text"  # its tokenizer has no project markers
    config = json.loads((Path(result.artifact_uri) / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["num_key_value_heads"] == 2
    assert config["tie_word_embeddings"] is False and config["max_position_embeddings"] == 192  # max_seq_len
    # The source's own tokenizer, copied: same vocabulary, same ids.
    assert json.loads((Path(result.artifact_uri) / "tokenizer.json").read_text()) == \
        json.loads((source / "tokenizer.json").read_text())
    hf_tokenizer = AutoTokenizer.from_pretrained(result.artifact_uri)
    ids = hf_tokenizer("user: segment=student\nitem: title=Trail Pack\ncopy:\n", return_tensors="pt").input_ids
    assert ids[0].tolist() == exported.tokenizer.encode("user: segment=student\nitem: title=Trail Pack\ncopy:\n")
    hf_model = AutoModelForCausalLM.from_pretrained(result.artifact_uri).eval()
    assert torch.allclose(logits(hf_model, ids), logits(exported.model, ids), atol=1e-4)
    # The engines serve it: prompts in the text layout, the source's tokenizer, its EOS.
    user = {"segment": "student", "locale": "en", "interests": ["hiking"]}
    item = {"title": "Aurora Trail Backpack", "category": "outdoor", "attributes": ["light"]}
    [copy] = TextEngine(exported).generate([TextRequest(user, item, seed=1, sampling=SamplingParams(max_new_tokens=8))])
    assert copy.error is None and copy.prompt_tokens > 0 and copy.num_tokens > 0
    # Every weight trained, the untied head and the q/k/v biases included.
    start = load_checkpoint(str(source), Storage(), require_metadata=False).model.state_dict()
    trained = exported.model.state_dict()
    for name in ("lm_head.weight", "model.layers.0.self_attn.k_proj.bias", "model.layers.1.mlp.gate_proj.weight"):
        assert not torch.equal(trained[name], start[name]), name


def test_lora_from_s3_trains_adapters_only_and_its_adapter_loads_like_the_merged_model(
    ray_local, deepspeed_ops, train_kit, tiny_world, source, s3_bucket, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    storage = Storage()
    source_uri = join_uri(s3_bucket, "checkpoints", "qwen2")
    for path in source.iterdir():
        storage.write_bytes(join_uri(source_uri, path.name), path.read_bytes())
    cfg = finetune_config(
        train_kit, tiny_world, str(tmp_path / "runs"), source_uri, "ft-lora",
        model={"finetune": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_targets": LORA_TARGETS,
               "lora_export": "adapter"},
        train={"lr": 1e-2},
        # ZeRO-3: the frozen base is partitioned too, gathered for the export, merged by zero_to_fp32.
        deepspeed={"zero_stage": 3, "zero3_persistence_threshold": 0},
    )  # fmt: skip
    result = train_kit.run(cfg)
    assert sum(result.losses[-3:]) / 3 < result.losses[0] - 0.5, result.losses

    adapter_dir = Path(result.artifact_uri)
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == source_uri and adapter_config["r"] == 8
    assert not (adapter_dir / "config.json").exists()  # an adapter, not a copy of the base
    adapter = load_artifact(result.artifact_uri, storage)  # the engines' loader: base from S3, adapter merged
    assert adapter.metadata["base"]["uri"] == source_uri

    # The same run exported merged, from its checkpoint (zero_to_fp32 with the frozen base weights).
    state = read_trainer_state(result.checkpoint_uri, storage)
    local = download_checkpoint(result.checkpoint_uri, storage, str(tmp_path / "checkpoint"), engine="model")
    spec = {**state.artifact, "lora": {**state.artifact["lora"], "export": "merged"}}
    merged_uri = str(tmp_path / "merged")
    save_trained_artifact(merged_uri, spec, consolidated_state_dict(f"{local}/model", 3), storage, {})
    merged = load_artifact(merged_uri, storage)

    ids = torch.tensor([adapter.tokenizer.encode("user: segment=student\nitem: title=Trail Pack\ncopy:\n")])
    expected = logits(merged.model, ids)
    assert torch.allclose(logits(adapter.model, ids), expected, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(source)  # the same base, as a local copy
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    assert torch.allclose(logits(peft_model, ids), expected, atol=1e-4)

    # Only the targets changed: the embedding, norms, k_proj and gate_proj are the source's exactly.
    start = load_checkpoint(str(source), storage, require_metadata=False).model.state_dict()
    for name, tensor in merged.model.state_dict().items():
        targeted = any(f"{t}." in name for t in LORA_TARGETS) and name.endswith("weight")
        assert torch.equal(tensor, start[name]) != targeted, name
