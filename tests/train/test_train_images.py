"""The image generators under Ray Train + DeepSpeed on 2 workers: the cGAN with two engines stepped in
turn (ZeRO-2), the cVAE with one (ZeRO-1); both export artifacts the image engine turns into PNGs."""

from __future__ import annotations

import math

import pytest

from aigc_dist.demo.world import CATEGORIES
from aigc_dist.engine.images import ImageEngine, ImageRequest
from aigc_dist.models.artifact import load_artifact
from aigc_dist.storage import Storage

pytestmark = pytest.mark.slow


def generate_pngs(artifact_uri: str) -> list:
    engine = ImageEngine(load_artifact(artifact_uri, Storage()))
    return engine.generate([ImageRequest(label=label, seed=label) for label in (0, 3, 9)])


def test_cgan_trains_two_engines_and_exports_the_generator(ray_local, deepspeed_ops, train_kit, digits_parquet,
                                                          tmp_path):  # fmt: skip
    cfg = train_kit.image_config(
        "cgan", str(digits_parquet), str(tmp_path / "runs"),
        model={"labels": list(CATEGORIES)},
        train={"lr": 2e-4, "beta1": 0.5, "weight_decay": 0.0},
    )  # fmt: skip
    result = train_kit.run(cfg)
    assert result.step == 20
    for record in result.history:  # both players stepped: the generator's and the discriminator's losses
        assert math.isfinite(record["loss"]) and math.isfinite(record["loss_d"])
    assert result.history[-1]["d_real"] > result.history[-1]["d_fake"]  # the discriminator learned something
    checkpoint = tmp_path / "runs" / "cgan" / "checkpoint_00000020"
    assert (checkpoint / "generator" / "latest").exists() and (checkpoint / "discriminator" / "latest").exists()
    artifact = load_artifact(result.artifact_uri, Storage())
    assert artifact.kind == "cgan" and artifact.conditioning["labels"] == list(CATEGORIES)
    for png in generate_pngs(result.artifact_uri):
        assert png.error is None and png.png.startswith(b"\x89PNG") and (png.width, png.height) == (16, 16)


def test_cvae_trains_and_exports(ray_local, deepspeed_ops, train_kit, digits_parquet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative storage path means the driver's directory, whatever the workers' is
    cfg = train_kit.image_config(
        "cvae", str(digits_parquet), "./runs",
        train={"lr": 2e-3, "weight_decay": 0.0}, deepspeed={"zero_stage": 1},
    )  # fmt: skip
    result = train_kit.run(cfg)
    assert result.artifact_uri == str(tmp_path / "runs" / "models" / "test-cvae" / "v1")
    assert (tmp_path / "runs" / "cvae" / "checkpoint_00000020" / "trainer_state.json").exists()
    first, last = result.history[0], result.history[-1]
    assert last["loss"] < first["loss"] - 20  # negative ELBO per image (nats), ~180 at the start
    assert last["samples"] == 20 * 2 * 32
    for png in generate_pngs(result.artifact_uri):
        assert png.error is None and png.png.startswith(b"\x89PNG")
