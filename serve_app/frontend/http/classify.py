"""Sequence classification in vLLM's shape (OpenAI-style, also infinity's route name):
``POST /classify`` and ``/v1/classify``.

``{"model", "input": str | [str], "use_activation"?: true, "truncate"?}`` ->
``{"id", "object": "list", "created", "model", "data": [{"index", "label", "probs",
"num_classes"}], "usage": {"prompt_tokens", "total_tokens"}}``, ``label`` the best label's name
(its config's ``id2label``), ``probs`` every label's probability in label order (the logits with
``use_activation: false``). Errors are OpenAI error objects. ``model`` may be left out while one
classifier is served.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from serve_app.frontend.http.bodies import (
    classify_inputs,
    json_response,
    openapi_body,
    parse_json,
    validate,
)
from serve_app.frontend.http.error_bodies import error_route_class, openai_error
from serve_app.frontend.http.route import call_of, read_body, respond
from serve_app.types import ClassifyRequest


class ClassificationRequest(BaseModel):
    """``{"model"?, "input": str | [str] | [[str, str]], "use_activation"?, "truncate"?,
    "priority"?}``; unknown fields are ignored, as vLLM's ``user`` and the like."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr | None = Field(None, description="The served classifier; may be left out "
                                    "while one is served.")
    input: StrictStr | list[StrictStr | list[StrictStr]] = Field(
        description="A text or a list of texts (serve_app: or [text, text] pairs).")
    use_activation: StrictBool = Field(True, description="false: the logits instead of the "
                                       "probabilities.")
    truncate: StrictBool = Field(True, description="serve_app extension: false refuses inputs "
                                 "over the model's token limit instead of cutting them.")
    priority: StrictInt | None = Field(None, description="serve_app extension: 1 the highest "
                                       "level, larger lower, 0 the default (1).")


_SCHEMA = openapi_body(ClassificationRequest)

router = APIRouter(route_class=error_route_class(openai_error), tags=["classify"])


@router.post("/classify", openapi_extra=_SCHEMA)
@router.post("/v1/classify", openapi_extra=_SCHEMA)
async def classify(request: Request) -> Response:
    call = call_of(request)
    data = parse_json(await read_body(request))
    body = validate(ClassificationRequest, data)
    raw = [body.input] if isinstance(body.input, str) else body.input
    name = call.dataplane.registry.classifier(body.model)
    req = ClassifyRequest(
        model=name, inputs=classify_inputs(raw, "input"), raw_scores=not body.use_activation,
        truncate=body.truncate, request_id=call.request_id, deadline=call.deadline(),
        priority=call.priority(body.priority))
    result = await call.run(req)
    labels = (await call.dataplane.info(call.find(name))).labels

    def render() -> Response:
        best = result.scores.argmax(axis=1).tolist()
        data: list[dict[str, Any]] = [
            {"index": i, "label": labels[b], "probs": row, "num_classes": len(labels)}
            for i, (b, row) in enumerate(zip(best, result.scores, strict=True))]
        tokens = result.prompt_tokens
        return json_response({
            "id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
            "model": name, "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    return respond(request, call, name, result, render, req.effective_priority)
