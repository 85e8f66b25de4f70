"""The HTTP application: every protocol's routes on one FastAPI app over one :class:`DataPlane`,
with the request id, API key check, metrics and access log around every request."""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from starlette._utils import get_route_path
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app import __version__
from serve_app.config.schema import CorsOptions
from serve_app.errors import InvalidInput, ModelNotFound, ServeAppError, Unauthorized
from serve_app.frontend.auth import is_open
from serve_app.frontend.context import ServerContext
from serve_app.frontend.dataplane import DataPlane
from serve_app.frontend.http import classify, kserve_v1, openai, rerank, tei, v2
from serve_app.frontend.http.bodies import json_response
from serve_app.frontend.http.error_bodies import (
    Handler,
    ProtocolRoute,
    guarded,
    kserve_error,
    openai_error,
    tei_error,
)
from serve_app.frontend.http.route import protocol_of
from serve_app.frontend.metrics import CONTENT_TYPE

_RENDERERS = {"openai": openai_error, "tei": tei_error}


def _render_for_path(path: str, err: ServeAppError) -> Response:
    """Errors raised outside any route (unknown path, wrong method) in the shape the path's
    protocol uses."""
    return _RENDERERS.get(protocol_of(path), kserve_error)(err)


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


def _access_record(scope: Scope, protocol: str, route: str, status: int, seconds: float,
                   rid: str) -> str:
    """One JSON line per request: ids, route, status, timings. Never a request's text."""
    state = scope["state"]
    record = {
        "request_id": rid,
        "protocol": protocol,
        "method": scope["method"],
        "route": route,
        "model": scope.get("path_params", {}).get("name") or state.get("model"),
        "status": status,
        "ms": round(seconds * 1000, 3),
    }
    timings = state.get("timings")
    if timings:
        record["tokens"] = int(timings["x-compute-tokens"])
        for key in ("tokenization", "queue", "inference"):
            record[f"{key}_ms"] = float(timings[f"x-{key}-time"])
    return orjson.dumps(record).decode()


#: POST routes that compute nothing (no admission bound to wait on)
UNBOUNDED = frozenset({"/tokenize", "/decode"})


class DirectRoutes:
    """The POST routes of the protocol routers, found by path without FastAPI: exact paths in
    a dict, the few with path parameters (V1's and V2's model paths) by their patterns, in the
    order FastAPI would try them. Each is called with its path parameters through its
    protocol's error handling (:func:`guarded`); its endpoint reads everything else from the
    request itself, as every route here does."""

    def __init__(self) -> None:
        self._exact: dict[str, tuple[APIRoute, Handler]] = {}
        self._patterns: list[ProtocolRoute] = []

    def add(self, routes: Iterable[Any]) -> None:
        for route in routes:
            if not (isinstance(route, ProtocolRoute) and "POST" in (route.methods or ())):
                continue
            if route.param_convertors:
                self._patterns.append(route)
            else:
                self._exact.setdefault(route.path, (route, guarded(type(route).render,
                                                                   route.endpoint)))

    def find(self, scope: Scope) -> Handler | None:
        """The handler of ``scope``'s route, its route and path parameters put in ``scope`` as
        FastAPI puts them; None: let FastAPI route it."""
        path = get_route_path(scope)
        hit = self._exact.get(path)
        if hit is not None:
            scope["route"], handle = hit
            return handle
        for route in self._patterns:
            match = route.path_regex.match(path)
            if match is None:
                continue
            params = {k: route.param_convertors[k].convert(v)
                      for k, v in match.groupdict().items()}
            scope["route"], scope["path_params"] = route, params
            return guarded(type(route).render,
                           functools.partial(_with_params, route.endpoint, params))
        return None


async def _with_params(endpoint: Callable[..., Awaitable[Response]], params: dict[str, Any],
                       request: Request) -> Response:
    return await endpoint(request=request, **params)


