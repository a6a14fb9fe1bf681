"""Shared pieces of the training tests: DeepSpeed's JIT-built op warmed once, tiny data, tiny configs.

Every training test runs real Ray Train workers (the session's `ray_local`) and real DeepSpeed on
CPU with gloo; nothing here fakes a component.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import torch

from aigc_dist.config import AigcConfig
from aigc_dist.config.loader import merge
from aigc_dist.demo.world import WorldConfig
from aigc_dist.storage import join_uri
from aigc_dist.train.loop import POLL_INTERVAL_ENV

REPO = Path(__file__).resolve().parents[2]
HF_EOS = "<|endoftext|>"  # the EOS of TrainKit.write_hf_checkpoint's tokenizer
# 400 (user, item, copy) examples: 25 steps per epoch at 2 workers x 8.
TINY_WORLD = WorldConfig(num_users=100, num_items=50, candidates_per_user=4, seed=0)


class TrainKit:
    """Helpers of the training tests (a fixture, since test modules cannot import conftest)."""

    world_config = TINY_WORLD

    @staticmethod
    def lm_config(world: str, storage_path: str, **overrides: Any) -> AigcConfig:
        """The tiny LM on 2 workers with short prompts, 20 steps, a progress record per step;
        `overrides` are nested section dicts."""
        base = {
            "model": {"kind": "lm", "preset": "tiny", "max_seq_len": 128, "name": "test-lm"},
            "train": {
                "run_name": "lm", "storage_path": storage_path, "dataset": join_uri(world, "copy.parquet"),
                "num_workers": 2, "max_steps": 20, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 2,
                "log_every_steps": 1, "checkpoint_every_steps": 10, "keep_checkpoints": 2, "shuffle_buffer": 64,
                "max_failures": 0,
            },
            "deepspeed": {"zero_stage": 2},
            "data": {"users": join_uri(world, "users.parquet"), "items": join_uri(world, "items.parquet"),
                     "max_prompt_tokens": 80, "max_field_chars": 24},
        }  # fmt: skip
        return AigcConfig.model_validate(merge(base, overrides))

    @staticmethod
    def image_config(kind: str, dataset: str, storage_path: str, **overrides: Any) -> AigcConfig:
        """The tiny cGAN or cVAE on 16x16 digits, 2 workers, 20 steps."""
        base = {
            "model": {"kind": kind, "preset": "tiny", "image_size": 16, "name": f"test-{kind}"},
            "train": {
                "run_name": kind, "storage_path": storage_path, "dataset": dataset, "num_workers": 2,
                "max_steps": 20, "micro_batch_size": 32, "warmup_steps": 2, "log_every_steps": 5,
                "checkpoint_every_steps": 10, "shuffle_buffer": 256, "max_failures": 0, "beta2": 0.999,
            },
        }  # fmt: skip
        return AigcConfig.model_validate(merge(base, overrides))

    @staticmethod
    def write_hf_checkpoint(directory: Path, texts: list[str], vocab_size: int = 384) -> None:
        """A checkpoint as a user brings one: transformers' Qwen2ForCausalLM (grouped-query attention, q/k/v
        bias, untied head) with random weights, saved by save_pretrained, beside a byte-level BPE trained on
        `texts` whose only special token is its EOS (no project markers, no pad token). Nothing downloaded."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import Qwen2Config, Qwen2ForCausalLM

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[HF_EOS], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
        tokenizer.train_from_iterator(texts, trainer)
        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=None,
                             eos_token_id=tokenizer.token_to_id(HF_EOS), pad_token_id=None)  # fmt: skip
        Qwen2ForCausalLM(config).save_pretrained(directory)
        tokenizer.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": HF_EOS, "model_max_length": 256}))

    @staticmethod
    def run(cfg: AigcConfig) -> Any:
        """run_training with the sections of `cfg`, as the CLI calls it."""
        from aigc_dist.train.trainer import run_training

        return run_training(cfg.train, cfg.deepspeed, cfg.model, cfg.data, cfg.storage)

    @staticmethod
    def write_config(path: Path, cfg: AigcConfig) -> Path:
        """A TOML config file a driver subprocess can be started with."""
        sections = {name: getattr(cfg, name).model_dump(mode="json", exclude_none=True)
                    for name in ("model", "train", "deepspeed", "data")}  # fmt: skip
        path.write_text(tomli_w.dumps(sections))
        return path

    @staticmethod
    def start_driver(script: str, args: list[str], log: Path) -> subprocess.Popen:
        """`python jobs/<script> ARGS` as its own process (what `ray job submit` runs), joined to the
        session's Ray rather than starting another."""
        import ray

        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        return subprocess.Popen([sys.executable, str(REPO / "jobs" / script), *args], env=env,
                                stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO)  # fmt: skip


@pytest.fixture(scope="session")
def train_kit() -> type[TrainKit]:
    return TrainKit


@pytest.fixture(scope="session", autouse=True)
def fast_train_controller() -> Iterator[None]:
    """Ray Train's controller polls its workers every 2 s: it notices a finished or failed worker
    group, and takes a report, only then. Tests poll every 0.25 s (Ray passes the variable from this
    driver to the controller and the workers), which saves seconds per run on short runs."""
    saved = os.environ.get(POLL_INTERVAL_ENV)
    os.environ[POLL_INTERVAL_ENV] = "0.25"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(POLL_INTERVAL_ENV, None)
        else:
            os.environ[POLL_INTERVAL_ENV] = saved


@pytest.fixture(scope="session")
def deepspeed_ops() -> None:
    """DeepSpeed's CPU communication op (`deepspeed_shm_comm`) is compiled with gcc on first use (tens
    of seconds) and cached in ~/.cache/torch_extensions: built here once, so workers only load it."""
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """users / items / candidates / copy parquet of a 100-user synthetic world, on local disk."""
    from aigc_dist.demo.world import write_world

    root = tmp_path_factory.mktemp("world")
    write_world(TINY_WORLD, root)
    return root


@pytest.fixture(scope="session")
def digits_parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits training split at 16x16 grey as `pixels` + `label` parquet."""
    from aigc_dist.storage import Storage
    from aigc_dist.train.datasets import write_digits_parquet

    path = tmp_path_factory.mktemp("digits") / "train.parquet"
    write_digits_parquet(str(path), Storage(), image_size=16, channels=1)
    return path
