"""Gradient accumulation, ZeRO-0 and optimizer offload, each checked against the others in one pair of runs.

(ZeRO-0, 2 micro-batches of 4 per optimizer step) must step exactly as (ZeRO-2 with its optimizer state
offloaded to the CPU, 1 micro-batch of 8): the same rows reach each rank in the same order
(`shuffle_buffer=0`, file order: the local shuffle buffer draws differently for different batch
sizes), and every example's loss covers the same number of tokens (copies of one fixed length), so the
mean of the two micro-batch means that DeepSpeed accumulates (each loss scaled by 1/2) is the token mean
over all 8 rows. (With the synthetic copies' own lengths, 17-101 characters, it would not be: the loss
is a mean over each micro-batch's copy tokens.) Prompts keep their own lengths: each micro-batch pads
to its own longest row, which right padding under causal attention leaves out of the maths. What is
left to differ is floating-point summation order (micro-batch, ZeRO reduction, offload copies).
Then `aigc-dist export` of the ZeRO-0 checkpoint (no ZeRO shards: rank 0's model-states file holds the
whole module) must give the very weights of the run's artifact.

On a CPU-only machine "offload to cpu" moves nothing between devices, but it runs DeepSpeed's ZeRO-Offload
code path (CPU fp32 partitions and gradient buffers). The optimizer is `torch.optim.AdamW` either way on
CPU (`deepspeed_config` sets torch_adam), so DeepSpeed's cpu_adam op is not built or used here.
"""

from __future__ import annotations

from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from aigc_dist.cli import main
from aigc_dist.models.artifact import load_artifact
from aigc_dist.models.tokenizer import byte_level_tokenizer
from aigc_dist.storage import Storage, join_uri
from aigc_dist.train.checkpoints import DEEPSPEED_TAG

pytestmark = pytest.mark.slow

STEPS = 8  # within the first epoch: 200 rows per rank, 8 per step
COPY_CHARS = 32  # ASCII: one token per character with the byte-level tokenizer
# The same maths on both sides, summed in another order: per-step losses agree to float32 rounding
# (5e-8 relative seen), and so do the final weights (2e-6 absolute seen, where Adam has moved each weight
# by up to 8 x lr = 0.024). Bounds with room for other thread counts and CPUs; a real difference
# (a micro-batch's gradient lost, an optimizer or schedule step per micro-batch) is orders larger.
LOSS_RTOL = 1e-5
WEIGHT_ATOL, WEIGHT_RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def fixed_length_examples(tiny_world, tmp_path_factory):
    """The tiny world's (user, item, copy) rows with each copy cut or padded to COPY_CHARS ASCII characters."""
    table = pq.read_table(tiny_world / "copy.parquet")
    copies = ["".join(c for c in text if c.isascii()).strip().ljust(COPY_CHARS, ".")[:COPY_CHARS]
              for text in table["copy"].to_pylist()]  # fmt: skip
    tokenizer = byte_level_tokenizer()
    assert {len(tokenizer.encode(text)) for text in copies} == {COPY_CHARS}  # the premise of the comparison
    path = tmp_path_factory.mktemp("fixed-copy") / "copy.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("copy"), "copy", pa.array(copies)), path)
    return path


@pytest.fixture(scope="module")
def runs(ray_local, deepspeed_ops, train_kit, tiny_world, fixed_length_examples, tmp_path_factory):
    root = tmp_path_factory.mktemp("accumulation")
    common = {"dataset": str(fixed_length_examples), "max_steps": STEPS, "shuffle_buffer": 0,
              "checkpoint_every_steps": STEPS}  # fmt: skip
    accumulated = train_kit.lm_config(
        str(tiny_world), str(root / "zero0"),
        train={**common, "run_name": "lm-zero0-accum", "micro_batch_size": 4, "grad_accum_steps": 2},
        deepspeed={"zero_stage": 0},
    )  # fmt: skip
    whole = train_kit.lm_config(
        str(tiny_world), str(root / "zero2"),
        train={**common, "run_name": "lm-zero2-whole", "micro_batch_size": 8, "grad_accum_steps": 1},
        deepspeed={"zero_stage": 2, "offload_optimizer": True},
    )  # fmt: skip
    return SimpleNamespace(root=root, accumulated=train_kit.run(accumulated), whole=train_kit.run(whole))


def test_two_micro_batches_of_4_step_like_one_of_8(runs):
    accumulated, whole = runs.accumulated, runs.whole
    steps = list(range(1, STEPS + 1))
    assert [r["step"] for r in accumulated.history] == [r["step"] for r in whole.history] == steps
    assert accumulated.losses == pytest.approx(whole.losses, rel=LOSS_RTOL)
    assert accumulated.losses[-1] < accumulated.losses[0] - 0.5  # it trained
    # Every micro-batch is counted: 2 workers x 2 micro-batches x 4 rows per step, and the same rows' tokens.
    assert [r["samples"] for r in accumulated.history] == [r["samples"] for r in whole.history] == \
        [16 * step for step in steps]
    assert [r["tokens"] for r in accumulated.history] == [r["tokens"] for r in whole.history]
    assert [r["lr"] for r in accumulated.history] == [r["lr"] for r in whole.history]  # one schedule step per step

    storage = Storage()
    trained = load_artifact(accumulated.artifact_uri, storage).model.state_dict()
    reference = load_artifact(whole.artifact_uri, storage).model.state_dict()
    for name, tensor in trained.items():
        torch.testing.assert_close(tensor, reference[name], atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL, msg=name)


def test_export_of_a_zero0_checkpoint_gives_the_run_artifact_weights(runs, capsys):
    run_dir = join_uri(str(runs.root / "zero0"), "lm-zero0-accum")
    state_dir = runs.root / "zero0" / "lm-zero0-accum" / f"checkpoint_{STEPS:08d}" / "model" / DEEPSPEED_TAG
    # Plain data parallelism: one whole-model file (weights and optimizer), no per-rank ZeRO shards.
    assert sorted(p.name for p in state_dir.iterdir()) == ["mp_rank_00_model_states.pt"]
    output = str(runs.root / "exported")
    assert main(["export", "--checkpoint", run_dir, "--output", output]) == 0
    assert output in capsys.readouterr().out
    storage = Storage()
    exported = load_artifact(output, storage)
    trained = load_artifact(runs.accumulated.artifact_uri, storage)
    assert exported.metadata["step"] == trained.metadata["step"] == STEPS
    assert exported.model.state_dict().keys() == trained.model.state_dict().keys()
    for name, tensor in trained.model.state_dict().items():
        assert torch.equal(tensor, exported.model.state_dict()[name]), name


def test_the_zero2_side_ran_with_its_optimizer_state_offloaded_to_cpu(runs):
    """What each rank's engine ran with, as DeepSpeed recorded it beside that rank's optimizer shard."""
    state_dir = runs.root / "zero2" / "lm-zero2-whole" / f"checkpoint_{STEPS:08d}" / "model" / DEEPSPEED_TAG
    for rank in range(2):
        shard = torch.load(state_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", map_location="cpu",
                           weights_only=False)  # DeepSpeed's own pickle, written by this module's run
        zero = shard["ds_config"]["zero_optimization"]
        assert zero["stage"] == 2 and zero["offload_optimizer"]["device"] == "cpu", zero
