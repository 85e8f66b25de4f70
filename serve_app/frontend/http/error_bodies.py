"""Domain errors as HTTP answers: one status per error for every protocol, KServe's and
OpenAI's error bodies, and the route class that renders a route's errors (domain, validation
or unexpected) in its protocol's shape and counts them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from serve_app.errors import (
    DeadlineExceeded,
    EmptyInput,
    InferenceFailed,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    ServeAppError,
    Unauthorized,
    WrongTask,
    lookup,
)
from serve_app.frontend.http.bodies import describe_validation, json_response
from serve_app.frontend.http.route import context_of, protocol_of

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
Renderer = Callable[[ServeAppError], Response]


def http_status(err: ServeAppError) -> int:
    return lookup(HTTP_STATUS, err, 500)


def error_headers(status: int) -> dict[str, str] | None:
    """Headers every protocol's error response carries for ``status``."""
    if status in (429, 503, 504):
        return {"Retry-After": "1"}
    if status == 401:
        return {"WWW-Authenticate": "Bearer"}
    return None


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


#: text-embeddings-inference's ``error_type`` and status per domain error, where they differ
#: from :data:`HTTP_STATUS` (anything else: Validation at its own status)
TEI_ERRORS: dict[type[ServeAppError], tuple[str, int]] = {
    EmptyInput: ("Empty", 400),
    InvalidInput: ("Validation", 422),
    WrongTask: ("Backend", 424),
    InferenceFailed: ("Backend", 424),
    Overloaded: ("Overloaded", 429),
    DeadlineExceeded: ("Overloaded", 504),
    ModelNotReady: ("Unhealthy", 503),
}


def tei_error(err: ServeAppError) -> Response:
    """text-embeddings-inference's error body, ``{"error": str, "error_type": str}``, at TEI's
    status: 422 for invalid input, 400 for empty input, 424 when the model cannot do the task
    (or fails), 429 overloaded, 503 not ready; ours for the errors TEI has no name for (401,
    404, 413, and 504 past the request's own deadline)."""
    etype, status = lookup(TEI_ERRORS, err, ("Validation", http_status(err)))
    body = {"error": err.message, "error_type": etype}
    return json_response(body, status_code=status, headers=error_headers(status))


Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def guarded(render: Renderer, handler: Handler) -> Handler:
    """``handler`` with its errors, domain or validation or unexpected, rendered by ``render``
    and counted.

    Unexpected exceptions are logged and shown as a generic InferenceFailed (500): every 500 is a
    bug to find in the logs, never a user mistake.
    """

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
            protocol_of(request.url.path), err.kind, err.variants)
        return render(err)

    return handle


class ProtocolRoute(APIRoute):
    """A route of one protocol: its errors in that protocol's shape (``render``)."""

    render: Renderer

    def get_route_handler(self) -> Handler:
        return guarded(type(self).render, super().get_route_handler())


def error_route_class(render: Renderer) -> type[ProtocolRoute]:
    """A route class whose errors, domain or validation or unexpected, are rendered by
    ``render`` (:func:`guarded`)."""
    return type("ProtocolRoute", (ProtocolRoute,), {"render": staticmethod(render)})
