"""Quality metrics for conditionally generated digit images.

- conditioning accuracy: a classifier fit on REAL training digits labels each generated image;
  the score is the share labelled as the class that was requested. An untrained generator scores
  near chance (0.1), a generator that follows its condition near the classifier's own accuracy.
- distance to the class mean: MSE and MAE between each generated image and the mean real image of
  its requested class, a coarse check that images look like the class rather than noise.

Generated images may have any supported size and 1 or 3 channels: they are compared in grey, the
classifier sees them shrunk to the digits' native 8x8.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch

from aigc_dist.data.digits import NUM_CLASSES, load_digits_split, resize_images
from aigc_dist.optional import optional_import

_svm = optional_import("sklearn.svm", "demo", "the digits images' quality measure")

# The classifier always reads the digits' native resolution, whatever size a model generates.
CLASSIFIER_SIZE = 8


@lru_cache(maxsize=4)
def digit_classifier(heldout_fraction: float = 0.2, seed: int = 0) -> Any:  # an sklearn SVC
    """An RBF SVM fit on the real 8x8 training digits of the (heldout_fraction, seed) split.

    Cached per process: fitting takes tens of milliseconds, but evaluation runs once per batch.
    """
    split = load_digits_split(CLASSIFIER_SIZE, 1, heldout_fraction, seed)
    # C=10 fits the training digits tighter than the default C=1: ~0.99 held-out vs ~0.98.
    classifier = _svm.SVC(C=10.0, gamma="scale")
    classifier.fit(_flat_grey(split.train_images, CLASSIFIER_SIZE), split.train_labels.numpy())
    return classifier


@lru_cache(maxsize=8)
def class_mean_images(image_size: int, heldout_fraction: float = 0.2, seed: int = 0) -> torch.Tensor:
    """Mean real training image per class, grey, [NUM_CLASSES, image_size, image_size] in [0, 1]."""
    split = load_digits_split(image_size, 1, heldout_fraction, seed)
    images = split.train_images[:, 0]  # [N, H, W]
    return torch.stack([images[split.train_labels == k].mean(dim=0) for k in range(NUM_CLASSES)])


def _as_tensor(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    images = torch.as_tensor(images, dtype=torch.float32).detach().cpu()
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be square [N, C, H, W] with C in (1, 3) (got {list(images.shape)})")
    return images


def _flat_grey(images: torch.Tensor, size: int) -> np.ndarray:
    """[N, C, H, W] in [0, 1] -> grey, resized to size x size, flattened: [N, size * size]."""
    grey = resize_images(images, size, 1)  # [N, 1, size, size]
    return grey.reshape(grey.shape[0], -1).numpy()


def classify_images(
    images: torch.Tensor | np.ndarray, heldout_fraction: float = 0.2, seed: int = 0
) -> np.ndarray:
    """Digit class predicted by the real-data classifier for each image [N, C, H, W] in [0, 1]: [N]."""
    images = _as_tensor(images)
    if images.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return digit_classifier(heldout_fraction, seed).predict(_flat_grey(images, CLASSIFIER_SIZE))


def classifier_heldout_accuracy(image_size: int = 8, heldout_fraction: float = 0.2, seed: int = 0) -> float:
    """Accuracy of the conditioning classifier on real held-out digits stored at image_size: the
    ceiling a perfect generator could reach on conditioning accuracy."""
    split = load_digits_split(image_size, 1, heldout_fraction, seed)
    predicted = classify_images(split.heldout_images, heldout_fraction, seed)
    return float((predicted == split.heldout_labels.numpy()).mean())


def evaluate_images(
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    heldout_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, float]:
    """Score generated images [N, C, H, W] in [0, 1] against their requested labels [N].

    Returns {"conditioning_accuracy", "mse_to_class_mean", "mae_to_class_mean", "num_images"}.
    The distances are averaged per requested class first, then over the classes present, so an
    unbalanced request mix does not let one class dominate. (heldout_fraction, seed) pick the real
    training split the classifier and class means come from; keep them equal to the model's.
    """
    images = _as_tensor(images)
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape [{images.shape[0]}] (got {list(labels.shape)})")
    if images.shape[0] == 0:
        raise ValueError("evaluate_images needs at least one image")
    if int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES:
        raise ValueError(
            f"labels must be digit classes in [0, {NUM_CLASSES}) (got {labels.unique().tolist()})"
        )

    predicted = classify_images(images, heldout_fraction, seed)
    accuracy = float((predicted == labels.numpy()).mean())

    grey = images.mean(dim=1)  # [N, C, H, W] -> [N, H, W]
    means = class_mean_images(images.shape[-1], heldout_fraction, seed)[labels]  # [N, H, W]
    diff = (grey - means).flatten(1)  # [N, H * W]
    per_image_mse, per_image_mae = diff.pow(2).mean(dim=1), diff.abs().mean(dim=1)  # [N] each
    classes = labels.unique()
    mse = torch.stack([per_image_mse[labels == k].mean() for k in classes]).mean()
    mae = torch.stack([per_image_mae[labels == k].mean() for k in classes]).mean()
    return {
        "conditioning_accuracy": accuracy,
        "mse_to_class_mean": float(mse),
        "mae_to_class_mean": float(mae),
        "num_images": float(images.shape[0]),
    }
