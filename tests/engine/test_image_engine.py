"""The shared image engine: PNGs that decode to what the model drew; bad conditions fail alone."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from aigc_dist.engine.images import ImageEngine, ImageRequest, encode_png
from aigc_dist.models.artifact import Artifact
from aigc_dist.models.cgan import CGANConfig, Generator
from aigc_dist.models.cvae import CVAE, CVAEConfig


def artifact_of(kind: str, model) -> Artifact:
    return Artifact(kind, model.eval(), model.config, None, {}, {"digest": "0" * 64})


@pytest.mark.parametrize("channels", [1, 3])
def test_png_decodes_to_the_same_pixels(channels):
    image = torch.rand(channels, 5, 7)
    decoded = np.asarray(Image.open(io.BytesIO(encode_png(image))))
    expected = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert decoded.shape[:2] == (5, 7)
    assert np.array_equal(decoded.reshape(expected.shape), expected)


def test_cgan_engine_generates_seeded_pngs():
    torch.manual_seed(0)
    engine = ImageEngine(artifact_of("cgan", Generator(CGANConfig(image_size=16))))
    requests = [ImageRequest(label=k % 10, seed=k) for k in range(12)]
    results = engine.generate(requests)
    assert all(r.error is None and (r.width, r.height) == (16, 16) for r in results)
    assert Image.open(io.BytesIO(results[0].png)).size == (16, 16)
    again = ImageEngine(engine.artifact, max_batch_size=5).generate(requests)  # other batch layout
    assert [r.png for r in again] == [r.png for r in results]
    assert results[0].png != results[1].png


def test_bad_conditions_fail_alone():
    torch.manual_seed(0)
    engine = ImageEngine(artifact_of("cvae", CVAE(CVAEConfig(image_size=8, num_classes=4, num_features=2))))
    results = engine.generate(
        [
            ImageRequest(label=1, features=[0.1, 0.2], seed=1),
            ImageRequest(label=4, features=[0.1, 0.2]),
            ImageRequest(label=1, features=[0.1]),
            ImageRequest(label="3", features=[0.1, 0.2]),  # type: ignore[arg-type]
        ]
    )
    assert results[0].error is None and results[0].png
    assert "label must be in [0, 4)" in results[1].error
    assert "features must have 2 values" in results[2].error
    assert "integer class id" in results[3].error
