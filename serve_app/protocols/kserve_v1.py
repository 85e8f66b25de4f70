"""KServe V1: ``GET /v1/models``, ``GET /v1/models/{name}``, ``POST /v1/models/{name}:predict``.

Errors are ``{"error": "<message>"}``. ``GET /v1/models`` and ``GET /v1/models/{name}`` also carry
the OpenAI model-list fields, so KServe and OpenAI clients both find theirs on one path.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from serve_app.errors import InvalidInput, ModelNotReady, ServeAppError
from serve_app.protocols.common import (
    check_texts,
    error_headers,
    error_route_class,
    http_status,
    json_response,
    parse_json,
    read_body,
    request_id,
    respond,
    router_of,
    timeout_of,
)
from serve_app.protocols.openai import model_card
from serve_app.types import EmbedRequest, deadline


def render_error(err: ServeAppError) -> Response:
    """KServe's (and Open Inference REST's) error body: ``{"error": "<message>"}``."""
    status = http_status(err)
    return json_response({"error": err.message}, status_code=status, headers=error_headers(status))


router = APIRouter(route_class=error_route_class(render_error), tags=["kserve-v1"])

_PREDICT_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "description": '{"instances": ["text", ...]} or {"inputs": ["text", ...]}',
                    "properties": {
                        "instances": {"type": "array", "items": {"type": "string"}},
                        "inputs": {"type": "array", "items": {"type": "string"}},
                        "truncate": {"type": "boolean", "default": True,
                                     "description": "false: refuse over-long texts (400)"},
                    },
                }
            }
        },
    }
}


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    r = router_of(request)
    return json_response(
        {
            "models": r.names,
            "object": "list",
            "data": [model_card(n, r.created) for n in r.names],
        }
    )


@router.get("/v1/models/{name}")
async def model_status(name: str, request: Request) -> Response:
    r = router_of(request)
    r.backend(name)
    if not await r.ready(name):
        raise ModelNotReady(f"model {name!r} is not ready")
    return json_response({"name": name, "ready": True, **model_card(name, r.created)})


@router.post("/v1/models/{name}:predict", openapi_extra=_PREDICT_SCHEMA)
async def predict(name: str, request: Request) -> Response:
    """``{"instances": [str, ...], "truncate"?: bool}`` -> ``{"predictions": [[float, ...]]}``."""
    r = router_of(request)
    r.backend(name)
    data = parse_json(await read_body(request))
    if not isinstance(data, dict):
        raise InvalidInput("request body must be a JSON object with 'instances'")
    if "instances" in data:
        field = "instances"
    elif "inputs" in data:
        field = "inputs"
    else:
        raise InvalidInput("request body must have 'instances' (or 'inputs'): a list of strings")
    texts = check_texts(data[field], field)
    truncate = data.get("truncate", True)
    if type(truncate) is not bool:
        raise InvalidInput(f"'truncate' must be true or false, got {truncate!r}", param="truncate")
    result = await r.embed(
        EmbedRequest(model=name, inputs=texts, truncate=truncate, request_id=request_id(request),
                     deadline=deadline(timeout_of(request)), protocol="kserve_v1")
    )
    return respond(request, name, result,
                   lambda: json_response({"predictions": result.embeddings}))
