"""Prometheus metrics of one service instance (its own registry, so apps do not collide).

    decodet_requests_total{endpoint, status}      counter: answered requests by HTTP status
    decodet_request_latency_seconds{endpoint}      histogram: time to answer /v1/detect
    decodet_batch_size                             histogram: images per forward pass
    decodet_queue_depth                            gauge: admitted, unanswered detect requests
    decodet_inference_seconds                      histogram: forward-pass time

Label values come from fixed sets (endpoint paths of the app, HTTP status codes), so the
number of series, and the memory they take, does not grow with traffic.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    """The service's metrics; :meth:`render` gives the Prometheus text exposition."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "decodet_requests",
            "Answered requests by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "decodet_request_latency_seconds",
            "Time to answer a request",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, max_batch} - {s for s in (16, 32, 64) if s > max_batch})
        self.batch_size = Histogram(
            "decodet_batch_size",
            "Images per forward pass",
            buckets=[float(s) for s in sizes],
            registry=self.registry,
        )
        self.inference = Histogram(
            "decodet_inference_seconds", "Forward-pass time", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.queue_depth = Gauge("decodet_queue_depth", "Admitted, unanswered detect requests", registry=self.registry)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
