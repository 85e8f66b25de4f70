"""text-embeddings-inference's native API (TEI 1.9), for the clients written for it: llama-index's
``TextEmbeddingsInference``, chromadb's ``HuggingFaceEmbeddingServer``, huggingface_hub's
``InferenceClient(base_url=...)``, haystack's TEI embedders and ranker, and others.

- ``POST /embed``: ``{"inputs": str | [str | [int]] | [int], "normalize"?: true, "truncate"?,
  "truncation_direction"?: "right" | "left" (either casing), "prompt_name"?, "dimensions"?}``
  -> ``[[float]]``, one vector per input.
- ``POST /rerank``: ``{"query", "texts", "raw_scores"?, "return_text"?, "truncate"?,
  "truncation_direction"?}`` -> ``[{"index", "score", "text"?}]``, highest first (a body with
  ``documents`` instead is answered in Cohere's shape, :mod:`.rerank`).
- ``POST /similarity``: ``{"inputs": {"source_sentence", "sentences"}, "parameters"?}`` -> the
  cosine of the source with each sentence.
- ``POST /tokenize``: ``{"inputs": str | [str], "add_special_tokens"?, "prompt_name"?}`` ->
  ``[[{"id", "text", "special", "start", "stop"}]]`` (UTF-8 byte offsets; null for special
  tokens). ``POST /decode``: ``{"ids": [int] | [[int]], "skip_special_tokens"?}`` -> ``[str]``.
- ``GET /info``, ``GET /health`` (also ``/ping``), and ``POST /`` and ``/invocations``, which
  answer as the model's task does (embedding: ``/embed``, reranker: ``/rerank``).

Errors are TEI's ``{"error", "error_type"}`` at TEI's statuses (:func:`tei_error`). Unknown fields
are ignored, as TEI ignores them. TEI serves one model; here a request may name one in a
``model`` field or an ``X-Model`` header, else it gets the first served model that does its
task (the first model of the config).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from serve_app import __version__
from serve_app.errors import TASK_NAMES, EmptyInput, InvalidInput, ModelNotReady, WrongTask
from serve_app.frontend.dataplane import ACCEPTS
from serve_app.frontend.http import rerank
from serve_app.frontend.http.bodies import (
    LateChunkFields,
    LongInputField,
    json_response,
    openapi_body,
    parse_json,
    validate,
)
from serve_app.frontend.http.error_bodies import error_route_class, tei_error
from serve_app.frontend.http.route import call_of, dataplane_of, read_body, respond
from serve_app.frontend.pipeline import Call
from serve_app.types import (
    ChunkEmbedResult,
    ClassifyInput,
    ClassifyRequest,
    DecodeRequest,
    EmbedRequest,
    EmbedResult,
    Input,
    Measured,
    ModelInfo,
    Side,
    SparseEmbedResult,
    Task,
    TokenEmbedResult,
    TokenizeRequest,
    chars,
)

Direction = Literal["Right", "right", "Left", "left"]
MODEL_HEADER = "x-model"
E = TypeVar("E", bound="TeiEmbedAll")


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = Field(None, description="serve_app extension: the served model "
                                    "(or the X-Model header); default: the first one that does "
                                    "the route's task.")
    priority: StrictInt | None = Field(None, description="serve_app extension: 1 the highest "
                                       "level, larger lower, 0 the default (1); or X-Priority.")


class _Truncation(BaseModel):
    model_config = ConfigDict(extra="allow")

    truncate: StrictBool | None = Field(None, description="Cut inputs over the model's token "
                                        "limit (null: true, TEI's --auto-truncate); false: "
                                        "refuse them.")
    truncation_direction: Direction = Field("Right", description="Which end truncation cuts.")

    def side(self) -> Side:
        return "left" if self.truncation_direction.lower() == "left" else "right"

    def cut(self) -> bool:
        return True if self.truncate is None else self.truncate


class _Prompted(_Truncation, LongInputField):
    prompt_name: StrictStr | None = Field(None, description="One of the model's prompts, put "
                                          "before each text.")


class TeiEmbedAll(_Body, _Prompted):
    """``{"inputs", "truncate"?, "truncation_direction"?, "prompt_name"?}`` (``/embed_all``;
    ``/embed_sparse`` takes ``max_active_dims`` too)"""

    inputs: Any = Field(description="A text, token ids, or a list of either.")


class TeiEmbedSparse(TeiEmbedAll):
    max_active_dims: StrictInt | None = Field(
        None, description="serve_app extension: keep each vector's largest N values.")


class TeiEmbed(TeiEmbedAll, LateChunkFields):
    """``{"inputs", "normalize"?, "truncate"?, "truncation_direction"?, "prompt_name"?,
    "dimensions"?}``, and serve_app's late chunking (``chunks`` / ``chunk_tokens``: one
    vector per chunk, their offsets in the ``x-chunk-offsets`` header)"""

    normalize: StrictBool = Field(True, description="L2-normalize (false: vectors as pooled).")
    dimensions: StrictInt | None = Field(None, description="Keep the first N values (then "
                                         "normalize).")


class TeiPredict(_Body, _Truncation):
    """``{"inputs": str | [str] | [str, str] | [[str] | [str, str]], "truncate"?,
    "truncation_direction"?, "raw_scores"?}``"""

    inputs: Any = Field(description="A text, a pair [text, text], or a list of texts and pairs "
                        "(each [text] or [text, text]).")
    raw_scores: StrictBool = Field(False, description="Logits instead of the probabilities.")


class SimilarityInputs(BaseModel):
    model_config = ConfigDict(extra="allow")
    source_sentence: StrictStr
    sentences: list[StrictStr]


class TeiSimilarity(_Body):
    """``{"inputs": {"source_sentence", "sentences"}, "parameters"?: {"truncate"?,
    "truncation_direction"?, "prompt_name"?}}``"""

    inputs: SimilarityInputs
    parameters: _Prompted | None = None


class TeiTokenize(_Body):
    """``{"inputs": str | [str], "add_special_tokens"?: true, "prompt_name"?}``"""

    inputs: StrictStr | list[StrictStr]
    add_special_tokens: StrictBool = True
    prompt_name: StrictStr | None = None


class TeiDecode(_Body):
    """``{"ids": [int] | [[int]], "skip_special_tokens"?: true}``"""

    ids: list[StrictInt] | list[list[StrictInt]]
    skip_special_tokens: StrictBool = True


class TeiRerank(_Body, _Truncation):
    """``{"query", "texts", "raw_scores"?, "return_text"?, "truncate"?,
    "truncation_direction"?}``"""

    query: StrictStr
    texts: list[StrictStr]
    raw_scores: StrictBool = Field(False, description="Logits instead of the activation.")
    return_text: StrictBool = False


def _inputs(value: Any) -> tuple[Input, ...]:
    """TEI's ``inputs``: a text, a list of token ids, or a list of texts and token-id lists."""
    one_ids = isinstance(value, list) and value and all(type(t) is int for t in value)
    if isinstance(value, str) or one_ids:
        value = [value]
    if not isinstance(value, list):
        raise InvalidInput("'inputs' must be a string, a list of token ids, or a list of "
                           "strings and token-id lists", param="inputs")
    if not value:
        raise EmptyInput("`inputs` cannot be empty", param="inputs")
    out: list[Input] = []
    for i, x in enumerate(value):
        if isinstance(x, str) or (isinstance(x, list) and all(type(t) is int for t in x)):
            if not x:
                raise EmptyInput(f"`inputs[{i}]` cannot be empty", param="inputs")
            out.append(x if isinstance(x, str) else tuple(x))
        else:
            raise InvalidInput(f"'inputs[{i}]' must be a string or a list of token ids",
                               param="inputs")
    return tuple(out)


