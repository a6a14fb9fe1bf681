"""The text generator: a Llama-family decoder in plain PyTorch, with Hugging Face's tensor names.

RMSNorm, SwiGLU, rotary positions (`rope_theta`, optional linear / llama3 scaling), grouped-query
attention, tied or untied embeddings, and optional QKV bias (Qwen2). Parameter names are those of
`transformers`' LlamaForCausalLM / Qwen2ForCausalLM (`model.layers.0.self_attn.q_proj.weight`, ...),
so a state dict moves between the two unchanged and `hf_format.py` only translates config.json.

Conventions used throughout this file:
- `targets` are already shifted by the caller: targets[b, t] is the token that should follow idx[b, t].
- Position ids count from each row's first real token, so a row's output does not depend on padding.
- A `cache` (engine/decode.py's SlotCache) stores each layer's keys and values and holds the rope
  table; the model only calls `cache.update(layer, k, v)` and reads `cache.rope`. Decoding, sampling
  and scheduling live in `aigc_dist/engine/`, not here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Rope scaling types implemented here; others (yarn, dynamic, longrope) are refused by name.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# The project's byte-level tokenizer (models/tokenizer.py): 256 bytes + 8 special tokens, <pad> <bos> <eos> first.
BYTE_VOCAB_SIZE, BYTE_PAD_ID, BYTE_BOS_ID, BYTE_EOS_ID = 264, 256, 257, 258


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # bool is an int subclass in Python


@dataclass
class LMConfig:
    """Hyper-parameters of a Llama-family model; field names are config.json's (Hugging Face)."""

    model_type: Literal["llama", "qwen2"] = "llama"  # qwen2: bias on q/k/v (never on o_proj)
    vocab_size: int = BYTE_VOCAB_SIZE  # token ids 0..vocab_size-1
    hidden_size: int = 64  # width of the residual stream
    intermediate_size: int = 176  # SwiGLU hidden width (~8/3 hidden_size keeps a 4x GELU MLP's size)
    num_hidden_layers: int = 2  # decoder layers
    num_attention_heads: int = 2  # query heads
    num_key_value_heads: int = 2  # key/value heads (grouped-query attention when fewer than query heads)
    head_dim: int | None = None  # per-head width; None = hidden_size / num_attention_heads
    max_position_embeddings: int = 256  # longest prompt + generated copy; bounds the KV cache
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # rotary base
    rope_scaling: dict[str, Any] | None = None  # None, or {"rope_type": "linear"|"llama3", ...}
    tie_word_embeddings: bool = True  # lm_head reuses the token embedding matrix
    attention_bias: bool = False  # llama: bias on q/k/v/o projections (qwen2 always has q/k/v bias)
    mlp_bias: bool = False
    attention_dropout: float = 0.0  # on attention weights (training only)
    initializer_range: float = 0.02  # std of the normal init of Linear and Embedding weights
    # Defaults are the byte-level tokenizer's, like vocab_size; a checkpoint's config.json sets its own.
    bos_token_id: int | None = BYTE_BOS_ID
    eos_token_id: list[int] = field(default_factory=lambda: [BYTE_EOS_ID])  # generation stops at any of them
    pad_token_id: int | None = BYTE_PAD_ID

    def __post_init__(self) -> None:
        if self.model_type not in ("llama", "qwen2"):
            raise ValueError(f"LMConfig.model_type must be 'llama' or 'qwen2' (got {self.model_type!r})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):  # fmt: skip
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"LMConfig.{name} must be an int >= 1 (got {value!r})")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"LMConfig.hidden_size must be divisible by num_attention_heads (got "
                                 f"{self.hidden_size} and {self.num_attention_heads}), or set head_dim")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not _is_int(self.head_dim) or self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"LMConfig.head_dim must be an even int >= 2 for rotary positions (got {self.head_dim!r})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LMConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if not 0 <= self.attention_dropout < 1:
            raise ValueError(f"LMConfig.attention_dropout must be in [0, 1) (got {self.attention_dropout!r})")
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = list(self.eos_token_id or [])
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and 0 <= value < self.vocab_size):
                raise ValueError(f"LMConfig.{name} must be a token id in 0..{self.vocab_size - 1} (got {value!r})")
        bad = [i for i in self.eos_token_id if not (_is_int(i) and 0 <= i < self.vocab_size)]
        if bad:
            raise ValueError(f"LMConfig.eos_token_id has ids outside 0..{self.vocab_size - 1}: {bad}")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"LMConfig.rope_scaling: rope_type {rope_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LMConfig:
        """Inverse of to_dict; unknown keys are an error (a typo would otherwise be silently ignored)."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"LMConfig has no field(s): {', '.join(map(str, unknown))}")
        return cls(**d)


# Presets as plain data (litgpt's name_to_config); sizes count the tied embedding once.
LM_PRESETS: dict[str, dict[str, Any]] = {
    # ~0.1M params: unit tests.
    "tiny": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 2, "max_position_embeddings": 256},
    # ~0.43M params: wide enough (4 heads of 32) to copy titles from the prompt; the demo, in minutes on CPU.
    "mini": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 4, "max_position_embeddings": 256},
    # ~9.9M params: a real CPU/small-GPU run; GQA (6 query heads, 2 key/value heads) thirds the KV cache.
    "small": {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 6,
              "num_key_value_heads": 2, "max_position_embeddings": 512},
    # ~0.1B params: GPU clusters.
    "base": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 12,
             "num_key_value_heads": 4, "max_position_embeddings": 1024},
}


def lm_config_from_preset(name: str, **overrides: Any) -> LMConfig:
    """LMConfig for a preset in LM_PRESETS, with any field overridden (e.g. max_position_embeddings=512)."""
    if name not in LM_PRESETS:
        raise ValueError(f"unknown LM preset {name!r}; choose one of: {', '.join(LM_PRESETS)}")
    return LMConfig.from_dict({**LM_PRESETS[name], **overrides})


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids [B, T] that start at 0 on each row's first real token (padding gets 0 too)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def attention_mask_4d(key_valid: Tensor, num_queries: int) -> Tensor:
    """Boolean mask [B, 1, T, S] for T queries that occupy the last T of S key slots.

    A query sees earlier or equal slots that hold real tokens. It always sees itself, so padding
    queries get a finite (ignored) output: a fully masked row would give NaN, and NaN values leak
    into real rows through 0 * NaN in the next layer.
    """
    S = key_valid.size(1)
    keys = torch.arange(S, device=key_valid.device)  # [S]
    queries = keys[S - num_queries :, None]  # [T, 1]
    allowed = (keys <= queries) & key_valid[:, None, :]  # [B, T, S]
    return (allowed | (keys == queries)).unsqueeze(1)  # [B, 1, T, S]


def inverse_frequencies(config: LMConfig, device: torch.device | str | None = None) -> Tensor:
    """Rotary inverse frequencies [head_dim / 2], with the config's rope scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.int64).float() / dim)
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":  # Llama 3.1: long wavelengths slowed by `factor`, short kept, smooth between
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        original = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        between = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        inv_freq = torch.where(medium, between, scaled)
    return inv_freq


