"""Artifacts rebuild their model from the directory alone, locally and on the S3 server."""

from __future__ import annotations

import json

import pytest
import torch

from aigc_dist.engine.decode import DecodeRequest, decode_stream
from aigc_dist.models.artifact import ArtifactError, load_artifact, save_artifact, save_text_artifact
from aigc_dist.models.cgan import CGANConfig, Generator
from aigc_dist.models.cvae import CVAE, CVAEConfig
from aigc_dist.models.llama import LlamaLM, LMConfig
from aigc_dist.models.tokenizer import byte_level_tokenizer
from aigc_dist.storage import Storage, join_uri

TOK = byte_level_tokenizer()


def tiny_lm(seed: int = 0) -> LlamaLM:
    torch.manual_seed(seed)
    return LlamaLM(LMConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=88, max_position_embeddings=64))


@pytest.fixture(params=["local", "s3"])
def artifact_root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "models" / "copy-lm" / "v1")
    return join_uri(request.getfixturevalue("s3_bucket"), "models", "copy-lm", "v1")


def _sampled(model: LlamaLM, prompts: list[list[int]]) -> list[list[int]]:
    requests = [DecodeRequest(p, 12, temperature=0.9, seed=s) for s, p in enumerate(prompts)]
    out = dict(decode_stream(model, requests, slots=2, eos_ids=[TOK.eos_id]))
    return [out[i] for i in range(len(prompts))]


def test_lm_round_trip_generates_identically(artifact_root):
    store, model = Storage(), tiny_lm()
    meta = save_text_artifact(
        artifact_root, model, store, conditioning={"prompt_template": {"max_field_chars": 32}},
        metadata={"name": "copy-lm", "version": "v1", "run": "r1", "step": 7, "metrics": {"loss": 1.5}},
    )
    loaded = load_artifact(artifact_root, store)
    assert loaded.kind == "lm" and loaded.tokenizer.files()["tokenizer.json"] == TOK.files()["tokenizer.json"]
    assert loaded.model_config == model.config
    assert loaded.metadata["step"] == 7 and loaded.metadata["metrics"] == {"loss": 1.5}
    assert loaded.digest == meta["digest"] and loaded.label.startswith("copy-lm:v1@")
    assert loaded.conditioning == {"prompt_template": {"max_field_chars": 32}}
    assert not loaded.model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name]), name
    prompts = [[TOK.bos_id, *TOK.encode("hi")], [TOK.bos_id, *TOK.encode("为您")]]
    assert _sampled(model, prompts) == _sampled(loaded.model, prompts)
    # Tied weights stay tied after loading (stored once, as transformers does, and re-tied).
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_image_models_round_trip(tmp_path):
    store = Storage()
    torch.manual_seed(0)
    gan = Generator(CGANConfig(image_size=16, channels=1, num_classes=10))
    vae = CVAE(CVAEConfig(image_size=8, channels=3, num_classes=4, num_features=2))
    labels, feats = torch.tensor([0, 3, 1]), torch.rand(3, 2)
    for kind, model, features in [("cgan", gan, None), ("cvae", vae, feats)]:
        uri = str(tmp_path / kind)
        save_artifact(uri, kind, model, store)
        loaded = load_artifact(uri, store)
        assert loaded.tokenizer is None
        before = model.generate(labels, features, seeds=[5, 6, 7])
        assert torch.equal(before, loaded.model.generate(labels, features, seeds=[5, 6, 7]))


def test_digest_identifies_content(tmp_path):
    store = Storage()
    a = save_text_artifact(str(tmp_path / "a"), tiny_lm(0), store)
    b = save_text_artifact(str(tmp_path / "b"), tiny_lm(0), store, metadata={"run": "other"})
    c = save_text_artifact(str(tmp_path / "c"), tiny_lm(1), store)
    assert a["digest"] == b["digest"]  # same files, whatever the run metadata
    assert a["digest"] != c["digest"]
    g1 = save_artifact(str(tmp_path / "g1"), "cgan", Generator(CGANConfig()), store)
    assert g1["digest"] != a["digest"]


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_corrupted_files_are_refused_naming_the_file(tmp_path, name):
    store, uri = Storage(), str(tmp_path / "m")
    save_text_artifact(uri, tiny_lm(), store)
    path = tmp_path / "m" / name
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{name} does not match metadata.json's sha256"):
        load_artifact(uri, store)


def test_corrupted_image_weights_are_refused(tmp_path):
    store, uri = Storage(), str(tmp_path / "g")
    save_artifact(uri, "cgan", Generator(CGANConfig()), store)
    weights = tmp_path / "g" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="weights_sha256"):
        load_artifact(uri, store)


def test_incomplete_foreign_or_old_directories_are_refused(tmp_path):
    store, uri = Storage(), str(tmp_path / "m")
    with pytest.raises(ArtifactError, match="not a complete artifact"):
        load_artifact(uri, store)
    save_artifact(uri, "cgan", Generator(CGANConfig()), store)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "kind": "diffusion"}))
    with pytest.raises(ArtifactError, match="unknown model kind 'diffusion'"):
        load_artifact(uri, store)
    # An LM artifact of the format before Hugging Face directories: refused, with the way to convert it.
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "kind": "lm"}))
    with pytest.raises(ArtifactError, match="earlier format.*export --to-hf"):
        load_artifact(uri, store)
    with pytest.raises(ArtifactError, match="stores a Generator"):
        save_artifact(uri, "cgan", tiny_lm(), store)
