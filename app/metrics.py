"""Prometheus metrics of one app instance (its own registry, so tests can build many apps).

Names follow Prometheus conventions (``_total`` counters, ``_seconds`` durations). ``endpoint`` is
the route template (``/v1/models/{name}/predict``), never the raw path, and ``model`` is only ever a
served model's name, so label sets stay bounded whatever clients send.

With ``VISION_WORKERS`` > 1 the workers write their values to files in a shared folder
(prometheus-client's multiprocess mode: the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` for
them), and ``/metrics``, whichever worker answers, reports the whole pool: counters and histograms
summed over the workers (those of a worker that died included), the queue depth summed over the
live ones, a model ready only when every live worker has it warm.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

#: Latency buckets (seconds) for whole requests and for single forward passes.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: Buckets (seconds) for the steps of a request (a header probe takes microseconds, a batch seconds).
_STAGE_BUCKETS = (0.0005, 0.001, 0.0025, *_LATENCY_BUCKETS)


class Metrics:
    """The service's metrics, registered in a fresh :class:`CollectorRegistry`; ``pool``: the
    workers' shared folder of multiprocess values (None: this process alone)."""

    def __init__(self, pool: Path | None = None) -> None:
        self.pool = pool
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vision_requests_total", "HTTP requests answered", ["endpoint", "model", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "vision_request_duration_seconds",
            "HTTP request latency, from the first byte received to the last byte sent",
            ["endpoint", "model", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.images_per_request = Histogram(
            "vision_images_per_request",
            "images in one predict request",
            ["model"],
            buckets=_COUNT_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "vision_inference_seconds",
            "time of one batched forward pass, postprocessing included",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "vision_stage_seconds",
            "time of one step on the way through a model: decode (one request's images made ready "
            "for a batch, waiting for a decode thread included), stack (one batch's inputs onto the "
            "model's device), run (one batch's forward pass and post-processing, outputs on the host)",
            ["model", "stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "vision_batch_size", "images in one forward pass", ["model"], buckets=_COUNT_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "vision_queue_depth_images",
            "images waiting for a batch",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_wait_seconds = Histogram(
            "vision_queue_wait_seconds",
            "time an image waited before its forward pass started",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rejects = Counter(
            "vision_rejects_total", "requests refused, by error code", ["reason"], registry=r
        )
        self.model_load_seconds = Gauge(
            "vision_model_load_seconds",
            "time to load a model's checkpoint",
            ["model"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_warmup_seconds = Gauge(
            "vision_model_warmup_seconds",
            "time of a model's warm-up forwards",
            ["model"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_ready = Gauge(
            "vision_model_ready",
            "1 once the model is warmed up",
            ["model"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.device_memory = Gauge(
            "vision_device_memory_bytes",
            "this worker's GPU memory, from PyTorch's caching allocator (kind: allocated, reserved, "
            "peak_reserved), after its last batch; the CUDA context is not counted",
            ["device", "kind"],
            registry=r,
            multiprocess_mode="liveall",  # one series per live worker (a pid label): memory per worker
        )
        self.reloads = Counter(
            "vision_reloads_total",
            "models-file reloads, by outcome (applied, unchanged, failed, rejected)",
            ["outcome"],
            registry=r,
        )

    def record_device_memory(self, device: str, readings: Mapping[str, int] | None) -> None:
        """Set ``vision_device_memory_bytes`` for ``device`` from ``readings``
        (:func:`models.device_memory`; None off CUDA, which leaves the metric without series)."""
        for kind, value in (readings or {}).items():
            self.device_memory.labels(device, kind).set(value)

    def forget_model(self, name: str) -> None:
        """A model that is no longer served (a reload removed it)."""
        if self.pool is None:
            self.model_ready.remove(name)
        else:  # multiprocess files keep every series: it stays, as not ready
            self.model_ready.labels(name).set(0)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (of the whole pool of workers)."""
        if self.pool is None:
            return generate_latest(self.registry)
        pool = CollectorRegistry()
        MultiProcessCollector(pool, path=str(self.pool))  # type: ignore[no-untyped-call]  # prometheus-client leaves it unannotated
        return generate_latest(pool)
