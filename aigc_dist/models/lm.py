"""Conditional decoder-only Transformer for personalized text, in plain PyTorch (nanoGPT style).

The condition (user + item features) is the prompt; the model continues it with the target copy.
Conventions used throughout this file:
- `targets` are already shifted by the caller: targets[b, t] is the token that should follow idx[b, t].
- Batches are left-padded: `attention_mask` [B, T] is 1 for real tokens, 0 for padding, and position ids
  count from each row's first real token, so a row's output does not depend on its padding.
- `generate` returns only the new tokens of each row, without the EOS that stopped it.

Decoding (sampling, the static generate loop, continuous batching) lives in `lm_decode.py`.
"""

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aigc_dist.models.tokenizer import ByteTokenizer


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # bool is an int subclass in Python


@dataclass
class LMConfig:
    """Hyper-parameters of TransformerLM; stored in the artifact so the model can be rebuilt."""

    vocab_size: int = ByteTokenizer.vocab_size  # token ids are 0..vocab_size-1 (bytes + specials)
    n_layer: int = 2  # number of Transformer blocks
    n_head: int = 2  # attention heads per block; d_model must divide evenly among them
    d_model: int = 64  # width of the residual stream
    max_seq_len: int = 256  # longest prompt + generated copy; bounds positions and the KV cache
    dropout: float = 0.0  # on embeddings, attention weights and residual branches (training only)
    pos_encoding: Literal["rope", "learned"] = "rope"  # rotary (no parameters) or a learned table
    tie_weights: bool = True  # lm_head reuses the token embedding matrix (fewer parameters)
    bias: bool = False  # biases in Linear/LayerNorm; off is slightly better and faster (nanoGPT)
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * d_model

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len", "mlp_ratio"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"LMConfig.{name} must be an int >= 1 (got {value!r})")
        if not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise ValueError(f"LMConfig.dropout must be in [0, 1) (got {self.dropout!r})")
        if self.pos_encoding not in ("rope", "learned"):
            raise ValueError(f"LMConfig.pos_encoding must be 'rope' or 'learned' (got {self.pos_encoding!r})")
        for name in ("tie_weights", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LMConfig.{name} must be true or false (got {getattr(self, name)!r})")
        if self.d_model % self.n_head:
            raise ValueError(
                f"LMConfig.d_model must be divisible by n_head (got d_model={self.d_model}, "
                f"n_head={self.n_head})"
            )
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise ValueError(
                f"LMConfig.d_model / n_head must be even for rope (got head dim {self.head_dim} "
                f"from d_model={self.d_model}, n_head={self.n_head})"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict[str, Any]:
        """Plain data for config.json."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LMConfig":
        """Inverse of to_dict; unknown keys are an error (a typo would otherwise be silently ignored)."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"LMConfig has no field(s): {', '.join(map(str, unknown))}")
        return cls(**d)


# Presets as plain data (litgpt's name_to_config). Sizes include tied embeddings, rope (no position table).
LM_PRESETS: dict[str, dict[str, Any]] = {
    # ~116k params: unit tests.
    "tiny": {"n_layer": 2, "n_head": 2, "d_model": 64, "max_seq_len": 256},
    # ~10.7M params: a real CPU/small-GPU run.
    "small": {"n_layer": 6, "n_head": 6, "d_model": 384, "max_seq_len": 512},
    # ~113M params: GPU clusters.
    "base": {"n_layer": 16, "n_head": 12, "d_model": 768, "max_seq_len": 1024},
    # ~430k params: wide enough (4 heads of 32) to copy titles from the prompt; the demo, in minutes on CPU.
    "mini": {"n_layer": 2, "n_head": 4, "d_model": 128, "max_seq_len": 256},
}


def lm_config_from_preset(name: str, **overrides: Any) -> LMConfig:
    """LMConfig for a preset in LM_PRESETS, with any field overridden (e.g. dropout=0.1)."""
    if name not in LM_PRESETS:
        raise ValueError(f"unknown LM preset {name!r}; choose one of: {', '.join(LM_PRESETS)}")
    return LMConfig.from_dict({**LM_PRESETS[name], **overrides})


def left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Stack prompts right-aligned: (idx [B, T] long, attention_mask [B, T] bool, True = real token)."""
    width = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if prompt:
            idx[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = True
    return idx.to(device), mask.to(device)


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids [B, T] that start at 0 on each row's first real token (padding gets 0 too)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _attention_mask(key_valid: Tensor, num_queries: int) -> Tensor:
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


def _rope(positions: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
    """cos, sin [B, 1, T, head_dim] for rotary embeddings at the given positions [B, T].

    Computed per forward instead of cached in buffers: it is cheap, and a model built on the meta
    device or cast to bf16 then needs no buffer fix-up.
    """
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)  # [B, 1, T, head_dim]
    return angles.cos(), angles.sin()


def rope_table(config: LMConfig, max_len: int, device: torch.device | str | None) -> tuple[Tensor, Tensor] | None:
    """cos, sin [max_len, head_dim] for positions 0..max_len-1 (None for learned positions).

    KV caches hold one so a decode step looks its rows' positions up instead of recomputing them.
    """
    if config.pos_encoding != "rope":
        return None
    cos, sin = _rope(torch.arange(max_len, device=device)[None], config.head_dim)  # [1, 1, L, hd]
    return cos[0, 0], sin[0, 0]


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


class KVCache:
    """Keys and values of every layer, allocated once for a whole generate call.

    Rows share one write index (`length`) because prompts are left-padded to a common width; which
    slots hold real tokens is tracked per row in `key_valid`, and each row's next position id in
    `next_pos`. Decoding writes into the preallocated tensors: no reallocation, no torch.cat per step.
    """

    def __init__(
        self,
        config: LMConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Allocate slots for max_len tokens per row (prompt width + max_new_tokens) for every layer."""
        if max_len > config.max_seq_len:
            raise ValueError(f"KV cache length {max_len} exceeds LMConfig.max_seq_len={config.max_seq_len}")
        shape = (batch_size, config.n_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # True: real
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # next token's position id
        self.length = 0  # slots written so far, the same for every row
        self.max_len = max_len
        self.padded = True  # whether any slot so far is padding (prefill sets it): decode then needs a mask
        self.rope = rope_table(config, max_len, device)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, H, T, hd] at the write index; return views of all slots so far [B, H, S, hd]."""
        end = self.length + k.size(2)
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: LMConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # index into the KV cache
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.c_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None, cache: Any
    ) -> Tensor:
        """cache: a KVCache or lm_decode.SlotCache; `update` stores k, v and returns the keys to attend to."""
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)  # [B, T, 3, H, hd]
        qkv = qkv.permute(2, 0, 3, 1, 4)  # [3, B, H, T, hd]
        v = qkv[2]
        # q and k rotated in one go: half the small ops, which dominate a decode step's overhead.
        q, k = (qkv[:2] if rope is None else _apply_rope(qkv[:2], *rope)).unbind(0)  # 2 x [B, H, T, hd]
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # [B, H, S, hd], S = slots written so far
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:  # no padding: the fused causal kernel; one query (a decode step) sees every key
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # [B, T, C]
        y = self.c_proj(y)
        return self.resid_dropout(y) if self.training else y  # eval: no call (decode steps are many small calls)


class MLP(nn.Module):
    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.mlp_ratio * config.d_model, bias=config.bias)
        self.act = nn.GELU()  # a module, so the CPU decode layout can fuse it into c_fc (lm_layout)
        self.c_proj = nn.Linear(config.mlp_ratio * config.d_model, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.c_proj(self.act(self.c_fc(x)))
        return self.dropout(x) if self.training else x


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: LMConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None, cache: Any
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), rope, mask, cache)
        return x + self.mlp(self.ln_2(x))


class TransformerLM(nn.Module):
    """Decoder-only Transformer: prompt (condition) in, next-token logits out."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = (
            nn.Embedding(config.max_seq_len, config.d_model) if config.pos_encoding == "learned" else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer) so the residual stream's variance
        # does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Number of parameters, counting the tied embedding / lm_head matrix once."""
        return sum(p.numel() for p in self.parameters())

    def hidden(self, idx: Tensor, positions: Tensor, mask: Tensor | None, cache: Any = None) -> Tensor:
        """Final-norm hidden states [B, T, C] for idx [B, T] at position ids positions [B, T].

        mask: boolean [B, 1, T, S] over the S keys attended to, or None for plain causal attention.
        cache: a KVCache or lm_decode.SlotCache that stores each layer's keys and values (its owner
        advances its lengths) and holds a rope table, so decoding looks positions up.
        """
        x = self.wte(idx)  # [B, T, C]
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(positions)
        elif cache is not None:
            rope = cache.rope[0][positions].unsqueeze(1), cache.rope[1][positions].unsqueeze(1)  # [B, 1, T, hd]
        else:
            rope = _rope(positions, self.config.head_dim)
        x = self.drop(x) if self.training else x
        for block in self.blocks:
            x = block(x, rope, mask, cache)
        return self.ln_f(x)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        loss_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits [B, T, vocab] for idx [B, T], and the loss when targets are given.

        targets [B, T]: already shifted by the caller, targets[b, t] is the token that should follow
        idx[b, t]. loss_mask [B, T] (bool or 0/1 float): positions whose target counts in the loss, so
        training can score the target copy only; the loss is the mean cross-entropy over those positions
        (0 when none is selected). attention_mask [B, T]: 1 = real token, 0 = padding (left or right).
        positions [B, T]: position ids; by default counted from each row's first real token.
        """
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds LMConfig.max_seq_len={self.config.max_seq_len}")
        for name, t in (("targets", targets), ("loss_mask", loss_mask), ("attention_mask", attention_mask)):
            if t is not None and t.shape != idx.shape:
                raise ValueError(f"{name} shape {tuple(t.shape)} must match idx shape {tuple(idx.shape)}")
        mask = None if attention_mask is None else _attention_mask(attention_mask.bool(), T)
        if positions is None:
            positions = positions_from_mask(
                torch.ones_like(idx) if attention_mask is None else attention_mask
            )
        logits = self.lm_head(self.hidden(idx, positions, mask))  # [B, T, vocab]
        if targets is None:
            return logits, None
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(B, T)
        if loss_mask is None:
            return logits, ce.mean()
        weight = loss_mask.to(ce.dtype)
        return logits, (ce * weight).sum() / weight.sum().clamp(min=1.0)

    @torch.inference_mode()
    def prefill(self, idx: Tensor, attention_mask: Tensor, cache: KVCache) -> Tensor:
        """Run left-padded prompts idx [B, P] once into an empty cache; next-token logits [B, vocab]."""
        if cache.length != 0:
            raise ValueError(f"prefill needs an empty KV cache (it already holds {cache.length} slots)")
        P = idx.size(1)
        if P > cache.max_len:
            raise ValueError(f"prompt width {P} exceeds the KV cache length {cache.max_len}")
        cache.key_valid[:, :P] = attention_mask.bool()
        cache.next_pos.copy_(attention_mask.long().sum(-1))
        cache.padded = not bool(cache.key_valid[:, :P].all())  # one host sync per call
        mask = _attention_mask(cache.key_valid[:, :P], P) if cache.padded else None  # [B, 1, P, P]
        x = self.hidden(idx, positions_from_mask(attention_mask), mask, cache)
        cache.length = P
        return self.lm_head(x[:, -1])  # [B, vocab]: the last column is every row's last real token

    @torch.inference_mode()
    def decode_step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """Append one token per row, tokens [B], to the cache; next-token logits [B, vocab]."""
        if cache.length >= cache.max_len:
            raise ValueError(f"KV cache is full ({cache.max_len} slots)")
        slot = cache.length
        cache.key_valid[:, slot] = True
        # The one query is the newest slot, so causality holds by itself: only padding needs a mask.
        mask = cache.key_valid[:, None, None, : slot + 1] if cache.padded else None  # [B, 1, 1, S]
        x = self.hidden(tokens[:, None], cache.next_pos[:, None], mask, cache)  # [B, 1, C]
        cache.length += 1
        cache.next_pos += 1
        return self.lm_head(x[:, -1])  # [B, vocab]

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        greedy: bool = False,
        eos_id: int | None = None,
        seeds: list[int] | None = None,
        pad_id: int = ByteTokenizer.pad_id,
        use_cache: bool = True,
    ) -> list[list[int]]:
        """Continue each prompt; returns the new tokens of each row (never the prompt, never the EOS).

        Prompts are left-padded into one batch, run once through `prefill`, then decoded one token per
        step from the KV cache (`use_cache=False` recomputes the whole sequence each step instead: the
        slow reference the tests compare against). A row stops at its first `eos_id`; the loop ends when
        every row has stopped or after max_new_tokens. `greedy=True` or temperature=0 takes the argmax;
        otherwise tokens are sampled at `temperature` from the top_k tokens / top_p nucleus.

        Row i draws its random numbers from its own torch.Generator seeded with seeds[i], all up front
        (see `lm_decode.row_uniforms`), so a request gives the same output for the same seed whatever its
        batch-mates, up to float rounding of its logits across batch shapes. seeds=None draws the seeds
        from torch's global generator (so torch.manual_seed makes a call reproducible).
        """
        from aigc_dist.models.lm_decode import generate

        return generate(self, prompts, max_new_tokens, temperature, top_k, top_p, greedy, eos_id, seeds, pad_id,
                        use_cache)
