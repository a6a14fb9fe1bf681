"""Conditional DCGAN: a generator and a projection discriminator, both conditioned on a categorical
label (segment / category id) plus optional numeric features.

This file also holds the pieces every conditional image generator shares (the base config, the
condition embedding, seeded latent sampling); `cvae.py` imports them so both models read their
conditions and seeds the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Self

import torch
import torch.nn as nn

# Square image sides the models support: each is the 4x4 base map doubled once per stage.
IMAGE_SIZES = (8, 16, 32, 64)
CHANNELS = (1, 3)

# What `generate` accepts as seeds: one int per sample (so a request always gets the same image,
# whatever batch it lands in), one torch.Generator for the whole batch, or None (global RNG).
Seeds = Sequence[int] | torch.Tensor | torch.Generator | None


def check_config_int(owner: str, name: str, value: Any, minimum: int) -> None:
    """Raise a ValueError naming `owner.name` unless value is an int >= minimum."""
    # bool is an int subclass; a flag in an int field is always a config mistake.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be an int (got {value!r})")
    if value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum} (got {value})")


@dataclass
class ConditionalImageConfig:
    """Fields every conditional image generator shares; subclasses add their own widths."""

    image_size: int = 16  # side of the square image, one of IMAGE_SIZES
    channels: int = 1  # 1 (grey) or 3 (RGB)
    num_classes: int = 10  # condition ids (segment / category) are in [0, num_classes)
    num_features: int = 0  # length of the numeric condition vector; 0 = label only
    label_dim: int = 16  # width of the learned label embedding

    def __post_init__(self) -> None:
        owner = type(self).__name__
        # Type first: 16.0 == 16 would pass the membership tests below.
        check_config_int(owner, "image_size", self.image_size, 1)
        check_config_int(owner, "channels", self.channels, 1)
        if self.image_size not in IMAGE_SIZES:
            raise ValueError(f"{owner}.image_size must be one of {IMAGE_SIZES} (got {self.image_size!r})")
        if self.channels not in CHANNELS:
            raise ValueError(f"{owner}.channels must be one of {CHANNELS} (got {self.channels!r})")
        check_config_int(owner, "num_classes", self.num_classes, 1)
        check_config_int(owner, "num_features", self.num_features, 0)
        check_config_int(owner, "label_dim", self.label_dim, 1)

    @property
    def num_stages(self) -> int:
        """Up/down-sampling stages between the 4x4 base map and image_size (8 -> 1, 64 -> 4)."""
        return int(math.log2(self.image_size)) - 2

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; `from_dict(to_dict())` rebuilds the same config."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build a config from a dict (e.g. an artifact's config.json), rejecting unknown keys."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(names)}")
        return cls(**data)


@dataclass
class CGANConfig(ConditionalImageConfig):
    """Conditional DCGAN hyper-parameters."""

    z_dim: int = 64  # noise vector length
    width: int = 32  # channels of the widest-resolution conv; doubles at each lower resolution

    def __post_init__(self) -> None:
        super().__post_init__()
        check_config_int(type(self).__name__, "z_dim", self.z_dim, 1)
        check_config_int(type(self).__name__, "width", self.width, 1)


# Sizes by preset, as plain data (the LM's are llama.LM_PRESETS); image_size, channels and classes
# come from the data.
CGAN_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"width": 16, "z_dim": 32},  # ~0.1M parameters at 16x16: tests and the CPU demo
    "small": {"width": 32, "z_dim": 64},
    "base": {"width": 64, "z_dim": 128},
}


class ConditionEmbedding(nn.Module):
    """Condition = learned label embedding concatenated with the raw numeric features."""

    def __init__(self, num_classes: int, label_dim: int, num_features: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = num_features
        self.label = nn.Embedding(num_classes, label_dim)
        self.dim = label_dim + num_features

    def forward(self, labels: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        cond = self.label(labels)  # [N] -> [N, label_dim]
        if self.num_features == 0:
            if features is not None and features.numel() > 0:
                raise ValueError(f"features given but the model has num_features=0 (got {features.shape})")
            return cond
        if features is None:
            raise ValueError(f"features are required: the model has num_features={self.num_features}")
        if features.shape != (labels.shape[0], self.num_features):
            expected = [labels.shape[0], self.num_features]
            raise ValueError(f"features must have shape {expected} (got {list(features.shape)})")
        return torch.cat([cond, features.to(cond.dtype)], dim=1)  # [N, label_dim + num_features]

    def prepare(
        self, labels: Any, features: Any, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Caller's labels and features as tensors on `device`, labels checked against num_classes."""
        labels = torch.as_tensor(labels, dtype=torch.long, device=device)
        self.check_labels(labels)
        if features is not None:
            features = torch.as_tensor(features, dtype=torch.float32, device=device)
        return labels, features

    def check_labels(self, labels: torch.Tensor) -> None:
        """Raise a ValueError for labels outside [0, num_classes) (an embedding would fail opaquely)."""
        if labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D tensor of class ids (got shape {list(labels.shape)})")
        low, high = (int(labels.min()), int(labels.max())) if labels.numel() else (0, 0)
        if low < 0 or high >= self.num_classes:
            raise ValueError(f"labels must be in [0, {self.num_classes}) (got min {low}, max {high})")