_PREDICT_HELP = ("a string, a pair of strings [string, string] or a batch of mixed strings "
                 "and pairs [[string], [string, string], ...]")


def _predict_inputs(value: Any) -> tuple[tuple[ClassifyInput, ...], bool]:
    """TEI's ``/predict`` inputs, and whether they are a batch (answered as a list of lists):
    a text; ``[text]``; a pair ``[text, text]``; or a list of ``[text]`` and ``[text, text]``."""
    def one(x: Any, where: str) -> ClassifyInput:
        if isinstance(x, str):
            return x
        if isinstance(x, list) and all(isinstance(t, str) for t in x):
            if len(x) == 1:
                return str(x[0])
            if len(x) == 2:
                return (x[0], x[1])
            raise InvalidInput(f"invalid length {len(x)} of {where}, expected {_PREDICT_HELP}",
                               param="inputs")
        raise InvalidInput(f"{where} must be {_PREDICT_HELP}", param="inputs")

    if isinstance(value, list) and value and all(isinstance(x, list) for x in value):
        inputs, batch = tuple(one(x, f"inputs[{i}]") for i, x in enumerate(value)), True
    elif isinstance(value, list) and not value:
        raise EmptyInput("`inputs` cannot be empty", param="inputs")
    else:
        inputs, batch = (one(value, "inputs"),), False
    for i, x in enumerate(inputs):
        if not x or not all(x):
            raise EmptyInput(f"`inputs[{i}]` cannot be empty", param="inputs")
    return inputs, batch


