"""KServe V1: ``GET /v1/models``, ``GET /v1/models/{name}``, ``POST /v1/models/{name}:predict``.

Errors are ``{"error": "<message>"}``. ``GET /v1/models`` and ``GET /v1/models/{name}`` also carry
the OpenAI model-list fields, so KServe and OpenAI clients both find theirs on one path.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from serve_app.errors import InvalidInput, ModelNotReady
from serve_app.frontend.http.bodies import check_texts, classify_inputs, json_response, parse_json
from serve_app.frontend.http.error_bodies import error_route_class, kserve_error
from serve_app.frontend.http.route import call_of, dataplane_of, model_card, read_body, respond
from serve_app.frontend.kserve import classify_mode, sparse_objects, v1_predictions
from serve_app.types import (
    ClassifyRequest,
    EmbedRequest,
    EmbedResult,
    SparseEmbedResult,
    TokenEmbedResult,
    long_inputs,
)

router = APIRouter(route_class=error_route_class(kserve_error), tags=["kserve-v1"])

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
                        "return_probabilities": {
                            "type": "boolean", "description": "a classifier: each label's "
                            "probability instead of the best label's index"},
                        "return_raw_logits": {
                            "type": "boolean", "description": "a classifier: each label's "
                            "logit instead of the best label's index"},
                        "truncate": {"type": "boolean",
                                     "description": "true: cut over-long texts; false: refuse "
                                     "them (400); default: the model's long_inputs"},
                        "long_inputs": {"type": "string", "enum": ["truncate", "chunk", "error"],
                                        "description": "an embedding model: cut over-long "
                                        "texts, embed them whole in windows (chunk), or refuse "
                                        "them; default: the model's long_inputs"},
                        "priority": {"type": "integer", "minimum": 0,
                                     "description": "1 the highest level, larger lower, 0 the "
                                     "default (1); or the X-Priority header"},
                    },
                }
            }
        },
    }
}


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    dp = dataplane_of(request)
    return json_response(
        {
            "models": dp.names,
            "object": "list",
            "data": [model_card(n, dp.created) for n in dp.names],
        }
    )


@router.get("/v1/models/{name}")
async def model_status(name: str, request: Request) -> Response:
    dp = dataplane_of(request)
    if not await dp.ready(dp.model(name)):
        raise ModelNotReady(f"model {name!r} is not ready")
    return json_response({"name": name, "ready": True, **model_card(name, dp.created)})


@router.post("/v1/models/{name}:predict", openapi_extra=_PREDICT_SCHEMA)
async def predict(name: str, request: Request) -> Response:
    """``{"instances": [str, ...], "truncate"?: bool}`` -> ``{"predictions": [...]}``: a vector
    per text (an embedding model), ``{"indices", "values"}`` per text (a sparse one), or
    as KServe's runtime answers a classifier (:mod:`serve_app.frontend.kserve`; a pair of texts,
    ``["a", "b"]``, is one input too)."""
    call = call_of(request)
    model = call.find(name)
    data = parse_json(await read_body(request))
    if not isinstance(data, dict):
        raise InvalidInput("request body must be a JSON object with 'instances'")
    if "instances" in data:
        field = "instances"
    elif "inputs" in data:
        field = "inputs"
    else:
        raise InvalidInput("request body must have 'instances' (or 'inputs'): a list of strings")
    truncate = data.get("truncate")
    if truncate is not None and type(truncate) is not bool:
        raise InvalidInput(f"'truncate' must be true or false, got {truncate!r}", param="truncate")
    common: dict[str, Any] = {
        "model": name, "request_id": call.request_id,
        "deadline": call.deadline(), "priority": call.priority(data.get("priority"))}
    if model.task == "classify":
        mode = await classify_mode(call.dataplane, model, data)
        creq = ClassifyRequest(inputs=classify_inputs(data[field], field),
                               raw_scores=mode == "logits", truncate=truncate is not False,
                               **common)
        classified = await call.run(creq)
        return respond(request, call, name, classified, lambda: json_response(
            {"predictions": v1_predictions(classified.scores, mode)}), creq.effective_priority)
    texts = check_texts(data[field], field, allow_empty=True)  # "" embeds, as in KServe
    req = EmbedRequest(inputs=texts, long_inputs=long_inputs(data.get("long_inputs"), truncate),
                       **common)
    result = await call.run(req)
    if isinstance(result, SparseEmbedResult):
        sparse = result
        return respond(request, call, name, result, lambda: json_response(
            {"predictions": sparse_objects(sparse)}), req.effective_priority)
    if isinstance(result, TokenEmbedResult):  # a multi-vector model: a matrix per text
        tokens = result
        return respond(request, call, name, result, lambda: json_response(
            {"predictions": [tokens.matrix(i) for i in range(len(texts))]}),
            req.effective_priority)
    assert isinstance(result, EmbedResult)
    vectors = result.embeddings
    return respond(request, call, name, result,
                   lambda: json_response({"predictions": vectors}), req.effective_priority)
