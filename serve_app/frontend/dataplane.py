"""The data plane every protocol adapter calls: models by name and version, their readiness and
metadata, and embedding. No Ray, no HTTP, no protocol: the REST adapters and the gRPC servicer
translate their wire format to these calls and back.

A :class:`ModelBackend` is one model seen from the ingress: a deployment handle in a Serve app with
separate model deployments (:class:`serve_app.serve.handles.HandleBackend`), or the model itself
(:class:`serve_app.runtime.runner.ModelRunner`) when it runs in the ingress replica.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from serve_app import __version__
from serve_app.config.schema import LimitOptions
from serve_app.errors import InvalidInput, ModelNotFound, ModelNotReady, wrong_task
from serve_app.types import (
    INPUT_TYPES,
    NO_PROMPT,
    EmbedRequest,
    EmbedResult,
    ModelInfo,
    RerankRequest,
    RerankResult,
    Task,
)


class ModelBackend(Protocol):
    async def embed(self, req: EmbedRequest) -> EmbedResult: ...

    async def rerank(self, req: RerankRequest) -> RerankResult: ...

    async def info(self) -> ModelInfo: ...

    async def stats(self) -> dict[str, Any]: ...

    async def ready(self) -> bool:
        """Whether the model can take requests now (in Serve: it has a running replica)."""
        ...

    def queued_inputs(self) -> int:
        """Inputs admitted and not answered yet (the queue depth metric)."""
        ...


class DataPlane:
    """Serves the models in ``backends`` (each name's default version) and ``others`` (more
    versions of those names, keyed by (name, version)); ``tasks`` says which names are
    rerankers (the others embed).

    ``info`` raises :class:`ModelNotFound` for an unknown name or version and
    :class:`ModelNotReady` while the model has not answered yet (loading, or no replica). Model
    metadata is cached once known. :meth:`embed` checks a request against ``limits`` and the
    model before any model work: the one place requests are validated after parsing.
    """

    def __init__(
        self,
        backends: Mapping[str, ModelBackend],
        versions: Mapping[str, str] | None = None,
        others: Mapping[tuple[str, str], ModelBackend] | None = None,
        limits: LimitOptions | None = None,
        server_name: str = "serve_app",
        ready_timeout_s: float = 2.0,
        load_timeout_s: float = 30.0,
        tasks: Mapping[str, Task] | None = None,
    ) -> None:
        self._backends = backends
        self._tasks = dict(tasks or {})
        self._others = others or {}
        self._versions = dict(versions or {})
        self._info: dict[tuple[str, str], ModelInfo] = {}
        self.limits = limits or LimitOptions()
        self.server_name = server_name
        self.server_version = __version__
        self.created = int(time.time())
        self._ready_timeout_s = ready_timeout_s
        self._load_timeout_s = load_timeout_s
        self.draining = False
        self.in_flight = 0
        self._levels: collections.Counter[tuple[str, int]] = collections.Counter()

    # -- models ----------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self._backends)

    def version(self, name: str) -> str:
        """The default version of ``name``: what V2 reports and unversioned requests get."""
        return self._versions.get(name, "1")

    def model_versions(self, name: str) -> list[str]:
        """Every served version of ``name``, the default first."""
        self.backend(name)
        return [self.version(name), *sorted(v for n, v in self._others if n == name)]

    def backend(self, name: str, version: str | None = None) -> ModelBackend:
        """The backend of ``name`` at ``version`` (None: its default version)."""
        try:
            default = self._backends[name]
        except KeyError:
            raise ModelNotFound(
                f"model {name!r} is not served here; served models: {self.names}", param="model"
            ) from None
        if version is None or version == self.version(name):
            return default
        try:
            return self._others[(name, version)]
        except KeyError:
            raise ModelNotFound(
                f"model {name!r} has no version {version!r}; versions: "
                f"{self.model_versions(name)}", param="model",
            ) from None

    def task(self, name: str) -> Task:
        self.backend(name)
        return self._tasks.get(name, "embedding")

    def of_task(self, task: Task) -> list[str]:
        """The served names that do ``task``."""
        return [n for n in self.names if self._tasks.get(n, "embedding") == task]

    def reranker(self, name: str | None) -> str:
        """The reranker a request names, or the only one served when it names none."""
        if name is not None:
            return name
        rerankers = self.of_task("rerank")
        if len(rerankers) != 1:
            raise InvalidInput(
                "no reranker is served here" if not rerankers else
                f"several rerankers are served ({rerankers}): name one in 'model'", param="model")
        return rerankers[0]

    def depth_by_level(self) -> dict[tuple[str, int], int]:
        """Inputs in flight per (model name, priority level); levels seen once stay, at 0."""
        return dict(self._levels)

    @contextlib.contextmanager
    def _flight(self, model: str, level: int, n: int) -> Iterator[None]:
        key = (model, level)
        self.in_flight += 1
        self._levels[key] += n
        try:
            yield
        finally:
            self.in_flight -= 1
            self._levels[key] -= n

    def queue_depth(self) -> dict[str, int]:
        """Inputs in flight per model name, every version together."""
        depth = {n: b.queued_inputs() for n, b in self._backends.items()}
        for (name, _), b in self._others.items():
            depth[name] = depth.get(name, 0) + b.queued_inputs()
        return depth

    async def info(self, name: str, version: str | None = None, wait: bool = False) -> ModelInfo:
        """Metadata of ``name`` (at ``version``); :class:`ModelNotReady` if the model does not
        answer within the ready timeout (probes, metadata) or, with ``wait``, the load timeout
        (inference, which may wait a while for a model that is still loading)."""
        key = (name, version or self.version(name))
        cached = self._info.get(key)
        if cached is not None:
            return cached
        backend = self.backend(name, version)
        timeout = self._load_timeout_s if wait else self._ready_timeout_s
        try:
            info = await asyncio.wait_for(backend.info(), timeout)
        except TimeoutError:
            raise ModelNotReady(f"model {name!r} is not ready yet", param="model") from None
        self._info[key] = info
        return info

    async def stats(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Forward-pass statistics of ``name`` (from one replica when there are several)."""
        return await self.backend(name, version).stats()

    # -- readiness -------------------------------------------------------------------------

    async def ready(self, name: str, version: str | None = None) -> bool:
        """Loaded once (metadata known), able to take requests now, and not shutting down."""
        backend = self.backend(name, version)
        if self.draining:
            return False
        try:
            await self.info(name, version)
        except ModelNotReady:
            return False
        return await backend.ready()

    async def all_ready(self) -> bool:
        every = [(n, None) for n in self.names] + list(self._others)
        return all(await asyncio.gather(*(self.ready(n, v) for n, v in every)))

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
            raise InvalidInput(f"at least one {field} is required", param=field)
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
        self._check_inputs(req.inputs, "input")

    async def _model(self, name: str, version: str | None, task: Task
                     ) -> tuple[ModelBackend, ModelInfo]:
        """The backend and metadata of a model that can take a request now and does
        ``task``."""
        backend = self.backend(name, version)
        if self.task(name) != task:  # a mistake whatever the model's state
            raise wrong_task(name, self.task(name))
        if not await backend.ready():  # answer now; never queue behind a model with no replica
            raise ModelNotReady(
                f"model {name!r} is not ready: no running replica; retry shortly",
                param="model",
            )
        return backend, await self.info(name, version, wait=True)

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        """Validate ``req`` and run it on its model."""
        self.backend(req.model, req.version)
        self.check(req)
        backend, info = await self._model(req.model, req.version, "embedding")
        if req.dimensions is not None and not 1 <= req.dimensions <= info.dim:
            raise InvalidInput(
                f"dimensions must be between 1 and {info.dim}, got {req.dimensions}",
                param="dimensions",
            )
        req = resolve_prompt(req, info)
        with self._flight(req.model, req.level, len(req.inputs)):
            return await backend.embed(req)

    async def rerank(self, req: RerankRequest) -> RerankResult:
        """Validate ``req`` and score its documents on its model."""
        self.backend(req.model, req.version)
        if not req.query:
            raise InvalidInput("query must be a non-empty string", param="query")
        self._check_inputs(req.documents, "document")
        if len(req.query) > self.limits.max_input_chars:
            raise InvalidInput(f"query has {len(req.query)} characters; the limit is "
                               f"{self.limits.max_input_chars} (max_input_chars)", param="query")
        backend, _ = await self._model(req.model, req.version, "rerank")
        with self._flight(req.model, req.level, len(req.documents)):
            return await backend.rerank(req)


