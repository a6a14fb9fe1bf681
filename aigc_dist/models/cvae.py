"""Conditional VAE: a conv encoder q(z | x, c) and a transposed-conv decoder p(x | z, c), both
conditioned on a categorical label plus optional numeric features (c). Generation decodes prior
samples z ~ N(0, I) under the requested condition."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from aigc_dist.models.cgan import (
    ConditionalImageConfig,
    ConditionEmbedding,
    Seeds,
    check_config_int,
    sample_latents,
)


@dataclass
class CVAEConfig(ConditionalImageConfig):
    """Conditional VAE hyper-parameters."""

    latent_dim: int = 16  # size of z; the condition carries the class, z only the style
    width: int = 32  # channels of the widest-resolution conv; doubles at each lower resolution
    hidden_dim: int = 256  # fully connected layer between the conv stack and (mu, logvar)

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        check_config_int(owner, "latent_dim", self.latent_dim, 1)
        check_config_int(owner, "width", self.width, 1)
        check_config_int(owner, "hidden_dim", self.hidden_dim, 1)


CVAE_PRESETS: dict[str, dict[str, int]] = {  # as cgan.CGAN_PRESETS
    "tiny": {"width": 16, "hidden_dim": 128, "latent_dim": 16},
    "small": {"width": 32, "hidden_dim": 256, "latent_dim": 16},
    "base": {"width": 64, "hidden_dim": 512, "latent_dim": 32},
}


class Encoder(nn.Module):
    """(image, condition) -> (mu, logvar) of q(z | x, c)."""

    def __init__(self, config: CVAEConfig, cond_dim: int) -> None:
        super().__init__()
        c = config
        layers: list[nn.Module] = []
        ch_in, ch = c.channels, c.width
        for _ in range(c.num_stages):
            layers += [nn.Conv2d(ch_in, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            ch_in, ch = ch, ch * 2
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(ch_in * 16 + cond_dim, c.hidden_dim), nn.LeakyReLU(0.2))
        self.mu = nn.Linear(c.hidden_dim, c.latent_dim)
        self.logvar = nn.Linear(c.hidden_dim, c.latent_dim)

    def forward(self, images: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(images)  # [N, C, H, W] -> [N, top_channels * 4 * 4]
        h = self.fc(torch.cat([h, cond], dim=1))  # [N, hidden_dim]
        return self.mu(h), self.logvar(h)  # [N, latent_dim] each


class Decoder(nn.Module):
    """(z, condition) -> pixel logits, through a 4x4 map and num_stages upsamplings."""

    def __init__(self, config: CVAEConfig, cond_dim: int) -> None:
        super().__init__()
        c = config
        top = c.width * 2 ** (c.num_stages - 1)
        self.project = nn.Sequential(
            nn.Linear(c.latent_dim + cond_dim, c.hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(c.hidden_dim, top * 16),
            nn.ReLU(inplace=True),
            nn.Unflatten(1, (top, 4, 4)),
        )
        layers: list[nn.Module] = []
        ch = top
        for _ in range(c.num_stages - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
            ch //= 2
        layers.append(nn.ConvTranspose2d(ch, c.channels, 4, stride=2, padding=1))  # logits, no activation
        self.upsample = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.project(torch.cat([z, cond], dim=1))  # [N, latent_dim + cond_dim] -> [N, top, 4, 4]
        return self.upsample(h)  # [N, channels, image_size, image_size]


class CVAE(nn.Module):
    """Conditional VAE over images in [0, 1]."""

    def __init__(self, config: CVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.cond = ConditionEmbedding(config.num_classes, config.label_dim, config.num_features)
        self.encoder = Encoder(config, self.cond.dim)
        self.decoder = Decoder(config, self.cond.dim)

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode, sample z by reparameterisation, decode. Returns (recon_logits, mu, logvar):
        logits [N, C, H, W] (sigmoid gives pixel means in [0, 1]); mu, logvar [N, latent_dim]."""
        cond = self.cond(labels, features)  # [N, cond_dim]
        mu, logvar = self.encoder(images, cond)
        # z = mu + sigma * eps keeps the sample differentiable in (mu, logvar).
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # [N, latent_dim]
        return self.decoder(z, cond), mu, logvar

    @torch.no_grad()
    def generate(
        self, labels: torch.Tensor, features: torch.Tensor | None = None, seeds: Seeds = None
    ) -> torch.Tensor:
        """Images in [0, 1], [N, C, H, W]: the decoder's pixel means for z ~ N(0, I) drawn per
        sample from `seeds` (same seed and condition -> same image, in any batch)."""
        device = next(self.parameters()).device
        labels, features = self.cond.prepare(labels, features, device)
        z = sample_latents(labels.shape[0], self.config.latent_dim, seeds, device)  # [N, latent_dim]
        logits = self.decoder(z, self.cond(labels, features))  # [N, C, H, W]
        return torch.sigmoid(logits)


def elbo_loss(
    recon_logits: torch.Tensor,
    images: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Negative ELBO per image, averaged over the batch: {"total", "reconstruction", "kl"}.

    Reconstruction is binary cross-entropy of the logits against pixels in [0, 1], summed over
    pixels: a Bernoulli likelihood, standard for digit images. Grey levels are not binary, so its
    minimum is not 0, but its gradient still pulls each pixel mean towards the target. KL is the
    closed form KL(N(mu, sigma^2) || N(0, I)) summed over latent dimensions; `beta` weights it.
    """
    n = images.shape[0]
    reconstruction = F.binary_cross_entropy_with_logits(recon_logits, images, reduction="sum") / n
    kl = -0.5 * torch.sum(1.0 + logvar - mu.pow(2) - logvar.exp()) / n
    return {"total": reconstruction + beta * kl, "reconstruction": reconstruction, "kl": kl}
