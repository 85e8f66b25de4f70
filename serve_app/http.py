"""The HTTP application: every protocol's routes on one FastAPI app over one :class:`Router`."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import __version__
from serve_app.auth import OPEN_PATHS
from serve_app.config import CorsOptions
from serve_app.errors import InvalidInput, ModelNotFound, ServeAppError, Unauthorized
from serve_app.metrics import CONTENT_TYPE, protocol_of
from serve_app.protocols import kserve_v1, openai, v2
from serve_app.protocols.common import json_response
from serve_app.router import Router


def _render_for_path(path: str, err: ServeAppError) -> Response:
    """Errors raised outside any route (unknown path, wrong method) in the shape the path's
    protocol uses."""
    if path.startswith("/openai/") or path.startswith("/v1/embeddings"):
        return openai.render_error(err)
    return kserve_v1.render_error(err)


access_log = logging.getLogger("serve_app.access")
access_log.setLevel(logging.WARNING)  # per-request lines only when enable_access_log() is called


def enable_access_log() -> None:
    """Send the access log's JSON lines to stderr (in a replica: its log file and the driver)."""
    if not access_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False


def _access_record(request: Request, protocol: str, route: str, status: int, seconds: float,
                   rid: str) -> str:
    """One JSON line per request: ids, route, status, timings. Never a request's text."""
    record = {
        "request_id": rid,
        "protocol": protocol,
        "method": request.method,
        "route": route,
        "model": request.path_params.get("name") or getattr(request.state, "model", None),
        "status": status,
        "ms": round(seconds * 1000, 3),
    }
    timings = getattr(request.state, "timings", None)
    if timings:
        record["tokens"] = int(timings["x-compute-tokens"])
        for key in ("tokenization", "queue", "inference"):
            record[f"{key}_ms"] = float(timings[f"x-{key}-time"])
    return orjson.dumps(record).decode()


def create_http_app(router: Router, cors: CorsOptions | None = None,
                    echo_request_id: bool = True) -> FastAPI:
    """The FastAPI app over ``router``. ``echo_request_id``: set ``X-Request-Id`` on responses
    (off behind Ray Serve's proxy, which already puts the caller's id, or a new one, on the
    request and echoes it on the response)."""
    app = FastAPI(
        title="serve_app",
        version=__version__,
        description="Text embeddings over KServe V1, Open Inference (V2) and OpenAI APIs.",
    )
    app.state.router = router

    @app.get("/", tags=["health"])
    async def root() -> Response:
        return json_response({"status": "alive"})

    @app.get("/metrics", tags=["health"])
    async def metrics() -> Response:
        return Response(router.metrics.render(), media_type=CONTENT_TYPE)

    @app.middleware("http")
    async def observe(request: Request, call_next: Any) -> Response:
        """Request id (the caller's ``X-Request-Id`` or a new one, echoed), API key check,
        metrics and one access-log line per request."""
        t0 = request.state.started = time.perf_counter()
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = rid
        protocol = protocol_of(request.url.path)
        response: Response
        try:
            if router.api_keys.enabled and request.url.path not in OPEN_PATHS:
                router.api_keys.check(request.headers.get("authorization"))
        except Unauthorized as e:
            router.metrics.observe_error(protocol, type(e).__name__)
            response = _render_for_path(request.url.path, e)
        else:
            response = await call_next(request)
        seconds = time.perf_counter() - t0
        if echo_request_id:
            response.headers["x-request-id"] = rid
        route = getattr(request.scope.get("route"), "path", "unmatched")
        router.metrics.observe_request(protocol, route, request.method, response.status_code,
                                       seconds)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(_access_record(request, protocol, route, response.status_code,
                                           seconds, rid))
        return response

    if cors is not None and cors.enabled:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors.allow_origins,
            allow_methods=cors.allow_methods,
            allow_headers=cors.allow_headers,
            allow_credentials=cors.allow_credentials,
            max_age=cors.max_age,
            expose_headers=["x-request-id"],
        )

    app.include_router(openai.router)
    app.include_router(kserve_v1.router)
    app.include_router(v2.router)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        err: ServeAppError
        if exc.status_code == 404:
            err = ModelNotFound(f"no route for {request.method} {request.url.path}")
        else:
            err = InvalidInput(str(exc.detail))
        router.metrics.observe_error(protocol_of(request.url.path), type(err).__name__)
        response = _render_for_path(request.url.path, err)
        response.status_code = exc.status_code
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    return app