def _chars(inputs: tuple[Input, ...]) -> int:
    """TEI's ``x-compute-characters``: characters of texts, one per token id."""
    return sum(len(x) for x in inputs)


def model_for(request: Request, named: str | None, task: Task | None) -> str:
    """The model a TEI request is for: the one it names (body, else ``X-Model``), else the first
    served model that does ``task`` (None: any task)."""
    name = named or request.headers.get(MODEL_HEADER)
    if name:
        return name
    registry = dataplane_of(request).registry
    if task is None:
        return registry.names[0]
    # a model of the task itself first, else one that answers it too (a reranker classifies)
    names = registry.of_task(task) or [n for n in registry.names
                                       if registry.get(n).task in ACCEPTS[task]]
    if not names:
        raise WrongTask(f"no {TASK_NAMES[task].split(' ', 1)[1]} is served here; served "
                        f"models: {registry.names}", param="model")
    return names[0]


def _answer(request: Request, call: Call, model: str, result: Measured, content: Any,
            chars: int, priority: int) -> Response:
    """``content`` as JSON with TEI's headers: the timings, ``x-compute-characters`` and
    ``x-compute-type`` (the device the model ran on)."""
    response = respond(request, call, model, result, lambda: json_response(content), priority)
    info = call.find(model).info
    device = str((info.engine or {}).get("device", "cpu")) if info is not None else "cpu"
    response.headers["x-compute-characters"] = str(chars)
    response.headers["x-compute-type"] = "gpu" if device.startswith("cuda") else "cpu"
    return response


def _embed_request(request: Request, call: Call, data: Any, body_type: type[E], task: Task,
                   **fields: Any) -> tuple[E, EmbedRequest]:
    """The body of an ``/embed*`` route and its request (and ``fields``): ``inputs`` checked
    before pydantic (its messages for a union are unreadable), the model by
    :func:`model_for` (``task``)."""
    inputs = _inputs(data.get("inputs")) if isinstance(data, dict) and "inputs" in data else ()
    body = validate(body_type, data)
    req = EmbedRequest(
        model=model_for(request, body.model, task), inputs=inputs,
        long_inputs=body.long_inputs_of(body.truncate), truncation_side=body.side(),
        prompt_name=body.prompt_name, request_id=call.request_id,
        deadline=call.deadline(), priority=call.priority(body.priority), **fields)
    return body, req


