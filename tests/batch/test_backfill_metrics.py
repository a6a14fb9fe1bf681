"""A backfill's throughput, as a real Prometheus sees it: Ray's metrics port, the driver, a Pushgateway."""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from typing import Any

import pytest

from aigc_dist.batch.pipeline import FAILPOINT_ENV, exported_metrics, run_backfill
from aigc_dist.config import MetricsConfig, StorageConfig


def test_a_taken_metrics_port_and_a_dead_pushgateway_never_fail_the_driver(caplog):
    with socket.socket() as taken, socket.socket() as dead:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        config = MetricsConfig(port=taken.getsockname()[1], pushgateway_url=f"http://127.0.0.1:{dead.getsockname()[1]}")
        with caplog.at_level(logging.WARNING), exported_metrics("r1", config) as metrics:
            metrics.inc("aigc_backfill_rows_total", 10, status="ok")
    assert "cannot serve /metrics" in caplog.text and "push to" in caplog.text
    with exported_metrics("r1", MetricsConfig(enabled=False)) as metrics:
        assert metrics is None


@pytest.mark.slow
def test_backfill_figures_in_prometheus_match_the_manifest(ray_local, prometheus, kit, world_dir, lm_artifact,
                                                           tmp_path):
    run = f"prom-{uuid.uuid4().hex[:8]}"
    backfill = kit.config(str(tmp_path / "out"), lm_artifact, run_id=run, rows_per_file=50, max_actors=1)
    metrics = MetricsConfig(port=prometheus.driver_port, pushgateway_url=prometheus.pushgateway_url)
    started = time.time()
    # The driver holds still after its 2nd commit (a failpoint) until Prometheus has scraped its live
    # /metrics with committed rows on it: the live series is asserted, not only the final push.
    release = tmp_path / "release"
    live = f'aigc_backfill_rows_total{{job="aigc-driver",run="{run}",status="ok"}}'
    result: dict[str, Any] = {}

    def drive() -> None:
        try:
            result["manifest"] = run_backfill(backfill, kit.world_data(world_dir), StorageConfig(), metrics)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test's thread
            result["error"] = exc

    driver = threading.Thread(target=drive)
    os.environ[FAILPOINT_ENV] = f"shard_committed:2=wait:{release}"
    try:
        driver.start()
        held = prometheus.wait_for(live, lambda value: bool(value and value > 0) or not driver.is_alive())
        assert "error" not in result, result
        assert driver.is_alive() and held is not None and held > 0, held  # scraped mid-run, rows on it
        ratio = prometheus.value(f'aigc_backfill_progress_ratio{{job="aigc-driver",run="{run}"}}')
        assert ratio is not None and 0 < ratio < 1
    finally:
        os.environ.pop(FAILPOINT_ENV, None)
        release.touch()
        driver.join(timeout=600)
    if "error" in result:
        raise result["error"]
    manifest = result["manifest"]

    counts = manifest["counts"]
    assert held < counts["ok"]  # the scrape saw the run part-way, then it went on
    assert counts["ok"] > 0
    # The driver's final figures, pushed as it ended (its own /metrics closed with it).
    pushed = f'job="aigc-backfill",run="{run}"'
    for status in ("ok", "quarantined", "filtered"):
        expr = f'aigc_backfill_rows_total{{{pushed},status="{status}"}}'
        assert prometheus.wait_for_value(expr, counts[status]) == counts[status], expr
    assert prometheus.value(f"aigc_backfill_progress_ratio{{{pushed}}}") == 1.0
    assert prometheus.value(f"aigc_backfill_input_rows{{{pushed}}}") == counts["total"]
    # every input row went through a generate task once, counted as it reported (before its commit)
    assert prometheus.value(f"aigc_backfill_generated_rows_total{{{pushed}}}") == counts["total"]
    assert prometheus.value(f"aigc_backfill_tokens_total{{{pushed}}}") == manifest["tokens"]["generated"]
    for kind in ("data", "errors"):
        assert prometheus.value(f'aigc_storage_written_bytes_total{{{pushed},kind="{kind}"}}') == \
            manifest["bytes"][kind]

    # The generator actor's figures, through Ray's metrics port: every row that reached the generate
    # stage came out ok (the filter drops some of them afterwards), in one engine call per generate task
    # (a 50-row shard is one task).
    generated = counts["ok"] + counts["filtered"]
    expr = f'sum(ray_aigc_generate_rows_total{{run="{run}",status="ok"}})'
    assert prometheus.wait_for_value(expr, generated) == generated
    tokens = prometheus.value(f'sum(ray_aigc_generated_tokens_total{{run="{run}"}})')
    assert tokens >= manifest["tokens"]["generated"] > 0  # filtered copy had tokens too
    batches = prometheus.value(f'sum(ray_aigc_generate_batch_size_rows_count{{run="{run}"}})')
    assert batches == manifest["num_shards"] == 6
    assert prometheus.value(f'sum(ray_aigc_generate_batch_seconds_count{{run="{run}"}})') == batches

    # The live series alone (job aigc-driver, scraped every 250 ms; the counters exist at 0 from the
    # driver's first scrape on) rose during the run: its rate over the run is above zero.
    window = f"{math.ceil(time.time() - started) + 5}s"
    for selector in (live, f'aigc_backfill_tokens_total{{job="aigc-driver",run="{run}"}}'):
        rate = f"rate({selector}[{window}])"
        assert (prometheus.wait_for(rate, lambda value: bool(value and value > 0)) or 0) > 0, rate
