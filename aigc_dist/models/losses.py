"""The text generator's training loss and the batch format it reads (the cVAE's is `cvae.elbo_loss`).

One definition for every loop that trains a Llama-family LM: the DeepSpeed recipe
(`train/generators.py`) and the single-process loop (`train/local.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

Example = tuple[list[int], list[bool]]  # token ids, loss mask (True on target-copy tokens and <eos>)


def collate_examples(examples: Sequence[Example], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a batch into next-token tensors.

    input_ids[b, t] predicts targets[b, t] = ids[t + 1]; loss_mask follows the target, so the loss
    covers the copy and <eos> only. Right padding needs no attention mask under a causal model: pad
    positions come after every real token and are masked out of the loss.
    """
    width = max(len(ids) for ids, _ in examples) - 1
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # [B, T]
    targets = torch.full((len(examples), width), pad_id, dtype=torch.long)  # [B, T]
    loss_mask = torch.zeros((len(examples), width), dtype=torch.bool)  # [B, T]
    for row, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        input_ids[row, :n] = torch.tensor(ids[:-1])
        targets[row, :n] = torch.tensor(ids[1:])
        loss_mask[row, :n] = torch.tensor(mask[1:])
    return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask}


def lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean cross-entropy over the target-copy tokens of a collated batch (`model` is a LlamaLM, or an
    engine that wraps one)."""
    _, loss = model(batch["input_ids"], targets=batch["targets"], loss_mask=batch["loss_mask"])
    return loss
