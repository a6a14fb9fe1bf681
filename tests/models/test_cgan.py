import json
import time

import pytest
import torch

from aigc_dist.data.digits import load_digits_split
from aigc_dist.evaluation.images import evaluate_images
from aigc_dist.models.cgan import CGANConfig, Discriminator, Generator
from aigc_dist.train.local import ImageTrainConfig, cgan_optimizers, cgan_train_step, train_cgan


def tiny(**overrides) -> CGANConfig:
    return CGANConfig(**{"image_size": 8, "width": 8, "z_dim": 8, "label_dim": 4, **overrides})


@pytest.mark.parametrize("image_size", [8, 16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_generator_and_discriminator_shapes_follow_the_config(image_size: int, channels: int) -> None:
    torch.manual_seed(0)
    config = tiny(image_size=image_size, channels=channels)
    gen, disc = Generator(config), Discriminator(config)
    labels = torch.tensor([0, 3, 9])
    images = gen.generate(labels, seeds=[1, 2, 3])
    assert images.shape == (3, channels, image_size, image_size)
    assert images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert disc(images * 2 - 1, labels).shape == (3,)


def test_same_seed_gives_the_same_image_in_any_batch() -> None:
    torch.manual_seed(0)
    gen = Generator(tiny())
    batch = gen.generate(torch.tensor([3, 5, 3]), seeds=[7, 8, 7])
    alone = gen.generate(torch.tensor([3]), seeds=[7])
    torch.testing.assert_close(batch[0], batch[2])
    torch.testing.assert_close(batch[0], alone[0])
    assert not torch.equal(gen.generate(torch.tensor([3]), seeds=[9])[0], alone[0])
    # A torch.Generator seeds the whole batch reproducibly too.
    first = gen.generate(torch.tensor([1, 2]), seeds=torch.Generator().manual_seed(4))
    again = gen.generate(torch.tensor([1, 2]), seeds=torch.Generator().manual_seed(4))
    torch.testing.assert_close(first, again)


def test_generate_keeps_the_training_mode() -> None:
    gen = Generator(tiny())
    gen.train()
    gen.generate(torch.tensor([0, 1]), seeds=[0, 1])
    assert gen.training


def test_numeric_features_change_the_image() -> None:
    torch.manual_seed(0)
    gen = Generator(tiny(num_features=3))
    labels = torch.tensor([4, 4])
    features = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]])
    images = gen.generate(labels, features, seeds=[5, 5])
    assert not torch.allclose(images[0], images[1])
    disc = Discriminator(tiny(num_features=3))
    logits = disc(images[[0, 0]] * 2 - 1, labels, features)
    assert logits[0] != logits[1]


def test_bad_conditions_are_rejected_with_a_message() -> None:
    gen = Generator(tiny(num_features=2))
    with pytest.raises(ValueError, match="num_features=2"):
        gen.generate(torch.tensor([1]), seeds=[0])
    with pytest.raises(ValueError, match=r"features must have shape \[1, 2\]"):
        gen.generate(torch.tensor([1]), torch.zeros(1, 3), seeds=[0])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        gen.generate(torch.tensor([10]), torch.zeros(1, 2), seeds=[0])
    with pytest.raises(ValueError, match="one entry per sample"):
        gen.generate(torch.tensor([1, 2]), torch.zeros(2, 2), seeds=[0])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("image_size", 12, r"CGANConfig.image_size must be one of \(8, 16, 32, 64\) \(got 12\)"),
        ("channels", 2, r"CGANConfig.channels must be one of \(1, 3\) \(got 2\)"),
        ("num_classes", 0, r"CGANConfig.num_classes must be >= 1 \(got 0\)"),
        ("num_features", -1, r"CGANConfig.num_features must be >= 0 \(got -1\)"),
        ("z_dim", 0, r"CGANConfig.z_dim must be >= 1 \(got 0\)"),
        ("width", 1.5, r"CGANConfig.width must be an int \(got 1.5\)"),
        ("label_dim", True, r"CGANConfig.label_dim must be an int \(got True\)"),
    ],
)
def test_config_errors_name_the_field_and_value(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CGANConfig(**{field: value})


def test_config_round_trips_through_json_and_rebuilds_the_model() -> None:
    config = tiny(image_size=16, channels=3, num_features=2, num_classes=4)
    restored = CGANConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    torch.manual_seed(0)
    gen = Generator(config)
    rebuilt = Generator(restored)
    rebuilt.load_state_dict(gen.state_dict())
    labels, features = torch.tensor([0, 3]), torch.ones(2, 2)
    torch.testing.assert_close(
        rebuilt.generate(labels, features, [1, 2]), gen.generate(labels, features, [1, 2])
    )
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['depth'\]"):
        CGANConfig.from_dict({**config.to_dict(), "depth": 3})


def test_train_step_updates_both_networks_and_reports_finite_metrics() -> None:
    torch.manual_seed(0)
    config = tiny(num_features=2)
    gen, disc = Generator(config), Discriminator(config)
    opt_g, opt_d = cgan_optimizers(gen, disc, ImageTrainConfig())
    before_g = [p.detach().clone() for p in gen.parameters()]
    before_d = [p.detach().clone() for p in disc.parameters()]
    images, labels, features = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)), torch.randn(8, 2)
    metrics = cgan_train_step(gen, disc, opt_g, opt_d, images, labels, features)
    assert set(metrics) == {"loss_d", "loss_g", "d_real", "d_fake"}
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert any(not torch.equal(a, b) for a, b in zip(before_g, gen.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(before_d, disc.parameters(), strict=True))


def test_training_is_deterministic_for_a_seed() -> None:
    images, labels = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    config = ImageTrainConfig(epochs=2, batch_size=8, seed=3)

    def run() -> tuple[list[dict[str, float]], torch.Tensor]:
        torch.manual_seed(0)
        gen, disc = Generator(tiny()), Discriminator(tiny())
        history = train_cgan(gen, disc, images, labels, config=config)
        return history, gen.generate(torch.tensor([1, 2]), seeds=[0, 1])

    (history_a, images_a), (history_b, images_b) = run(), run()
    assert len(history_a) == 2
    assert history_a == history_b
    torch.testing.assert_close(images_a, images_b)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.usefixtures("two_threads")
def test_trained_cgan_draws_the_requested_digit() -> None:
    # Seeded end to end: model init (manual_seed), shuffling and noise (ImageTrainConfig.seed),
    # evaluation latents (per-sample seeds). Measured on 2 CPU threads: ~4 s uncontended; accuracy
    # 0.982 for this seed and 0.94-0.98 over seeds 0-7, against a 0.8 bar.
    torch.manual_seed(0)
    split = load_digits_split(image_size=16, channels=1, seed=0)
    config = CGANConfig(image_size=16, channels=1, num_classes=10, z_dim=64, width=32)
    gen, disc = Generator(config), Discriminator(config)
    labels = torch.arange(10).repeat_interleave(50)  # 50 images per class
    seeds = list(range(len(labels)))
    untrained = evaluate_images(gen.generate(labels, seeds=seeds), labels)

    start = time.perf_counter()
    train_cgan(gen, disc, split.train_images, split.train_labels, config=ImageTrainConfig(epochs=20, seed=0))
    elapsed = time.perf_counter() - start
    trained = evaluate_images(gen.generate(labels, seeds=seeds), labels)
    print(f"cGAN: trained in {elapsed:.1f}s, untrained {untrained}, trained {trained}")

    assert untrained["conditioning_accuracy"] < 0.35
    assert trained["conditioning_accuracy"] >= 0.8
    assert trained["mse_to_class_mean"] < untrained["mse_to_class_mean"]
