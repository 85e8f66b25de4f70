"""A route's side of the request pipeline (:mod:`serve_app.frontend.pipeline`): the
:class:`Call` an HTTP request makes (id, deadline and priority from its headers, the protocol
from its path), its body (size limit, gzip/deflate), and its answer with the timing headers;
the app's shared state and the model card both model lists show."""

from __future__ import annotations

import gzip
import time
import zlib
from collections.abc import Callable
from typing import Any

from fastapi import Request, Response

from serve_app.errors import InvalidInput, PayloadTooLarge
from serve_app.frontend.context import ServerContext
from serve_app.frontend.dataplane import DataPlane
from serve_app.frontend.pipeline import Call
from serve_app.types import DEFAULT_PRIORITY, Measured

#: Request headers that set a deadline, in seconds: our own, then the one the OpenAI SDK sends
#: with its client timeout (past it the client has gone anyway).
TIMEOUT_HEADERS = ("x-request-timeout", "x-stainless-timeout")
OWNED_BY = "serve_app"


#: text-embeddings-inference's paths (``/`` among them: TEI answers ``POST /``)
TEI_PATHS = frozenset({"/", "/embed", "/embed_all", "/embed_sparse", "/predict", "/rerank",
                       "/similarity", "/tokenize", "/decode", "/info", "/health", "/ping",
                       "/invocations"})


def protocol_of(path: str) -> str:
    """The protocol an HTTP path belongs to (the metrics label, the error body's shape)."""
    if path.startswith("/v2"):
        return "v2"
    if path.startswith(("/openai/", "/v1/embeddings", "/v1/rerank", "/v1/classify",
                        "/classify")):
        return "openai"
    if path in TEI_PATHS:
        return "tei"
    if path.startswith("/v1/"):
        return "kserve_v1"
    return "other"


def model_card(name: str, created: int) -> dict[str, Any]:
    """An OpenAI model object; KServe V1's model list carries the same fields."""
    return {"id": name, "object": "model", "created": created, "owned_by": OWNED_BY}


def dataplane_of(request: Request) -> DataPlane:
    return request.app.state.dataplane


def context_of(request: Request) -> ServerContext:
    return request.app.state.context


async def read_body(request: Request) -> bytes:
    """The request body, decompressed when it says ``Content-Encoding: gzip`` or ``deflate``;
    :class:`PayloadTooLarge` past ``limits.max_body_bytes``, before or after decompression."""
    limit = context_of(request).max_body_bytes
    too_large = PayloadTooLarge(
        f"request body exceeds {limit} bytes (max_body_bytes); send fewer or shorter inputs"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding in ("", "identity"):
        return body
    try:
        if encoding == "gzip":
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            d = zlib.decompressobj()
        else:
            raise InvalidInput(f"unsupported Content-Encoding {encoding!r}; use gzip or deflate")
        out = d.decompress(body, limit)
        if d.unconsumed_tail:
            raise too_large
        return out
    except (zlib.error, gzip.BadGzipFile) as e:
        raise InvalidInput(f"body is not valid {encoding} data: {e}") from e


def timeout_of(request: Request) -> float | None:
    """The request's own timeout in seconds, from :data:`TIMEOUT_HEADERS`; None without one."""
    for name in TIMEOUT_HEADERS:
        value = request.headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value)
        except ValueError:
            raise InvalidInput(f"header {name} must be a number of seconds, got {value!r}") \
                from None
        if not 0 < seconds < 1e6:
            raise InvalidInput(f"header {name} must be > 0 seconds, got {value!r}")
        return seconds
    return None


def call_of(request: Request) -> Call:
    """The request's :class:`Call` through the pipeline: its id (the caller's ``X-Request-Id``,
    or the one the HTTP app made), the deadline its headers set (:data:`TIMEOUT_HEADERS`) and
    its ``X-Priority`` header, under the protocol its path belongs to."""
    rid = str(getattr(request.state, "request_id", "")) or request.headers.get(
        "x-request-id", "")
    return Call(dataplane_of(request), context_of(request).metrics, protocol_of(request.url.path),
                request_id=rid, timeout_s=timeout_of(request),
                priority_text=request.headers.get("x-priority"), priority_where="header X-Priority",
                started=getattr(request.state, "started", time.perf_counter()))


def respond(request: Request, call: Call, model: str, result: Measured,
            render: Callable[[], Response], priority: int = DEFAULT_PRIORITY) -> Response:
    """``render()`` the answer through :meth:`Call.answer` (counted, timed) and add
    text-embeddings-inference's timing headers; the access log gets the same figures."""
    response = call.answer(model, result, render, priority)
    assert call.timings is not None
    response.headers.update(call.timings)
    request.state.timings = call.timings
    request.state.model = model
    return response
