"""The trainer's pieces that need no cluster: example encoding, progress lines, checkpoint state."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aigc_dist.config import ConfigError, DataConfig, StorageConfig
from aigc_dist.data.prompts import encode_example
from aigc_dist.models.tokenizer import byte_level_tokenizer
from aigc_dist.storage import Storage
from aigc_dist.train.checkpoints import TrainerState, check_resumable, find_checkpoint, shard_files
from aigc_dist.train.datasets import LMEncoding, encode_lm_batch, prompt_template
from aigc_dist.train.generators import image_batch_tensors, lm_batch_tensors
from aigc_dist.train.loop import format_progress


def test_examples_are_joined_with_features_and_encoded_like_encode_example(tmp_path):
    users = tmp_path / "users.parquet"
    items = tmp_path / "items.parquet"
    pq.write_table(pa.table({"user_id": ["u1"], "segment": ["student"], "locale": ["en"]}), users)
    pq.write_table(pa.table({"item_id": ["i1"], "title": ["Trail Pack"], "category": ["outdoor"]}), items)
    data = DataConfig(users=str(users), items=str(items), max_prompt_tokens=64)
    tokenizer = byte_level_tokenizer()
    files = tokenizer.files()
    encoding = LMEncoding(prompt_template(data, tokenizer), 96, (files["tokenizer.json"],
                          files["tokenizer_config.json"]), data.users, data.items, StorageConfig())  # fmt: skip
    rows = pa.table({"user_id": ["u1", "u-unknown", "u1"], "item_id": ["i1", "i1", "i1"],
                     "copy": ["Pack it, student.", "dropped", "Go outside."]})  # fmt: skip
    out = encode_lm_batch(rows, encoding)
    assert out.num_rows == 2  # the row whose user is unknown is dropped, not fatal
    ids, mask = encode_example({"segment": "student", "locale": "en"}, {"title": "Trail Pack", "category": "outdoor"},
                               "Pack it, student.", encoding.template, tokenizer, 96)  # fmt: skip
    assert out["input_ids"][0].as_py() == ids and out["loss_mask"][0].as_py() == mask
    batch = {name: np.array([np.array(v) for v in out[name].to_pylist()], dtype=object)
             for name in ("input_ids", "loss_mask")}  # fmt: skip
    tensors = lm_batch_tensors(batch, tokenizer.pad_id)
    width = max(out["num_tokens"].to_pylist()) - 1  # right-padded to the longest, minus the shift
    assert tensors["input_ids"].shape == tensors["targets"].shape == (2, width)


def test_prompt_template_requires_only_fields_it_renders():
    template = prompt_template(DataConfig(user_fields=["locale"], item_fields=["title"]))
    assert template.required_user_fields == () and template.required_item_fields == ("title",)


def test_image_rows_of_the_wrong_size_name_the_fields():
    batch = {"pixels": np.zeros((2, 64), np.float32), "label": np.array([1, 2])}
    images, labels = image_batch_tensors(batch, channels=1, image_size=8)
    assert images.shape == (2, 1, 8, 8) and labels.tolist() == [1, 2]
    with pytest.raises(ConfigError, match=r"model\.image_size=16"):
        image_batch_tensors(batch, channels=1, image_size=16)


def test_progress_line_has_step_loss_rate_and_eta():
    line = format_progress(40, 200, 2.31412, 10532.4, "tokens", 0.2125, {"loss_d": 0.5})
    assert line == "step 40/200 | loss 2.3141 | loss_d 0.5000 | 10,532 tokens/s | 0.212 s/step | ETA 0:00:34"


def state(**overrides) -> TrainerState:
    fields = {"kind": "lm", "engines": ["model"], "artifact_engine": "model", "artifact": {"kind": "lm"},
              "zero_stage": 2, "world_size": 2, "run_name": "r", "name": "n", "version": "v1",
              "storage_path": "/x", "step": 50, "history": [{"step": 50, "loss": 1.0}], "attempt_starts": [0]}
    return TrainerState(**{**fields, **overrides})  # fmt: skip


def write_checkpoint(directory, trainer_state: TrainerState, ranks: int) -> None:
    directory.mkdir()
    trainer_state.write(str(directory))
    for name in shard_files(trainer_state):
        if f"rank_{ranks}_" not in name:  # ranks >= `ranks` have not uploaded (yet)
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_bytes(b"shard")


def test_trainer_state_round_trips_and_newest_complete_checkpoint_is_found(tmp_path):
    for step in (50, 100):
        write_checkpoint(tmp_path / f"checkpoint_{step:08d}", state(step=step), ranks=2)
    write_checkpoint(tmp_path / "checkpoint_00000150", state(step=150), ranks=1)  # rank 1's shard missing
    (tmp_path / "checkpoint_00000200").mkdir()  # an upload cut short before trainer_state.json
    newest = find_checkpoint(str(tmp_path), Storage())
    assert newest.endswith("checkpoint_00000100")
    assert TrainerState.read(newest) == state(step=100)
    assert find_checkpoint(newest, Storage()) == newest  # a checkpoint itself is accepted too
    with pytest.raises(ConfigError, match="checkpoint_00000150' is incomplete"):
        find_checkpoint(str(tmp_path / "checkpoint_00000150"), Storage())
    with pytest.raises(ConfigError, match="train.resume_from: no complete checkpoint"):
        find_checkpoint(str(tmp_path / "nothing"), Storage())


def test_every_rank_adds_its_shards():
    assert shard_files(state(zero_stage=3, world_size=2, engines=["generator"])) == [
        "generator/latest",
        "generator/state/zero_pp_rank_0_mp_rank_00_model_states.pt",
        "generator/state/zero_pp_rank_1_mp_rank_00_model_states.pt",
        "generator/state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "generator/state/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert shard_files(state(zero_stage=0)) == ["model/latest", "model/state/mp_rank_00_model_states.pt"]


def test_resuming_with_other_workers_or_stage_says_what_to_change():
    with pytest.raises(ConfigError) as err:
        check_resumable(state(), kind="lm", world_size=4, zero_stage=3, source="s3://b/run")
    message = str(err.value)
    assert "train.num_workers is 4 but the checkpoint was written by 2" in message
    assert "deepspeed.zero_stage is 3" in message and "aigc-dist export" in message
    check_resumable(state(), kind="lm", world_size=2, zero_stage=2, source="x")  # same settings: fine


def test_worker_settings_round_trip_through_plain_data_without_printing_secrets():
    from aigc_dist.config import AigcConfig, StorageConfig
    from aigc_dist.train.loop import WorkerSettings

    cfg = AigcConfig()
    storage = StorageConfig(access_key_id="AKIA-TEST", secret_access_key="s3cr3t")
    settings = WorkerSettings(cfg.train, cfg.deepspeed, cfg.model, cfg.data, storage, False, None)
    plain = settings.to_dict()
    assert "s3cr3t" not in repr(plain)  # what Ray may log of train_loop_config
    back = WorkerSettings.from_dict(plain)
    assert back == settings and back.storage.secret_access_key.get_secret_value() == "s3cr3t"