class Observe:
    """ASGI middleware around every HTTP request: request id (the caller's ``X-Request-Id`` or
    a new one, echoed when ``echo_request_id``), API key check, metrics and one access-log line.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs
    each request in an anyio task group with memory streams, which costs more than the app's
    own work per request.

    ``direct``: the POST routes (every protocol's inference routes), which it calls itself,
    each through its protocol's error handling: FastAPI's routing, dependency solving and inner
    middleware cost more per request than a short text's forward pass, and those routes use
    none of them (:class:`DirectRoutes`)."""

    def __init__(self, app: ASGIApp, context: ServerContext, echo_request_id: bool,
                 direct: DirectRoutes, dataplane: DataPlane) -> None:
        self.app = app
        self.context = context
        self.echo = echo_request_id
        self.direct = direct
        self.dataplane = dataplane

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        headers = Headers(scope=scope)
        rid = headers.get("x-request-id") or uuid.uuid4().hex
        state["started"], state["request_id"] = t0, rid
        path = scope["path"]
        protocol = protocol_of(path)
        status = 500  # unless a response starts: an exception escaped the app
        echoed = (b"x-request-id", rid.encode("latin-1"))

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if self.echo:
                    message["headers"] = [*message.get("headers", ()), echoed]
            await send(message)

        keys = self.context.api_keys
        try:
            if keys.enabled and not is_open(scope["method"], path):
                try:
                    keys.check(headers.get("authorization"))
                except Unauthorized as e:
                    self.context.metrics.observe_error(protocol, e.kind)
                    await _render_for_path(path, e)(scope, receive, send_observed)
                    return
            post = scope["method"] == "POST"
            full = self.dataplane.overloaded() if post else None
            if full is not None and get_route_path(scope) not in UNBOUNDED:
                # refused before its body is read: under a burst, parsing what will be
                # refused anyway is what delays every answer (the 429s first)
                self.context.metrics.observe_error(protocol, full.kind)
                await _render_for_path(path, full)(scope, receive, send_observed)
                return
            handle = self.direct.find(scope) if post else None
            if handle is not None:
                response = await handle(Request(scope, receive))
                await response(scope, receive, send_observed)
                return
            await self.app(scope, receive, send_observed)
        finally:
            self._observe(scope, protocol, status, time.perf_counter() - t0, rid)

    def _observe(self, scope: Scope, protocol: str, status: int, seconds: float,
                 rid: str) -> None:
        route = getattr(scope.get("route"), "path", "unmatched")
        self.context.metrics.observe_request(protocol, route, scope["method"], status, seconds)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(_access_record(scope, protocol, route, status, seconds, rid))


def create_http_app(dataplane: DataPlane, context: ServerContext | None = None,
                    cors: CorsOptions | None = None, echo_request_id: bool = True) -> FastAPI:
    """The FastAPI app over ``dataplane``. ``echo_request_id``: set ``X-Request-Id`` on responses
    (off behind Ray Serve's proxy, which already puts the caller's id, or a new one, on the
    request and echoes it on the response)."""
    app = FastAPI(
        title="serve_app",
        version=__version__,
        description="Text embeddings and reranking over KServe V1, Open Inference (V2), OpenAI, "
        "text-embeddings-inference's and Cohere's APIs.",
    )
    context = context or ServerContext()
    context.metrics.watch_queue(dataplane.queue_depth, dataplane.depth_by_priority)
    context.metrics.watch_engines(dataplane.engines)
    app.state.dataplane = dataplane
    app.state.context = context

    @app.get("/", tags=["health"])
    async def root() -> Response:
        return json_response({"status": "alive"})

    @app.get("/metrics", tags=["health"])
    async def metrics() -> Response:
        return Response(context.metrics.render(), media_type=CONTENT_TYPE)

    direct = DirectRoutes()  # filled once the routes are in
    app.add_middleware(Observe, context=context, echo_request_id=echo_request_id,
                       direct=direct, dataplane=dataplane)

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

    routers = (openai.router, rerank.router, classify.router, tei.router, kserve_v1.router,
               v2.router)
    for router in routers:
        app.include_router(router)
        direct.add(router.routes)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        err: ServeAppError
        if exc.status_code == 404:
            err = ModelNotFound(f"no route for {request.method} {request.url.path}")
        else:
            err = InvalidInput(str(exc.detail))
        context.metrics.observe_error(protocol_of(request.url.path), err.kind)
        response = _render_for_path(request.url.path, err)
        response.status_code = exc.status_code
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    return app
