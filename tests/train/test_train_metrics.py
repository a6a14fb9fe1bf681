"""Training figures as a real Prometheus sees them: recorded by the rank 0 worker, through Ray's metrics port."""

from __future__ import annotations

import uuid

import pytest

pytestmark = pytest.mark.slow


def test_train_step_time_samples_tokens_and_loss_reach_prometheus(ray_local, prometheus, deepspeed_ops, train_kit,
                                                                  tiny_world, tmp_path):
    run = f"lm-metrics-{uuid.uuid4().hex[:6]}"
    cfg = train_kit.lm_config(str(tiny_world), str(tmp_path / "runs"), train={
        "run_name": run, "max_steps": 6, "log_every_steps": 2, "checkpoint_every_steps": 6, "export_at_end": False})

    result = train_kit.run(cfg)

    last = result.metrics
    selector = f'run="{run}",component="train",model="test-lm"'
    # Every optimizer step timed once (rank 0 only: the other rank records nothing).
    steps = f"sum(ray_aigc_train_step_seconds_count{{{selector}}})"
    assert prometheus.wait_for_value(steps, 6) == 6
    assert prometheus.wait_for_value(f"sum(ray_aigc_train_samples_total{{{selector}}})", last["samples"]) == \
        last["samples"] == 6 * 2 * 8
    assert prometheus.wait_for_value(f"sum(ray_aigc_train_tokens_total{{{selector}}})", last["tokens"]) == \
        last["tokens"]
    assert prometheus.value(f"ray_aigc_train_loss{{{selector}}}") == pytest.approx(last["loss"], rel=1e-6)