async def _embed(request: Request, call: Call, data: Any) -> Response:
    body, req = _embed_request(request, call, data, TeiEmbed, "embedding")
    if body.dimensions is not None and body.dimensions < 1:
        raise InvalidInput("`dimensions` should be positive", param="dimensions")
    task = call.find(req.model).task
    if task == "multivector":
        raise WrongTask("a multi-vector model answers a matrix per text: use `embed_all`",
                        param="model")
    sparse = task == "sparse"
    if sparse and body.normalize:  # TEI's words: a SPLADE model's vectors are not normalized
        raise WrongTask("`normalize` is not available for SPLADE models", param="normalize")
    chunks, chunk_tokens = body.late_chunking()
    req = dataclasses.replace(req, dimensions=body.dimensions,
                              normalize=None if sparse else body.normalize,
                              chunks=chunks, chunk_tokens=chunk_tokens)
    result = await call.run(req)
    if isinstance(result, SparseEmbedResult):  # TEI answers a SPLADE model's /embed dense
        vectors = np.zeros((len(req.inputs), result.dim), dtype=np.float32)
        for i in range(len(req.inputs)):
            indices, values = result.row(i)
            vectors[i, indices] = values
    else:
        assert isinstance(result, EmbedResult)
        vectors = result.embeddings
    response = _answer(request, call, req.model, result, vectors, _chars(req.inputs),
                       req.effective_priority)
    if isinstance(result, ChunkEmbedResult):  # late chunking: where each vector's chunk lies
        response.headers["x-chunk-offsets"] = orjson.dumps(result.spans.tolist()).decode()
    return response


async def _embed_sparse(request: Request, call: Call, data: Any) -> Response:
    body, req = _embed_request(request, call, data, TeiEmbedSparse, "sparse")
    model = call.find(req.model)
    if model.task == "sparse":
        req = dataclasses.replace(req, max_active_dims=body.max_active_dims)
    elif "sparse" in await call.dataplane.outputs(model):  # BGE-M3's lexical weights
        req = dataclasses.replace(req, max_active_dims=body.max_active_dims, outputs=("sparse",))
    else:  # TEI's words
        raise WrongTask("Model is not an embedding model with SPLADE pooling", param="model")
    result = await call.run(req)
    assert isinstance(result, SparseEmbedResult)

    def rows() -> list[list[dict[str, Any]]]:
        out = []
        for i in range(len(req.inputs)):
            indices, values = result.row(i)
            out.append([{"index": j, "value": v}
                        for j, v in zip(indices.tolist(), values.tolist(), strict=True)])
        return out

    return _answer(request, call, req.model, result, rows(), _chars(req.inputs),
                   req.effective_priority)


async def _predict(request: Request, call: Call, data: Any) -> Response:
    inputs, batch = (_predict_inputs(data["inputs"]) if isinstance(data, dict)
                     and "inputs" in data else ((), False))
    body = validate(TeiPredict, data)
    name = model_for(request, body.model, "classify")
    req = ClassifyRequest(
        model=name, inputs=inputs, raw_scores=body.raw_scores, truncate=body.cut(),
        truncation_side=body.side(), request_id=call.request_id, deadline=call.deadline(),
        priority=call.priority(body.priority))
    result = await call.run(req)
    labels = (await call.dataplane.info(call.find(name))).labels
    ranked = [[{"score": float(row[j]), "label": labels[j]}
               for j in np.argsort(-row, kind="stable").tolist()] for row in result.scores]
    return _answer(request, call, name, result, ranked if batch else ranked[0], chars(inputs),
                   req.effective_priority)


async def _rerank(request: Request, call: Call, data: Any) -> Response:
    if isinstance(data, dict) and "documents" in data and "texts" not in data:
        return await rerank.cohere(request, call, data)
    body = validate(TeiRerank, data)
    if not body.texts:
        raise EmptyInput("`texts` cannot be empty", param="texts")
    texts = tuple(body.texts)
    req, result, scores = await rerank.score(
        call, model_for(request, body.model, "rerank"), body.query, texts, body.raw_scores,
        body.cut(), body.side(), body.priority)
    out: list[dict[str, Any]] = []
    for i in rerank.ranked(scores):
        item: dict[str, Any] = {"index": i, "score": float(scores[i])}
        if body.return_text:
            item["text"] = texts[i]
        out.append(item)
    chars = len(body.query) * len(texts) + sum(map(len, texts))
    return _answer(request, call, req.model, result, out, chars, req.effective_priority)


router = APIRouter(route_class=error_route_class(tei_error), tags=["tei"])


