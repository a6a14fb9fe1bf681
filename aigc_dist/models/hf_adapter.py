"""LoRA adapter directories in PEFT's layout: written by training, loaded merged into their base.

    <uri>/adapter_config.json        peft_type LORA, r, lora_alpha, target_modules, base_model_name_or_path
    <uri>/adapter_model.safetensors  base_model.model.<module path>.lora_A.weight / .lora_B.weight
    <uri>/tokenizer.json, tokenizer_config.json
    <uri>/metadata.json              aigc-dist's own, last: prompt template, run, sha256 of every file,
                                     and the base's URI and `weights_digest`

`peft.PeftModel.from_pretrained(base_model, uri)` opens the directory. `hf_format.load_checkpoint`
(and so the engines) loads the base named in adapter_config.json through the same store and merges
the adapter into its weights: one plain model, decoding exactly as fast as a merged export. A base
whose weights changed since the adapter was trained is refused (its digest no longer matches).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from typing import Any

import safetensors.torch
import torch

from aigc_dist.models.hf_format import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    CONFIG_FILE,
    METADATA_FILE,
    METADATA_FORMAT,
    TOKENIZER_FILE,
    CheckpointError,
    CheckpointStore,
    TextCheckpoint,
    _load_whole,
    _read,
    _read_checked,
    _read_metadata,
    join,
)
from aigc_dist.models.lora import adapter_state_dict, lora_settings, merge_adapter_weights
from aigc_dist.models.tokenizer import TOKENIZER_CONFIG_FILE, TextTokenizer, TokenizerError

# adapter_config.json settings that would change what the adapter computes, and the only value read here.
_REFUSED_UNLESS = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
                   "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False,
                   "use_qalora": False, "layer_replication": None, "target_parameters": None,
                   "trainable_token_indices": None}  # fmt: skip


def adapter_config(rank: int, alpha: float, targets: Sequence[str], base_uri: str) -> dict[str, Any]:
    """adapter_config.json as PEFT writes it for plain LoRA on a causal LM."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_uri,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_adapter(uri: str, model: torch.nn.Module, tokenizer: TextTokenizer, store: CheckpointStore, *,
                 targets: Sequence[str], base_uri: str, base_digest: str, metadata: dict[str, Any] | None = None
                 ) -> dict[str, Any]:  # fmt: skip
    """Write the LoRA adapters of `model` (a LlamaLM with `add_lora` applied) as an adapter directory
    on the base at `base_uri`; metadata.json last. Returns the metadata written."""
    settings = lora_settings(model, targets)
    state = adapter_state_dict(model)
    files = {
        ADAPTER_CONFIG_FILE: json.dumps(adapter_config(settings.rank, settings.alpha, targets, base_uri),
                                        indent=2).encode(),
        ADAPTER_WEIGHTS_FILE: safetensors.torch.save(state, metadata={"format": "pt"}),
        **tokenizer.files(),
    }
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}
    meta = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "num_parameters": sum(t.numel() for t in state.values()),  # the adapter's own
        **(metadata or {}),
        "format": METADATA_FORMAT,
        "kind": "lm",
        "base": {"uri": base_uri, "digest": base_digest},
        "files": digests,
        # The model served is base + adapter: both belong in its identity.
        "digest": hashlib.sha256(json.dumps({"files": digests, "base": base_digest}, sort_keys=True).encode())
        .hexdigest(),
    }
    for name, data in files.items():
        store.write_bytes(join(uri, name), data)
    store.write_bytes(join(uri, METADATA_FILE), json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False).encode())
    return meta


def _scaling(config: dict[str, Any], where: str) -> float:
    """alpha / r (alpha / sqrt(r) with rsLoRA); CheckpointError naming a setting this loader cannot apply."""
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{where}: peft_type {config.get('peft_type')!r} is not supported (LORA only)")
    for name, allowed in _REFUSED_UNLESS.items():
        value = config.get(name, allowed)
        if value != allowed and not (allowed == {} and value is None):
            raise CheckpointError(f"{where}: {name}={value!r} is not supported (plain LoRA on Linear layers only)")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, int | float):
        raise CheckpointError(f"{where}: r must be an int >= 1 and lora_alpha a number (got {rank!r}, {alpha!r})")
    return alpha / (rank**0.5 if config.get("use_rslora") else rank)


def load_adapter(uri: str, store: CheckpointStore, device: str | torch.device, meta: dict[str, Any] | None,
                 dtype: torch.dtype | None) -> TextCheckpoint:  # fmt: skip
    """The base named in adapter_config.json with the adapter merged into it (see the module doc)."""
    expected = meta.get("files") if meta else None
    where = f"{uri}/{ADAPTER_CONFIG_FILE}"
    data = _read_checked(store, uri, ADAPTER_CONFIG_FILE, expected) or b""
    try:
        config = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where} is not JSON: {exc}") from None
    scaling = _scaling(config, where)
    base_uri = config.get("base_model_name_or_path")
    if not isinstance(base_uri, str) or not base_uri:
        raise CheckpointError(f"{where}: base_model_name_or_path must name the base checkpoint")
    if _read(store, base_uri, CONFIG_FILE) is None:
        raise CheckpointError(f"{where}: the base {base_uri!r} is not a checkpoint this store can read (no "
                              f"{CONFIG_FILE} there); a hub id must be downloaded to a path or s3:// URI first")
    weights = _read_checked(store, uri, ADAPTER_WEIGHTS_FILE, expected)
    if weights is None:
        raise CheckpointError(f"{uri} is not a complete adapter: {ADAPTER_WEIGHTS_FILE} is missing")
    base, digest = _load_whole(base_uri, store, "cpu", _read_metadata(base_uri, store, required=False), None)
    stored_dtype = next(base.model.parameters()).dtype
    recorded = ((meta or {}).get("base") or {}).get("digest")
    if recorded is not None and recorded != digest:
        raise CheckpointError(f"{uri}: its base {base_uri} has changed since the adapter was trained (weights "
                              f"digest {digest[:12]}, the adapter records {recorded[:12]})")
    try:  # in float32: a bf16 sum would round away much of a small update
        merge_adapter_weights(base.model.float(), safetensors.torch.load(weights), scaling)
    except ValueError as exc:
        raise CheckpointError(f"{uri}/{ADAPTER_WEIGHTS_FILE}: {exc}") from None
    tokenizer = base.tokenizer
    tokenizer_json = _read_checked(store, uri, TOKENIZER_FILE, expected)
    if tokenizer_json is not None:  # ours ship the tokenizer trained with; PEFT's own adapters often do not
        try:
            tokenizer = TextTokenizer.from_files(tokenizer_json, _read_checked(store, uri, TOKENIZER_CONFIG_FILE,
                                                                               expected), uri)  # fmt: skip
        except TokenizerError as exc:
            raise CheckpointError(str(exc)) from None
    model = base.model.to(device=device, dtype=dtype or stored_dtype)
    return TextCheckpoint(model.eval(), tokenizer, meta or {}, uri)
