"""Where a request's time goes in our service, from its own ``/metrics`` around one load level.

The bench reads ``/metrics`` before and after each level (closed and open loop) of our service and
keeps the difference: the service's timing histograms (``vision_request_duration_seconds``,
``vision_stage_seconds``, ``vision_queue_wait_seconds``, ``vision_inference_seconds``,
``vision_batch_size``; see docs/api.md) summed over that level's requests. From their sums and
counts, :func:`level_breakdown` gives mean milliseconds per step:

- ``request_ms``: in the app, first byte received to last byte sent (answered requests, 200);
- ``decode_ms``: one request's images made ready (PIL decode and preprocessing, or JPEG headers);
- ``queue_wait_ms``: an image's wait for its batch;
- ``batch_ms``: one batch in the inference thread, split into ``stack_ms`` (inputs onto the
  device) and ``run_ms`` (forward pass and post-processing, outputs on the host);
- ``app_other_ms``: what is left of ``request_ms``: reading the body and multipart parsing,
  routing, the answer's JSON, and event-loop scheduling;
- ``busy``: the share of the level's wall time each worker's inference thread ran a batch (1.0:
  the model never waits for input; well under 1: the feed, not the model, limits);
- ``mean_batch``: images per batch.

The client's mean latency minus ``request_ms`` is the time outside the app (the client, the
socket, the server's HTTP parsing before the app sees the request). No profiler runs and no
synchronisation is added, so the figures are those of the load as measured.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

#: histogram -> the key its totals get in :func:`timing_totals` (stages get ``stage_<name>``)
_HISTOGRAMS = {
    "vision_request_duration_seconds": "request",
    "vision_stage_seconds": "stage",
    "vision_queue_wait_seconds": "queue_wait",
    "vision_inference_seconds": "batch",
    "vision_batch_size": "batch_size",
}


def timing_totals(metrics_text: str, model: str) -> dict[str, float]:
    """The sums and counts of the service's timing histograms for ``model`` in a ``/metrics``
    text: ``{key}_sum`` and ``{key}_count`` for request (status 200 only, every endpoint),
    ``stage_decode``, ``stage_stack``, ``stage_run``, queue_wait, batch and batch_size."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        key = _HISTOGRAMS.get(family.name)
        if key is None:
            continue
        for sample in family.samples:
            labels = sample.labels
            if labels.get("model") != model or not sample.name.endswith(("_sum", "_count")):
                continue
            if key == "request" and labels.get("status") != "200":
                continue
            name = f"stage_{labels.get('stage')}" if key == "stage" else key
            suffix = "sum" if sample.name.endswith("_sum") else "count"
            totals[f"{name}_{suffix}"] = totals.get(f"{name}_{suffix}", 0.0) + sample.value
    return totals


def _mean_ms(delta: Mapping[str, float], name: str) -> float | None:
    count = delta.get(f"{name}_count", 0.0)
    return round(1000.0 * delta.get(f"{name}_sum", 0.0) / count, 3) if count > 0 else None


def level_breakdown(
    before: Mapping[str, float], after: Mapping[str, float], wall_s: float, workers: int
) -> dict[str, Any] | None:
    """The level's breakdown (see the module's docstring) from :func:`timing_totals` read before
    and after it, ``wall_s`` apart, on a server of ``workers`` processes; None when no batch ran."""
    delta = {key: after[key] - before.get(key, 0.0) for key in after}
    batches = delta.get("batch_count", 0.0)
    if batches <= 0 or wall_s <= 0:
        return None
    out: dict[str, Any] = {
        "requests": int(delta.get("request_count", 0.0)),
        "batches": int(batches),
        "mean_batch": round(delta.get("batch_size_sum", 0.0) / batches, 2),
        "busy": round(delta.get("batch_sum", 0.0) / (max(1, workers) * wall_s), 3),
        "request_ms": _mean_ms(delta, "request"),
        "decode_ms": _mean_ms(delta, "stage_decode"),
        "queue_wait_ms": _mean_ms(delta, "queue_wait"),
        "batch_ms": _mean_ms(delta, "batch"),
        "stack_ms": _mean_ms(delta, "stage_stack"),
        "run_ms": _mean_ms(delta, "stage_run"),
    }
    parts = [out[key] for key in ("request_ms", "decode_ms", "queue_wait_ms", "batch_ms")]
    known = [p for p in parts if p is not None]
    out["app_other_ms"] = round(known[0] - sum(known[1:]), 3) if len(known) == len(parts) else None
    return out
