"""Trained weights -> an artifact at `<storage_path>/models/<name>/<version>/`.

Two ways in, one way out (`save_trained_artifact`):
- at the end of a run, from the live engines: under ZeRO-3 every rank joins
  `deepspeed.zero.GatheredParameters` so rank 0 sees whole tensors (`gathered_state_dict`);
- on demand, from a checkpoint (`export_checkpoint`, `aigc-dist export --checkpoint URI`): the
  ZeRO shards of all ranks are merged on one machine by DeepSpeed's `zero_to_fp32`, which needs no
  process group and no GPU.
Serve and batch only ever load artifacts, never training checkpoints.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from typing import Any

import torch
from torch import nn

from aigc_dist.models.artifact import save_artifact
from aigc_dist.models.hf_adapter import save_adapter
from aigc_dist.models.hf_format import peek_checkpoint, save_checkpoint, weights_digest
from aigc_dist.models.llama import LlamaLM, LMConfig
from aigc_dist.models.lora import add_lora, merge_lora
from aigc_dist.models.spec import model_spec
from aigc_dist.models.tokenizer import TextTokenizer, byte_level_tokenizer
from aigc_dist.storage import Storage, join_uri
from aigc_dist.train.checkpoints import (
    DEEPSPEED_TAG,
    TrainerState,
    download_checkpoint,
    find_checkpoint,
    read_trainer_state,
    verify_checkpoint_files,
)
from aigc_dist.train.sources import fetch_source

log = logging.getLogger(__name__)


def artifact_uri(storage_path: str, name: str, version: str) -> str:
    """Where a run's artifact goes: <storage_path>/models/<name>/<version>."""
    return join_uri(storage_path, "models", name, version)


def gathered_state_dict(engine: Any, zero_stage: int, rank: int) -> dict[str, torch.Tensor] | None:
    """The engine's whole weights as fp32 CPU tensors on rank 0 (None elsewhere).

    Collective under ZeRO-3: every rank must call it, since gathering a partitioned parameter is an
    all-gather. Under stages 0-2 every rank already holds every weight.
    """
    import deepspeed

    module: nn.Module = engine.module
    state = None
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None, enabled=zero_stage == 3):
        if rank == 0:
            state = {
                name: (t.detach().float() if t.is_floating_point() else t.detach()).to("cpu").clone()
                for name, t in module.state_dict().items()
            }
    return state


def artifact_metadata(state: TrainerState) -> dict[str, Any]:
    """What an artifact records of the run that trained it: name, version, run, step, last metrics."""
    return {
        "name": state.name,
        "version": state.version,
        "run": state.run_name,
        "step": state.step,
        "metrics": state.history[-1] if state.history else {},
    }


def save_trained_artifact(
    uri: str, spec: dict[str, Any], state_dict: dict[str, torch.Tensor], storage: Storage, metadata: dict[str, Any]
) -> dict[str, Any]:
    """Rebuild the model from `spec` (kind, model hyper-parameters, tokenizer, conditioning, LoRA), load
    `state_dict` into it strictly, and write the artifact; returns the metadata written. A LoRA run
    writes its adapters merged into one checkpoint, or as an adapter directory on its source."""
    kind = spec["kind"]
    if kind == "lm":
        model, lora = lm_from_spec(spec), spec.get("lora")
        model.load_state_dict(state_dict, strict=True)
        metadata = {**metadata, **(spec.get("conditioning") or {})}
        tokenizer = spec_tokenizer(spec, storage)
        if lora is not None and lora["export"] == "adapter":
            base = spec["source"]
            meta = save_adapter(uri, model.eval(), tokenizer, storage, targets=lora["targets"], base_uri=base,
                                base_digest=weights_digest(base, storage), metadata=metadata)
            log.info("exported lm LoRA adapter %s on %s (digest %s)", uri, base, meta["digest"][:12])
            return meta
        if lora is not None:
            merge_lora(model)
        meta = save_checkpoint(uri, model.eval(), tokenizer, storage, metadata=metadata)
        log.info("exported lm checkpoint %s (digest %s)", uri, meta["digest"][:12])
        return meta
    kind_spec = model_spec(kind)
    model = kind_spec.module(kind_spec.config_cls.from_dict(spec["model"]))
    model.load_state_dict(state_dict, strict=True)
    meta = save_artifact(uri, kind, model.eval(), storage, conditioning=spec.get("conditioning") or {},
                         metadata=metadata)
    log.info("exported %s artifact %s (digest %s)", kind, uri, meta["digest"][:12])
    return meta


def lm_from_spec(spec: dict[str, Any]) -> LlamaLM:
    """The trained module's shape (LoRA layers included) with uninitialized weights, for a state dict:
    random init of a large model would only be overwritten."""
    config = LMConfig.from_dict(spec["model"])
    with torch.device("meta"):
        model = LlamaLM(config)
    model = model.to_empty(device="cpu")
    if config.tie_word_embeddings:  # to_empty gives the tied name a tensor of its own
        model.lm_head.weight = model.model.embed_tokens.weight
    lora = spec.get("lora")
    if lora is not None:
        add_lora(model, lora["targets"], lora["rank"], lora["alpha"])
    return model


def spec_tokenizer(spec: dict[str, Any], storage: Storage) -> TextTokenizer:
    """The tokenizer a run trained with: the project's byte-level one, or its source checkpoint's."""
    source = spec.get("tokenizer")
    if source is None:
        return byte_level_tokenizer(spec["model"]["max_position_embeddings"])
    return peek_checkpoint(fetch_source(source, weights=False), storage)[1]


def consolidated_state_dict(engine_dir: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """Whole fp32 weights from one engine's checkpoint directory (all ranks' shards present)."""
    if zero_stage == 0:
        # No ZeRO shards: rank 0's model-states file holds the whole module.
        path = os.path.join(engine_dir, DEEPSPEED_TAG, "mp_rank_00_model_states.pt")
        module = torch.load(path, map_location="cpu", weights_only=True)["module"]
        return {k: (v.float() if v.is_floating_point() else v) for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its prints, bars
        state = get_fp32_state_dict_from_zero_checkpoint(engine_dir, tag=DEEPSPEED_TAG)
    return {k: v.contiguous() for k, v in state.items()}


def export_checkpoint(
    checkpoint_uri: str, storage: Storage, output_uri: str | None = None
) -> tuple[str, dict[str, Any]]:
    """Export a training checkpoint as an artifact; returns (artifact URI, metadata).

    The default destination is where the run itself exports: the run's storage path, artifact
    name and version recorded in the checkpoint.
    """
    with tempfile.TemporaryDirectory(prefix="aigc-export-") as tmp:
        checkpoint_uri = find_checkpoint(checkpoint_uri, storage, what="--checkpoint")
        probe = read_trainer_state(checkpoint_uri, storage)
        local = download_checkpoint(checkpoint_uri, storage, tmp, engine=probe.artifact_engine)
        verify_checkpoint_files(local, checkpoint_uri)  # zero_to_fp32 unpickles with weights_only=False
        state = consolidated_state_dict(os.path.join(local, probe.artifact_engine), probe.zero_stage)
    uri = output_uri or artifact_uri(probe.storage_path, probe.name, probe.version)
    metadata = {**artifact_metadata(probe), "source_checkpoint": checkpoint_uri}
    return uri, save_trained_artifact(uri, probe.artifact, state, storage, metadata)

