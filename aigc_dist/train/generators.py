"""How each generator family trains: its modules, its data, one step, its artifact.

A recipe knows nothing of Ray Train's loop, checkpoints or logging (that is `loop.py`); the loop
knows nothing of what a batch means. Each family's step is written once (`lm_step`, `cgan_step`,
`cvae_step`) against the three calls it makes of what it trains (forward, `backward`, `step`): a
DeepSpeed engine under Ray Train, or `local.PlainEngine` (a module and its optimizer) in the
single-process loops that tests and quick experiments run. The losses are the models' own
(`models/losses.py` for text, `cvae.elbo_loss`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aigc_dist.config import ConfigError, DataConfig, ModelConfig, StorageConfig, TrainConfig
from aigc_dist.engine.text import prompt_conditioning
from aigc_dist.models.cgan import CGANConfig, Discriminator, Generator
from aigc_dist.models.cvae import CVAE, CVAEConfig, elbo_loss
from aigc_dist.models.hf_format import load_checkpoint
from aigc_dist.models.llama import LM_PRESETS, LlamaLM, LMConfig, lm_config_from_preset
from aigc_dist.models.lora import add_lora
from aigc_dist.models.losses import collate_examples, lm_loss
from aigc_dist.models.spec import model_spec
from aigc_dist.models.tokenizer import byte_level_tokenizer
from aigc_dist.storage import Storage
from aigc_dist.train.datasets import image_dataset, lm_dataset, prompt_template
from aigc_dist.train.sources import fetch_source, is_hub_id, open_source


@dataclass
class StepResult:
    """What one micro-batch did, summed over its examples where that makes sense."""

    loss: float  # the loss the progress line shows (lm: copy cross-entropy, cgan: generator, cvae: -ELBO)
    samples: int
    tokens: int = 0  # input tokens (text only)
    extra: dict[str, float] = field(default_factory=dict)  # further per-step means, e.g. loss_d


class Recipe(Protocol):
    """One generator family, as the worker loop drives it."""

    kind: str  # artifact kind: lm, cgan or cvae
    engine_names: tuple[str, ...]  # one DeepSpeed engine per name; also checkpoint sub-directories
    artifact_engine: str  # the engine whose module becomes the artifact
    throughput_unit: str  # "tokens" or "samples": what the progress line counts per second
    progress_extras: tuple[str, ...]  # the StepResult.extra names its progress line and reports carry

    def build_modules(self) -> dict[str, nn.Module]: ...

    def dataset(self, train: TrainConfig, data: DataConfig, storage: StorageConfig) -> Any: ...

    def step(self, engines: dict[str, Any], batch: dict[str, np.ndarray], device: torch.device) -> StepResult: ...

    def artifact_spec(self) -> dict[str, Any]: ...


class Trainee(Protocol):
    """What a step trains: a DeepSpeed engine, or `local.PlainEngine`; both forward like their module."""

    module: nn.Module

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...


def lm_step(model: Trainee, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """One optimizer step of the LM on a collated batch; its copy cross-entropy."""
    loss = lm_loss(model, tensors)
    model.backward(loss)
    model.step()
    return loss


def cvae_step(model: Trainee, images: torch.Tensor, labels: torch.Tensor, kl_weight: float,
              features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One negative-ELBO step on images in [0, 1]; the per-image loss terms (total, reconstruction, kl)."""
    logits, mu, logvar = model(images, labels, features)
    losses = elbo_loss(logits.float(), images.float(), mu.float(), logvar.float(), beta=kl_weight)
    model.backward(losses["total"])
    model.step()
    return losses


def cgan_step(gen: Trainee, disc: Trainee, images: torch.Tensor, labels: torch.Tensor, z: torch.Tensor,
              features: torch.Tensor | None = None) -> dict[str, float]:
    """One discriminator step then one generator step on real images in [0, 1] and noise z [N, z_dim].

    Fakes are drawn for the batch's own conditions, so the discriminator compares real and fake at
    equal label frequencies. The generator uses the non-saturating loss (maximise log D(G(z))), which
    keeps its gradients alive while the discriminator is winning. Returns both losses and the
    discriminator's mean probabilities on real and fake images.
    """
    real = images * 2.0 - 1.0  # [0, 1] -> the generator's Tanh range [-1, 1]
    fake = gen(z, labels, features)  # [N, C, H, W]

    logits_real = disc(real, labels, features).float()  # [N]
    logits_fake = disc(fake.detach(), labels, features).float()  # [N]
    loss_d = F.binary_cross_entropy_with_logits(
        logits_real, torch.ones_like(logits_real)
    ) + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
    disc.backward(loss_d)
    disc.step()

    with _frozen(disc.module):
        logits_gen = disc(fake, labels, features).float()  # [N]
    loss_g = F.binary_cross_entropy_with_logits(logits_gen, torch.ones_like(logits_gen))
    gen.backward(loss_g)
    gen.step()
    return {
        "loss_d": loss_d.item(),
        "loss_g": loss_g.item(),
        "d_real": torch.sigmoid(logits_real).mean().item(),
        "d_fake": torch.sigmoid(logits_fake).mean().item(),
    }


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """No gradients for `module` inside: the generator's loss must not touch the discriminator's
    gradients (DeepSpeed reduces gradients from hooks the moment they are produced)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def lm_batch_tensors(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """A numpy batch from the dataset shard -> `collate_examples` tensors (input_ids, targets, loss_mask)."""
    examples = [
        (ids.tolist(), mask.tolist()) for ids, mask in zip(batch["input_ids"], batch["loss_mask"], strict=True)
    ]
    return collate_examples(examples, pad_id)


def image_batch_tensors(
    batch: dict[str, np.ndarray], channels: int, image_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A numpy batch -> images [B, C, H, W] in [0, 1] and labels [B]; a size mismatch names the fields."""
    pixels = np.stack(list(batch["pixels"])).astype(np.float32)  # [B, C*H*W]
    expected = channels * image_size * image_size
    if pixels.shape[1] != expected:
        raise ConfigError(
            f"train.dataset rows have {pixels.shape[1]} pixels but model.channels={channels} and "
            f"model.image_size={image_size} need {expected}"
        )
    images = torch.from_numpy(pixels).view(-1, channels, image_size, image_size)
    return images, torch.from_numpy(np.asarray(batch["label"], dtype=np.int64))