def sample_latents(n: int, dim: int, seeds: Seeds, device: torch.device | str) -> torch.Tensor:
    """Standard-normal latents [n, dim]. Per-sample int seeds draw each row on the CPU from its own
    generator, so the same seed gives the same row on any device and in any batch."""
    if seeds is None or isinstance(seeds, torch.Generator):
        gen_device = seeds.device if isinstance(seeds, torch.Generator) else device
        return torch.randn(n, dim, generator=seeds, device=gen_device).to(device)
    seed_list = seeds.tolist() if isinstance(seeds, torch.Tensor) else list(seeds)
    if len(seed_list) != n:
        raise ValueError(f"seeds must have one entry per sample: {n} (got {len(seed_list)})")
    rows = [torch.randn(dim, generator=torch.Generator().manual_seed(int(s))) for s in seed_list]
    return torch.stack(rows).to(device) if rows else torch.zeros(0, dim, device=device)


def dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation (N(0, 0.02) convs, N(1, 0.02) norms): stable early GAN training."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """(z, label, features) -> image in [-1, 1] through a 4x4 map and num_stages upsamplings."""

    def __init__(self, config: CGANConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.cond = ConditionEmbedding(c.num_classes, c.label_dim, c.num_features)
        self.base_channels = c.width * 2 ** (c.num_stages - 1)
        self.project = nn.Sequential(
            nn.Linear(c.z_dim + self.cond.dim, self.base_channels * 16, bias=False),
            nn.Unflatten(1, (self.base_channels, 4, 4)),
            nn.BatchNorm2d(self.base_channels),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        ch = self.base_channels
        for _ in range(c.num_stages - 1):
            layers += [
                nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(ch // 2),
                nn.ReLU(inplace=True),
            ]
            ch //= 2
        # Last stage straight to pixels: no norm, Tanh keeps the output in [-1, 1].
        layers += [nn.ConvTranspose2d(ch, c.channels, 4, stride=2, padding=1), nn.Tanh()]
        self.upsample = nn.Sequential(*layers)
        self.apply(dcgan_init)

    def forward(
        self, z: torch.Tensor, labels: torch.Tensor, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = torch.cat([z, self.cond(labels, features)], dim=1)  # [N, z_dim + cond_dim]
        h = self.project(h)  # [N, base_channels, 4, 4]
        return self.upsample(h)  # [N, channels, image_size, image_size]

    @torch.no_grad()
    def generate(
        self, labels: torch.Tensor, features: torch.Tensor | None = None, seeds: Seeds = None
    ) -> torch.Tensor:
        """Images in [0, 1], [N, C, H, W], one per label. Runs in eval mode (running BatchNorm
        statistics) so each image depends only on its own seed and condition, not its batch."""
        device = next(self.parameters()).device
        labels, features = self.cond.prepare(labels, features, device)
        z = sample_latents(labels.shape[0], self.config.z_dim, seeds, device)  # [N, z_dim]
        was_training = self.training
        self.eval()
        try:
            images = self(z, labels, features)  # [N, C, H, W] in [-1, 1]
        finally:
            self.train(was_training)
        return (images + 1.0) / 2.0


class Discriminator(nn.Module):
    """Strided convs to a 4x4 map, then a projection head: logit = w.h + <h, proj(condition)>, so
    the condition enters as an inner product with the image features (Miyato & Koyama, 2018)."""

    def __init__(self, config: CGANConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.cond = ConditionEmbedding(c.num_classes, c.label_dim, c.num_features)
        # The first conv has no norm (DCGAN): normalising raw pixels throws away their scale.
        layers: list[nn.Module] = [nn.Conv2d(c.channels, c.width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = c.width
        for _ in range(c.num_stages - 1):
            layers += [
                nn.Conv2d(ch, ch * 2, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(ch * 2),
                nn.LeakyReLU(0.2),
            ]
            ch *= 2
        self.body = nn.Sequential(*layers, nn.Flatten())
        hidden = ch * 16
        self.head = nn.Linear(hidden, 1)
        self.project = nn.Linear(self.cond.dim, hidden, bias=False)
        self.apply(dcgan_init)

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Real/fake logits [N] for images in [-1, 1], [N, C, H, W]."""
        h = self.body(images)  # [N, C, H, W] -> [N, hidden]
        projection = (h * self.project(self.cond(labels, features))).sum(dim=1)  # [N]
        return self.head(h).squeeze(1) + projection  # [N]
