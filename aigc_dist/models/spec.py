"""One record per kind of generator: what it is, and where each stage keeps its part for it.

A kind (the artifact's and `model.kind`'s name: lm, cgan, cvae) is read in one place. The rest of
the code looks its kind up here instead of branching on names:

    module, config, presets   the torch module an artifact holds, its config class, its sizes by preset
    recipe                    how it trains (train/generators.py): modules, data, one step, artifact spec
    engine                    how it generates (engine/): opens an engine on an artifact directory
    backfill                  how a backfill prepares, generates and writes its rows (batch/tasks.py)

The stages' parts are named as "module:attribute" and imported when asked for, the way torchtitan's
ModelSpec ties a model to its trainer pieces: models/ imports torch only (its parts are the only ones
it can hold as objects), while a recipe needs DeepSpeed's world, an engine vLLM, a backfill task Ray
Data's. `modality` ("text" | "image") is what a backfill's `mode` and a Serve route choose by; the
image kinds share an engine and a backfill task, since both generate one image per condition.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from aigc_dist.models.cgan import CGAN_PRESETS, CGANConfig, Generator
from aigc_dist.models.cvae import CVAE, CVAE_PRESETS, CVAEConfig
from aigc_dist.models.llama import LM_PRESETS, LlamaLM, LMConfig

Modality = Literal["text", "image"]


@dataclass(frozen=True)
class ModelSpec:
    """A kind of generator, and the name of each stage's part for it (see the module docstring)."""

    kind: str
    modality: Modality
    config_cls: type
    module: type[nn.Module]  # built from a config: the module an artifact holds (a cGAN's generator only)
    presets: Mapping[str, Mapping[str, Any]]  # preset name -> config fields it sets
    recipe: str
    engine: str
    backfill: str

    def part(self, stage: Literal["recipe", "engine", "backfill"]) -> Any:
        """The object a stage's part names (imported on first use)."""
        module_name, _, attribute = getattr(self, stage).partition(":")
        return getattr(importlib.import_module(module_name), attribute)


MODEL_SPECS: dict[str, ModelSpec] = {
    spec.kind: spec
    for spec in (
        ModelSpec("lm", "text", LMConfig, LlamaLM, LM_PRESETS, recipe="aigc_dist.train.generators:LMRecipe",
                  engine="aigc_dist.engine.vllm_engine:text_engine", backfill="aigc_dist.batch.tasks:TextTask"),
        ModelSpec("cgan", "image", CGANConfig, Generator, CGAN_PRESETS, recipe="aigc_dist.train.generators:CGANRecipe",
                  engine="aigc_dist.engine.images:image_engine", backfill="aigc_dist.batch.tasks:ImageTask"),
        ModelSpec("cvae", "image", CVAEConfig, CVAE, CVAE_PRESETS, recipe="aigc_dist.train.generators:CVAERecipe",
                  engine="aigc_dist.engine.images:image_engine", backfill="aigc_dist.batch.tasks:ImageTask"),
    )
}


def model_spec(kind: str | None) -> ModelSpec:
    """The spec of a kind; a ValueError names the known kinds."""
    if kind not in MODEL_SPECS:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(MODEL_SPECS)}")
    return MODEL_SPECS[kind]


def kinds_of(modality: Modality) -> tuple[str, ...]:
    """The kinds that generate one modality, e.g. ("cgan", "cvae") for "image"."""
    return tuple(kind for kind, spec in MODEL_SPECS.items() if spec.modality == modality)
