"""Prometheus metrics, served by each ingress replica at ``GET /metrics``.

Everything is counted at the ingress, including what the model replicas measured: each answer
brings back its tokenize, queue and inference times and truncations, and the forward passes the
replica finished since its previous answer (each pass is reported exactly once). So one scrape
of every ingress replica sees every model replica's batches, with no second scrape target.
Ray Serve's own metrics (replica health, its queues) stay on Ray's metrics export port.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from serve_app.types import Measured, VariantReport

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                    10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class Metrics:
    """One registry per app, so several apps in one process never collide. Every series carries
    ``replica``, the ingress replica that counted it, so the series of several ingress replicas
    behind one scraped address never mix."""

    def __init__(self, replica: str = "") -> None:
        self.replica = replica
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "serve_app_requests", "Requests by protocol (openai, kserve_v1, v2, v2_grpc), route "
            "(HTTP path template or gRPC method) and status.",
            ["replica", "protocol", "route", "method", "status"], registry=r,
        )
        self.latency = Histogram(
            "serve_app_request_seconds", "Request latency at the ingress, by protocol and route.",
            ["replica", "protocol", "route"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.errors = Counter(
            "serve_app_errors", "Failed requests by protocol and kind (InvalidInput, "
            "ModelNotFound, Overloaded, DeadlineExceeded, ModelNotReady, ...).",
            ["replica", "protocol", "kind"], registry=r,
        )
        self.inputs = Counter(
            "serve_app_embedded_inputs", "Inputs embedded, by model and protocol.",
            ["replica", "model", "protocol"], registry=r,
        )
        self.tokens = Counter(
            "serve_app_embedded_tokens", "Tokens embedded (after truncation), by model and "
            "protocol.", ["replica", "model", "protocol"], registry=r,
        )
        self.truncated = Counter(
            "serve_app_truncated_inputs", "Texts cut at the model's token limit.",
            ["replica", "model"], registry=r,
        )
        self.stage = Histogram(
            "serve_app_stage_seconds", "Time per request in each stage: tokenize, queue (waiting "
            "for a forward pass), inference (forward passes), encode (response encoding).",
            ["replica", "model", "stage"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_inputs = Histogram(
            "serve_app_batch_inputs", "Inputs per forward pass.", ["replica", "model"],
            buckets=_BATCH_BUCKETS, registry=r,
        )
        self.batch_tokens = Histogram(
            "serve_app_batch_tokens", "Tokens per forward pass.", ["replica", "model"],
            buckets=_TOKEN_BUCKETS, registry=r,
        )
        self.queued = Gauge(
            "serve_app_queued_inputs", "Inputs this ingress has in flight to each model "
            "(admitted, not yet answered).", ["replica", "model"], registry=r,
        )
        self.priority_wait = Histogram(
            "serve_app_priority_queue_seconds", "Time a request waited for forward passes in "
            "the model replica's queue, by priority level (1 the highest).",
            ["replica", "model", "priority"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.priority_queued = Gauge(
            "serve_app_priority_inputs", "Inputs this ingress has in flight to each model, by "
            "priority level.", ["replica", "model", "priority"], registry=r,
        )
        self.variant_loads = Counter(
            "serve_app_variant_loads", "Variant loads by the model replicas, by variant and "
            "outcome (loaded, failed).", ["replica", "model", "outcome"], registry=r,
        )
        self.variant_load_seconds = Histogram(
            "serve_app_variant_load_seconds", "Time a model replica took to load a variant "
            "(read its checkpoint, check it against its base).", ["replica", "model"],
            buckets=_LOAD_BUCKETS, registry=r,
        )
        self.variant_evictions = Counter(
            "serve_app_variant_evictions", "Variants a model replica unloaded to make room "
            "(least recently used first).", ["replica", "model"], registry=r,
        )
        self.variants_resident = Gauge(
            "serve_app_variants_resident", "Variants each model replica holds, as of its latest "
            "answer, by base model and model replica.", ["replica", "model", "model_replica"],
            registry=r,
        )
        self.fidelity = Gauge(
            "serve_app_engine_fidelity", "Agreement of each model's engine with float32 torch, "
            "measured at warm-up on the calibration corpus (cosine of embeddings; 1 is equal), "
            "by statistic (min, mean) over the corpus.",
            ["replica", "model", "version", "backend", "precision", "stat"], registry=r,
        )
        # each metric's children by labels: found once, not per request (prometheus_client's
        # labels() checks and hashes its arguments on every call)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._engines: Callable[[], Mapping[tuple[str, str], Mapping[str, Any]]] = dict
        self._queue_depth: Callable[[], Mapping[str, int]] = dict
        self._priority_depth: Callable[[], Mapping[tuple[str, int], int]] = dict

    def _of(self, metric: Any, *labels: str) -> Any:
        """``metric``'s child of this replica and ``labels``."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self.replica, *labels)
        return child

    def observe_request(self, protocol: str, route: str, method: str, status: int | str,
                        seconds: float) -> None:
        self._of(self.requests, protocol, route, method, str(status)).inc()
        self._of(self.latency, protocol, route).observe(seconds)

    def observe_error(self, protocol: str, kind: str, variants: VariantReport | None = None
                      ) -> None:
        self._of(self.errors, protocol, kind).inc()
        if variants is not None:
            self.observe_variants(variants)

    def observe_embedding(self, model: str, protocol: str, result: Measured,
                          priority: int = 1) -> None:
        self._of(self.inputs, model, protocol).inc(len(result.token_counts))
        self._of(self.tokens, model, protocol).inc(result.prompt_tokens)
        if result.truncated:
            self._of(self.truncated, model).inc(result.truncated)
        self._of(self.stage, model, "tokenize").observe(result.tokenize_s)
        self._of(self.stage, model, "queue").observe(result.queue_s)
        self._of(self.priority_wait, model, str(priority)).observe(result.queue_s)
        self._of(self.stage, model, "inference").observe(result.inference_s)
        for inputs, tokens in result.passes:
            self._of(self.batch_inputs, model).observe(inputs)
            self._of(self.batch_tokens, model).observe(tokens)
        if result.variants is not None:
            self.observe_variants(result.variants)

    def observe_variants(self, report: VariantReport) -> None:
        for name, seconds, ok in report.loads:
            self._of(self.variant_loads, name, "loaded" if ok else "failed").inc()
            self._of(self.variant_load_seconds, name).observe(seconds)
        for name in report.evictions:
            self._of(self.variant_evictions, name).inc()
        self._of(self.variants_resident, report.base, report.replica).set(
            len(report.resident))

    def observe_encode(self, model: str, seconds: float) -> None:
        self._of(self.stage, model, "encode").observe(seconds)

    def watch_queue(self, depth: Callable[[], Mapping[str, int]],
                    by_priority: Callable[[], Mapping[tuple[str, int], int]] = dict) -> None:
        """Read the queue depth per model from ``depth``, and per (model, priority level) from
        ``by_priority``, at every scrape."""
        self._queue_depth = depth
        self._priority_depth = by_priority

    def watch_engines(self, engines: Callable[[], Mapping[tuple[str, str], Mapping[str, Any]]]
                      ) -> None:
        """Read each model's engine and fidelity (by name and version) from ``engines`` at
        every scrape."""
        self._engines = engines

    def render(self) -> bytes:
        for model, n in self._queue_depth().items():
            self._of(self.queued, model).set(n)
        for (model, priority), n in self._priority_depth().items():
            self._of(self.priority_queued, model, str(priority)).set(n)
        for (model, version), engine in self._engines().items():
            measured = engine.get("fidelity")
            if measured:
                for stat in ("min", "mean"):
                    self._of(self.fidelity, model, version, engine["backend"],
                                         engine["precision"], stat).set(measured[stat])
        return generate_latest(self.registry)
