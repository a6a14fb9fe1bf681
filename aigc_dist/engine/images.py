"""Batched conditional image generation on a loaded cGAN or cVAE artifact, as PNG bytes.

Shared by the backfill (image mode) and the Serve `/v1/images` route, like the text engine.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from aigc_dist.models.artifact import IMAGE_KINDS, Artifact, ArtifactError, ArtifactStore, load_artifact


@dataclass
class ImageRequest:
    """One image: the condition (class id plus optional numeric features) and a seed."""

    label: int
    features: Sequence[float] | None = None
    seed: int = 0


@dataclass
class ImageResult:
    """A PNG for one request, or the reason there is none (`error`, with `png` empty)."""

    png: bytes = b""
    width: int = 0
    height: int = 0
    error: str | None = None
    pixels: torch.Tensor | None = field(default=None, repr=False)  # [C, H, W] in [0, 1], for evaluation


def encode_png(image: torch.Tensor) -> bytes:
    """[C, H, W] floats in [0, 1] (C = 1 grey or 3 RGB) -> 8-bit PNG bytes, with the stdlib only."""
    channels, height, width = image.shape
    if channels not in (1, 3):
        raise ValueError(f"PNG needs 1 or 3 channels (got {channels})")
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()  # [H, W, C]
    rows = pixels.reshape(height, width * channels).numpy().tobytes()
    stride = width * channels
    raw = b"".join(b"\x00" + rows[y * stride : (y + 1) * stride] for y in range(height))  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    colour_type = 0 if channels == 1 else 2
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


class ImageEngine:
    """Turns `ImageRequest`s into PNGs in batches; bad conditions fail alone, not the batch."""

    def __init__(self, artifact: Artifact, max_batch_size: int = 256, num_threads: int | None = None):
        if artifact.kind not in IMAGE_KINDS:
            raise ArtifactError(f"ImageEngine needs a {' or '.join(IMAGE_KINDS)} artifact (got {artifact.kind!r})")
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.artifact = artifact
        self.model = artifact.model.eval()
        self.config = artifact.model_config
        self.max_batch_size = max_batch_size

    @classmethod
    def from_uri(cls, uri: str, store: ArtifactStore, **kwargs: Any) -> ImageEngine:
        return cls(load_artifact(uri, store), **kwargs)

    def _check(self, request: ImageRequest) -> str | None:
        if isinstance(request.label, bool) or not isinstance(request.label, int):
            return f"label must be an integer class id (got {request.label!r})"
        if not 0 <= request.label < self.config.num_classes:
            return f"label must be in [0, {self.config.num_classes}) (got {request.label})"
        given = 0 if request.features is None else len(request.features)
        if given != self.config.num_features:
            return f"features must have {self.config.num_features} values (got {given})"
        return None

    def generate(self, requests: Sequence[ImageRequest]) -> list[ImageResult]:
        """One result per request, in order."""
        results = [ImageResult(error=self._check(r)) for r in requests]
        valid = [i for i, r in enumerate(results) if r.error is None]
        for start in range(0, len(valid), self.max_batch_size):
            chunk = valid[start : start + self.max_batch_size]
            labels = torch.tensor([requests[i].label for i in chunk], dtype=torch.long)
            features = None
            if self.config.num_features:
                features = torch.tensor([list(requests[i].features) for i in chunk], dtype=torch.float32)
            with torch.inference_mode():
                images = self.model.generate(labels, features, seeds=[requests[i].seed for i in chunk]).cpu()
            for i, image in zip(chunk, images, strict=True):
                results[i] = ImageResult(encode_png(image), image.shape[2], image.shape[1], pixels=image)
        return results


def image_engine(uri: str, store: ArtifactStore, backend: str = "native", *, device: str = "cpu",
                 max_batch_size: int = 256, num_threads: int | None = None, **_vllm_settings: Any) -> ImageEngine:
    """The image engine a backfill actor or a Serve replica runs (the opener the image kinds' ModelSpec
    names, with the text opener's arguments). `engine.backend` chooses the text engine: a replica serving
    text on vLLM serves its image model beside it on this engine, the only one images have."""
    return ImageEngine(load_artifact(uri, store, device=device), max_batch_size=max_batch_size,
                       num_threads=num_threads)