class LMRecipe:
    """The Llama-family LM: prompt (user + item features) -> copy; loss on the copy only.

    From a preset with the project's byte-level tokenizer (trained from scratch); `model.source`
    starts from a Hugging Face checkpoint and its own tokenizer instead (`model.preset` is then
    unused), training every weight or, with `model.finetune = "lora"`, LoRA adapters only."""

    kind = "lm"
    engine_names = ("model",)
    artifact_engine = "model"
    throughput_unit = "tokens"
    progress_extras: tuple[str, ...] = ()

    def __init__(self, model: ModelConfig, data: DataConfig, train: TrainConfig,
                 precision_dtype: torch.dtype = torch.float32, storage: StorageConfig | None = None):  # fmt: skip
        # (DeepSpeed casts the LM's weights; its inputs are token ids, so precision_dtype is not needed here.)
        self.storage = storage or StorageConfig()
        self.source = model.source
        _check_finetune(model)  # before any download
        overrides = {"max_position_embeddings": model.max_seq_len} if model.max_seq_len is not None else {}
        if model.source is None:
            if model.preset not in LM_PRESETS:
                choices = ", ".join(LM_PRESETS)
                raise ConfigError(f"model.preset: unknown lm preset {model.preset!r}; choose one of {choices}")
            self.tokenizer = byte_level_tokenizer()
            ids = {"bos_token_id": self.tokenizer.bos_id, "eos_token_id": [self.tokenizer.eos_id],
                   "pad_token_id": self.tokenizer.pad_id}  # fmt: skip
            self.config = lm_config_from_preset(model.preset, **ids, **overrides)
        else:
            config, self.tokenizer = open_source(model.source, self.storage)
            self.config = dataclasses.replace(config, **overrides)
        self.lora = _lora_spec(model, self.config)
        self.template = prompt_template(data, self.tokenizer)
        # Right padding is masked out of the loss, so any id serves where a checkpoint names no pad token.
        eos = self.config.eos_token_id
        self.pad_id = next((i for i in (self.tokenizer.pad_id, self.config.pad_token_id, eos[0] if eos else None)
                            if i is not None), 0)  # fmt: skip

    def build_modules(self) -> dict[str, nn.Module]:
        """The model, before `deepspeed.initialize`: fresh from the preset, or the source's weights (every
        rank loads them whole; ZeRO-3 partitions them when the engine is built)."""
        if self.source is None:
            return {"model": LlamaLM(self.config)}
        location = fetch_source(self.source, weights=True)
        model = load_checkpoint(location, Storage(self.storage), require_metadata=False, dtype=torch.float32).model
        model.config = self.config  # a max_seq_len override: no weight depends on it
        if self.lora is not None:
            add_lora(model, self.lora["targets"], self.lora["rank"], self.lora["alpha"])
        return {"model": model.train()}

    def dataset(self, train: TrainConfig, data: DataConfig, storage: StorageConfig) -> Any:
        return lm_dataset(_dataset_uri(train), data, self.config.max_position_embeddings, storage, self.tokenizer,
                          self.template)

    def step(self, engines: dict[str, Any], batch: dict[str, np.ndarray], device: torch.device) -> StepResult:
        tensors = {k: v.to(device) for k, v in lm_batch_tensors(batch, self.pad_id).items()}
        loss = lm_step(engines["model"], tensors)
        tokens = int(np.sum(batch["num_tokens"])) - len(batch["num_tokens"])  # inputs, after the shift
        return StepResult(loss=loss.item(), samples=len(batch["num_tokens"]), tokens=tokens)

    def artifact_spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.config.to_dict(),
            "tokenizer": self.source,  # None: the project's byte-level tokenizer; else the checkpoint it came from
            "conditioning": prompt_conditioning(self.template),
            "source": self.source,
            "lora": self.lora,  # None: every weight trained
        }


