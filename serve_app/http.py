"""The HTTP application: every protocol's routes on one FastAPI app over one :class:`Router`."""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import __version__
from serve_app.auth import OPEN_PATHS
from serve_app.errors import InvalidInput, ModelNotFound, ServeAppError, Unauthorized
from serve_app.metrics import CONTENT_TYPE
from serve_app.protocols import kserve_v1, openai, v2
from serve_app.protocols.common import json_response
from serve_app.router import Router


def _render_for_path(path: str, err: ServeAppError) -> Response:
    """Errors raised outside any route (unknown path, wrong method) in the shape the path's
    protocol uses."""
    if path.startswith("/openai/") or path.startswith("/v1/embeddings"):
        return openai.render_error(err)
    return kserve_v1.render_error(err)


def create_http_app(router: Router) -> FastAPI:
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
    async def require_api_key(request: Request, call_next: Any) -> Response:
        if router.api_keys.enabled and request.url.path not in OPEN_PATHS:
            try:
                router.api_keys.check(request.headers.get("authorization"))
            except Unauthorized as e:
                return _render_for_path(request.url.path, e)
        response: Response = await call_next(request)
        return response

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Response:
        t0 = time.perf_counter()
        response: Response = await call_next(request)
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")
        router.metrics.observe_request(request.url.path, template, request.method,
                                       response.status_code, time.perf_counter() - t0)
        return response

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
        response = _render_for_path(request.url.path, err)
        response.status_code = exc.status_code
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    return app