def rope_cos_sin(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin [..., head_dim] at positions [...] (computed in float32, as transformers does)."""
    angles = positions.float()[..., None] * inv_freq  # [..., head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rope_table(config: LMConfig, max_len: int, device: torch.device | str | None) -> tuple[Tensor, Tensor]:
    """cos, sin [max_len, head_dim] for positions 0..max_len-1: KV caches hold one, so a decode
    step looks its rows' positions up instead of recomputing them."""
    return rope_cos_sin(torch.arange(max_len, device=device), inverse_frequencies(config, device))


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # one fused kernel: a decode step is many small ops
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Lower precision: normalize in float32, cast back, then scale (transformers' order).
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LMConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # index into the KV cache
        self.n_head, self.n_kv_head = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        d, q_width, kv_width = config.hidden_size, self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.q_proj = nn.Linear(d, q_width, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, kv_width, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, kv_width, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_width, d, bias=config.attention_bias)
        # engine/cpu_layout.py may set a fused q|k|v product for decoding (one call instead of three).
        self.qkv_fused: nn.Module | None = None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, cache: Any) -> Tensor:
        B, T, _ = x.shape
        H, Hkv, hd = self.n_head, self.n_kv_head, self.head_dim
        if self.qkv_fused is not None:
            qk, v = self.qkv_fused(x).split([(H + Hkv) * hd, Hkv * hd], dim=-1)
        else:
            qk, v = torch.cat([self.q_proj(x), self.k_proj(x)], dim=-1), self.v_proj(x)
        # q and k heads rotated in one go: half the small ops, which dominate a decode step's time.
        qk = _apply_rope(qk.view(B, T, H + Hkv, hd), *rope)  # [B, T, H + Hkv, hd]
        q, k = qk.transpose(1, 2).split([H, Hkv], dim=1)  # [B, H, T, hd], [B, Hkv, T, hd]
        v = v.view(B, T, Hkv, hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # [B, Hkv, S, hd], S = slots attended to
        dropout_p = self.dropout if self.training else 0.0
        gqa = self.n_kv_head != self.n_head
        if mask is None:  # no padding: the fused causal kernel; one query (a decode step) sees every key
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * hd))  # [B, T, C]


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        d, hidden = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, hidden, bias=config.mlp_bias)
        self.up_proj = nn.Linear(d, hidden, bias=config.mlp_bias)
        self.down_proj = nn.Linear(hidden, d, bias=config.mlp_bias)
        self.gate_up_fused: nn.Module | None = None  # set by engine/cpu_layout.py for decoding

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_fused is not None:
            gate, up = self.gate_up_fused(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LMConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, cache: Any) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """`model.*` of a Hugging Face causal LM: embeddings, layers, final norm."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaLM(nn.Module):
    """Decoder-only Llama-family LM: prompt (condition) in, next-token logits out."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.embed_tokens

    def num_parameters(self) -> int:
        """Number of parameters, counting a tied embedding / lm_head matrix once."""
        return sum(p.numel() for p in self.parameters())

    def hidden(self, idx: Tensor, positions: Tensor, mask: Tensor | None, cache: Any = None) -> Tensor:
        """Final-norm hidden states [B, T, C] for idx [B, T] at position ids positions [B, T].

        mask: boolean [B, 1, T, S] over the S keys attended to, or None for plain causal attention.
        cache: stores each layer's keys and values and holds a rope table (decoding looks positions up).
        """
        x = self.model.embed_tokens(idx)  # [B, T, C]
        if cache is not None:
            rope = cache.rope[0][positions].unsqueeze(2), cache.rope[1][positions].unsqueeze(2)  # [B, T, 1, hd]
        else:
            # Recomputed per call rather than a buffer: cheap, and casting the model to bf16 or building it
            # on the meta device (ZeRO-3) then needs no fix-up.
            cos, sin = rope_cos_sin(positions, inverse_frequencies(self.config, idx.device))
            rope = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)  # [B, T, 1, hd]
        for layer in self.model.layers:
            x = layer(x, rope, mask, cache)
        return self.model.norm(x)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        loss_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits [B, T, vocab] for idx [B, T], and the loss when targets are given.

        targets [B, T]: already shifted, targets[b, t] is the token that should follow idx[b, t].
        loss_mask [B, T]: positions whose target counts in the loss (the target copy); the loss is
        the mean cross-entropy over them (0 when none). attention_mask [B, T]: 1 = real token,
        0 = padding. positions [B, T]: by default counted from each row's first real token.
        """
        B, T = idx.shape
        for name, t in (("targets", targets), ("loss_mask", loss_mask), ("attention_mask", attention_mask)):
            if t is not None and t.shape != idx.shape:
                raise ValueError(f"{name} shape {tuple(t.shape)} must match idx shape {tuple(idx.shape)}")
        mask = None if attention_mask is None else attention_mask_4d(attention_mask.bool(), T)
        if positions is None:
            positions = positions_from_mask(torch.ones_like(idx) if attention_mask is None else attention_mask)
        logits = self.lm_head(self.hidden(idx, positions, mask))  # [B, T, vocab]
        if targets is None:
            return logits, None
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(B, T)
        if loss_mask is None:
            return logits, ce.mean()
        weight = loss_mask.to(ce.dtype)
        return logits, (ce * weight).sum() / weight.sum().clamp(min=1.0)
