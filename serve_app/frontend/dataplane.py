"""The data plane every protocol calls: the served models (:mod:`.registry`), their readiness
and metadata, the checks every request passes after parsing, and the call to the model's
backend. Shutting down (drain) and the inputs in flight are counted here too. No Ray, no HTTP,
no protocol: the REST adapters and the gRPC servicer translate their wire format to these calls
and back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
from collections.abc import Iterator
from typing import Any

from serve_app import __version__
from serve_app.config.schema import LimitOptions
from serve_app.errors import EmptyInput, InvalidInput, ModelNotReady, Overloaded, wrong_task
from serve_app.frontend.prompts import resolve_prompt
from serve_app.frontend.registry import Registry, ServedModel
from serve_app.types import (
    AnyEmbedResult,
    ClassifyRequest,
    ClassifyResult,
    DecodeRequest,
    DecodeResult,
    EmbedRequest,
    ModelInfo,
    RerankRequest,
    RerankResult,
    Task,
    TokenizeRequest,
    TokenizeResult,
)

#: the models' tasks each kind of request goes to
ACCEPTS: dict[Task, tuple[Task, ...]] = {
    "embedding": ("embedding", "sparse", "multivector"), "rerank": ("rerank", "multivector"),
    "classify": ("classify", "rerank"), "sparse": ("sparse",),
    "multivector": ("multivector",)}


class DataPlane:
    """Serves the models of ``registry``.

    ``info`` raises :class:`ModelNotFound` for an unknown name or version and
    :class:`ModelNotReady` while the model has not answered yet (loading, or no replica). Model
    metadata is cached once known. :meth:`embed` and :meth:`rerank` check a request against
    ``limits`` and its model before any model work: the one place requests are validated after
    parsing. ``ready_timeout_s``: how long probes and metadata wait for a model's first answer;
    ``load_timeout_s``: how long a request waits for it (a model still loading).
    """

    def __init__(
        self,
        registry: Registry,
        limits: LimitOptions | None = None,
        server_name: str = "serve_app",
        ready_timeout_s: float = 2.0,
        load_timeout_s: float = 30.0,
    ) -> None:
        self.registry = registry
        self.limits = limits or LimitOptions()
        self.server_name = server_name
        self.server_version = __version__
        self.created = int(time.time())
        self._ready_timeout_s = ready_timeout_s
        self._load_timeout_s = load_timeout_s
        self.draining = False
        self.in_flight = 0
        self._by_priority: collections.Counter[tuple[str, int]] = collections.Counter()

    # -- models ----------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return self.registry.names

    def model(self, name: str, version: str | None = None) -> ServedModel:
        """The served model ``name`` at ``version`` (None: its default version)."""
        return self.registry.get(name, version)

    def depth_by_priority(self) -> dict[tuple[str, int], int]:
        """Inputs in flight per (model name, priority); priorities seen once stay, at 0."""
        return dict(self._by_priority)

    @contextlib.contextmanager
    def _flight(self, model: str, priority: int, n: int) -> Iterator[None]:
        key = (model, priority)
        self.in_flight += 1
        self._by_priority[key] += n
        try:
            yield
        finally:
            self.in_flight -= 1
            self._by_priority[key] -= n

    def queue_depth(self) -> dict[str, int]:
        """Inputs in flight per model name, every version together."""
        depth: dict[str, int] = {}
        for m in self.registry:
            depth[m.name] = depth.get(m.name, 0) + m.backend.queued_inputs()
        return depth

    def engines(self) -> dict[tuple[str, str], dict[str, Any]]:
        """The engine (backend, precision, fidelity) of each (name, version) that has answered
        its metadata."""
        return {(m.name, m.version): m.info.engine for m in self.registry
                if m.info is not None and m.info.engine}

    async def info(self, model: ServedModel, wait: bool = False) -> ModelInfo:
        """Metadata of ``model``; :class:`ModelNotReady` if it does not answer within the ready
        timeout (probes, metadata) or, with ``wait``, the load timeout (inference, which may
        wait a while for a model that is still loading)."""
        if model.info is not None:
            return model.info
        timeout = self._load_timeout_s if wait else self._ready_timeout_s
        try:
            model.info = await asyncio.wait_for(model.backend.info(), timeout)
        except TimeoutError:
            raise ModelNotReady(f"model {model.name!r} is not ready yet", param="model") from None
        return model.info

    async def outputs(self, model: ServedModel) -> tuple[str, ...]:
        """What an embedding request may ask of ``model`` (:attr:`ModelInfo.outputs`: BGE-M3
        answers sparse and multi-vector outputs besides its vectors; known once it has loaded);
        its own answer only, for other tasks."""
        if model.task != "embedding":
            return ("pooled",)
        return (await self.info(model, wait=True)).outputs

    async def stats(self, model: ServedModel) -> dict[str, Any]:
        """Forward-pass statistics of ``model`` (from one replica when there are several)."""
        return await model.backend.stats()

    # -- readiness -------------------------------------------------------------------------

    async def ready(self, model: ServedModel) -> bool:
        """Loaded once (metadata known), able to take requests now, and not shutting down."""
        if self.draining:
            return False
        try:
            await self.info(model)
        except ModelNotReady:
            return False
        return await model.backend.ready()

    async def all_ready(self) -> bool:
        return all(await asyncio.gather(*(self.ready(m) for m in self.registry)))

    def overloaded(self) -> Overloaded | None:
        """While every served model is at its admission bound, the error any request that
        would compute gets (429) before its body is read; else None."""
        if self.registry.names and all(m.backend.full() for m in self.registry):
            return Overloaded("every served model is at its queue limit; retry after a short "
                              "wait")
        return None

    def drain(self) -> int:
        """Start shutting down: readiness turns false (load balancers stop sending) while
        requests still arriving are served. Returns the embeds in flight."""
        self.draining = True
        return self.in_flight

    # -- inference -------------------------------------------------------------------------

    def _check_inputs(self, inputs: tuple[Any, ...], field: str) -> None:
        """Refuse what no model should see: no inputs, too many, over-long ones (before any
        tokenizing)."""
        if not inputs:
            raise EmptyInput(f"at least one {field} is required", param=field)
        limit = self.limits.max_inputs_per_request
        if len(inputs) > limit:
            raise InvalidInput(
                f"{len(inputs)} {field}s in one request; the limit is {limit} "
                "(max_inputs_per_request): send them in several requests",
                param=field,
            )
        chars = self.limits.max_input_chars
        for i, x in enumerate(inputs):
            if len(x) > chars:
                what = "characters" if isinstance(x, str) else "token ids"
                raise InvalidInput(
                    f"{field} {i} has {len(x)} {what}; the limit is {chars} (max_input_chars)",
                    param=field,
                )

    def check(self, req: EmbedRequest) -> None:
        """Refuse an embedding request no model should see (before any lookup of its model)."""
        self._check_inputs(req.inputs, "input")

    async def _ready_info(self, model: ServedModel, task: Task | None) -> ModelInfo:
        """The metadata of ``model`` when it does ``task`` (None: any; a sparse model embeds,
        a reranker classifies pairs) and can take a request now."""
        if task is not None and model.task not in ACCEPTS[task]:  # wrong in every state
            raise wrong_task(model.name, model.task, task)
        if not await model.backend.ready():  # answer now; never queue behind no replica
            raise ModelNotReady(
                f"model {model.name!r} is not ready: no running replica; retry shortly",
                param="model",
            )
        return await self.info(model, wait=True)

    async def embed(self, req: EmbedRequest, model: ServedModel | None = None
                    ) -> AnyEmbedResult:
        """Validate ``req`` and run it on its model (``model``, when the caller found it)."""
        model = model or self.registry.get(req.model, req.version)
        self.check(req)
        info = await self._ready_info(model, "embedding")
        _check_outputs(req, info)
        if req.dimensions is not None and not 1 <= req.dimensions <= info.dim:
            raise InvalidInput(
                f"dimensions must be between 1 and {info.dim}, got {req.dimensions}",
                param="dimensions",
            )
        if req.normalize is False and req.encoding != "float":
            raise InvalidInput(f"encoding {req.encoding!r} quantizes normalized vectors; ask "
                               "for float vectors, or leave normalize on", param="normalize")
        req = resolve_prompt(req, info)
        if info.task == "multivector" or {"tokens", "multivector"} & set(req.outputs):
            # a matrix per text: its answer counts toward the payload limit
            req = dataclasses.replace(req, max_answer_bytes=self.limits.max_body_bytes)
        with self._flight(req.model, req.effective_priority, len(req.inputs)):
            return await model.backend.embed(req)

    async def rerank(self, req: RerankRequest, model: ServedModel | None = None
                     ) -> RerankResult:
        """Validate ``req`` and score its documents on its model (``model``, when the caller
        found it)."""
        model = model or self.registry.get(req.model, req.version)
        if not req.query:
            raise EmptyInput("query must be a non-empty string", param="query")
        self._check_inputs(req.documents, "document")
        if len(req.query) > self.limits.max_input_chars:
            raise InvalidInput(f"query has {len(req.query)} characters; the limit is "
                               f"{self.limits.max_input_chars} (max_input_chars)", param="query")
        await self._ready_info(model, "rerank")
        with self._flight(req.model, req.effective_priority, len(req.documents)):
            return await model.backend.rerank(req)

    async def classify(self, req: ClassifyRequest, model: ServedModel | None = None
                       ) -> ClassifyResult:
        """Validate ``req`` and classify its inputs on its model (``model``, when the caller
        found it)."""
        model = model or self.registry.get(req.model, req.version)
        self._check_inputs(tuple(x if isinstance(x, str) else x[0] + x[1] for x in req.inputs),
                           "input")
        for i, x in enumerate(req.inputs):
            if not x or (not isinstance(x, str) and not all(x)):
                raise EmptyInput(f"input {i} is empty", param="input")
        await self._ready_info(model, "classify")
        with self._flight(req.model, req.effective_priority, len(req.inputs)):
            return await model.backend.classify(req)

    async def tokenize(self, req: TokenizeRequest, model: ServedModel | None = None
                       ) -> TokenizeResult:
        """Validate ``req`` and tokenize its texts with its model's tokenizer."""
        model = model or self.registry.get(req.model, req.version)
        self._check_inputs(req.texts, "input")
        await self._ready_info(model, None)
        return await model.backend.tokenize(req)

    async def decode(self, req: DecodeRequest, model: ServedModel | None = None
                     ) -> DecodeResult:
        """Validate ``req`` and decode its token ids with its model's tokenizer."""
        model = model or self.registry.get(req.model, req.version)
        self._check_inputs(req.ids, "ids")
        await self._ready_info(model, None)
        return await model.backend.decode(req)


