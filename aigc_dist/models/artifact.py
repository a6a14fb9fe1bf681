"""Trained-model artifacts: a directory that rebuilds its model from its own files.

Text models are Hugging Face checkpoint directories (`hf_format.py`); `load_artifact` opens either
kind and gives the engines one `Artifact` record. Image generators (cgan, cvae) are stored as:

    <uri>/config.json        kind, model hyper-parameters, conditioning (labels...)
    <uri>/model.safetensors  weights (tied weights stored once)
    <uri>/metadata.json      name, version, run, step, metrics, sha256 of the weights, content digest

metadata.json is written last and names the sha256 of the weights, so a half-written artifact or
a corrupted weights file fails to load instead of serving garbage. Serve and batch load only
artifacts, never training checkpoints.

Pure torch + stdlib (+ safetensors, a weights format): the bytes are moved by a `store` the caller
passes (`aigc_dist.storage.Storage` satisfies it), so this module never imports an S3 client.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import safetensors.torch
import torch
from torch import nn

from aigc_dist.models.hf_format import (
    METADATA_FORMAT,
    CheckpointError,
    TextCheckpoint,
    load_checkpoint,
    save_checkpoint,
)
from aigc_dist.models.llama import LlamaLM
from aigc_dist.models.spec import kinds_of, model_spec
from aigc_dist.models.tokenizer import TextTokenizer, byte_level_tokenizer

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, METADATA_FILE = "config.json", "model.safetensors", "metadata.json"

# Key of an LM artifact's metadata.json (and of Artifact.conditioning) that holds its prompt template.
PROMPT_TEMPLATE_KEY = "prompt_template"

# The kinds stored in this module's format (text models are Hugging Face checkpoints); each spec's
# `module` is what the artifact holds: for the cGAN only the generator, all that inference needs (the
# discriminator lives in training checkpoints).
IMAGE_KINDS = kinds_of("image")


class ArtifactError(ValueError):
    """An artifact directory that is incomplete, corrupted or of an unknown kind."""


class ArtifactStore(Protocol):
    """Where artifact files are read and written (local directory, S3 prefix, ...)."""

    def read_bytes(self, uri: str) -> bytes: ...

    def write_bytes(self, uri: str, data: bytes) -> None: ...


@dataclass
class Artifact:
    """A loaded artifact: the model in eval mode plus everything needed to use it."""

    kind: str
    model: nn.Module
    model_config: Any
    tokenizer: TextTokenizer | None
    conditioning: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """Content digest (config + weights): equal digests, equal models."""
        return self.metadata["digest"]

    @property
    def label(self) -> str:
        """`name:version@digest12`, how outputs and logs identify the model."""
        return f"{self.metadata.get('name', '?')}:{self.metadata.get('version', '?')}@{self.digest[:12]}"


def _join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without aliases: a tensor that shares storage with an earlier one is dropped
    (safetensors refuses shared tensors; the model re-ties them when it is built)."""
    seen: set[tuple[int, int]] = set()
    unique = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        unique[name] = tensor.detach().to("cpu").contiguous()
    return unique


