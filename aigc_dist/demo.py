"""`aigc-dist demo`: the smallest real end-to-end run that exists so far.

Until the full pipeline lands (issue #9) the demo proves the platform path a backfill takes:
a local Ray instance, a Ray Data pipeline, parquet written through `storage.py` and read back.
"""

from __future__ import annotations

import logging
import time

from aigc_dist.config import StorageConfig
from aigc_dist.storage import Storage, join_uri

log = logging.getLogger(__name__)


def run_demo(output: str, storage_config: StorageConfig, num_rows: int = 10_000) -> dict[str, float]:
    """Write `num_rows` rows with Ray Data under `output`, read them back, return a summary."""
    import ray

    storage = Storage(storage_config)
    started = time.perf_counter()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    target = join_uri(output, "smoke")
    fs, path = storage.filesystem(target)
    ray.data.range(num_rows).map_batches(lambda b: {"id": b["id"], "square": b["id"] ** 2}).write_parquet(
        path, filesystem=fs
    )
    read_back = ray.data.read_parquet(path, filesystem=fs).count()
    summary = {"rows_written": num_rows, "rows_read": read_back, "seconds": time.perf_counter() - started}
    print(f"demo: wrote and read back {read_back} rows at {target} in {summary['seconds']:.1f}s")
    if read_back != num_rows:
        raise RuntimeError(f"demo: wrote {num_rows} rows but read {read_back}")
    return summary
