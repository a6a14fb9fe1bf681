"""One ModelSpec per kind: every stage finds its part for a kind there, and the parts agree."""

from __future__ import annotations

import inspect

import pytest
import torch

from aigc_dist.config import BackfillConfig, DataConfig, ModelConfig, TrainConfig
from aigc_dist.models.spec import MODEL_SPECS, kinds_of, model_spec


@pytest.mark.parametrize("kind", MODEL_SPECS)
def test_each_stage_finds_the_part_its_kind_names(kind):
    spec = model_spec(kind)
    recipe, engine, task = spec.part("recipe"), spec.part("engine"), spec.part("backfill")
    assert recipe.kind == kind  # the recipe writes artifacts of this kind
    assert task.modality == spec.modality  # the backfill task generates what the kind generates
    # Every engine opener takes what a backfill actor and a Serve replica pass it (config.EngineConfig.options).
    inspect.signature(engine).bind("uri", object(), device="cpu", max_batch_size=8, **BackfillConfig().engine.options())


@pytest.mark.parametrize("kind", MODEL_SPECS)
def test_every_preset_builds_the_module_the_artifact_holds(kind):
    spec = model_spec(kind)
    assert spec.presets, f"{kind} has no preset"
    image = {} if spec.modality == "text" else {"image_size": 16, "channels": 1, "num_classes": 10}
    for name, fields in spec.presets.items():
        config = spec.config_cls.from_dict({**fields, **image})
        if name in ("small", "base"):  # build the large ones without allocating their weights
            with torch.device("meta"):
                module = spec.module(config)
        else:
            module = spec.module(config)
        assert isinstance(module, torch.nn.Module)
        assert spec.config_cls.from_dict(config.to_dict()) == config  # what config.json stores rebuilds it


@pytest.mark.parametrize("kind", ["cgan", "cvae"])
def test_the_recipe_of_a_kind_builds_its_presets_sizes(kind):
    """make_recipe goes through the spec: the preset's sizes reach the module it trains."""
    from aigc_dist.train.generators import make_recipe

    model = ModelConfig(kind=kind, preset="tiny", image_size=16, num_classes=10)
    recipe = make_recipe(model, DataConfig(), TrainConfig())
    assert recipe.kind == kind
    for field, value in model_spec(kind).presets["tiny"].items():
        assert getattr(recipe.config, field) == value


def test_modalities_and_unknown_kinds():
    assert kinds_of("text") == ("lm",)
    assert kinds_of("image") == ("cgan", "cvae")
    with pytest.raises(ValueError, match="unknown model kind 'diffusion'; known: lm, cgan, cvae"):
        model_spec("diffusion")


def test_an_image_model_opens_on_its_engine_whatever_the_text_backend(tmp_path):
    """engine.backend chooses the text engine: a replica serving text on vLLM serves images beside it."""
    from aigc_dist.engine.images import ImageEngine, ImageRequest, image_engine
    from aigc_dist.models.artifact import save_artifact
    from aigc_dist.models.cgan import CGANConfig, Generator
    from aigc_dist.storage import Storage

    uri = str(tmp_path / "cgan")
    save_artifact(uri, "cgan", Generator(CGANConfig(image_size=16)), Storage())
    engines = [image_engine(uri, Storage(), backend, max_batch_size=3) for backend in ("native", "vllm", "auto")]
    assert all(isinstance(e, ImageEngine) and e.max_batch_size == 3 for e in engines)
    request = ImageRequest(label=1, seed=7)
    assert len({e.generate([request])[0].png for e in engines}) == 1  # the same image from each
