"""Single-process training: the recipes' steps (`generators.py`) on plain PyTorch optimizers.

The same `lm_step`, `cgan_step` and `cvae_step` that Ray Train drives through DeepSpeed engines run
here on `PlainEngine`s (a module, its optimizer, clipping and schedule behind the engine's calls), so
a model trained in a test or a quick experiment is trained by the code a cluster run uses. The loops
are over in-memory examples or tensors, on one process. Images are always passed in [0, 1], the
range `generate` returns.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from aigc_dist.models.cgan import Discriminator, Generator
from aigc_dist.models.cvae import CVAE
from aigc_dist.models.llama import LlamaLM
from aigc_dist.models.losses import Example, collate_examples
from aigc_dist.train.generators import cgan_step, cvae_step, lm_step
from aigc_dist.train.optim import parameter_groups, warmup_cosine


class PlainEngine:
    """A module and its optimizer behind the calls a recipe's step makes of a DeepSpeed engine: forward,
    `backward(loss)`, `step()` (clip, optimizer step, schedule step, zero the gradients)."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, grad_clip: float = 0.0):
        self.module, self.optimizer, self.scheduler, self.grad_clip = module, optimizer, scheduler, grad_clip

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, group_batches: int = 20, seed: int = 0
) -> Iterator[list[int]]:
    """Endless batches of example indices, drawn from shuffled epochs, that waste little on padding.

    `collate_examples` pads every row to the longest in its batch, so a batch of mixed lengths spends
    compute on padding. Here the shuffled stream is cut into windows of `group_batches * batch_size`
    examples; each window is sorted by length, cut into batches, and its batches are yielded in random
    order. Which examples share a window stays random; within a window, neighbours in length share a
    batch. group_batches=1 is plain shuffled batching. Epochs run into each other, so every batch is
    full, even when there are fewer examples than batch_size.
    """
    if not lengths:
        raise ValueError("length_grouped_batches needs at least one example")
    for name, value in (("batch_size", batch_size), ("group_batches", group_batches)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1 (got {value})")
    rng = random.Random(seed)
    window = batch_size * group_batches
    order: list[int] = []
    while True:
        while len(order) < window:  # reshuffle per epoch
            fresh = list(range(len(lengths)))
            rng.shuffle(fresh)
            order += fresh
        picked, order = sorted(order[:window], key=lengths.__getitem__), order[window:]
        batches = [picked[start : start + batch_size] for start in range(0, window, batch_size)]
        rng.shuffle(batches)
        yield from batches


def train_lm(
    model: LlamaLM,
    examples: Sequence[Example],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    pad_id: int,
    warmup_steps: int = 20,
    weight_decay: float = 0.01,
    grad_clip: float = 1.0,
    group_batches: int = 20,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """`lm_step` under AdamW (decay on matrices only, `parameter_groups`) with warm-up + cosine, on shuffled,
    length-grouped batches; returns the loss of every step. `group_batches` and `seed` pick the batches as
    in `length_grouped_batches`."""
    batches = length_grouped_batches([len(ids) for ids, _ in examples], batch_size, group_batches, seed)
    optimizer = torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup_steps, steps))
    engine = PlainEngine(model, optimizer, schedule, grad_clip)
    model.train()
    losses = []
    for step in range(steps):
        loss = lm_step(engine, collate_examples([examples[i] for i in next(batches)], pad_id))
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


@dataclass
class ImageTrainConfig:
    """Hyper-parameters of the single-process image training loops."""

    epochs: int = 20  # passes over the training tensors
    batch_size: int = 64  # images per optimizer step
    lr: float = 2e-4  # Adam learning rate (both cGAN networks share it)
    beta1: float = 0.5  # Adam beta1; 0.5 is the DCGAN choice, damps momentum in the adversarial game
    beta2: float = 0.999  # Adam beta2
    kl_weight: float = 1.0  # cVAE only: weight of the KL term (1.0 = the true ELBO)
    seed: int = 0  # seeds shuffling, noise and reparameterisation; same seed -> same weights

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ImageTrainConfig.{name} must be an int >= 1 (got {value!r})")
        if not self.lr > 0:
            raise ValueError(f"ImageTrainConfig.lr must be > 0 (got {self.lr})")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ImageTrainConfig.{name} must be in [0, 1) (got {getattr(self, name)})")
        if self.kl_weight < 0:
            raise ValueError(f"ImageTrainConfig.kl_weight must be >= 0 (got {self.kl_weight})")

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict, e.g. for a run's metadata."""
        return asdict(self)