def resolve_prompt(req: EmbedRequest, info: ModelInfo) -> EmbedRequest:
    """``req`` with its ``input_type`` turned into the model's prompt name for it, after
    checking both against the model's prompts.

    ``prompt_name`` must be one of the model's prompts. ``input_type`` picks the model's prompt
    of that name or of a synonym (``query``/``search_query``, ``document``/``search_document``/
    ``passage``); a model without one for that side embeds those texts with no prompt, as
    asymmetric models without a document prompt (BGE) expect."""
    names = info.prompt_names()
    if req.prompt_name is None and req.input_type is None:
        return req
    if any(not isinstance(x, str) for x in req.inputs):
        raise InvalidInput("prompts apply to texts; token-id inputs are used as they are",
                           param="prompt_name" if req.prompt_name else "input_type")
    if req.prompt_name is not None:
        if req.input_type is not None:
            raise InvalidInput("give prompt_name or input_type, not both", param="input_type")
        if req.prompt_name not in names:
            raise InvalidInput(f"model {req.model!r} has no prompt {req.prompt_name!r}; its "
                               f"prompts: {names}", param="prompt_name")
        return req
    synonyms = INPUT_TYPES.get(str(req.input_type))
    if synonyms is None:
        raise InvalidInput(f"input_type must be one of {sorted(INPUT_TYPES)}, got "
                           f"{req.input_type!r}", param="input_type")
    # no prompt for that side: "" (none), not None, which would add the model's default
    found = next((n for n in synonyms if n in names), NO_PROMPT)
    return dataclasses.replace(req, prompt_name=found, input_type=None)