def _check_finetune(model: ModelConfig) -> None:
    if model.finetune != "lora":
        return
    if model.source is None:
        raise ConfigError("model.finetune: lora adapts a checkpoint you bring; set model.source (a preset starts "
                          "from random weights: train it in full)")
    if model.lora_export == "adapter" and is_hub_id(model.source):
        raise ConfigError(f"model.lora_export: an adapter names its base, which engines read through storage, and "
                          f"model.source {model.source!r} is a hub id; copy the base to a path or s3:// URI and "
                          "set model.source to it, or export lora_export=merged")


def _lora_spec(model: ModelConfig, config: LMConfig) -> dict[str, Any] | None:
    """The LoRA settings a run records for its export, checked on a weightless copy of the model, so a
    target that matches nothing fails on the driver."""
    if model.finetune != "lora":
        return None
    spec = {"rank": model.lora_rank, "alpha": model.lora_alpha, "targets": list(model.lora_targets),
            "export": model.lora_export}  # fmt: skip
    with torch.device("meta"):
        probe = LlamaLM(config)
    try:
        add_lora(probe, spec["targets"], spec["rank"], spec["alpha"])
    except ValueError as exc:
        raise ConfigError(f"model.lora_targets: {exc}") from None
    return spec


class _ImageRecipe:
    throughput_unit = "samples"

    def __init__(self, model: ModelConfig, data: DataConfig, train: TrainConfig,
                 precision_dtype: torch.dtype = torch.float32, storage: StorageConfig | None = None):  # fmt: skip
        # (Pixels come from train.dataset alone: data's prompt settings and storage are the text recipe's.)
        presets = model_spec(self.kind).presets
        if model.preset not in presets:
            raise ConfigError(
                f"model.preset: unknown {self.kind} preset {model.preset!r}; choose one of {', '.join(presets)}"
            )
        self.model = model
        self.train = train
        self.dtype = precision_dtype  # DeepSpeed casts the module, not its inputs
        self.config = self.config_cls(
            image_size=model.image_size, channels=model.channels, num_classes=model.num_classes, **presets[model.preset]
        )

    def dataset(self, train: TrainConfig, data: DataConfig, storage: StorageConfig) -> Any:
        return image_dataset(_dataset_uri(train), storage)

    def _batch(self, batch: dict[str, np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = image_batch_tensors(batch, self.model.channels, self.model.image_size)
        return images.to(device, self.dtype), labels.to(device)

    def artifact_spec(self) -> dict[str, Any]:
        conditioning = {"labels": list(self.model.labels)} if self.model.labels else {}
        return {"kind": self.kind, "model": self.config.to_dict(), "tokenizer": None, "conditioning": conditioning}


class CVAERecipe(_ImageRecipe):
    """Conditional VAE: one engine, negative ELBO."""

    kind = "cvae"
    config_cls = CVAEConfig
    engine_names = ("model",)
    artifact_engine = "model"
    progress_extras = ("reconstruction", "kl")

    def build_modules(self) -> dict[str, nn.Module]:
        return {"model": CVAE(self.config)}

    def step(self, engines: dict[str, Any], batch: dict[str, np.ndarray], device: torch.device) -> StepResult:
        images, labels = self._batch(batch, device)
        losses = cvae_step(engines["model"], images, labels, self.train.kl_weight)
        return StepResult(
            loss=losses["total"].item(),
            samples=images.shape[0],
            extra={"reconstruction": losses["reconstruction"].item(), "kl": losses["kl"].item()},
        )


class CGANRecipe(_ImageRecipe):
    """Conditional DCGAN: a generator and a discriminator engine, stepped alternately."""

    kind = "cgan"
    config_cls = CGANConfig
    engine_names = ("generator", "discriminator")
    artifact_engine = "generator"
    progress_extras = ("loss_d", "d_real", "d_fake")

    def build_modules(self) -> dict[str, nn.Module]:
        return {"generator": Generator(self.config), "discriminator": Discriminator(self.config)}

    def step(self, engines: dict[str, Any], batch: dict[str, np.ndarray], device: torch.device) -> StepResult:
        images, labels = self._batch(batch, device)
        z = torch.randn(images.shape[0], self.config.z_dim, device=device, dtype=self.dtype)  # [N, z_dim]
        metrics = cgan_step(engines["generator"], engines["discriminator"], images, labels, z)
        return StepResult(loss=metrics.pop("loss_g"), samples=images.shape[0], extra=metrics)


def _dataset_uri(train: TrainConfig) -> str:
    if not train.dataset:
        raise ConfigError("train.dataset: required (parquet path or s3:// URI of the training examples)")
    return train.dataset


def make_recipe(model: ModelConfig, data: DataConfig, train: TrainConfig, precision_dtype: torch.dtype = torch.float32,
                storage: StorageConfig | None = None) -> Recipe:  # fmt: skip
    """The recipe `model.kind`'s ModelSpec names; a `ConfigError` names the field when the preset, the
    source checkpoint or the LoRA settings cannot work. `storage` reaches an s3:// model.source."""
    return model_spec(model.kind).part("recipe")(model, data, train, precision_dtype, storage)
