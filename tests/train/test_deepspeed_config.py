"""Our `train` + `deepspeed` sections -> DeepSpeed's config: every knob lands where DeepSpeed reads it,
and combinations that cannot work are config errors that name our fields."""

from __future__ import annotations

import pytest
import torch
from deepspeed.runtime.config import DeepSpeedConfig as DeepSpeedParsed

from aigc_dist.config import ConfigError, DeepSpeedConfig, TrainConfig, load_config
from aigc_dist.train.deepspeed_config import deepspeed_config, lr_scheduler_factory, resolve_precision
from aigc_dist.train.optim import warmup_cosine


def mapped(world_size: int = 1, on_gpu: bool = False, train: dict | None = None, **ds: object) -> dict:
    return deepspeed_config(TrainConfig(**(train or {})), DeepSpeedConfig(**ds), world_size=world_size, on_gpu=on_gpu)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_zero_stage_is_accepted_by_deepspeeds_own_parser(stage):
    config = mapped(zero_stage=stage)
    parsed = DeepSpeedParsed(config)  # DeepSpeed's validation, without an engine or a process group
    assert parsed.zero_optimization_stage == stage
    assert parsed.optimizer_name == "adamw"


def test_batch_sizes_multiply_out_per_world_size():
    config = mapped(world_size=4, train={"micro_batch_size": 6, "grad_accum_steps": 3})
    assert config["train_micro_batch_size_per_gpu"] == 6
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 6 * 3 * 4


def test_optimizer_clipping_and_hyper_parameters_come_from_train():
    train = {"lr": 1e-3, "weight_decay": 0.05, "beta1": 0.5, "beta2": 0.999, "grad_clip": 0.5}
    config = mapped(train=train)
    params = config["optimizer"]["params"]
    assert config["optimizer"]["type"] == "AdamW"
    assert params["lr"] == 1e-3 and params["weight_decay"] == 0.05 and params["betas"] == [0.5, 0.999]
    assert config["gradient_clipping"] == 0.5
    assert mapped(train={"grad_clip": 0.0})["gradient_clipping"] == 0.0  # 0 disables clipping


def test_cpu_uses_torch_adamw_and_gpu_deepspeeds_own():
    assert mapped(on_gpu=False)["optimizer"]["params"]["torch_adam"] is True
    assert "torch_adam" not in mapped(on_gpu=True)["optimizer"]["params"]  # fused / CPU Adam on GPU


def test_offload_maps_to_cpu_devices():
    zero = mapped(zero_stage=3, offload_optimizer=True, offload_params=True)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["offload_optimizer"]["pin_memory"] is False  # pinned memory only helps a GPU copy
    assert mapped(on_gpu=True, zero_stage=2, offload_optimizer=True)["zero_optimization"]["offload_optimizer"][
        "pin_memory"
    ]
    assert "offload_optimizer" not in mapped(zero_stage=2)["zero_optimization"]


def test_zero3_persistence_threshold_is_passed_only_for_stage_3():
    assert mapped(zero_stage=3, zero3_persistence_threshold=0)["zero_optimization"][
        "stage3_param_persistence_threshold"
    ] == 0
    assert "stage3_param_persistence_threshold" not in mapped(zero_stage=2)["zero_optimization"]


@pytest.mark.parametrize(
    ("precision", "on_gpu", "expected"),
    [("auto", False, "fp32"), ("auto", True, "bf16"), ("bf16", False, "bf16"), ("fp16", True, "fp16")],
)
def test_precision(precision, on_gpu, expected):
    assert resolve_precision(DeepSpeedConfig(precision=precision), on_gpu) == expected
    config = mapped(on_gpu=on_gpu, precision=precision)
    assert config["bf16"]["enabled"] is (expected == "bf16")
    assert config["fp16"]["enabled"] is (expected == "fp16")


def test_fp16_on_cpu_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match=r"deepspeed\.precision: fp16 needs a GPU"):
        mapped(on_gpu=False, precision="fp16")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--deepspeed.offload_params=true"], "offload_params=true needs zero_stage=3"),
        (["--deepspeed.zero_stage=0", "--deepspeed.offload_optimizer=true"], "offload_optimizer=true needs zero_stage"),
        (["--train.warmup_steps=50", "--train.max_steps=50"], "warmup_steps (50) must be < max_steps (50)"),
        (["--train.beta1=1.0"], "train.beta1"),
        (["--train.min_lr_ratio=2"], "train.min_lr_ratio"),
        (["--deepspeed.zero3_persistence_threshold=-1"], "deepspeed.zero3_persistence_threshold"),
        (["--model.kind=cgan", '--model.labels=["a", "b"]'], "labels must be 10 distinct names"),
    ],
)
def test_invalid_combinations_are_config_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_schedule_is_warmup_then_cosine_to_the_floor():
    train = TrainConfig(lr=1e-2, warmup_steps=4, max_steps=20, min_lr_ratio=0.1)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    scheduler = lr_scheduler_factory(train)(optimizer)
    rates = []
    for _ in range(train.max_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [train.lr * warmup_cosine(s, 4, 20, 0.1) for s in range(20)]
    assert rates == pytest.approx(expected)
    assert rates[0] == pytest.approx(train.lr / 4)  # the first step already learns (DeepSpeed's own starts at 0)
    assert max(rates) == pytest.approx(train.lr) and train.lr * 0.1 <= rates[-1] < train.lr * 0.12


def test_weight_decay_falls_on_matrices_only_and_frozen_weights_stay_out():
    from aigc_dist.models.llama import LlamaLM, lm_config_from_preset
    from aigc_dist.models.lora import add_lora
    from aigc_dist.train.optim import parameter_groups

    model = LlamaLM(lm_config_from_preset("tiny"))
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {p.dim() for p in decay["params"]} == {2} and {p.dim() for p in no_decay["params"]} == {1}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, _ in model.named_parameters() if "norm" in n}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # tied head once
    add_lora(model, ["q_proj"], rank=2, alpha=4.0)
    [adapters] = parameter_groups(model, 0.1)  # A and B only: no empty no-decay group
    assert len(adapters["params"]) == 2 * 2 and all(p.requires_grad for p in adapters["params"])
    # What DeepSpeed builds from the groups on CPU (torch_adam).
    optimizer = torch.optim.AdamW(parameter_groups(LlamaLM(lm_config_from_preset("tiny")), 0.1))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
