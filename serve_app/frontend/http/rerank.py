"""Reranking over HTTP in Cohere's and Jina's shape (also vLLM's, and KServe's
``/openai/v1/rerank``) at ``POST /v1/rerank`` and ``/openai/v1/rerank``: ``{"model", "query",
"documents", "top_n"?, "return_documents"?}`` -> ``{"id", "model", "results": [{"index",
"relevance_score", "document"?: {"text"}}], "usage": {"prompt_tokens", "total_tokens"}}``;
errors are OpenAI error objects. ``model`` may be left out while one reranker is served.

text-embeddings-inference's ``POST /rerank`` (:mod:`.tei`) answers a body with ``documents`` in
this shape too, through :func:`cohere`; both score through :func:`score`.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from serve_app.frontend.http.bodies import json_response, openapi_body, parse_json, validate
from serve_app.frontend.http.error_bodies import error_route_class, openai_error
from serve_app.frontend.http.route import call_of, read_body, respond
from serve_app.frontend.pipeline import Call
from serve_app.types import Measured, RerankRequest, Side


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


class Document(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: StrictStr


class CohereRerank(_Options):
    """``{"model"?: str, "query": str, "documents": [str | {"text": str}], "top_n"?: int,
    "return_documents"?: bool, "raw_scores"?: bool, "truncate"?: bool}``"""

    documents: list[StrictStr | Document]
    top_n: StrictInt | None = Field(None, ge=1, description="Keep the best N results.")
    return_documents: StrictBool = False


def ranked(scores: np.ndarray, top_n: int | None = None) -> list[int]:
    """Document indices by score, highest first (ties in request order)."""
    order = np.argsort(-scores, kind="stable")
    return [int(i) for i in order[:top_n]]


async def score(call: Call, model: str, query: str, documents: tuple[str, ...], raw: bool,
                truncate: bool, side: Side = "right", priority: int | None = None
                ) -> tuple[RerankRequest, Measured, np.ndarray]:
    """Score ``documents`` against ``query`` on ``model`` through the pipeline."""
    req = RerankRequest(
        model=model, query=query, documents=documents, raw_scores=raw, truncate=truncate,
        truncation_side=side, request_id=call.request_id, deadline=call.deadline(),
        priority=call.priority(priority))
    result = await call.run(req)
    return req, result, result.scores


async def cohere(request: Request, call: Call, data: Any) -> Response:
    """A Cohere-shaped rerank body, answered in Cohere's shape."""
    body = validate(CohereRerank, data)
    texts = tuple(d if isinstance(d, str) else d.text for d in body.documents)
    req, result, scores = await score(
        call, call.dataplane.registry.reranker(body.model), body.query, texts, body.raw_scores,
        body.truncate, priority=body.priority)

    def render() -> Response:
        results: list[dict[str, Any]] = []
        for i in ranked(scores, body.top_n):
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


_COHERE_SCHEMA = openapi_body(CohereRerank)

router = APIRouter(route_class=error_route_class(openai_error), tags=["rerank"])


@router.post("/v1/rerank", openapi_extra=_COHERE_SCHEMA)
@router.post("/openai/v1/rerank", openapi_extra=_COHERE_SCHEMA)
async def rerank(request: Request) -> Response:
    call = call_of(request)
    return await cohere(request, call, parse_json(await read_body(request)))
