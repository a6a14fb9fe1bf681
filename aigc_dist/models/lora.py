"""LoRA (Hu et al., 2021) in plain PyTorch: low-rank adapters on frozen Linear layers.

A target Linear `W` becomes `y = W x + (alpha / r) * B (A x)` with A [r, in] and B [out, r]; only A
and B train. B starts at zero, so training starts exactly from the base model. Names follow PEFT:
the wrapped layer is `base_layer`, the adapters `lora_A` / `lora_B`, so a module path here is the
path in PEFT's saved adapter file with the `base_model.model.` prefix removed:

    model.layers.0.self_attn.q_proj.base_layer.weight     (the frozen base weight)
    model.layers.0.self_attn.q_proj.lora_A.weight         [r, in]
    model.layers.0.self_attn.q_proj.lora_B.weight         [out, r]

`merge_lora` folds the adapters into the base weights, giving a plain model that decodes at the base
model's speed; `merge_adapter_weights` does the same from a saved adapter state dict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# How PEFT prefixes the module paths of a causal LM in adapter_model.safetensors.
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoRASettings:
    """What a set of adapters was built with (adapter_config.json's r, lora_alpha, target_modules)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update: base_layer(x) + scaling * lora_B(lora_A(x))."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1 (got {rank})")
        self.base_layer = base_layer.requires_grad_(False)
        weight = base_layer.weight
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, device=weight.device, dtype=weight.dtype)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        # PEFT's default init: A as nn.Linear initializes its weight, B zero (the update starts at 0).
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling  # [..., out]

    def delta_weight(self) -> Tensor:
        """The update to the base weight [out, in], computed in float32 (bf16 products lose the small B A)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling


def _matches(name: str, targets: Sequence[str]) -> bool:
    """PEFT's rule for a list of target_modules: the module's own name, or a dotted suffix of its path."""
    return any(name == t or name.endswith("." + t) for t in targets)


def add_lora(model: nn.Module, targets: Sequence[str], rank: int, alpha: float) -> list[str]:
    """Wrap every Linear of `model` whose path matches `targets` in a LoRALinear and freeze every
    other parameter; returns the wrapped paths. ValueError when nothing matches (a typo in a target
    would otherwise train nothing) or a target is tied to another weight."""
    for p in model.parameters():
        p.requires_grad_(False)
    linear = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    chosen = [name for name in linear if _matches(name, targets)]
    if not chosen:
        available = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise ValueError(f"LoRA targets {list(targets)} match no Linear layer of the model (its Linear layers are "
                         f"named {', '.join(available)})")
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name in chosen:
        if id(linear[name].weight) in embedding_weights:
            # A merged update would change the embedding too (one tensor), which the adapter file cannot say.
            raise ValueError(f"LoRA target {name!r} shares its weight with the token embedding "
                             "(tie_word_embeddings); leave it out of the targets")
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LoRALinear(linear[name], rank, alpha))
    return chosen


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRALinear modules by path."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def lora_settings(model: nn.Module, targets: Sequence[str]) -> LoRASettings:
    """Rank and alpha of the model's adapters (one of each: what adapter_config.json can record)."""
    layers = lora_layers(model)
    pairs = {(m.rank, m.alpha) for m in layers.values()}
    if len(pairs) != 1:
        raise ValueError(f"expected adapters of one rank and alpha, found {sorted(pairs) or 'none'}")
    (rank, alpha), = pairs
    return LoRASettings(rank, alpha, tuple(targets))


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter weights under PEFT's saved names (`base_model.model.<path>.lora_A.weight`), on CPU."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().to("cpu").contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().to("cpu").contiguous()
    return state


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scaling * B A) and put the plain Linear back;
    returns `model`, now without LoRA modules, every parameter trainable again as in the base."""
    for name, layer in lora_layers(model).items():
        base = layer.base_layer
        base.weight.add_(layer.delta_weight().to(base.weight.dtype))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@torch.no_grad()
def merge_adapter_weights(model: nn.Module, adapter: dict[str, Tensor], scaling: float) -> list[str]:
    """Add the update of a saved adapter (PEFT key names) to a plain model's weights; returns the
    merged module paths. ValueError naming the key for a tensor that fits no Linear of the model."""
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in adapter.items():
        path = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if path.endswith(suffix):
                pairs.setdefault(path.removesuffix(suffix), {})[part] = tensor
                break
        else:
            raise ValueError(f"adapter tensor {key!r} is not a LoRA A or B weight (only LoRA on Linear layers "
                             "is supported)")
    for path, pair in sorted(pairs.items()):
        try:
            target = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"adapter names module {path!r}, which the base model does not have") from None
        if not isinstance(target, nn.Linear) or set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"adapter weights for {path!r} do not fit: need lora_A and lora_B of a Linear layer")
        a, b = pair["lora_A"].float(), pair["lora_B"].float()  # [r, in], [out, r]
        if a.shape[1] != target.in_features or b.shape[0] != target.out_features or a.shape[0] != b.shape[1]:
            raise ValueError(f"adapter weights for {path!r} have shapes {tuple(a.shape)} and {tuple(b.shape)}, "
                             f"which do not fit a Linear of {target.in_features} -> {target.out_features}")
        target.weight.add_(((b @ a) * scaling).to(target.weight.device, target.weight.dtype))
    return sorted(pairs)