def save_artifact(
    uri: str,
    kind: str,
    model: nn.Module,
    store: ArtifactStore,
    *,
    tokenizer: TextTokenizer | None = None,
    conditioning: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write an image generator as an artifact at `uri`; returns the metadata written (with its digests).
    Text models are written by `hf_format.save_checkpoint`."""
    if kind not in IMAGE_KINDS:
        raise ArtifactError(f"save_artifact writes the image kinds {', '.join(IMAGE_KINDS)} (got {kind!r}); "
                            "text models are written by hf_format.save_checkpoint")
    module = model_spec(kind).module
    if not isinstance(model, module):
        raise ArtifactError(f"kind {kind!r} stores a {module.__name__}, got {type(model).__name__}")
    config = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "model": model.config.to_dict(),
        "tokenizer": None,
        "conditioning": conditioning or {},
    }
    config_bytes = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False).encode()
    weights = safetensors.torch.save(_unique_state(model))
    weights_sha = hashlib.sha256(weights).hexdigest()
    meta = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        **(metadata or {}),
        "weights_sha256": weights_sha,
        "digest": hashlib.sha256(hashlib.sha256(config_bytes).digest() + weights_sha.encode()).hexdigest(),
    }
    store.write_bytes(_join(uri, WEIGHTS_FILE), weights)
    store.write_bytes(_join(uri, CONFIG_FILE), config_bytes)
    store.write_bytes(_join(uri, METADATA_FILE), json.dumps(meta, indent=2, sort_keys=True).encode())
    return meta


def save_text_artifact(uri: str, model: LlamaLM, store: ArtifactStore, *, tokenizer: TextTokenizer | None = None,
                       conditioning: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None
                       ) -> dict[str, Any]:  # fmt: skip
    """A text model as a Hugging Face directory, its prompt template (`conditioning`) in metadata.json;
    the project's byte-level tokenizer unless another is given. Returns the metadata written."""
    tokenizer = tokenizer or byte_level_tokenizer(model.config.max_position_embeddings)
    return save_checkpoint(uri, model, tokenizer, store, metadata={**(metadata or {}), **(conditioning or {})})


def text_artifact(checkpoint: TextCheckpoint) -> Artifact:
    """The engines' view of a loaded text checkpoint (its prompt template from metadata.json)."""
    template = checkpoint.metadata.get(PROMPT_TEMPLATE_KEY)
    conditioning = {PROMPT_TEMPLATE_KEY: template} if template is not None else {}
    return Artifact("lm", checkpoint.model, checkpoint.config, checkpoint.tokenizer, conditioning, checkpoint.metadata)


def artifact_kind(uri: str, store: ArtifactStore) -> str:
    """An artifact's kind from its small files, without reading its weights: "lm" for a Hugging Face
    text checkpoint, else config.json's `kind`."""
    try:
        meta = json.loads(store.read_bytes(_join(uri, METADATA_FILE)))
        if meta.get("format") == METADATA_FORMAT:
            return "lm"
        return json.loads(store.read_bytes(_join(uri, CONFIG_FILE))).get("kind")
    except FileNotFoundError as exc:
        raise ArtifactError(f"{uri} is not a complete artifact: {exc} is missing") from None


def load_artifact(uri: str, store: ArtifactStore, device: str | torch.device = "cpu") -> Artifact:
    """Rebuild the model from the directory alone and check it against its recorded digests."""
    try:
        meta = json.loads(store.read_bytes(_join(uri, METADATA_FILE)))
    except FileNotFoundError:
        raise ArtifactError(f"{uri} is not a complete artifact: {METADATA_FILE} is missing") from None
    if meta.get("format") == METADATA_FORMAT:
        try:
            return text_artifact(load_checkpoint(uri, store, device))
        except CheckpointError as exc:
            raise ArtifactError(str(exc)) from None
    try:
        config_bytes = store.read_bytes(_join(uri, CONFIG_FILE))
        weights = store.read_bytes(_join(uri, WEIGHTS_FILE))
    except FileNotFoundError as exc:
        raise ArtifactError(f"{uri} is not a complete artifact: {exc} is missing") from None
    if hashlib.sha256(weights).hexdigest() != meta.get("weights_sha256"):
        raise ArtifactError(f"{uri}: {WEIGHTS_FILE} does not match metadata.json's weights_sha256 (corrupted?)")
    config = json.loads(config_bytes)
    if config.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{uri}: format_version {config.get('format_version')!r} is not {FORMAT_VERSION}")
    kind = config.get("kind")
    if kind == "lm":
        raise ArtifactError(f"{uri} is a text model in aigc-dist's earlier format; engines load Hugging Face "
                            f"directories only; `aigc-dist export --to-hf {uri}` says why it cannot be converted "
                            "and prints the train overrides that retrain one of its size")
    if kind not in IMAGE_KINDS:
        raise ArtifactError(f"{uri}: unknown model kind {kind!r}; known: {', '.join(IMAGE_KINDS)}")
    spec = model_spec(kind)
    model_config = spec.config_cls.from_dict(config["model"])
    model = spec.module(model_config)
    missing, unexpected = model.load_state_dict(safetensors.torch.load(weights), strict=False)
    tied = set(model.state_dict()) - set(_unique_state(model))
    if unexpected or set(missing) - tied:
        raise ArtifactError(f"{uri}: weights do not fit the config (missing {missing}, unexpected {unexpected})")
    return Artifact(kind, model.to(device).eval(), model_config, None, config.get("conditioning", {}), meta)
