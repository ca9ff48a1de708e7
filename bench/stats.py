"""Percentiles and summaries of latency samples, in plain Python (no numpy on the client side)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence

#: Percentiles every latency summary reports.
PERCENTILES: tuple[int, ...] = (50, 95, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 <= q <= 100) of ``values`` by linear interpolation between the two
    nearest ranks, the definition numpy's ``percentile(method="linear")`` uses.

    Raises ValueError for an empty sequence or q outside [0, 100].
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0  # 0-based fractional rank
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    frac = rank - lo
    return ordered[lo] + (ordered[hi] - ordered[lo]) * frac


def latency_summary_ms(latencies_s: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99/mean/max of latencies given in seconds, returned in milliseconds.

    Every value is None when there are no samples.
    """
    keys = [f"p{q}" for q in PERCENTILES] + ["mean", "max"]
    if not latencies_s:
        return dict.fromkeys(keys)
    out: dict[str, float | None] = {
        f"p{q}": round(percentile(latencies_s, q) * 1000.0, 3) for q in PERCENTILES
    }
    out["mean"] = round(statistics.fmean(latencies_s) * 1000.0, 3)
    out["max"] = round(max(latencies_s) * 1000.0, 3)
    return out


def median_or_none(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not None; None when none are."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def median_records(records: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """Field-by-field median of repeated measurements of one configuration.

    Numeric fields (int/float, not bool) become the median of the repeats that have them; nested
    mappings are merged the same way, recursively; any other field keeps the first record's value.
    ``repeats`` records how many measurements went in.
    """
    if not records:
        raise ValueError("median of no records")
    out = _median_fields(records)
    out["repeats"] = len(records)
    return out


def _median_fields(records: Sequence[Mapping[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key in records[0]:
        values = [r.get(key) for r in records]
        first = next((v for v in values if v is not None), None)
        if isinstance(first, bool) or not isinstance(first, int | float | Mapping):
            out[key] = first
        elif isinstance(first, Mapping):
            out[key] = _median_fields([v for v in values if isinstance(v, Mapping)])
        else:
            numbers = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
            med = statistics.median(numbers)
            out[key] = int(med) if isinstance(first, int) and med == int(med) else med
    return out