def cgan_optimizers(
    gen: Generator, disc: Discriminator, config: ImageTrainConfig
) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for the generator and for the discriminator, as DCGAN trains them."""
    betas = (config.beta1, config.beta2)
    return torch.optim.Adam(gen.parameters(), config.lr, betas), torch.optim.Adam(
        disc.parameters(), config.lr, betas
    )


def cvae_optimizer(model: CVAE, config: ImageTrainConfig) -> torch.optim.Adam:
    """Adam for the cVAE."""
    return torch.optim.Adam(model.parameters(), config.lr, (config.beta1, config.beta2))


def cgan_train_step(
    gen: Generator,
    disc: Discriminator,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    features: torch.Tensor | None = None,
) -> dict[str, float]:
    """`cgan_step` on plain optimizers: a discriminator step, then a generator step, on images in [0, 1]."""
    z = torch.randn(images.shape[0], gen.config.z_dim, device=images.device)  # [N, z_dim]
    return cgan_step(PlainEngine(gen, opt_g), PlainEngine(disc, opt_d), images, labels, z, features)


def cvae_train_step(
    model: CVAE,
    opt: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    features: torch.Tensor | None = None,
    kl_weight: float = 1.0,
) -> dict[str, float]:
    """`cvae_step` on a plain optimizer; returns the per-image loss terms."""
    losses = cvae_step(PlainEngine(model, opt), images, labels, kl_weight, features)
    return {name: value.item() for name, value in losses.items()}


def _batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    features: torch.Tensor | None,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """One shuffled epoch. The last short batch is dropped: a 1-image batch breaks BatchNorm."""
    order = torch.randperm(images.shape[0], generator=generator)
    for start in range(0, images.shape[0] - batch_size + 1, batch_size):
        idx = order[start : start + batch_size]
        batch_features = features[idx].to(device) if features is not None else None
        yield images[idx].to(device), labels[idx].to(device), batch_features


def _train_loop(
    step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], dict[str, float]],
    device: torch.device,
    images: torch.Tensor,
    labels: torch.Tensor,
    features: torch.Tensor | None,
    config: ImageTrainConfig,
) -> list[dict[str, float]]:
    if images.shape[0] < config.batch_size:
        raise ValueError(f"need at least batch_size={config.batch_size} images (got {images.shape[0]})")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape [{images.shape[0]}] (got {list(labels.shape)})")
    history: list[dict[str, float]] = []
    shuffle = torch.Generator().manual_seed(config.seed)
    # fork_rng: seed the noise / reparameterisation draws without clobbering the caller's RNG.
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(config.seed)
        for epoch in range(config.epochs):
            totals: dict[str, float] = {}
            steps = 0
            for batch in _batches(images, labels, features, config.batch_size, shuffle, device):
                for name, value in step(*batch).items():
                    totals[name] = totals.get(name, 0.0) + value
                steps += 1
            history.append({"epoch": float(epoch), **{k: v / steps for k, v in totals.items()}})
    return history


def train_cgan(
    gen: Generator,
    disc: Discriminator,
    images: torch.Tensor,
    labels: torch.Tensor,
    features: torch.Tensor | None = None,
    config: ImageTrainConfig | None = None,
) -> list[dict[str, float]]:
    """Train a cGAN in place on images [N, C, H, W] in [0, 1] with labels [N] (and features
    [N, num_features]). Returns per-epoch means of `cgan_train_step`'s metrics."""
    config = config or ImageTrainConfig()
    opt_g, opt_d = cgan_optimizers(gen, disc, config)
    gen.train()
    disc.train()
    device = next(gen.parameters()).device

    def step(x: torch.Tensor, y: torch.Tensor, f: torch.Tensor | None) -> dict[str, float]:
        return cgan_train_step(gen, disc, opt_g, opt_d, x, y, f)

    return _train_loop(step, device, images, labels, features, config)


def train_cvae(
    model: CVAE,
    images: torch.Tensor,
    labels: torch.Tensor,
    features: torch.Tensor | None = None,
    config: ImageTrainConfig | None = None,
) -> list[dict[str, float]]:
    """Train a cVAE in place on images [N, C, H, W] in [0, 1] with labels [N] (and features
    [N, num_features]). Returns per-epoch means of `cvae_train_step`'s loss terms."""
    # A VAE is not an adversarial game: plain Adam (beta1 0.9) at a higher rate than the cGAN default.
    config = config or ImageTrainConfig(lr=1e-3, beta1=0.9)
    opt = cvae_optimizer(model, config)
    model.train()
    device = next(model.parameters()).device

    def step(x: torch.Tensor, y: torch.Tensor, f: torch.Tensor | None) -> dict[str, float]:
        return cvae_train_step(model, opt, x, y, f, config.kl_weight)

    return _train_loop(step, device, images, labels, features, config)
