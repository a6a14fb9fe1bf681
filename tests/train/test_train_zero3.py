"""ZeRO-3: parameters are partitioned across the 2 workers, yet training matches ZeRO-2 step for step,
and the artifact gathered from the live engines equals what `zero_to_fp32` merges from the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aigc_dist.models.artifact import load_artifact
from aigc_dist.models.llama import LlamaLM, lm_config_from_preset
from aigc_dist.storage import Storage
from aigc_dist.train.export import export_checkpoint

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parent / "golden" / "lm_tiny_2workers.json"


def test_zero3_trains_like_zero2_and_exports_the_gathered_weights(ray_local, deepspeed_ops, train_kit, tiny_world,
                                                                  tmp_path):  # fmt: skip
    cfg = train_kit.lm_config(
        str(tiny_world), str(tmp_path / "runs"),
        train={"run_name": "lm-zero3"},  # 20 steps: the golden run's schedule
        # Threshold 0: even the tiny model's small tensors are partitioned, not kept whole on each rank.
        deepspeed={"zero_stage": 3, "zero3_persistence_threshold": 0},
    )  # fmt: skip
    result = train_kit.run(cfg)

    # The same maths as ZeRO-2 (the golden run), up to the order of floating-point sums.
    assert result.losses[:10] == pytest.approx(json.loads(GOLDEN.read_text())["losses"], rel=1e-4)

    storage = Storage()
    gathered = load_artifact(result.artifact_uri, storage)  # GatheredParameters on the live engines
    merged_uri, meta = export_checkpoint(result.checkpoint_uri, storage, str(tmp_path / "merged"))
    merged = load_artifact(merged_uri, storage)  # zero_to_fp32 over both ranks' shards
    assert meta["step"] == gathered.metadata["step"] == 20
    torch.manual_seed(cfg.train.seed)
    initial = LlamaLM(lm_config_from_preset("tiny", max_position_embeddings=128)).state_dict()
    for name, tensor in gathered.model.state_dict().items():
        assert torch.equal(tensor, merged.model.state_dict()[name]), name
        assert tensor.shape == initial[name].shape  # whole tensors, not one rank's partition
    embedding = "model.embed_tokens.weight"  # tied to lm_head: gathered once, exported once
    assert not torch.equal(gathered.model.state_dict()[embedding], initial[embedding])  # it trained
    assert gathered.model.lm_head.weight is gathered.model.model.embed_tokens.weight
