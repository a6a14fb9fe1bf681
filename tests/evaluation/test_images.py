import pytest
import torch

from aigc_dist.data.digits import load_digits_split
from aigc_dist.evaluation.images import class_mean_images, classifier_heldout_accuracy, evaluate_images


@pytest.mark.parametrize("image_size", [8, 16, 32])
def test_classifier_recognises_held_out_real_digits(image_size: int) -> None:
    # The ceiling of conditioning accuracy: real digits it never saw, at the generators' sizes.
    assert classifier_heldout_accuracy(image_size) >= 0.95


def test_real_held_out_digits_score_high_and_shuffled_labels_score_near_chance() -> None:
    split = load_digits_split(16, channels=3)
    real = evaluate_images(split.heldout_images, split.heldout_labels)
    assert set(real) == {"conditioning_accuracy", "mse_to_class_mean", "mae_to_class_mean", "num_images"}
    assert real["conditioning_accuracy"] >= 0.95
    assert real["num_images"] == 360
    shuffled = split.heldout_labels[torch.randperm(360, generator=torch.Generator().manual_seed(0))]
    wrong = evaluate_images(split.heldout_images, shuffled)
    assert wrong["conditioning_accuracy"] < 0.25
    assert wrong["mse_to_class_mean"] > real["mse_to_class_mean"]


def test_class_means_are_at_zero_distance_and_noise_is_far() -> None:
    labels = torch.arange(10)
    means = class_mean_images(16).unsqueeze(1)  # [10, 1, 16, 16]
    exact = evaluate_images(means, labels)
    assert exact["mse_to_class_mean"] == pytest.approx(0.0, abs=1e-12)
    assert exact["mae_to_class_mean"] == pytest.approx(0.0, abs=1e-6)
    noise = evaluate_images(torch.rand(10, 1, 16, 16, generator=torch.Generator().manual_seed(0)), labels)
    assert noise["mse_to_class_mean"] > 0.1


def test_bad_inputs_are_rejected_with_a_message() -> None:
    with pytest.raises(ValueError, match=r"labels must have shape \[2\]"):
        evaluate_images(torch.rand(2, 1, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"labels must be digit classes in \[0, 10\)"):
        evaluate_images(torch.rand(1, 1, 8, 8), torch.tensor([10]))
    with pytest.raises(ValueError, match=r"images must be square \[N, C, H, W\]"):
        evaluate_images(torch.rand(1, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"image_size must be one of"):
        evaluate_images(torch.rand(1, 1, 12, 12), torch.tensor([1]))
