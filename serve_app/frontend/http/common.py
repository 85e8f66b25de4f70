"""What the HTTP protocol adapters share: body reading, JSON encoding, input checks, KServe's
error body and model card, the protocol a path belongs to, and the route class that turns domain
errors into each protocol's own error response. No adapter imports another; they import this."""

from __future__ import annotations

import gzip
import logging
import time
import zlib
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import orjson
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from serve_app.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    ServeAppError,
    Unauthorized,
    lookup,
)
from serve_app.frontend.context import ServerContext
from serve_app.frontend.dataplane import DataPlane
from serve_app.frontend.pipeline import Call
from serve_app.types import DEFAULT_LEVEL, Measured

log = logging.getLogger(__name__)

#: One HTTP status per domain error, shared by every HTTP protocol (bodies differ).
HTTP_STATUS: dict[type[ServeAppError], int] = {
    InvalidInput: 400,
    Unauthorized: 401,
    ModelNotFound: 404,
    PayloadTooLarge: 413,
    Overloaded: 429,
    InferenceFailed: 500,
    ModelNotReady: 503,
    DeadlineExceeded: 504,
}
#: Request headers that set a deadline, in seconds: our own, then the one the OpenAI SDK sends
#: with its client timeout (past it the client has gone anyway).
TIMEOUT_HEADERS = ("x-request-timeout", "x-stainless-timeout")

M = TypeVar("M", bound=BaseModel)


OWNED_BY = "serve_app"


def protocol_of(path: str) -> str:
    """The protocol an HTTP path belongs to (the metrics label, the error body's shape)."""
    if path.startswith("/v2"):
        return "v2"
    if path.startswith(("/openai/", "/v1/embeddings", "/v1/rerank")):
        return "openai"
    if path.startswith("/rerank"):
        return "tei"
    if path.startswith("/v1/"):
        return "kserve_v1"
    return "other"


def http_status(err: ServeAppError) -> int:
    return lookup(HTTP_STATUS, err, 500)


def error_headers(status: int) -> dict[str, str] | None:
    """Headers every protocol's error response carries for ``status``."""
    if status in (429, 503, 504):
        return {"Retry-After": "1"}
    if status == 401:
        return {"WWW-Authenticate": "Bearer"}
    return None


def json_response(
    content: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """Encode with orjson straight from numpy (no per-float Python objects)."""
    return Response(
        orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )


def kserve_error(err: ServeAppError) -> Response:
    """KServe V1's and Open Inference REST's error body: ``{"error": "<message>"}``."""
    status = http_status(err)
    return json_response({"error": err.message}, status_code=status, headers=error_headers(status))


def openai_error(err: ServeAppError) -> Response:
    """OpenAI's error body, ``{"error": {"message", "type", "param", "code"}}``, with the HTTP
    status of the error (the embeddings and the Cohere-shaped rerank routes)."""
    status = http_status(err)
    if isinstance(err, ModelNotFound):
        etype, code = "invalid_request_error", "model_not_found"
    elif isinstance(err, Unauthorized):
        etype, code = "invalid_request_error", "invalid_api_key"
    elif status < 500:
        etype, code = "invalid_request_error", None
    else:
        etype, code = "server_error", None
    body = {"error": {"message": err.message, "type": etype, "param": err.param, "code": code}}
    return json_response(body, status_code=status, headers=error_headers(status))


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


def parse_json(data: bytes) -> Any:
    if not data:
        raise InvalidInput("request body is empty; expected a JSON object")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"request body is not valid JSON: {e}") from e


def validate(model: type[M], data: Any) -> M:
    """``model.model_validate(data)`` with pydantic's errors as one readable InvalidInput."""
    if not isinstance(data, dict):
        raise InvalidInput(f"request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise InvalidInput(describe_validation(e.errors()), param=_first_param(e.errors())) from e


def describe_validation(errors: Any) -> str:
    parts = []
    for err in list(errors)[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def _first_param(errors: Any) -> str | None:
    for err in errors:
        loc = [p for p in err.get("loc", ()) if p != "body"]
        if loc:
            return str(loc[0])
    return None


def check_texts(items: Any, field: str, allow_empty: bool = False) -> tuple[str, ...]:
    """A non-empty list of strings (non-empty ones unless ``allow_empty``), as a tuple. Names
    ``field`` in every message."""
    if not isinstance(items, list):
        raise InvalidInput(f"'{field}' must be a list of strings", param=field)
    if not items:
        raise InvalidInput(f"'{field}' must not be empty", param=field)
    for i, x in enumerate(items):
        if not isinstance(x, str):
            raise InvalidInput(
                f"'{field}[{i}]' must be a string, got {type(x).__name__}", param=field
            )
        if not x and not allow_empty:
            raise InvalidInput(f"'{field}[{i}]' is an empty string", param=field)
    return tuple(items)


def respond(request: Request, call: Call, model: str, result: Measured,
            render: Callable[[], Response], level: int = DEFAULT_LEVEL) -> Response:
    """``render()`` the answer through :meth:`Call.answer` (counted, timed) and add
    text-embeddings-inference's timing headers; the access log gets the same figures."""
    response = call.answer(model, result, render, level)
    assert call.timings is not None
    response.headers.update(call.timings)
    request.state.timings = call.timings
    request.state.model = model
    return response


Renderer = Callable[[ServeAppError], Response]


def error_route_class(render: Renderer) -> type[APIRoute]:
    """An APIRoute whose errors, domain or validation or unexpected, are rendered by ``render``.

    Unexpected exceptions are logged and shown as a generic InferenceFailed (500): every 500 is a
    bug to find in the logs, never a user mistake.
    """

    class ProtocolRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def handle(request: Request) -> Response:
                err: ServeAppError
                try:
                    return await handler(request)
                except ServeAppError as e:
                    err = e
                except RequestValidationError as e:
                    err = InvalidInput(describe_validation(e.errors()))
                except Exception:
                    log.exception("unexpected error on %s %s", request.method, request.url.path)
                    err = InferenceFailed("internal server error")
                context_of(request).metrics.observe_error(
                    protocol_of(request.url.path), type(err).__name__, err.variants)
                return render(err)

            return handle

    return ProtocolRoute
