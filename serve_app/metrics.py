"""Prometheus metrics of one ingress process, served at ``GET /metrics``.

Counts are per ingress replica (one by default); Ray Serve's own metrics (replica queues, batch
sizes) stay on Ray's metrics export port.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def protocol_of(path: str) -> str:
    if path.startswith("/v2"):
        return "v2"
    if path.startswith("/openai/") or path.startswith("/v1/embeddings"):
        return "openai"
    if path.startswith("/v1/"):
        return "kserve_v1"
    return "other"


class Metrics:
    """One registry per app, so several apps in one process never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "serve_app_requests", "HTTP requests by protocol, route and status.",
            ["protocol", "route", "method", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "serve_app_request_seconds", "HTTP request latency at the ingress.",
            ["protocol", "route"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.inputs = Counter(
            "serve_app_embedded_inputs", "Inputs embedded, by model.", ["model"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "serve_app_embedded_tokens", "Tokens embedded after truncation, by model.", ["model"],
            registry=self.registry,
        )

    def observe_request(self, path: str, route: str, method: str, status: int,
                        seconds: float) -> None:
        protocol = protocol_of(path)
        self.requests.labels(protocol, route, method, str(status)).inc()
        self.latency.labels(protocol, route).observe(seconds)

    def observe_embedding(self, model: str, inputs: int, tokens: int) -> None:
        self.inputs.labels(model).inc(inputs)
        self.tokens.labels(model).inc(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
