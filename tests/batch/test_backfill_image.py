"""Image backfill: a cGAN artifact, conditioned on the item's category, writes decodable PNGs."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest
from PIL import Image

from aigc_dist.batch.layout import read_output
from aigc_dist.batch.pipeline import run_backfill
from aigc_dist.config import StorageConfig
from aigc_dist.data.synthetic import CATEGORIES

pytestmark = pytest.mark.slow


def test_image_backfill_writes_decodable_pngs_of_the_item_category(ray_local, tmp_path, kit, world_dir):
    artifact = kit.save_cgan_artifact(str(tmp_path / "banner-cgan"))
    backfill = kit.config(str(tmp_path / "out"), artifact, run_id="banners", mode="image", rows_per_file=100,
                          batch_size=64)

    manifest = run_backfill(backfill, kit.world_data(world_dir), StorageConfig())

    data, errors = read_output(str(tmp_path / "out" / "banners"))
    assert manifest["counts"] == {"total": 300, "ok": 300, "quarantined": 0, "filtered": 0, "by_stage": {},
                                  "profiles": {"users": 0, "items": 0}}
    assert data.num_rows == 300 and errors.num_rows == 0
    items = {i["item_id"]: i for i in pq.read_table(f"{world_dir}/items.parquet").to_pylist()}
    for row in data.to_pylist():
        image = Image.open(io.BytesIO(row["image"]))
        image.load()  # decodes every pixel, not just the header
        assert image.size == (16, 16) == (row["width"], row["height"]) and image.format == "PNG"
        assert row["label"] == CATEGORIES.index(items[row["item_id"]]["category"])
        assert row["num_bytes"] == len(row["image"])
    assert len({row["image"] for row in data.to_pylist()}) > 250  # one seed per request, not one image for all
