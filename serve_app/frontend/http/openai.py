"""OpenAI embeddings API: ``POST /v1/embeddings`` (and KServe's ``/openai/v1/embeddings``),
``GET /openai/v1/models``. Errors are OpenAI error objects, validation errors included."""

from __future__ import annotations

import base64
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import ConfigDict, Field, StrictBool, StrictInt, StrictStr

from serve_app.errors import EmptyInput, InvalidInput
from serve_app.frontend.http.bodies import (
    LateChunkFields,
    json_response,
    openapi_body,
    parse_json,
    validate,
)
from serve_app.frontend.http.error_bodies import error_route_class, openai_error
from serve_app.frontend.http.route import call_of, dataplane_of, model_card, read_body, respond
from serve_app.frontend.kserve import sparse_objects
from serve_app.types import (
    ChunkEmbedResult,
    EmbedRequest,
    EmbedResult,
    Input,
    MultiEmbedResult,
    SparseEmbedResult,
    TokenEmbedResult,
)

_INPUT_HELP = (
    "'input' must be a non-empty string, a non-empty list of strings, a list of token ids, or a "
    "list of token-id lists"
)


class EmbeddingRequest(LateChunkFields):
    """``{"input": str | [str] | [int] | [[int]], "model": str, "encoding_format"?: "float" |
    "base64" | "int8" | "uint8" | "binary" | "ubinary", "dimensions"?: int, "user"?: str,
    "prompt_name"?: str, "input_type"?: str}``, and serve_app's extensions (``long_inputs``,
    late chunking's ``chunks`` / ``chunk_tokens``, ...). Unknown fields are accepted and
    ignored."""

    model_config = ConfigDict(extra="allow")

    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(
        description="Text(s) or token ids to embed."
    )
    model: StrictStr = Field(description="The served model name.")
    encoding_format: Literal["float", "base64", "int8", "uint8", "binary", "ubinary"] = Field(
        "float", description="float or base64 (float32 bytes), or a compact encoding as "
        "sentence-transformers' quantize_embeddings makes it, answered as a list of integers: "
        "int8/uint8 (one per dimension, on the ranges the model's metadata reports), "
        "binary/ubinary (sign bits packed 8 to a byte, as int8 or uint8).")
    dimensions: StrictInt | None = Field(None, description="Keep the first N values, renormalize.")
    user: StrictStr | None = None
    prompt_name: StrictStr | None = Field(
        None, description="One of the model's prompts (text-embeddings-inference's field), put "
        "before each text.")
    input_type: StrictStr | None = Field(
        None, description="query or document (also search_query, search_document), as Cohere "
        "and NVIDIA NIM name it: the model's prompt for that side.")
    priority: StrictInt | None = Field(
        None, description="serve_app extension: the level the texts wait at, as in Triton: 1 "
        "the highest, larger numbers lower, 0 the default (1). The X-Priority header works too.")
    truncate: StrictBool | None = Field(
        None, description="serve_app extension (as in text-embeddings-inference): true cuts "
        "inputs over the model's token limit, false refuses them with a 400 (long_inputs "
        "truncate / error); default: the model's long_inputs.")
    max_active_dims: StrictInt | None = Field(
        None, description="serve_app extension, a sparse (SPLADE) model's: keep each vector's "
        "largest N values (sentence-transformers' max_active_dims).")
    output: Literal["pooled", "sparse", "multivector", "tokens"] = Field(
        "pooled", description="serve_app extension: the model's own vectors (pooled), or "
        "another of its outputs (the model's metadata lists them): sparse lexical weights or "
        "multi-vector rows (BGE-M3), every token's last hidden state (tokens).")