def _check_outputs(req: EmbedRequest, info: ModelInfo) -> None:
    """Refuse outputs the model does not answer, and options its answer cannot take."""
    unknown = [o for o in req.outputs if o not in info.outputs]
    if unknown or len(set(req.outputs)) != len(req.outputs):
        raise InvalidInput(f"model {req.model!r} answers the outputs {list(info.outputs)}, "
                           f"each once; asked for {list(req.outputs)}", param="output")
    if len(req.outputs) > 1 and "tokens" in req.outputs:
        raise InvalidInput("every token's hidden state (tokens) comes alone; ask for it in a "
                           "request of its own", param="output")
    dense = info.task == "embedding" and "pooled" in req.outputs
    if not dense and (req.dimensions is not None or req.encoding != "float"):
        what = {"sparse": "a sparse vector spans the vocabulary and comes as indices and "
                "float values (max_active_dims keeps its largest)",
                "multivector": "multi-vector rows come whole, as float32",
                "tokens": "token vectors come whole, as float32"}
        kind = "sparse" if info.task == "sparse" else (
            "multivector" if info.task == "multivector" else req.outputs[0])
        raise InvalidInput(f"dimensions and compact encodings apply to dense vectors: "
                           f"{what.get(kind, kind)}",
                           param="dimensions" if req.dimensions is not None else "encoding")
    if req.max_active_dims is not None:
        if info.task != "sparse" and "sparse" not in req.outputs:
            raise InvalidInput("max_active_dims prunes sparse vectors; this request asks "
                               f"model {req.model!r} for dense ones", param="max_active_dims")
        if req.max_active_dims < 1:
            raise InvalidInput("max_active_dims must be a positive integer",
                               param="max_active_dims")
