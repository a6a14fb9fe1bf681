"""Single-process training of the text generator: batching, the loss step, a plain loop.

The distributed trainer (Ray Train + DeepSpeed) reuses `collate_examples` and `lm_loss`; this loop
is what tests and quick experiments run on one CPU.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from aigc_dist.models.llama import LlamaLM

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


def lm_loss(model: LlamaLM, batch: dict[str, Tensor]) -> Tensor:
    """Mean cross-entropy over the target-copy tokens of a collated batch."""
    _, loss = model(batch["input_ids"], targets=batch["targets"], loss_mask=batch["loss_mask"])
    return loss


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, group_batches: int = 20, seed: int = 0
) -> Iterator[list[int]]:
    """Endless batches of example indices, drawn from shuffled epochs, that waste little on padding.

    `collate_examples` pads every row to the longest in its batch, so a batch of mixed lengths spends
    compute on padding. Here the shuffled stream is cut into windows of `group_batches * batch_size`
    examples; each window is sorted by length, cut into batches, and its batches are yielded in random
    order. Which examples share a window stays random; within a window, neighbours in length share a
    batch. group_batches=1 is plain shuffled batching. Epochs run into each other, so every batch is
    full, even when there are fewer examples than batch_size.
    """
    if not lengths:
        raise ValueError("length_grouped_batches needs at least one example")
    for name, value in (("batch_size", batch_size), ("group_batches", group_batches)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1 (got {value})")
    rng = random.Random(seed)
    window = batch_size * group_batches
    order: list[int] = []
    while True:
        while len(order) < window:  # reshuffle per epoch
            fresh = list(range(len(lengths)))
            rng.shuffle(fresh)
            order += fresh
        picked, order = sorted(order[:window], key=lengths.__getitem__), order[window:]
        batches = [picked[start : start + batch_size] for start in range(0, window, batch_size)]
        rng.shuffle(batches)
        yield from batches


def train_lm(
    model: LlamaLM,
    examples: Sequence[Example],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    pad_id: int,
    warmup_steps: int = 20,
    weight_decay: float = 0.01,
    grad_clip: float = 1.0,
    group_batches: int = 20,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """AdamW with warm-up + cosine on shuffled, length-grouped batches; returns the loss of every step.

    `group_batches` and `seed` pick the batches as in `length_grouped_batches`.
    """
    batches = length_grouped_batches([len(ids) for ids, _ in examples], batch_size, group_batches, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup_steps, steps))
    model.train()
    losses = []
    for step in range(steps):
        loss = lm_loss(model, collate_examples([examples[i] for i in next(batches)], pad_id))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses
