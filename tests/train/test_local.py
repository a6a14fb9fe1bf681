"""Training helpers of the text generator: batching, the loss's batch format, the learning-rate schedule."""

from __future__ import annotations

import itertools

import pytest

from aigc_dist.models.losses import collate_examples
from aigc_dist.train.local import length_grouped_batches
from aigc_dist.train.optim import warmup_cosine


def test_length_grouped_batches_are_full_cover_every_example_and_group_lengths():
    lengths = [(i * 37) % 101 + 5 for i in range(200)]  # varied lengths
    batches = list(itertools.islice(length_grouped_batches(lengths, batch_size=8, group_batches=5, seed=1), 25))
    assert all(len(b) == 8 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(200))  # one epoch: each example exactly once
    # Grouping by length cuts padding against plain shuffled batches of the same examples.
    grouped_pad = sum(max(lengths[i] for i in b) * 8 - sum(lengths[i] for i in b) for b in batches)
    plain = list(itertools.islice(length_grouped_batches(lengths, batch_size=8, group_batches=1, seed=1), 25))
    plain_pad = sum(max(lengths[i] for i in b) * 8 - sum(lengths[i] for i in b) for b in plain)
    assert grouped_pad < plain_pad / 2


def test_length_grouped_batches_are_seeded_and_fill_up_from_the_next_epoch():
    first = list(itertools.islice(length_grouped_batches([3, 1, 2], batch_size=5, seed=7), 4))
    again = list(itertools.islice(length_grouped_batches([3, 1, 2], batch_size=5, seed=7), 4))
    assert first == again and all(len(b) == 5 for b in first)  # fewer examples than a batch still fills it
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(length_grouped_batches([1], batch_size=0))


def test_collate_shifts_targets_and_masks_the_prompt():
    batch = collate_examples([([1, 2, 3, 4], [False, False, True, True]), ([5, 6], [False, True])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [5, 0, 0]]
    assert batch["targets"].tolist() == [[2, 3, 4], [6, 0, 0]]
    assert batch["loss_mask"].tolist() == [[False, True, True], [True, False, False]]


def test_warmup_then_cosine_decay():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.1)  # floor at min_ratio
