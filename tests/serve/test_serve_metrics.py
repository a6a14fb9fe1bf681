"""A burst of Serve requests, as a real Prometheus sees it through Ray's metrics port."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.slow


def test_serve_latency_histogram_counts_every_request_sent(serve_cluster, serve_kit, prometheus):
    app = f"metrics-{uuid.uuid4().hex[:6]}"  # the run label: this app's series only
    url = serve_cluster.deploy(app, serve_kit.config())
    try:
        bodies = [{"requests": [serve_kit.request(user=i, item=i, seed=i, max_new_tokens=8)]} for i in range(24)]
        bad = [{"requests": [serve_kit.request(temperature=-1)]}] * 3  # 422: counted with their status
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda body: serve_kit.post(f"{url}/v1/generate", body), bodies + bad))
        assert [a.status_code for a in answers] == [200] * len(bodies) + [422] * len(bad)

        route = f'run="{app}",route="/v1/generate"'
        sent = len(bodies) + len(bad)
        expr = f"sum(ray_aigc_request_latency_seconds_count{{{route}}})"
        assert prometheus.wait_for_value(expr, sent) == sent
        for status, count in (("200", len(bodies)), ("422", len(bad))):
            assert prometheus.wait_for_value(f'sum(ray_aigc_requests_total{{{route},status="{status}"}})',
                                             count) == count
        # Every accepted request went through a generate batch; p99 latency is a finite number of seconds.
        expr = f'sum(ray_aigc_generate_rows_total{{run="{app}",status="ok"}})'
        assert prometheus.wait_for_value(expr, len(bodies)) == len(bodies)
        p99 = prometheus.value(f"histogram_quantile(0.99, sum by (le) "
                               f"(ray_aigc_request_latency_seconds_bucket{{{route}}}))")
        assert 0 < p99 <= 60
    finally:
        serve_cluster.delete(app)
