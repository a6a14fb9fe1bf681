"""Artifacts rebuild their model from the directory alone, locally and on the S3 server."""

from __future__ import annotations

import json

import pytest
import torch

from aigc_dist.models.artifact import ArtifactError, load_artifact, save_artifact
from aigc_dist.models.cgan import CGANConfig, Generator
from aigc_dist.models.cvae import CVAE, CVAEConfig
from aigc_dist.models.lm import LMConfig, TransformerLM
from aigc_dist.models.tokenizer import ByteTokenizer
from aigc_dist.storage import Storage, join_uri

TOK = ByteTokenizer()


def tiny_lm(seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(LMConfig(n_layer=2, n_head=2, d_model=32, max_seq_len=64))


@pytest.fixture(params=["local", "s3"])
def artifact_root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "models" / "copy-lm" / "v1")
    return join_uri(request.getfixturevalue("s3_bucket"), "models", "copy-lm", "v1")


def test_lm_round_trip_generates_identically(artifact_root):
    store, model = Storage(), tiny_lm()
    meta = save_artifact(
        artifact_root, "lm", model, store, tokenizer=TOK,
        conditioning={"prompt_template": {"max_field_chars": 32}},
        metadata={"name": "copy-lm", "version": "v1", "run": "r1", "step": 7, "metrics": {"loss": 1.5}},
    )
    loaded = load_artifact(artifact_root, store)
    assert loaded.kind == "lm" and loaded.tokenizer == TOK
    assert loaded.model_config == model.config
    assert loaded.metadata["step"] == 7 and loaded.metadata["metrics"] == {"loss": 1.5}
    assert loaded.digest == meta["digest"] and loaded.label.startswith("copy-lm:v1@")
    assert loaded.conditioning == {"prompt_template": {"max_field_chars": 32}}
    assert not loaded.model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name]), name
    prompts = [[TOK.bos_id, *TOK.encode("hi")], [TOK.bos_id, *TOK.encode("为您")]]
    kwargs = dict(max_new_tokens=12, temperature=0.9, seeds=[1, 2])
    assert model.generate(prompts, **kwargs) == loaded.model.generate(prompts, **kwargs)
    # Tied weights stay tied after loading (stored once, re-tied by the model).
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.wte.weight.data_ptr()


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
    a = save_artifact(str(tmp_path / "a"), "lm", tiny_lm(0), store, tokenizer=TOK)
    b = save_artifact(str(tmp_path / "b"), "lm", tiny_lm(0), store, tokenizer=TOK, metadata={"run": "other"})
    c = save_artifact(str(tmp_path / "c"), "lm", tiny_lm(1), store, tokenizer=TOK)
    assert a["digest"] == b["digest"]  # same config and weights, whatever the run metadata
    assert a["digest"] != c["digest"]


def test_corrupted_weights_are_refused(tmp_path):
    store, uri = Storage(), str(tmp_path / "m")
    save_artifact(uri, "lm", tiny_lm(), store, tokenizer=TOK)
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="weights_sha256"):
        load_artifact(uri, store)


def test_incomplete_or_foreign_directories_are_refused(tmp_path):
    store, uri = Storage(), str(tmp_path / "m")
    with pytest.raises(ArtifactError, match="not a complete artifact"):
        load_artifact(uri, store)
    save_artifact(uri, "lm", tiny_lm(), store, tokenizer=TOK)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["kind"] = "diffusion"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="unknown model kind 'diffusion'"):
        load_artifact(uri, store)
    with pytest.raises(ArtifactError, match="stores a TransformerLM"):
        save_artifact(uri, "lm", Generator(CGANConfig()), store)