def _inputs(value: Any) -> tuple[Input, ...]:
    """The request's ``input`` as internal inputs, with a message that says what to fix."""
    if isinstance(value, str):
        if not value:
            raise EmptyInput("'input' is an empty string", param="input")
        return (value,)
    if not isinstance(value, list) or not value:
        raise InvalidInput(_INPUT_HELP, param="input")
    first = value[0]
    if isinstance(first, str):
        for i, x in enumerate(value):
            if not isinstance(x, str) or not x:
                raise InvalidInput(f"'input[{i}]' must be a non-empty string", param="input")
        return tuple(value)
    if type(first) is int:
        if any(type(x) is not int for x in value):
            raise InvalidInput(_INPUT_HELP, param="input")
        return (tuple(value),)
    if isinstance(first, list):
        out: list[Input] = []
        for i, seq in enumerate(value):
            if not isinstance(seq, list) or not seq or any(type(t) is not int for t in seq):
                raise InvalidInput(
                    f"'input[{i}]' must be a non-empty list of token ids", param="input"
                )
            out.append(tuple(seq))
        return tuple(out)
    raise InvalidInput(_INPUT_HELP, param="input")


def render_embeddings(result: EmbedResult | SparseEmbedResult | TokenEmbedResult, model: str,
                      encoding: str) -> Response:
    """OpenAI's list of embeddings; sparse vectors each as ``{"indices", "values"}``,
    multi-vector (or token) rows as a matrix (base64: its float32 bytes, row after row), late
    chunking's one per chunk with its ``offsets`` (serve_app's extensions: docs/protocols.md)."""
    items: list[Any]
    if isinstance(result, SparseEmbedResult):
        items = sparse_objects(result)
    elif isinstance(result, TokenEmbedResult):
        matrices = [result.matrix(i) for i in range(len(result.offsets) - 1)]
        items = ([base64.b64encode(m.astype("<f4", copy=False).tobytes()).decode()
                  for m in matrices] if encoding == "base64" else matrices)
    elif encoding == "base64":
        vectors = result.embeddings
        le = vectors.astype("<f4", copy=False)
        items = [base64.b64encode(le[i].tobytes()).decode() for i in range(len(le))]
    else:
        # rows stay numpy (int8/uint8 for compact encodings): orjson writes them without a
        # Python number per value
        items = list(result.embeddings)
    data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(items)]
    if isinstance(result, ChunkEmbedResult):  # late chunking: each chunk's place in the text
        for item, span in zip(data, result.spans.tolist(), strict=True):
            item["offsets"] = span
    tokens = result.prompt_tokens
    return json_response(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


router = APIRouter(route_class=error_route_class(openai_error), tags=["openai"])

_BODY_SCHEMA = openapi_body(EmbeddingRequest)


@router.post("/v1/embeddings", openapi_extra=_BODY_SCHEMA)
@router.post("/openai/v1/embeddings", openapi_extra=_BODY_SCHEMA)
async def create_embeddings(request: Request) -> Response:
    call = call_of(request)
    data = parse_json(await read_body(request))
    # Check 'input' before pydantic does: its messages for a four-way union are unreadable.
    inputs = _inputs(data["input"]) if isinstance(data, dict) and "input" in data else ()
    body = validate(EmbeddingRequest, data)
    chunks, chunk_tokens = body.late_chunking()
    req = EmbedRequest(
        model=body.model,
        inputs=inputs,
        long_inputs=body.long_inputs_of(body.truncate),
        chunks=chunks,
        chunk_tokens=chunk_tokens,
        dimensions=body.dimensions,
        request_id=call.request_id,
        deadline=call.deadline(),
        prompt_name=body.prompt_name,
        input_type=body.input_type,
        encoding="float" if body.encoding_format == "base64" else body.encoding_format,
        priority=call.priority(body.priority),
        max_active_dims=body.max_active_dims,
        outputs=(body.output,),
    )
    if body.encoding_format == "base64" and (call.find(body.model).task == "sparse"
                                             or body.output == "sparse"):
        raise InvalidInput("sparse vectors come as indices and values: ask for "
                           "encoding_format float", param="encoding_format")
    result = await call.run(req)
    assert not isinstance(result, MultiEmbedResult)
    return respond(request, call, body.model, result,
                   lambda: render_embeddings(result, body.model, body.encoding_format),
                   req.effective_priority)


@router.get("/openai/v1/models")
async def list_models(request: Request) -> Response:
    dp = dataplane_of(request)
    return json_response(
        {"object": "list", "data": [model_card(n, dp.created) for n in dp.names]}
    )


@router.get("/openai/v1/models/{name}")
async def retrieve_model(name: str, request: Request) -> Response:
    dp = dataplane_of(request)
    dp.model(name)
    return json_response(model_card(name, dp.created))
