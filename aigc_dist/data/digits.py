"""scikit-learn's bundled handwritten digits as conditional image training data.

`sklearn.datasets.load_digits()` ships inside the scikit-learn package (1797 8x8 images, 16 grey
levels, 10 classes), so tests train on real images with no download. The digit class is the
condition label.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from aigc_dist.optional import optional_import

_datasets = optional_import("sklearn.datasets", "demo", "scikit-learn's digits data")
_model_selection = optional_import("sklearn.model_selection", "demo", "scikit-learn's digits data")

IMAGE_SIZES = (8, 16, 32, 64)
NUM_CLASSES = 10
# load_digits pixels are counts of set bits in 4x4 blocks: integers 0..16.
MAX_GREY_LEVEL = 16.0


@dataclass(frozen=True)
class DigitsSplit:
    """A deterministic train / held-out split: images float32 [N, C, H, W] in [0, 1], labels int64 [N]."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    # Parsed once per process: load_digits reads and decodes a bundled CSV each call.
    bunch = _datasets.load_digits()
    images = (bunch.images / MAX_GREY_LEVEL).astype(np.float32)  # [1797, 8, 8] in [0, 1]
    return images, bunch.target.astype(np.int64)


def resize_images(images: torch.Tensor, image_size: int, channels: int) -> torch.Tensor:
    """Resize square grey or RGB images [N, C, h, w] in [0, 1] to [N, channels, image_size, image_size].

    Bilinear resizing (area averaging when shrinking, which avoids aliasing); grey becomes RGB by
    repeating the channel, RGB becomes grey by averaging. Values stay in [0, 1].
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W] (got shape {list(images.shape)})")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3 (got {channels})")
    if images.shape[-1] > image_size:
        images = F.interpolate(images, size=(image_size, image_size), mode="area")
    elif images.shape[-1] < image_size:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    if images.shape[1] != channels:
        grey = images.mean(dim=1, keepdim=True)  # [N, 1, H, W]
        images = grey.expand(-1, channels, -1, -1).contiguous()  # [N, channels, H, W]
    return images.clamp(0.0, 1.0)


def load_digits_split(
    image_size: int = 16, channels: int = 1, heldout_fraction: float = 0.2, seed: int = 0
) -> DigitsSplit:
    """The digits resized to image_size and channels, split stratified by class.

    The split depends only on (heldout_fraction, seed), never on image_size or channels, so a
    model trained at 16x16 and a classifier fit at 8x8 with the same seed never see each other's
    held-out images.
    """
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {IMAGE_SIZES} (got {image_size})")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1) (got {heldout_fraction})")
    images, labels = _raw_digits()
    train_idx, heldout_idx = _model_selection.train_test_split(
        np.arange(len(labels)), test_size=heldout_fraction, stratify=labels, random_state=seed
    )
    # Sorted so a split's order is stable and readable (shuffling is the training loop's job).
    train_idx, heldout_idx = np.sort(train_idx), np.sort(heldout_idx)
    tensor = torch.from_numpy(images).unsqueeze(1)  # [1797, 1, 8, 8]
    tensor = resize_images(tensor, image_size, channels)  # [1797, channels, image_size, image_size]
    target = torch.from_numpy(labels)
    return DigitsSplit(
        train_images=tensor[train_idx],
        train_labels=target[train_idx],
        heldout_images=tensor[heldout_idx],
        heldout_labels=target[heldout_idx],
    )
