"""A backfill on engine.backend = "vllm" keeps the native backfill's contract and its greedy copy.

vLLM runs inside the generator actors (its offline engine, in-process); the model is the session's trained
`mini` checkpoint (vLLM's CPU attention needs head_dim >= 32, which the 32-wide test LM lacks).
"""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from aigc_dist.batch.layout import RunLayout, read_output
from aigc_dist.batch.pipeline import FAILPOINT_ENV, BackfillError, run_backfill
from aigc_dist.batch.run_state import read_commits
from aigc_dist.config import DataConfig, EngineConfig, StorageConfig
from aigc_dist.demo.world import make_world, write_world
from aigc_dist.storage import Storage, join_uri

pytestmark = pytest.mark.slow
VLLM = EngineConfig(backend="vllm")


def _by_request(run: str) -> tuple[dict, dict]:
    data, errors = read_output(run, Storage())
    rows = {r["request_id"]: r for r in data.to_pylist()}
    bad = {(e["request_id"], e["table"], e["raw"]): (e["stage"], e["error"]) for e in errors.to_pylist()}
    assert len(rows) == data.num_rows and len(bad) == errors.num_rows  # each request_id (each bad row) once
    return rows, bad


@pytest.mark.timeout(1500)
def test_vllm_backfill_to_s3_gives_the_native_copy_counts_and_errors(ray_local, s3_bucket, kit, trained_copy_model):
    storage = Storage()
    everyone = make_world(trained_copy_model.world)
    last_users = pa.array([u["user_id"] for u in everyone.users.to_pylist()[-40:]])  # 400 pairs, 250 held out
    world = dataclasses.replace(everyone, candidates=everyone.candidates.filter(
        pc.is_in(everyone.candidates["user_id"], last_users)))
    world_uri = join_uri(s3_bucket, "world")
    fs, path = storage.filesystem(world_uri)
    write_world(world, path, filesystem=fs)
    good = world.candidates.to_pylist()
    bad = [{"user_id": "u999999", "item_id": good[0]["item_id"]}, {"user_id": good[0]["user_id"], "item_id": "i9"},
           {"user_id": 17, "item_id": good[0]["item_id"]}]
    candidates = join_uri(world_uri, "candidates.jsonl")
    storage.write_bytes(candidates, b"".join(json.dumps(r).encode() + b"\n" for r in good + bad) + b'{"user_id": \n')
    data = DataConfig(users=join_uri(world_uri, "users.parquet"), items=join_uri(world_uri, "items.parquet"),
                      candidates=candidates)
    artifact = join_uri(s3_bucket, "models/copy-trained/v1")
    for file in Path(trained_copy_model.artifact).iterdir():  # vLLM reads a local copy, checked file by file
        storage.write_bytes(join_uri(artifact, file.name), file.read_bytes())
    out = join_uri(s3_bucket, "backfills")
    settings = dict(rows_per_file=100, max_new_tokens=120, temperature=0.0, min_chars=0)

    native = run_backfill(kit.config(out, artifact, run_id="native", **settings), data, StorageConfig())
    on_vllm = run_backfill(kit.config(out, artifact, run_id="vllm", engine=VLLM, **settings), data, StorageConfig())

    assert on_vllm["counts"] == native["counts"]
    assert on_vllm["counts"]["total"] == len(good) + len(bad) + 1 and on_vllm["counts"]["ok"] == len(good)
    assert on_vllm["model"]["digest"] == native["model"]["digest"]
    ours, our_errors = _by_request(join_uri(out, "native"))
    theirs, their_errors = _by_request(join_uri(out, "vllm"))
    assert their_errors == our_errors and len(their_errors) == len(bad) + 1  # the same rows, stages and reasons
    assert set(theirs) == set(ours)
    differ = [(ours[k]["content"], theirs[k]["content"]) for k in ours if ours[k]["content"] != theirs[k]["content"]]
    assert len(differ) <= 0.05 * len(ours), differ  # greedy, fp32: the same copy but for near-ties
    assert sum(theirs[k]["num_tokens"] for k in theirs) == on_vllm["tokens"]["generated"]
    assert all(theirs[k]["finished"] == ours[k]["finished"] for k in ours
               if ours[k]["content"] == theirs[k]["content"])

    # The engine is part of what a run is: resuming a native run on vLLM would mix two outputs.
    with pytest.raises(BackfillError, match="other (output )?settings"):
        run_backfill(kit.config(out, artifact, run_id="native", engine=VLLM, **settings), data, StorageConfig())


@pytest.mark.timeout(1500)
def test_vllm_backfill_sigkilled_mid_stream_resumes_to_the_uninterrupted_output(ray_local, tmp_path, kit, world_dir,
                                                                                trained_copy_model):
    settings = dict(rows_per_file=50, max_new_tokens=48, temperature=0.0, engine=VLLM)  # 6 shards
    run_backfill(kit.config(str(tmp_path), trained_copy_model.artifact, run_id="reference", **settings),
                 kit.world_data(world_dir), StorageConfig())
    reference = kit.outputs(tmp_path / "reference")

    backfill = kit.config(str(tmp_path), trained_copy_model.artifact, run_id="crashy", **settings)
    config = kit.write_config(tmp_path / "crashy.toml", backfill, kit.world_data(world_dir))
    layout, storage = RunLayout(str(tmp_path / "crashy")), Storage()
    driver = kit.start_driver(config, tmp_path / "killed.log", **{FAILPOINT_ENV: "shard_committed:2"})
    assert driver.wait(timeout=400) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert 2 <= len(read_commits(layout, storage)) < 6  # killed with shards still pending

    driver = kit.start_driver(config, tmp_path / "resume.log")
    assert driver.wait(timeout=400) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert kit.outputs(tmp_path / "crashy") == reference  # 0 missing, 0 duplicates, the same copy
    assert not kit.unlisted_files(tmp_path / "crashy")
