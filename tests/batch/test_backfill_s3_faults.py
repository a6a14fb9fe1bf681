"""S3 that fails like S3 under load: 503 SlowDown, dropped connections, lost answers of exclusive PUTs."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from aigc_dist.batch.inputs import stable_request_id
from aigc_dist.batch.layout import read_output
from aigc_dist.batch.pipeline import run_backfill
from aigc_dist.batch.shards import row_seed
from aigc_dist.config import StorageConfig
from aigc_dist.data.prompts import template_digest
from aigc_dist.storage import Storage, join_uri

pytestmark = pytest.mark.slow


def test_backfill_through_a_faulty_s3_is_still_exactly_once(ray_local, s3_bucket, faulty_s3, kit, world_dir,
                                                            lm_artifact):
    storage = Storage()  # straight to S3, for setup and for checking
    for name in ("users", "items", "candidates"):
        storage.write_bytes(join_uri(s3_bucket, f"world/{name}.parquet"), (Path(world_dir) / f"{name}.parquet")
                            .read_bytes())
    backfill = kit.config(join_uri(s3_bucket, "out"), lm_artifact, run_id="faults", rows_per_file=100,
                          progress_interval_s=5.0)

    manifest = run_backfill(backfill, kit.world_data(join_uri(s3_bucket, "world")),
                            StorageConfig(endpoint_url=faulty_s3.endpoint_url, retries=8))

    run = join_uri(s3_bucket, "out/faults")
    data, errors = read_output(run, storage)
    assert manifest["counts"]["total"] == 300 == data.num_rows + errors.num_rows
    ids = data["request_id"].to_pylist()
    salt = template_digest(kit.template)
    expected = {stable_request_id(c["user_id"], c["item_id"], salt)
                for c in pq.read_table(Path(world_dir) / "candidates.parquet").to_pylist()}
    assert len(ids) == len(set(ids)) and set(ids) | set(errors["request_id"].to_pylist()) == expected
    assert all(r["seed"] == row_seed(0, r["request_id"]) and r["content"] for r in data.to_pylist())
    listed = {join_uri(run, e["path"]) for kind in ("data", "errors") for e in manifest["files"][kind]}
    assert set(storage.list(join_uri(run, "data")) + storage.list(join_uri(run, "errors"))) == listed
    faults = faulty_s3.faults
    assert faults["503 SlowDown"] > 0 and faults["dropped connection"] > 0, faults
    # Every commit marker and the lock were created by a retry that found its own first write.
    assert faults["lost answer of exclusive PUT"] >= manifest["num_shards"] + 1, faults
