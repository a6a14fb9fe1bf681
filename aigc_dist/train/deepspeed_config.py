"""Our typed `train` + `deepspeed` sections -> the dict `deepspeed.initialize(config=...)` takes.

Everything DeepSpeed would reject, or silently do differently from what the config says, is
caught here first and raised as a `ConfigError` naming our fields, never as a DeepSpeed traceback
from inside a worker. The learning-rate schedule is not in the dict: DeepSpeed's `WarmupCosineLR`
starts at lr 0 and refuses `warmup_steps = 0`, so the trainer passes `lr_scheduler_factory(train)`
(the same `warmup_cosine` the single-process loop uses) to `deepspeed.initialize(lr_scheduler=...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import torch

from aigc_dist.config import ConfigError, DeepSpeedConfig, TrainConfig
from aigc_dist.train.optim import warmup_cosine

Precision = Literal["fp32", "bf16", "fp16"]

# DeepSpeed prints its own step line every `steps_per_print` steps; ours is the progress line.
_NEVER = 2**31 - 1


def resolve_precision(ds: DeepSpeedConfig, on_gpu: bool) -> Precision:
    """`auto` -> bf16 on GPU, fp32 on CPU. fp16 (with loss scaling) needs a GPU."""
    if ds.precision == "auto":
        return "bf16" if on_gpu else "fp32"
    if ds.precision == "fp16" and not on_gpu:
        raise ConfigError(
            "deepspeed.precision: fp16 needs a GPU and this run has none (train.use_gpu resolved to false); "
            "use bf16 or fp32 on CPU"
        )
    return ds.precision


def deepspeed_config(train: TrainConfig, ds: DeepSpeedConfig, *, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config for one engine of a run with `world_size` data-parallel ranks.

    Batch: `train_batch_size` = micro_batch_size x grad_accum_steps x world_size (DeepSpeed checks
    the three agree). Optimizer: AdamW with our lr, betas and weight decay (its groups: `optim.parameter_groups`);
    on CPU it is `torch.optim.AdamW` (DeepSpeed's fused Adam is CUDA-only), on GPU DeepSpeed's fused or, with
    optimizer offload, CPU Adam. ZeRO: the stage, optional CPU offload of optimizer state (stage >= 1)
    and parameters (stage 3), and the ZeRO-3 persistence threshold.
    """
    if world_size < 1:
        raise ConfigError(f"train.num_workers must be >= 1 (got {world_size})")
    precision = resolve_precision(ds, on_gpu)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = ds.zero3_persistence_threshold
    optimizer_params: dict[str, Any] = {
        "lr": train.lr,
        "betas": [train.beta1, train.beta2],
        "eps": 1e-8,
        "weight_decay": train.weight_decay,
    }
    if not on_gpu:
        optimizer_params["torch_adam"] = True
    config: dict[str, Any] = {
        "train_batch_size": train.micro_batch_size * train.grad_accum_steps * world_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.grad_clip,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }
    return config


def lr_scheduler_factory(train: TrainConfig) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """What `deepspeed.initialize(lr_scheduler=...)` calls with its optimizer: linear warm-up over
    `warmup_steps`, then cosine decay to `min_lr_ratio * lr` at `max_steps` (optimizer steps)."""
    schedule = partial(
        warmup_cosine, warmup_steps=train.warmup_steps, total_steps=train.max_steps, min_ratio=train.min_lr_ratio
    )
    return partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=schedule)
