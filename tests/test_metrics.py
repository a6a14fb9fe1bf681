"""Metric names and labels follow the rules; the driver's endpoint and push never fail a job."""

from __future__ import annotations

import logging
import re
import socket
import urllib.request
from pathlib import Path

import pytest

from aigc_dist.metrics import ALLOWED_LABELS, MAX_LABEL_VALUES, SPECS, UNITS, ActorMetrics, DriverMetrics, MetricSpec

REPO = Path(__file__).resolve().parents[1]
# Values that differ per request, user or item: no label may carry one.
PER_REQUEST = {"request_id", "user_id", "item_id", "user", "item", "seed", "prompt", "content", "path", "url",
               "trace_id", "session_id", "id"}


def test_every_metric_name_follows_the_naming_rules():
    for name, spec in SPECS.items():
        assert spec.name == name and re.fullmatch(r"aigc_[a-z0-9_]+", name), name
        assert name.endswith("_total") == (spec.kind == "counter"), name
        assert name.removesuffix("_total").rsplit("_", 1)[-1] in UNITS, name
        assert spec.help.endswith("."), name  # a sentence: Grafana shows it as the description
        assert spec.prometheus_name == ("ray_" + name if spec.exporter == "ray" else name)
        if spec.kind == "histogram":
            assert list(spec.buckets) == sorted(set(spec.buckets)) and spec.buckets[0] > 0, name
    latency = [s for s in SPECS.values() if s.name.endswith("_seconds")]
    assert latency and all(s.kind == "histogram" for s in latency)  # latencies are histograms, not averages


@pytest.mark.parametrize("name, kind, labels, problem", [
    ("rows_total", "counter", ("run",), "aigc_"),
    ("aigc_rows", "counter", ("run",), "_total"),
    ("aigc_rows_total", "gauge", ("run",), "_total"),
    ("aigc_rows_generated_total", "counter", ("run",), "unit"),
    ("aigc_rows_total", "counter", ("user_id",), "ALLOWED_LABELS"),
])
def test_a_metric_breaking_the_rules_cannot_be_defined(name, kind, labels, problem):
    with pytest.raises(ValueError, match=problem):
        MetricSpec(name, kind, "help.", labels, "driver")


def test_no_label_can_take_a_per_request_value():
    for spec in SPECS.values():
        assert set(spec.labels) <= ALLOWED_LABELS, spec.name
        assert not set(spec.labels) & PER_REQUEST, spec.name
    assert not ALLOWED_LABELS & PER_REQUEST
    metrics = DriverMetrics({"run": "r1"})
    with pytest.raises(ValueError, match="no label"):  # a label the spec does not declare
        metrics.inc("aigc_backfill_rows_total", 1, status="ok", request_id="req-1")
    with pytest.raises(ValueError, match="not allowed"):
        DriverMetrics({"user_id": "u1"})
    with pytest.raises(ValueError, match="not allowed"):
        ActorMetrics("serve", {"request_id": "x"})
    # A declared label fed one value per request runs into the cap at once.
    with pytest.raises(ValueError, match="per-request"):
        for i in range(MAX_LABEL_VALUES + 1):
            metrics.inc("aigc_storage_written_bytes_total", 1, kind=f"file-{i}")


def test_misuse_names_the_mistake():
    metrics = DriverMetrics({"run": "r1"})
    with pytest.raises(KeyError, match="aigc_nope_total"):
        metrics.inc("aigc_nope_total")
    with pytest.raises(ValueError, match="ActorMetrics"):  # a Ray-exported metric, in a driver
        metrics.inc("aigc_generated_tokens_total", 1)
    with pytest.raises(ValueError, match=r"needs a value for label\(s\) \['status'\]"):
        metrics.inc("aigc_backfill_rows_total", 1)
    with pytest.raises(TypeError, match="gauge"):
        metrics.inc("aigc_backfill_progress_ratio", 1)
    with pytest.raises(ValueError, match="DriverMetrics"):
        ActorMetrics("backfill", {"run": "r1"}).inc("aigc_backfill_tokens_total", 1)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_two_drivers_serve_metrics_side_by_side_and_a_taken_port_is_only_a_warning(caplog):
    first, second = DriverMetrics({"run": "a"}), DriverMetrics({"run": "b"})
    try:
        port_a, port_b = first.serve_http("127.0.0.1", 0), second.serve_http("127.0.0.1", 0)
        assert port_a and port_b and port_a != port_b
        first.inc("aigc_backfill_rows_total", 5, status="ok")
        first.set("aigc_backfill_progress_ratio", 0.25)
        second.inc("aigc_storage_written_bytes_total", 1024, kind="data")
        body = _scrape(port_a)
        assert 'aigc_backfill_rows_total{run="a",status="ok"} 5.0' in body
        assert 'aigc_backfill_progress_ratio{run="a"} 0.25' in body
        assert "aigc_storage_written_bytes_total" not in body  # each driver has its own registry
        assert 'aigc_storage_written_bytes_total{kind="data",run="b"} 1024.0' in _scrape(port_b)

        third = DriverMetrics({"run": "c"})
        with caplog.at_level(logging.WARNING, logger="aigc_dist.metrics"):
            assert third.serve_http("127.0.0.1", port_a) is None
        assert f"cannot serve /metrics on 127.0.0.1:{port_a}" in caplog.text
        third.close()
    finally:
        first.close()
        second.close()
    with pytest.raises(OSError):
        _scrape(port_a)


def test_a_failed_push_is_a_warning_not_an_error(caplog):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    metrics = DriverMetrics({"run": "r1"})
    metrics.inc("aigc_backfill_rows_total", 3, status="ok")
    with caplog.at_level(logging.WARNING, logger="aigc_dist.metrics"):
        assert metrics.push(f"http://127.0.0.1:{port}", job="aigc-backfill") is False
    assert "push to" in caplog.text


def test_docs_list_every_metric_with_its_prometheus_name_and_labels():
    text = (REPO / "docs" / "metrics.md").read_text()
    for spec in SPECS.values():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{spec.prometheus_name}`")), None)
        assert row is not None, f"docs/metrics.md has no table row for {spec.prometheus_name}"
        for label in spec.labels:
            assert f"`{label}`" in row, f"{spec.prometheus_name}: label {label} missing from its row"
