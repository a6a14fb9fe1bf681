"""Text models as Hugging Face checkpoint directories (local or S3), the one format they have.

    <uri>/config.json                    model_type llama | qwen2, hyper-parameters (transformers' names)
    <uri>/model.safetensors              weights with transformers' tensor names, or, when large,
    <uri>/model-0000k-of-0000n.safetensors + model.safetensors.index.json
    <uri>/tokenizer.json, tokenizer_config.json (+ chat_template inside, when the model has one)
    <uri>/generation_config.json         bos / eos / pad ids
    <uri>/metadata.json                  aigc-dist's own: prompt template, run, sha256 of every file; last

`transformers.AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)`
open what `save_checkpoint` writes; `load_checkpoint` opens what transformers' `save_pretrained`
writes (a checkpoint the user brings has no metadata.json: `require_metadata=False`). Architectures
and options this package cannot run are refused with the file and the field named. A LoRA adapter
directory (PEFT's layout, `hf_adapter.py`) loads as its base with the adapter merged in.

Pure torch + safetensors + tokenizers: bytes move through a `store` the caller passes
(`aigc_dist.storage.Storage` satisfies it), so this module never imports an S3 client.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import safetensors.torch
import torch

from aigc_dist.models.llama import SUPPORTED_ROPE_TYPES, LlamaLM, LMConfig
from aigc_dist.models.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, TextTokenizer, TokenizerError

CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
GENERATION_FILE, METADATA_FILE = "generation_config.json", "metadata.json"
# A LoRA adapter directory, in PEFT's layout (`hf_adapter.py`).
ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
METADATA_FORMAT = "aigc-dist/hf-1"  # metadata.json's `format`: what an engine accepts
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
DEFAULT_MAX_SHARD_BYTES = 2 * 2**30  # one safetensors file up to 2 GiB, as save_pretrained's default of 5 GB shrunk
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint directory that is incomplete, corrupted, or of an architecture this package cannot run."""


class CheckpointStore(Protocol):
    def read_bytes(self, uri: str) -> bytes: ...

    def write_bytes(self, uri: str, data: bytes) -> None: ...


@dataclass
class TextCheckpoint:
    """A loaded text model: the module (eval mode), its tokenizer and aigc-dist's metadata (may be empty)."""

    model: LlamaLM
    tokenizer: TextTokenizer
    metadata: dict[str, Any] = field(default_factory=dict)
    uri: str = ""

    @property
    def config(self) -> LMConfig:
        return self.model.config

    @property
    def digest(self) -> str:
        """Content digest of the directory's files: equal digests, equal models."""
        return self.metadata.get("digest", "")

    @property
    def label(self) -> str:
        """`name:version@digest12`, how outputs and logs identify the model."""
        m = self.metadata
        return f"{m.get('name', '?')}:{m.get('version', '?')}@{self.digest[:12]}"


def join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def hf_config(config: LMConfig, dtype: str = "float32") -> dict[str, Any]:
    """config.json as transformers writes it for the model type (rope in v5's `rope_parameters`
    and in v4's `rope_theta` / `rope_scaling`, so either generation of tools reads it)."""
    rope = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta}
    d: dict[str, Any] = {
        "architectures": [ARCHITECTURES[config.model_type]],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_dropout": config.attention_dropout,
        "initializer_range": config.initializer_range,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id[0] if len(config.eos_token_id) == 1 else (config.eos_token_id or None),
        "pad_token_id": config.pad_token_id,
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if config.model_type == "llama":
        d.update(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias, pretraining_tp=1)
    else:
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_hidden_layers)
    return d