@router.post("/embed", openapi_extra=openapi_body(TeiEmbed))
async def embed(request: Request) -> Response:
    return await _embed(request, call_of(request), parse_json(await read_body(request)))


@router.post("/embed_all", openapi_extra=openapi_body(TeiEmbedAll))
async def embed_all(request: Request) -> Response:
    """Every token's vector of each input (the model's last hidden states, special tokens
    included; a multi-vector model's rows): ``[[[float]]]``."""
    return await _embed_all(request, call_of(request), parse_json(await read_body(request)))


async def _embed_all(request: Request, call: Call, data: Any) -> Response:
    _, req = _embed_request(request, call, data, TeiEmbedAll, "embedding",
                            outputs=("tokens",))
    task = call.find(req.model).task
    if task == "multivector":  # its own answer is a matrix per text
        req = dataclasses.replace(req, outputs=("pooled",))
    elif task != "embedding":  # TEI's words
        raise WrongTask("Model is not an embedding model" if task != "sparse"
                        else "`embed_all` is not available for SPLADE models", param="model")
    result = await call.run(req)
    assert isinstance(result, TokenEmbedResult)
    matrices = [result.matrix(i) for i in range(len(req.inputs))]
    return _answer(request, call, req.model, result, matrices, _chars(req.inputs),
                   req.effective_priority)


@router.post("/embed_sparse", openapi_extra=openapi_body(TeiEmbedSparse))
async def embed_sparse(request: Request) -> Response:
    """A SPLADE model's vectors, non-zero values only: ``[[{"index", "value"}]]``."""
    return await _embed_sparse(request, call_of(request), parse_json(await read_body(request)))


@router.post("/predict", openapi_extra=openapi_body(TeiPredict))
async def predict(request: Request) -> Response:
    """Each label's score, best first: ``[{"score", "label"}]`` (a batch: one list each)."""
    return await _predict(request, call_of(request), parse_json(await read_body(request)))


@router.post("/rerank", openapi_extra=openapi_body(TeiRerank, rerank.CohereRerank))
async def tei_rerank(request: Request) -> Response:
    return await _rerank(request, call_of(request), parse_json(await read_body(request)))


@router.post("/similarity", openapi_extra=openapi_body(TeiSimilarity))
async def similarity(request: Request) -> Response:
    call = call_of(request)
    body = validate(TeiSimilarity, parse_json(await read_body(request)))
    if not body.inputs.sentences:
        raise EmptyInput("`inputs.sentences` cannot be empty", param="inputs.sentences")
    texts = (body.inputs.source_sentence, *body.inputs.sentences)
    for i, t in enumerate(texts):
        if not t:
            raise EmptyInput("`inputs.source_sentence` cannot be empty" if i == 0 else
                             f"`inputs.sentences[{i - 1}]` cannot be empty", param="inputs")
    opts = body.parameters or _Prompted()
    req = EmbedRequest(
        model=model_for(request, body.model, "embedding"), inputs=texts,
        long_inputs=opts.long_inputs_of(opts.truncate), truncation_side=opts.side(),
        prompt_name=opts.prompt_name, normalize=True,
        request_id=call.request_id, deadline=call.deadline(),
        priority=call.priority(body.priority))
    result = await call.embed_dense(req)
    vectors = result.embeddings
    cosines = (vectors[1:].astype(np.float64) @ vectors[0].astype(np.float64)).astype(np.float32)
    return _answer(request, call, req.model, result, cosines, _chars(texts),
                   req.effective_priority)


@router.post("/tokenize", openapi_extra=openapi_body(TeiTokenize))
async def tokenize(request: Request) -> Response:
    call = call_of(request)
    body = validate(TeiTokenize, parse_json(await read_body(request)))
    texts = (body.inputs,) if isinstance(body.inputs, str) else tuple(body.inputs)
    if not texts or not all(texts):
        raise EmptyInput("`inputs` cannot be empty", param="inputs")
    name = model_for(request, body.model, None)
    req = TokenizeRequest(model=name, texts=texts, add_special_tokens=body.add_special_tokens,
                          prompt_name=body.prompt_name, request_id=call.request_id,
                          deadline=call.deadline(), priority=call.priority(body.priority))
    result = await call.dataplane.tokenize(req, call.find(name))
    return json_response([[{"id": t.id, "text": t.text, "special": t.special, "start": t.start,
                            "stop": t.stop} for t in tokens] for tokens in result.tokens])


