"""Reranking over HTTP, in the two shapes clients already speak:

- text-embeddings-inference's ``POST /rerank``: ``{"query", "texts", "raw_scores"?,
  "return_text"?, "truncate"?}`` -> ``[{"index", "score", "text"?}]``, highest score first;
  errors ``{"error": str, "error_type": str}`` as TEI writes them.
- Cohere's and Jina's (also vLLM's, and KServe's ``/openai/v1/rerank``) at ``POST /v1/rerank``
  and ``/openai/v1/rerank``: ``{"model", "query", "documents", "top_n"?, "return_documents"?}``
  -> ``{"id", "model", "results": [{"index", "relevance_score", "document"?: {"text"}}],
  "usage": {"prompt_tokens", "total_tokens"}}``; errors are OpenAI error objects.

``/rerank`` answers a body with ``documents`` in the second shape (with TEI's error body), so
either client works against it. ``model`` may be left out while one reranker is served.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from serve_app.errors import (
    DeadlineExceeded,
    InferenceFailed,
    ModelNotReady,
    Overloaded,
    ServeAppError,
    lookup,
)
from serve_app.frontend.http.bodies import json_response, parse_json, validate
from serve_app.frontend.http.error_bodies import (
    error_headers,
    error_route_class,
    http_status,
    openai_error,
)
from serve_app.frontend.http.route import call_of, read_body, respond
from serve_app.frontend.pipeline import Call
from serve_app.types import Measured, RerankRequest

#: text-embeddings-inference's ``error_type`` per domain error (anything else: Validation)
TEI_ERROR_TYPES: dict[type[ServeAppError], str] = {
    Overloaded: "Overloaded",
    DeadlineExceeded: "Overloaded",
    ModelNotReady: "Unhealthy",
    InferenceFailed: "Backend",
}


def render_tei_error(err: ServeAppError) -> Response:
    status = http_status(err)
    body = {"error": err.message, "error_type": lookup(TEI_ERROR_TYPES, err, "Validation")}
    return json_response(body, status_code=status, headers=error_headers(status))


class _Options(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = Field(None, description="The served reranker; optional while "
                                    "one is served.")
    query: StrictStr
    raw_scores: StrictBool = Field(False, description="Logits instead of the model's activation.")
    truncate: StrictBool = Field(True, description="Cut (query, document) pairs over the "
                                 "model's token limit, longest part first; false: refuse them.")
    priority: StrictInt | None = Field(None, description="1 the highest level, larger lower, 0 the "
                                 "default (1); or the X-Priority header.")


class TeiRerank(_Options):
    """``{"query": str, "texts": [str], "raw_scores"?: bool, "return_text"?: bool,
    "truncate"?: bool, "truncation_direction"?: "right", "model"?: str}``"""

    texts: list[StrictStr]
    return_text: StrictBool = False
    truncation_direction: Literal["right", "Right"] = "right"


class Document(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: StrictStr


class CohereRerank(_Options):
    """``{"model"?: str, "query": str, "documents": [str | {"text": str}], "top_n"?: int,
    "return_documents"?: bool, "raw_scores"?: bool, "truncate"?: bool}``"""

    documents: list[StrictStr | Document]
    top_n: StrictInt | None = Field(None, ge=1, description="Keep the best N results.")
    return_documents: StrictBool = False


def _ranked(scores: np.ndarray, top_n: int | None = None) -> list[int]:
    """Document indices by score, highest first (ties in request order)."""
    order = np.argsort(-scores, kind="stable")
    return [int(i) for i in order[:top_n]]


async def _score(call: Call, body: _Options, documents: tuple[str, ...]
                 ) -> tuple[RerankRequest, Measured, np.ndarray]:
    req = RerankRequest(
        model=call.dataplane.registry.reranker(body.model), query=body.query,
        documents=documents, raw_scores=body.raw_scores, truncate=body.truncate,
        request_id=call.request_id, deadline=call.deadline(), priority=call.priority(body.priority))
    result, scores = await call.run(req)
    return req, result, scores


async def _cohere(request: Request, call: Call, data: Any) -> Response:
    body = validate(CohereRerank, data)
    texts = tuple(d if isinstance(d, str) else d.text for d in body.documents)
    req, result, scores = await _score(call, body, texts)

    def render() -> Response:
        results: list[dict[str, Any]] = []
        for i in _ranked(scores, body.top_n):
            item: dict[str, Any] = {"index": i, "relevance_score": float(scores[i])}
            if body.return_documents:
                item["document"] = {"text": texts[i]}
            results.append(item)
        tokens = result.prompt_tokens
        return json_response({
            "id": req.request_id or str(uuid.uuid4()), "model": req.model,
            "results": results, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })

    return respond(request, call, req.model, result, render, req.effective_priority)


_TEI_SCHEMA = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"oneOf": [TeiRerank.model_json_schema(), CohereRerank.model_json_schema()]}}}}}
_COHERE_SCHEMA = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": CohereRerank.model_json_schema()}}}}

tei_router = APIRouter(route_class=error_route_class(render_tei_error), tags=["rerank"])
router = APIRouter(route_class=error_route_class(openai_error), tags=["rerank"])


@tei_router.post("/rerank", openapi_extra=_TEI_SCHEMA)
async def tei_rerank(request: Request) -> Response:
    call = call_of(request)
    data = parse_json(await read_body(request))
    if isinstance(data, dict) and "documents" in data and "texts" not in data:
        return await _cohere(request, call, data)
    body = validate(TeiRerank, data)
    texts = tuple(body.texts)
    req, result, scores = await _score(call, body, texts)

    def render() -> Response:
        out: list[dict[str, Any]] = []
        for i in _ranked(scores):
            item: dict[str, Any] = {"index": i, "score": float(scores[i])}
            if body.return_text:
                item["text"] = texts[i]
            out.append(item)
        return json_response(out)

    return respond(request, call, req.model, result, render, req.effective_priority)


@router.post("/v1/rerank", openapi_extra=_COHERE_SCHEMA)
@router.post("/openai/v1/rerank", openapi_extra=_COHERE_SCHEMA)
async def rerank(request: Request) -> Response:
    call = call_of(request)
    return await _cohere(request, call, parse_json(await read_body(request)))