def config_from_hf(d: dict[str, Any], source: str) -> LMConfig:
    """LMConfig from a config.json; CheckpointError naming the field for what cannot run here."""
    where = f"{source}/{CONFIG_FILE}"

    def refuse(name: str, why: str) -> CheckpointError:
        return CheckpointError(f"{where}: {name} {d.get(name)!r} {why}")

    model_type = d.get("model_type")
    if model_type not in ARCHITECTURES:
        raise refuse("model_type", f"is not supported (supported: {', '.join(ARCHITECTURES)})")
    if d.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", "is not supported (Llama-family models use 'silu')")
    sliding = d.get("sliding_window")
    if model_type == "qwen2" and d.get("use_sliding_window"):
        raise refuse("use_sliding_window", "is not supported (full attention only)")
    if model_type == "mistral" and sliding is not None and sliding < d.get("max_position_embeddings", 0):
        raise refuse("sliding_window", "is shorter than the context; sliding-window attention is not supported")
    rope = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        name = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
        raise CheckpointError(f"{where}: {name}.rope_type {rope_type!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    eos = d.get("eos_token_id")
    try:
        return LMConfig(
            # Mistral without a sliding window is Llama; qwen2 keeps its q/k/v bias.
            model_type="qwen2" if model_type == "qwen2" else "llama",
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(d.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rope_scaling=None if rope_type == "default" else dict(scaling),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", model_type != "llama")),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            attention_dropout=float(d.get("attention_dropout", 0.0)),
            initializer_range=float(d.get("initializer_range", 0.02)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            pad_token_id=d.get("pad_token_id"),
        )
    except KeyError as exc:
        raise CheckpointError(f"{where}: required field {exc.args[0]!r} is missing") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the tied lm_head (transformers omits it too; safetensors refuses aliases)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def weight_files(state: dict[str, torch.Tensor], max_shard_bytes: int) -> dict[str, bytes]:
    """One model.safetensors, or numbered shards plus model.safetensors.index.json when larger."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    meta = {"format": "pt"}  # transformers reads this key
    if len(shards) == 1:
        return {WEIGHTS_FILE: safetensors.torch.save(shards[0], metadata=meta)}
    files, weight_map = {}, {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        files[name] = safetensors.torch.save(shard, metadata=meta)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    files[INDEX_FILE] = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2).encode()
    return files


def checkpoint_files(model: LlamaLM, tokenizer: TextTokenizer, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     chat_template: str | None = None) -> dict[str, bytes]:  # fmt: skip
    """Every file of the directory but metadata.json, by name."""
    config = model.config
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"vocab_size={config.vocab_size}")
    state = _unique_state(model)
    dtype = next((k for k, v in _DTYPES.items() if v == next(iter(state.values())).dtype), "float32")
    files = weight_files(state, max_shard_bytes)
    files[CONFIG_FILE] = json.dumps(hf_config(config, dtype), indent=2).encode()
    eos = config.eos_token_id
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
                  "pad_token_id": config.pad_token_id, "_from_model_config": False}
    files[GENERATION_FILE] = json.dumps(generation, indent=2).encode()
    tokenizer_files = tokenizer.files()
    if chat_template:
        tokenizer_config = {**json.loads(tokenizer_files[TOKENIZER_CONFIG_FILE]), "chat_template": chat_template}
        tokenizer_files[TOKENIZER_CONFIG_FILE] = json.dumps(tokenizer_config, indent=2, ensure_ascii=False).encode()
    files.update(tokenizer_files)
    return files


def save_checkpoint(uri: str, model: LlamaLM, tokenizer: TextTokenizer, store: CheckpointStore, *,
                    metadata: dict[str, Any] | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
                    ) -> dict[str, Any]:  # fmt: skip
    """Write the directory; metadata.json last, with the sha256 of every other file, so a half-written
    or corrupted directory fails to load instead of serving garbage. Returns the metadata written."""
    files = checkpoint_files(model, tokenizer, max_shard_bytes, tokenizer.chat_template)
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}
    meta = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "num_parameters": model.num_parameters(),
        **(metadata or {}),
        "format": METADATA_FORMAT,
        "kind": "lm",
        "files": digests,
        "digest": hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest(),
    }
    for name, data in files.items():
        store.write_bytes(join(uri, name), data)
    store.write_bytes(join(uri, METADATA_FILE), json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False).encode())
    return meta


def _read(store: CheckpointStore, uri: str, name: str) -> bytes | None:
    try:
        return store.read_bytes(join(uri, name))
    except FileNotFoundError:
        return None


def _read_json(store: CheckpointStore, uri: str, name: str, required: bool) -> dict[str, Any] | None:
    data = _read(store, uri, name)
    if data is None:
        if required:
            raise CheckpointError(f"{uri} is not a complete checkpoint: {name} is missing")
        return None
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{uri}/{name} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{uri}/{name} must hold a JSON object")
    return value


def _read_checked(store: CheckpointStore, uri: str, name: str, expected: dict[str, str] | None,
                  digests: dict[str, str] | None = None) -> bytes | None:  # fmt: skip
    """A file's bytes (None when absent), checked against metadata.json's sha256 when `expected` is given;
    its sha256 goes into `digests` when given."""
    data = _read(store, uri, name)
    return None if data is None else _checked(uri, name, data, expected, digests)


def _checked(uri: str, name: str, data: bytes, expected: dict[str, str] | None,
             digests: dict[str, str] | None) -> bytes:  # fmt: skip
    sha = hashlib.sha256(data).hexdigest()
    if expected is not None and sha != expected.get(name):
        raise CheckpointError(f"{uri}/{name} does not match metadata.json's sha256 (corrupted or replaced?)")
    if digests is not None:
        digests[name] = sha
    return data


def _read_weights(uri: str, store: CheckpointStore, expected: dict[str, str] | None,
                  digests: dict[str, str]) -> dict[str, torch.Tensor]:  # fmt: skip
    def load(name: str) -> dict[str, torch.Tensor]:
        data = _read_checked(store, uri, name, expected, digests)
        if data is None:
            raise CheckpointError(f"{uri} is not a complete checkpoint: {name} is missing")
        return safetensors.torch.load(data)

    index_data = _read_checked(store, uri, INDEX_FILE, expected, digests)
    if index_data is None:
        return load(WEIGHTS_FILE)
    try:
        index = json.loads(index_data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{uri}/{INDEX_FILE} is not JSON: {exc}") from None
    state: dict[str, torch.Tensor] = {}
    for name in sorted(set(index.get("weight_map", {}).values())):
        state.update(load(name))
    return state


def read_state_dict(uri: str, store: CheckpointStore, expected: dict[str, str] | None = None
                    ) -> dict[str, torch.Tensor]:  # fmt: skip
    """The weights, whole or from shards; each file checked against `expected` sha256 digests if given."""
    return _read_weights(uri, store, expected, {})


def _files_digest(digests: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def _read_metadata(uri: str, store: CheckpointStore, required: bool) -> dict[str, Any] | None:
    meta = _read_json(store, uri, METADATA_FILE, required=required)
    if meta is not None and meta.get("format") != METADATA_FORMAT:
        raise CheckpointError(
            f"{uri}/{METADATA_FILE}: format {meta.get('format')!r} is not {METADATA_FORMAT!r}; for an artifact of "
            "aigc-dist's earlier format, `aigc-dist export --to-hf URI` says what it is and how to replace it"
        )
    return meta


def _config_and_tokenizer(uri: str, store: CheckpointStore, expected: dict[str, str] | None,
                          digests: dict[str, str], config_data: bytes | None = None
                          ) -> tuple[LMConfig, TextTokenizer]:  # fmt: skip
    """config.json (already read when `config_data` is given) and the tokenizer files, checked and parsed."""
    raw = {}
    for name, required in ((CONFIG_FILE, True), (TOKENIZER_FILE, True), (TOKENIZER_CONFIG_FILE, False),
                           (GENERATION_FILE, False)):  # fmt: skip
        # Only config.json goes into `digests`: with the weights it fixes what the model computes.
        kept = digests if name == CONFIG_FILE else None
        if name == CONFIG_FILE and config_data is not None:
            data = _checked(uri, name, config_data, expected, kept)
        else:
            data = _read_checked(store, uri, name, expected, kept)
        if data is None and required:
            raise CheckpointError(f"{uri} is not a complete checkpoint: {name} is missing (every text model "
                                  "needs config.json and tokenizer.json)")
        raw[name] = data
    try:
        config_json = json.loads(raw[CONFIG_FILE])
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{uri}/{CONFIG_FILE} is not JSON: {exc}") from None
    generation = json.loads(raw[GENERATION_FILE]) if raw[GENERATION_FILE] else {}
    if generation.get("eos_token_id") is not None:  # generation_config.json's list wins (Qwen2 has two EOS ids)
        config_json = {**config_json, "eos_token_id": generation["eos_token_id"]}
    config = config_from_hf(config_json, uri)
    try:
        tokenizer = TextTokenizer.from_files(raw[TOKENIZER_FILE], raw[TOKENIZER_CONFIG_FILE], uri)
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{uri}/{TOKENIZER_FILE} has {tokenizer.vocab_size} tokens, more than "
                              f"{CONFIG_FILE}'s vocab_size={config.vocab_size}")
    if not config.eos_token_id and tokenizer.eos_id is not None:
        config.eos_token_id = [tokenizer.eos_id]
    return config, tokenizer


def peek_checkpoint(uri: str, store: CheckpointStore) -> tuple[LMConfig, TextTokenizer]:
    """A checkpoint's config and tokenizer without its weights (what a training run checks on its driver);
    metadata.json is optional, and its sha256 digests are checked when present."""
    meta = _read_metadata(uri, store, required=False)
    if _read(store, uri, CONFIG_FILE) is None and _read(store, uri, ADAPTER_CONFIG_FILE) is not None:
        raise CheckpointError(f"{uri} is a LoRA adapter directory, not a whole checkpoint: start from its base "
                              "model, or from a merged export")
    return _config_and_tokenizer(uri, store, meta.get("files") if meta else None, {})


def model_config_json(uri: str, store: CheckpointStore) -> dict[str, Any]:
    """config.json of a checkpoint, or of the base an adapter directory names: what describes the model
    that loads from `uri`, without reading weights (drivers size caches and prompts with it)."""
    config = _read_json(store, uri, CONFIG_FILE, required=False)
    if config is not None:
        return config
    adapter = _read_json(store, uri, ADAPTER_CONFIG_FILE, required=False)
    base = (adapter or {}).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise CheckpointError(f"{uri} is not a complete checkpoint: {CONFIG_FILE} is missing")
    return _read_json(store, base, CONFIG_FILE, required=True)


def weights_digest(uri: str, store: CheckpointStore) -> str:
    """sha256 over config.json and the weight files of a checkpoint: what an adapter records of its base,
    so that loading it on a base whose weights were replaced fails instead of merging into the wrong model."""
    digests: dict[str, str] = {}
    _read_checked(store, uri, CONFIG_FILE, None, digests)
    _read_weights(uri, store, None, digests)
    return _files_digest(digests)


def _load_whole(uri: str, store: CheckpointStore, device: str | torch.device, meta: dict[str, Any] | None,
                dtype: torch.dtype | None, config_data: bytes | None = None) -> tuple[TextCheckpoint, str]:  # fmt: skip
    """The checkpoint, and `weights_digest` of it (computed from the bytes as they are read)."""
    expected = meta.get("files") if meta else None
    digests: dict[str, str] = {}
    config, tokenizer = _config_and_tokenizer(uri, store, expected, digests, config_data)
    state = _read_weights(uri, store, expected, digests)
    with torch.device("meta"):
        model = LlamaLM(config)
    model = model.to_empty(device="cpu")
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        model.lm_head.weight = model.model.embed_tokens.weight
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{uri}: weights do not fit {CONFIG_FILE} (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    model = model.to(device=device, dtype=dtype or next(iter(state.values())).dtype if state else torch.float32)
    return TextCheckpoint(model.eval(), tokenizer, meta or {}, uri), _files_digest(digests)


def load_checkpoint(uri: str, store: CheckpointStore, device: str | torch.device = "cpu", *,
                    require_metadata: bool = True, dtype: torch.dtype | None = None) -> TextCheckpoint:  # fmt: skip
    """Rebuild a text model from its directory. With metadata.json (aigc-dist's own, required by
    engines by default) every file is checked against its recorded sha256. A LoRA adapter directory
    (adapter_config.json, PEFT's layout) loads as its base with the adapter merged in (`hf_adapter.py`)."""
    meta = _read_metadata(uri, store, required=require_metadata)
    config_data = _read(store, uri, CONFIG_FILE)
    if config_data is None and _read(store, uri, ADAPTER_CONFIG_FILE) is not None:
        from aigc_dist.models.hf_adapter import load_adapter  # hf_adapter builds on this module

        return load_adapter(uri, store, device, meta, dtype)
    return _load_whole(uri, store, device, meta, dtype, config_data)[0]
