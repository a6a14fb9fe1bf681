"""Plain single-process PyTorch training for the conditional image generators.

The per-step functions (`cgan_train_step`, `cvae_train_step`) hold all the maths and take ready
optimizers and one batch, so distributed training can call them from its own loop; `train_cgan`
and `train_cvae` are the simplest such loops, over in-memory tensors, used by tests and demos.
Images are always passed in [0, 1], the same range `generate` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from aigc_dist.models.cgan import Discriminator, Generator
from aigc_dist.models.cvae import CVAE, elbo_loss


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
    """One discriminator step then one generator step on a batch of real images in [0, 1].

    Fakes are drawn for the batch's own conditions, so the discriminator compares real and fake at
    equal label frequencies. The generator uses the non-saturating loss (maximise log D(G(z)))
    which keeps its gradients alive while the discriminator is winning. Returns the losses and the
    discriminator's mean probabilities on real and fake images.
    """
    real = images * 2.0 - 1.0  # [0, 1] -> the generator's Tanh range [-1, 1]
    z = torch.randn(images.shape[0], gen.config.z_dim, device=images.device)  # [N, z_dim]
    fake = gen(z, labels, features)  # [N, C, H, W]

    opt_d.zero_grad(set_to_none=True)
    logits_real = disc(real, labels, features)  # [N]
    logits_fake = disc(fake.detach(), labels, features)  # [N]
    loss_d = F.binary_cross_entropy_with_logits(
        logits_real, torch.ones_like(logits_real)
    ) + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
    loss_d.backward()
    opt_d.step()

    opt_g.zero_grad(set_to_none=True)
    logits_gen = disc(fake, labels, features)  # [N]
    loss_g = F.binary_cross_entropy_with_logits(logits_gen, torch.ones_like(logits_gen))
    loss_g.backward()
    opt_g.step()
    return {
        "loss_d": loss_d.item(),
        "loss_g": loss_g.item(),
        "d_real": torch.sigmoid(logits_real).mean().item(),
        "d_fake": torch.sigmoid(logits_fake).mean().item(),
    }


def cvae_train_step(
    model: CVAE,
    opt: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    features: torch.Tensor | None = None,
    kl_weight: float = 1.0,
) -> dict[str, float]:
    """One ELBO step on a batch of images in [0, 1]; returns the per-image loss terms."""
    opt.zero_grad(set_to_none=True)
    logits, mu, logvar = model(images, labels, features)
    losses = elbo_loss(logits, images, mu, logvar, beta=kl_weight)
    losses["total"].backward()
    opt.step()
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
