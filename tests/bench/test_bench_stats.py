"""Percentiles and repeat medians of bench.stats, checked against numpy and hand-made cases."""

from __future__ import annotations

import random

import numpy as np
import pytest

from bench.stats import latency_summary_ms, median_or_none, median_records, percentile


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 1000])
def test_percentile_matches_numpy_linear(n: int) -> None:
    rng = random.Random(n)
    values = [rng.expovariate(3.0) for _ in range(n)]
    for q in (0, 1, 25, 50, 90, 95, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-15)


def test_percentile_interpolates_between_ranks() -> None:
    # ranks 0..3 of [10, 20, 30, 40]: p50 is rank 1.5 -> 25; p99 is rank 2.97 -> 39.7
    assert percentile([40, 10, 30, 20], 50) == pytest.approx(25.0)
    assert percentile([40, 10, 30, 20], 99) == pytest.approx(39.7)
    assert percentile([7.0], 99) == 7.0


def test_percentile_rejects_empty_and_out_of_range() -> None:
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


def test_latency_summary_is_in_milliseconds() -> None:
    summary = latency_summary_ms([0.010, 0.020, 0.030])
    assert summary["p50"] == pytest.approx(20.0)
    assert summary["mean"] == pytest.approx(20.0)
    assert summary["max"] == pytest.approx(30.0)
    assert set(latency_summary_ms([])) == {"p50", "p95", "p99", "mean", "max"}
    assert all(v is None for v in latency_summary_ms([]).values())


def test_median_records_takes_fieldwise_medians() -> None:
    runs = [
        {"concurrency": 16, "images_per_s": 10.0, "latency_ms": {"p99": 300.0}, "mode": "closed", "ok": True},
        {
            "concurrency": 16,
            "images_per_s": 30.0,
            "latency_ms": {"p99": 100.0},
            "mode": "closed",
            "ok": False,
        },
        {"concurrency": 16, "images_per_s": 20.0, "latency_ms": {"p99": None}, "mode": "closed", "ok": True},
    ]
    merged = median_records(runs)
    assert merged["images_per_s"] == 20.0
    assert merged["concurrency"] == 16 and isinstance(merged["concurrency"], int)
    assert merged["latency_ms"] == {"p99": 200.0}  # the None is left out
    assert merged["mode"] == "closed" and merged["ok"] is True  # non-numbers: the first record's
    assert merged["repeats"] == 3
    assert median_or_none([None, 3.0, 1.0]) == 2.0 and median_or_none([None]) is None
