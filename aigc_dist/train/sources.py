"""The checkpoint a fine-tuning run starts from (`model.source`): a directory, an s3:// URI, or a hub id.

A hub id (`Qwen/Qwen2.5-0.5B`: owner/name, no scheme, and no such local path) is fetched with
`huggingface_hub.snapshot_download` into the machine's Hugging Face cache, on each machine that
needs it: the driver fetches only config and tokenizer files, each worker the weights too. Anything
else is read through `aigc_dist.storage.Storage`, like every other location.
"""

from __future__ import annotations

import os
import re

from aigc_dist.config import ConfigError, StorageConfig
from aigc_dist.models.hf_format import CheckpointError, peek_checkpoint
from aigc_dist.models.llama import LMConfig
from aigc_dist.models.tokenizer import TextTokenizer
from aigc_dist.storage import Storage, StorageError, parse_uri

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# What a checkpoint directory needs from a hub repository; skips the .bin / .pt copies some repositories add.
_HUB_FILES_HEAD = ["*.json", "tokenizer*"]
_HUB_FILES_ALL = [*_HUB_FILES_HEAD, "*.safetensors"]


def is_hub_id(source: str) -> bool:
    """owner/name without a scheme that is not a local path."""
    return "://" not in source and not os.path.exists(source) and bool(_HUB_ID.match(source))


def absolute_source(source: str | None) -> str | None:
    """On the driver: a local path made absolute (a Ray Train worker runs in a directory of its own);
    URIs and hub ids unchanged."""
    if source is None or "://" in source or is_hub_id(source):
        return source
    return parse_uri(source).uri


def fetch_source(source: str, *, weights: bool) -> str:
    """A location `Storage` reads: `source` itself, or the local snapshot of a hub id (config and
    tokenizer only unless `weights`)."""
    if not is_hub_id(source):
        return source
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(f"model.source: {source!r} is no local path, so it names a Hugging Face hub model, but "
                          "huggingface_hub is not installed (pip install huggingface_hub); or give a directory "
                          "or s3:// URI") from None
    try:
        return snapshot_download(source, allow_patterns=_HUB_FILES_ALL if weights else _HUB_FILES_HEAD)
    except Exception as exc:  # offline, unknown repository, gated model, ...: each its own class
        raise ConfigError(f"model.source: {source!r} is no local path, so it names a Hugging Face hub model, and "
                          f"fetching it failed: {type(exc).__name__}: {exc}") from exc


def open_source(source: str, storage: StorageConfig) -> tuple[LMConfig, TextTokenizer]:
    """The source checkpoint's config and tokenizer (no weights); ConfigError naming model.source."""
    location = fetch_source(source, weights=False)
    try:
        return peek_checkpoint(location, Storage(storage))
    except (CheckpointError, StorageError, FileNotFoundError) as exc:
        raise ConfigError(f"model.source: {exc}") from None
