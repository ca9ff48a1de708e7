"""bench.breakdown: the service's own timing histograms read around a level, as mean ms per step."""

from __future__ import annotations

import pytest

from app.metrics import Metrics
from bench.breakdown import level_breakdown, timing_totals


def test_a_level_breakdown_from_the_services_metrics() -> None:
    metrics = Metrics()
    text = metrics.render().decode()
    before = timing_totals(text, "m")
    assert before == {}  # no series yet
    metrics.request_seconds.labels("/v1/classify", "m", "200").observe(0.5)  # before the level
    before = timing_totals(metrics.render().decode(), "m")
    for seconds in (0.030, 0.050):
        metrics.request_seconds.labels("/v1/classify", "m", "200").observe(seconds)
    metrics.request_seconds.labels("/v1/classify", "m", "503").observe(0.001)  # refused: not counted
    metrics.request_seconds.labels("/v1/classify", "other", "200").observe(9.0)  # another model
    for seconds in (0.004, 0.006):
        metrics.stage_seconds.labels("m", "decode").observe(seconds)
    metrics.stage_seconds.labels("m", "stack").observe(0.002)
    metrics.stage_seconds.labels("m", "run").observe(0.010)
    metrics.stage_seconds.labels("other", "run").observe(5.0)
    for _ in range(3):
        metrics.queue_wait_seconds.labels("m").observe(0.005)
    metrics.inference_seconds.labels("m").observe(0.013)
    metrics.batch_size.labels("m").observe(3)
    after = timing_totals(metrics.render().decode(), "m")

    got = level_breakdown(before, after, wall_s=0.1, workers=1)
    assert got is not None
    assert (got["requests"], got["batches"], got["mean_batch"]) == (2, 1, 3.0)
    assert got["busy"] == pytest.approx(0.13)
    expected = {
        "request_ms": 40.0,
        "decode_ms": 5.0,
        "queue_wait_ms": 5.0,
        "batch_ms": 13.0,
        "stack_ms": 2.0,
        "run_ms": 10.0,
        "app_other_ms": 17.0,  # 40 - 5 - 5 - 13
    }
    assert {key: got[key] for key in expected} == pytest.approx(expected)
    # two workers over the same wall time: each ran a batch half as much of it
    two = level_breakdown(before, after, wall_s=0.1, workers=2)
    assert two is not None and two["busy"] == pytest.approx(0.065)


def test_no_breakdown_without_a_batch() -> None:
    metrics = Metrics()
    metrics.request_seconds.labels("/v1/classify", "m", "400").observe(0.002)  # refused before a batch
    totals = timing_totals(metrics.render().decode(), "m")
    assert level_breakdown({}, totals, wall_s=1.0, workers=1) is None
    metrics.batch_size.labels("m").observe(1)
    metrics.inference_seconds.labels("m").observe(0.01)
    after = timing_totals(metrics.render().decode(), "m")
    got = level_breakdown(totals, after, wall_s=1.0, workers=1)
    assert got is not None
    assert got["request_ms"] is None and got["app_other_ms"] is None  # no answered request: no mean
    assert level_breakdown(totals, after, wall_s=0.0, workers=1) is None
