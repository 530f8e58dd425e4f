"""Prometheus metrics of one server: requests by route and status, latency, batches, queue, truncations.

Each app gets its own registry (tests run several apps in one process). Labelled children are cached,
so recording a request costs a dictionary lookup and two atomic adds.
"""

from __future__ import annotations

import threading

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

_LATENCY_BUCKETS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "embedkit_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "embedkit_request_duration_seconds",
            "time from request start to response, by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inputs = Counter("embedkit_inputs", "texts embedded", registry=r)
        self.truncated = Counter(
            "embedkit_truncated_inputs", "inputs cut to the model's max length", registry=r
        )
        self.batch_texts = Histogram(
            "embedkit_batch_size", "texts per inference batch", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_tokens = Counter("embedkit_batch_tokens", "tokens run through the model", registry=r)
        self.queue_tokens = Gauge("embedkit_queue_tokens", "tokens queued or running", registry=r)
        self.ready = Gauge("embedkit_ready", "1 when the model is loaded and the worker alive", registry=r)
        self._children: dict[tuple[str, int], tuple] = {}
        self._lock = threading.Lock()
        self.answered = 0  # plain count for the shutdown summary

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        pair = self._children.get(key)
        if pair is None:
            with self._lock:
                pair = (self.requests.labels(route, str(status)), self.latency.labels(route))
                self._children[key] = pair
        pair[0].inc()
        pair[1].observe(seconds)
        self.answered += 1

    def on_batch(self, texts: int, tokens: int) -> None:
        self.batch_texts.observe(texts)
        self.batch_tokens.inc(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
