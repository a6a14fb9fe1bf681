import pytest
import torch

from aigc_dist.data.digits import load_digits_split, resize_images


@pytest.mark.parametrize("image_size", [8, 16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_split_has_the_requested_shape_dtype_and_range(image_size: int, channels: int) -> None:
    split = load_digits_split(image_size, channels)
    assert split.train_images.shape == (1437, channels, image_size, image_size)
    assert split.heldout_images.shape == (360, channels, image_size, image_size)
    assert split.train_images.dtype == torch.float32 and split.train_labels.dtype == torch.int64
    for images in (split.train_images, split.heldout_images):
        assert images.min() == 0.0 and images.max() == 1.0
    if channels == 3:
        # RGB repeats the grey channel: the condition is the digit, not a colour.
        torch.testing.assert_close(split.train_images[:, 0], split.train_images[:, 2])


def test_split_is_stratified_disjoint_and_deterministic_by_seed() -> None:
    a, b, other = load_digits_split(8, seed=0), load_digits_split(8, seed=0), load_digits_split(8, seed=1)
    torch.testing.assert_close(a.heldout_images, b.heldout_images)
    assert not torch.equal(a.heldout_images, other.heldout_images)
    assert torch.bincount(a.heldout_labels, minlength=10).min() >= 35  # every class held out
    train_rows = {tuple(row.tolist()) for row in a.train_images.flatten(1)}
    overlap = sum(tuple(row.tolist()) in train_rows for row in a.heldout_images.flatten(1))
    assert overlap <= 5  # only the few digits the dataset itself contains twice


def test_split_does_not_depend_on_image_size() -> None:
    small, large = load_digits_split(8), load_digits_split(32)
    torch.testing.assert_close(small.heldout_labels, large.heldout_labels)
    # Same images in the same order: each 32x32 image shrunk back is nearest to its own 8x8 original.
    distances = torch.cdist(
        resize_images(large.heldout_images, 8, 1).flatten(1), small.heldout_images.flatten(1)
    )
    assert torch.equal(distances.argmin(dim=1), torch.arange(360))


def test_resize_converts_channels_both_ways() -> None:
    grey = torch.rand(2, 1, 8, 8)
    rgb = resize_images(grey, 16, 3)
    assert rgb.shape == (2, 3, 16, 16)
    torch.testing.assert_close(resize_images(rgb, 8, 1).shape, torch.Size([2, 1, 8, 8]))


def test_bad_arguments_are_rejected_with_a_message() -> None:
    with pytest.raises(ValueError, match=r"image_size must be one of \(8, 16, 32, 64\) \(got 28\)"):
        load_digits_split(28)
    with pytest.raises(ValueError, match=r"heldout_fraction must be in \(0, 1\) \(got 1.0\)"):
        load_digits_split(8, heldout_fraction=1.0)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        resize_images(torch.rand(1, 1, 8, 8), 8, 2)
