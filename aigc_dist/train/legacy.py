"""`aigc-dist export --to-hf URI`: what becomes of an artifact of aigc-dist's earlier format.

Image artifacts (cgan, cvae) kept their format and need nothing. A text model of the earlier format
is a GPT-style decoder: LayerNorm, a GELU MLP, a fused q|k|v projection (`c_attn`), rotary or learned
positions. The text models now are Llama-family checkpoints: RMSNorm, SwiGLU, separate projections.
These compute different functions, so no renaming or reshaping of the old weights gives a Llama
model that writes the same copy; the old model cannot be converted, only replaced. The command
says so, describes the old model, and prints the `aigc-dist train` overrides that retrain a model
of the same size with the same prompt fields (a preset trains in minutes to hours, its data is the
user's own). It writes nothing: a GPT-NeoX export would open in transformers but not in this
package's engines, and a silently approximate Llama conversion would serve different copy.
"""

from __future__ import annotations

import json
from typing import Any

from aigc_dist.config import ConfigError
from aigc_dist.models.hf_format import METADATA_FORMAT
from aigc_dist.models.spec import kinds_of
from aigc_dist.storage import Storage, join_uri

# The earlier format's text presets, by (n_layer, n_head, d_model); today's presets have the same names
# and about the same sizes.
_OLD_PRESETS = {(2, 2, 64): "tiny", (2, 4, 128): "mini", (6, 6, 384): "small", (16, 12, 768): "base"}
_OLD_PRESET_SEQ_LEN = {"tiny": 256, "mini": 256, "small": 512, "base": 1024}


def _read_json(uri: str, storage: Storage) -> dict[str, Any] | None:
    try:
        value = json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"--to-hf: {uri} is not JSON") from None
    return value if isinstance(value, dict) else None


def retrain_overrides(model: dict[str, Any], conditioning: dict[str, Any], name: str | None) -> list[str]:
    """`aigc-dist train` overrides for a model of the old one's size, trained on the same prompt fields."""
    preset = _OLD_PRESETS.get((model.get("n_layer"), model.get("n_head"), model.get("d_model")))
    args = ["--model.kind=lm", f"--model.preset={preset or 'tiny|mini|small|base'}"]
    seq_len = model.get("max_seq_len")
    if seq_len is not None and (preset is None or seq_len != _OLD_PRESET_SEQ_LEN[preset]):
        args.append(f"--model.max_seq_len={seq_len}")
    if name:
        args.append(f"--model.name={name}")
    template = conditioning.get("prompt_template") or {}
    for key in ("user_fields", "item_fields"):
        if template.get(key) is not None:
            args.append(f"--data.{key}='{json.dumps(list(template[key]))}'")
    for key in ("max_field_chars", "max_prompt_tokens"):
        if template.get(key) is not None:
            args.append(f"--data.{key}={template[key]}")
    return args


def convert_to_hf(uri: str, storage: Storage) -> str:
    """A line saying why `uri` needs no conversion; ConfigError with the reason and what to do when it is
    a text model of the earlier format (or not an artifact at all)."""
    meta = _read_json(join_uri(uri, "metadata.json"), storage)
    if meta is not None and meta.get("format") == METADATA_FORMAT:
        return f"{uri} is already a Hugging Face checkpoint ({METADATA_FORMAT}): nothing to convert"
    config = _read_json(join_uri(uri, "config.json"), storage)
    if meta is None or config is None or config.get("format_version") != 1:
        raise ConfigError(f"--to-hf: {uri} is not an aigc-dist artifact of the earlier format (it needs "
                          "config.json with format_version 1 and metadata.json)")
    kind = config.get("kind")
    if kind in kinds_of("image"):
        return f"{uri} is a {kind} artifact: image artifacts keep their format, engines load it as it is"
    if kind != "lm":
        raise ConfigError(f"--to-hf: {uri}: unknown artifact kind {kind!r}")
    model = config.get("model") or {}
    shape = (f"{model.get('n_layer')} layers x {model.get('d_model')} wide, {model.get('pos_encoding', 'rope')} "
             f"positions, {meta.get('num_parameters', '?')} parameters")
    trained = f"run {meta.get('run', '?')!r}, step {meta.get('step', '?')}"
    overrides = " ".join(retrain_overrides(model, config.get("conditioning") or {}, meta.get("name")))
    raise ConfigError(
        f"--to-hf: {uri} is a text model of aigc-dist's earlier format ({shape}; {trained}) and cannot be converted. "
        "It is a GPT-style decoder (LayerNorm, GELU MLP, fused c_attn); the text models now are Llama-family "
        "checkpoints (RMSNorm, SwiGLU), which compute a different function, so no mapping of its weights writes "
        "the same copy, and nothing was written. Retrain it with this version on the same data and prompt fields "
        f"(a new artifact version): aigc-dist train --config YOUR_TRAIN_CONFIG {overrides} "
        "--model.version=NEW_VERSION; keep serving the old artifact with the aigc-dist release that wrote it "
        "until the new one is out. See docs/finetuning.md, 'Converting old artifacts'."
    )
