"""ZeRO-3: parameters are partitioned across the 2 workers, yet training matches ZeRO-2 step for step,
the artifact gathered from the live engines equals what `zero_to_fp32` merges from the checkpoint, and
a second run of the same name resumes from the partitioned checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from aigc_dist.models.artifact import load_artifact
from aigc_dist.models.llama import LlamaLM, lm_config_from_preset
from aigc_dist.storage import Storage
from aigc_dist.train.checkpoints import DEEPSPEED_TAG
from aigc_dist.train.export import export_checkpoint

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parent / "golden" / "lm_tiny_2workers.json"
GOLDEN_RESUMED = Path(__file__).parent / "golden" / "lm_tiny_2workers_resumed.json"  # see test_train_lm.py


@pytest.fixture(scope="module")
def zero3_run(ray_local, deepspeed_ops, train_kit, tiny_world, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("zero3")
    cfg = train_kit.lm_config(
        str(tiny_world), str(tmp_path / "runs"),
        train={"run_name": "lm-zero3"},  # 20 steps: the golden run's schedule
        # Threshold 0: even the tiny model's small tensors are partitioned, not kept whole on each rank.
        deepspeed={"zero_stage": 3, "zero3_persistence_threshold": 0},
    )  # fmt: skip
    return SimpleNamespace(cfg=cfg, tmp_path=tmp_path, result=train_kit.run(cfg))


def test_zero3_trains_like_zero2_and_exports_the_gathered_weights(zero3_run):
    cfg, tmp_path, result = zero3_run.cfg, zero3_run.tmp_path, zero3_run.result

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

    # Partitioned for real: each rank's checkpoint shard holds its own slice of the fp32 master weights
    # (DeepSpeed's fp32_flat_groups), about half of the model's parameters, and the two slices together
    # hold all of them (plus alignment padding).
    total = sum(p.numel() for p in gathered.model.parameters())  # the tied embedding once
    state_dir = Path(result.checkpoint_uri) / "model" / DEEPSPEED_TAG
    per_rank = []
    for rank in range(2):
        shard = torch.load(state_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", map_location="cpu",
                           weights_only=False)  # DeepSpeed's own pickle, written by this test's run
        per_rank.append(sum(t.numel() for t in shard["optimizer_state_dict"]["fp32_flat_groups"]))
    assert all(0.4 * total < n < 0.6 * total for n in per_rank), (per_rank, total)
    assert total <= sum(per_rank) <= total + 1024, (per_rank, total)


def test_same_run_name_resumes_from_the_partitioned_checkpoint(zero3_run, train_kit):
    """Runs last: it continues the run above. Each rank loads its own partition of the weights and of
    the optimizer state back, so the run goes on exactly as a resumed ZeRO-2 run does."""
    cfg = zero3_run.cfg.model_copy(deep=True)
    cfg.train.max_steps = 25  # the end of the first epoch: no second pass over the data to wait for
    result = train_kit.run(cfg)
    assert result.attempt_starts == [0, 20]  # started fresh, then resumed at the checkpoint of step 20
    assert result.step == 25
    assert [record["step"] for record in result.history] == list(range(1, 26))  # none lost, none repeated
    assert result.history[:20] == zero3_run.result.history
    # The ZeRO-2 run resumed the same way (test_train_lm.py) recorded steps 21-25: each rank's partition of
    # the weights and of the Adam moments came back exactly, or these would differ (a fresh model: ~5.5).
    assert result.losses[20:] == pytest.approx(json.loads(GOLDEN_RESUMED.read_text())["losses"], rel=1e-4)
    assert result.metrics["samples"] == 25 * 2 * 8  # the counters came back with the checkpoint
