"""Optimizer parameter groups and the learning-rate schedule, one definition for every training loop
(DeepSpeed's, `deepspeed_config.py`, and the single-process one, `local.py`)."""

from __future__ import annotations

import math
from typing import Any

import torch


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def parameter_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The module's trainable parameters in nanoGPT's two groups (as `deepspeed.initialize(model_parameters=...)`
    and `torch.optim.AdamW` take them): weight decay on matrices (Linear, embedding, conv weights), none on
    biases and norm gains, whose decay only pulls them off their useful values. Frozen parameters (LoRA's
    base weights) are left out: the optimizer keeps no state for them."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    return [group for group in groups if group["params"]]  # an empty group would still get ZeRO buffers
