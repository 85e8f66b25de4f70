"""The one request pipeline every protocol runs, HTTP routes and gRPC methods alike.

A protocol module makes a :class:`Call` from its transport (the request id, the timeout and
priority its headers or metadata give), translates its body into an internal request with the
call's ``request_id``, :meth:`Call.deadline` and :meth:`Call.priority`, runs it with
:meth:`Call.run` (model lookup, checks and the model call, in the data plane) and renders the
answer through :meth:`Call.answer`, which counts it and times it. Errors are the domain errors
of :mod:`serve_app.errors`; each protocol maps them to its wire form once. Adding a protocol is
one module of translation: its wire types in, its wire types out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from serve_app.errors import wrong_task
from serve_app.frontend.dataplane import DataPlane
from serve_app.frontend.metrics import Metrics
from serve_app.frontend.registry import ServedModel
from serve_app.types import (
    DEFAULT_PRIORITY,
    AnyEmbedResult,
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    EmbedResult,
    Measured,
    RerankRequest,
    RerankResult,
    deadline,
    priority,
)

T = TypeVar("T")
#: the header (and V2 response parameter, as ``truncated_inputs``) that counts the texts an
#: answer cut at the model's token limit; absent when it cut none
TRUNCATED_HEADER = "x-truncated-inputs"
Internal = EmbedRequest | RerankRequest | ClassifyRequest


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


@dataclass
class Call:
    """One request through the frontend. ``protocol`` labels its metrics; ``timeout_s`` and
    ``priority_text`` are what the transport said (a header, gRPC metadata, named
    ``priority_where`` in errors; None when it said nothing), which a body field or V2
    parameter overrides. After :meth:`answer`, ``timings`` holds text-embeddings-inference's
    timing headers (milliseconds) and ``model`` the model that answered."""

    dataplane: DataPlane
    metrics: Metrics
    protocol: str
    request_id: str = ""
    timeout_s: float | None = None
    priority_text: str | None = None
    priority_where: str = "priority"
    started: float = field(default_factory=time.perf_counter)
    model: str | None = None
    timings: dict[str, str] | None = None
    _found: tuple[tuple[str, str | None], ServedModel] | None = None

    def deadline(self, timeout_s: float | None = None) -> float | None:
        """The wall-clock deadline: ``timeout_s`` (the body's own) when given, else the
        transport's."""
        return deadline(timeout_s if timeout_s is not None else self.timeout_s)

    def priority(self, given: Any = None, where: str = "priority") -> int:
        """The request's priority level: ``given`` (a body field or V2 parameter, named
        ``where`` in errors) when the caller set it, else the transport's, else 0 (the
        default, highest level)."""
        if given is not None:
            return priority(given, where)
        if self.priority_text is None:
            return 0
        return priority(self.priority_text, self.priority_where, text=True)

    def find(self, name: str, version: str | None = None) -> ServedModel:
        """The served model ``name`` at ``version``; found once, run by :meth:`run`."""
        if self._found is None or self._found[0] != (name, version):
            self._found = ((name, version), self.dataplane.model(name, version))
        return self._found[1]

    @overload
    async def run(self, req: EmbedRequest) -> AnyEmbedResult: ...

    @overload
    async def run(self, req: RerankRequest) -> RerankResult: ...

    @overload
    async def run(self, req: ClassifyRequest) -> ClassifyResult: ...

    async def run(self, req: Internal) -> AnyEmbedResult | RerankResult | ClassifyResult:
        """Run ``req`` on its model: its result (vectors or their codes, sparse vectors or
        every token's, a reranker's or a classifier's scores)."""
        served = self.find(req.model, req.version)
        if isinstance(req, RerankRequest):
            return await self.dataplane.rerank(req, served)
        if isinstance(req, ClassifyRequest):
            return await self.dataplane.classify(req, served)
        return await self.dataplane.embed(req, served)

    async def embed_dense(self, req: EmbedRequest) -> EmbedResult:
        """Run ``req``, which its protocol answers with dense vectors only: a model of
        another kind (sparse, multi-vector) is the protocol's :class:`WrongTask`, before any
        model work."""
        task = self.find(req.model, req.version).task
        if task != "embedding":
            raise wrong_task(req.model, task, "embedding")
        result = await self.run(req)
        assert isinstance(result, EmbedResult)
        return result

    def answer(self, model: str, result: Measured, render: Callable[[], T],
               priority: int = DEFAULT_PRIORITY) -> T:
        """Count the inputs computed (the queue wait under ``priority``), ``render()``
        the answer, timing the encoding, and keep the timings (:attr:`timings`):
        ``x-compute-tokens``, ``x-tokenization-time``, ``x-queue-time``,
        ``x-inference-time``, ``x-compute-time`` (the three together), ``x-total-time``
        (the frontend's whole handling, encoding included) and, when the model cut texts at
        its token limit, ``x-truncated-inputs`` (how many)."""
        self.metrics.observe_embedding(model, self.protocol, result, priority)
        t0 = time.perf_counter()
        out = render()
        done = time.perf_counter()
        self.metrics.observe_encode(model, done - t0)
        compute = result.tokenize_s + result.queue_s + result.inference_s
        self.model = model
        self.timings = {
            "x-compute-tokens": str(result.prompt_tokens),
            "x-tokenization-time": _ms(result.tokenize_s),
            "x-queue-time": _ms(result.queue_s),
            "x-inference-time": _ms(result.inference_s),
            "x-compute-time": _ms(compute),
            "x-total-time": _ms(done - self.started),
        }
        if result.truncated:  # an answer that cut texts says so
            self.timings[TRUNCATED_HEADER] = str(result.truncated)
        return out
