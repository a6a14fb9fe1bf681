"""Image backfill: a cGAN artifact, conditioned on the item's category, writes decodable PNGs."""

from __future__ import annotations

import io
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from aigc_dist.batch.layout import read_output
from aigc_dist.batch.pipeline import run_backfill
from aigc_dist.config import StorageConfig
from aigc_dist.demo.world import CATEGORIES

pytestmark = pytest.mark.slow
MAX_FILE_BYTES = 16 * 1024
PARQUET_FOOTER_BYTES = 4096  # schema and metadata a file carries besides its rows


def test_image_backfill_writes_decodable_pngs_of_the_item_category(ray_local, tmp_path, kit, world_dir):
    """300 good candidates and 2 whose item's category is no class of the model (an unknown name, none at
    all): 300 PNGs, and the 2 in errors/ with the reason, the job unharmed."""
    world = tmp_path / "world"
    shutil.copytree(world_dir, world)
    items = pq.read_table(world / "items.parquet")
    bad_items = [{**items.slice(0, 1).to_pylist()[0], "item_id": "odd-name", "category": "spaceships"},
                 {**items.slice(0, 1).to_pylist()[0], "item_id": "no-category", "category": None}]
    pq.write_table(pa.Table.from_pylist(items.to_pylist() + bad_items), world / "items.parquet")
    candidates = pq.read_table(world / "candidates.parquet")
    user = candidates["user_id"][0].as_py()
    bad_candidates = [{**candidates.slice(0, 1).to_pylist()[0], "item_id": item["item_id"]} for item in bad_items]
    pq.write_table(pa.Table.from_pylist(candidates.to_pylist() + bad_candidates), world / "candidates.parquet")
    artifact = kit.save_cgan_artifact(str(tmp_path / "banner-cgan"))
    # ~75 rows per shard, tens of KB of PNGs: over max_file_bytes, so a shard is several files.
    backfill = kit.config(str(tmp_path / "out"), artifact, run_id="banners", mode="image", rows_per_file=100,
                          batch_size=64, max_file_bytes=MAX_FILE_BYTES)

    manifest = run_backfill(backfill, kit.world_data(str(world)), StorageConfig())

    data, errors = read_output(str(tmp_path / "out" / "banners"))
    assert manifest["counts"] == {"total": 302, "ok": 300, "quarantined": 2, "filtered": 0, "by_stage": {"prompt": 2},
                                  "profiles": {"users": 0, "items": 0}}
    assert data.num_rows == 300 and errors.num_rows == 2
    reasons = {e["item_id"]: e for e in errors.to_pylist()}
    assert set(reasons) == {"odd-name", "no-category"} and {e["user_id"] for e in reasons.values()} == {user}
    assert all(e["stage"] == "prompt" and "is not a class of the model" in e["error"] for e in reasons.values())
    assert "'spaceships'" in reasons["odd-name"]["error"] and "None" in reasons["no-category"]["error"]
    items = {i["item_id"]: i for i in pq.read_table(f"{world_dir}/items.parquet").to_pylist()}
    for row in data.to_pylist():
        image = Image.open(io.BytesIO(row["image"]))
        image.load()  # decodes every pixel, not just the header
        assert image.size == (16, 16) == (row["width"], row["height"]) and image.format == "PNG"
        assert row["label"] == CATEGORIES.index(items[row["item_id"]]["category"])
        assert row["num_bytes"] == len(row["image"])
    assert len({row["image"] for row in data.to_pylist()}) > 250  # one seed per request, not one image for all

    # Files reach the bytes target, not a storm: each shard's rows in a few files, none much over it.
    data_files = manifest["files"]["data"]
    assert len(data_files) > manifest["num_shards"] == 4  # 302 rows, rows_per_file 100
    assert sum(f["rows"] for f in data_files) == 300
    assert all(f["bytes"] <= MAX_FILE_BYTES + PARQUET_FOOTER_BYTES for f in data_files), data_files
    for shard in range(4):
        assert 1 <= len([f for f in data_files if f["shard"] == shard]) <= 8, data_files
