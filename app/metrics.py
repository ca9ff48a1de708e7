"""Prometheus metrics of one app instance (its own registry, so tests can build many apps).

Names follow Prometheus conventions (``_total`` counters, ``_seconds`` durations). ``endpoint`` is
the route template (``/v1/models/{name}/predict``), never the raw path, and ``model`` is only ever a
served model's name, so label sets stay bounded whatever clients send.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: Latency buckets (seconds) for whole requests and for single forward passes.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The service's metrics, registered in a fresh :class:`CollectorRegistry`."""

    def __init__(self) -> None:
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
        self.batch_size = Histogram(
            "vision_batch_size", "images in one forward pass", ["model"], buckets=_COUNT_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "vision_queue_depth_images", "images waiting for a batch", ["model"], registry=r
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
            "vision_model_load_seconds", "time to load a model's checkpoint", ["model"], registry=r
        )
        self.model_warmup_seconds = Gauge(
            "vision_model_warmup_seconds", "time of a model's warm-up forwards", ["model"], registry=r
        )
        self.model_ready = Gauge("vision_model_ready", "1 once the model is warmed up", ["model"], registry=r)
        self.reloads = Counter(
            "vision_reloads_total",
            "models-file reloads, by outcome (applied, unchanged, failed, rejected)",
            ["outcome"],
            registry=r,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