@router.post("/decode", openapi_extra=openapi_body(TeiDecode))
async def decode(request: Request) -> Response:
    call = call_of(request)
    body = validate(TeiDecode, parse_json(await read_body(request)))
    seqs = [body.ids] if body.ids and type(body.ids[0]) is int else body.ids
    ids = tuple(tuple(s) for s in seqs if isinstance(s, list))
    if not ids or not all(ids):
        raise EmptyInput("`ids` cannot be empty", param="ids")
    name = model_for(request, body.model, None)
    req = DecodeRequest(model=name, ids=ids, skip_special_tokens=body.skip_special_tokens,
                        request_id=call.request_id, deadline=call.deadline(),
                        priority=call.priority(body.priority))
    result = await call.dataplane.decode(req, call.find(name))
    return json_response(list(result.texts))


def _model_type(info: ModelInfo) -> dict[str, Any]:
    if info.task in ("embedding", "sparse", "multivector"):
        return {"embedding": {"pooling": info.pooling}}
    labels = info.labels or ("LABEL_0",)
    kind = "reranker" if info.task == "rerank" else "classifier"
    return {kind: {"id2label": {str(i): name for i, name in enumerate(labels)},
                   "label2id": {name: i for i, name in enumerate(labels)}}}


@router.get("/info")
async def info(request: Request, model: str | None = None) -> Response:
    """TEI's ``Info`` of the model (the ``model`` query parameter or ``X-Model``; default: the
    first served model)."""
    dp = dataplane_of(request)
    served = dp.model(model_for(request, model, None))
    meta = await dp.info(served)
    engine = meta.engine or {}
    return json_response({
        "model_id": meta.model_id,
        "model_sha": meta.revision,
        "model_dtype": str(engine.get("dtype", "float32")),
        "served_model_name": served.name,
        "model_type": _model_type(meta),
        "max_concurrent_requests": meta.max_queued_inputs,
        "max_input_length": meta.max_length,
        "max_batch_tokens": meta.max_batch_tokens,
        "max_batch_requests": meta.max_batch_size,
        "max_client_batch_size": dp.limits.max_inputs_per_request,
        "auto_truncate": True,
        "tokenization_workers": meta.tokenizer_threads,
        "version": __version__,
        "sha": None,
        "docker_label": None,
    })


@router.get("/health")
@router.get("/ping")
async def health(request: Request) -> Response:
    """200 with no body when every served model can take requests, else TEI's 503."""
    if not await dataplane_of(request).all_ready():
        raise ModelNotReady("unhealthy")
    return Response(status_code=200)


_ROOT_SCHEMA = openapi_body(TeiEmbed, TeiEmbedSparse, TeiPredict, TeiRerank)


@router.post("/", openapi_extra=_ROOT_SCHEMA)
@router.post("/invocations", openapi_extra=_ROOT_SCHEMA)
async def invocations(request: Request) -> Response:
    """As TEI (and SageMaker's container contract): the model's task picks the route, an
    embedding model ``/embed``, a SPLADE model ``/embed_sparse``, a classifier ``/predict``,
    a reranker ``/rerank``, a multi-vector model ``/embed_all``."""
    call = call_of(request)
    data = parse_json(await read_body(request))
    named = data.get("model") if isinstance(data, dict) else None
    name = model_for(request, named if isinstance(named, str) else None, None)
    route = _ROOT_ROUTES[call.find(name).task]
    return await route(request, call, data)


_ROOT_ROUTES: dict[Task, Callable[[Request, Call, Any], Awaitable[Response]]] = {
    "embedding": _embed, "sparse": _embed_sparse, "classify": _predict, "rerank": _rerank,
    "multivector": _embed_all}
