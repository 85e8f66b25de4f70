"""What the protocol adapters talk to: models by name, their metadata, readiness. No Ray here.

A :class:`ModelBackend` is one model seen from the ingress: in a Serve app a deployment handle
(``serve_app.deployments``), in unit tests an in-process runner.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, Protocol

from serve_app import __version__
from serve_app.auth import ApiKeys
from serve_app.config import LimitOptions
from serve_app.errors import DeadlineExceeded, InvalidInput, ModelNotFound, ModelNotReady
from serve_app.metrics import Metrics
from serve_app.types import EmbedRequest, EmbedResult, ModelInfo


class ModelBackend(Protocol):
    async def embed(self, req: EmbedRequest) -> EmbedResult: ...

    async def info(self) -> ModelInfo: ...

    async def stats(self) -> dict[str, Any]: ...

    async def ready(self) -> bool:
        """Whether the model can take requests now (in Serve: it has a running replica)."""
        ...

    def queued_inputs(self) -> int:
        """Inputs admitted and not answered yet (the queue depth metric)."""
        ...


class Router:
    """Routes requests to models by name (and version) and caches their metadata.

    ``backends`` holds each name's default version, the one requests without a version get;
    ``others`` more versions of those names, keyed by (name, version). ``info`` raises
    :class:`ModelNotFound` for an unknown name or version and :class:`ModelNotReady` while the
    model has not answered yet (it is loading, or has no replica).
    """

    def __init__(
        self,
        backends: Mapping[str, ModelBackend],
        server_name: str = "serve_app",
        versions: dict[str, str] | None = None,
        ready_timeout_s: float = 2.0,
        load_timeout_s: float = 30.0,
        metrics: Metrics | None = None,
        api_keys: ApiKeys | None = None,
        limits: LimitOptions | None = None,
        others: Mapping[tuple[str, str], ModelBackend] | None = None,
    ) -> None:
        self._backends = backends
        self._others = others or {}
        self._info: dict[tuple[str, str], ModelInfo] = {}
        self.server_name = server_name
        self.server_version = __version__
        self.versions = versions or {}
        self._ready_timeout_s = ready_timeout_s
        self._load_timeout_s = load_timeout_s
        self.created = int(time.time())
        self.metrics = metrics or Metrics()
        self.api_keys = api_keys or ApiKeys()
        self.limits = limits or LimitOptions()
        self.draining = False
        self.in_flight = 0
        self.metrics.watch_queue(self._queue_depth)

    def _queue_depth(self) -> dict[str, int]:
        depth = {n: b.queued_inputs() for n, b in self._backends.items()}
        for (name, _), b in self._others.items():
            depth[name] = depth.get(name, 0) + b.queued_inputs()
        return depth

    @property
    def names(self) -> list[str]:
        return list(self._backends)

    def version(self, name: str) -> str:
        """The default version of ``name``: what V2 reports and unversioned requests get."""
        return self.versions.get(name, "1")

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

    def check_version(self, name: str, version: str | None) -> None:
        self.backend(name, version)

    async def info(self, name: str, wait: bool = False, version: str | None = None) -> ModelInfo:
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

    async def ready(self, name: str, version: str | None = None) -> bool:
        """Loaded once (metadata known), able to take requests now, and not shutting down."""
        if self.draining:
            return False
        try:
            await self.info(name, version=version)
        except ModelNotReady:
            return False
        return await self.backend(name, version).ready()

    def drain(self) -> int:
        """Start shutting down: readiness turns false (load balancers stop sending) while
        requests still arriving are served. Returns the embeds in flight."""
        self.draining = True
        return self.in_flight

    async def all_ready(self) -> bool:
        every = [(n, None) for n in self.names] + list(self._others)
        results = await asyncio.gather(*(self.ready(n, v) for n, v in every))
        return all(results)

    async def stats(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Forward-pass statistics of ``name`` (from one replica when there are several)."""
        return await self.backend(name, version).stats()

    def check_limits(self, req: EmbedRequest) -> None:
        """Refuse what no model should see: too many inputs, over-long texts (before any
        tokenizing), a deadline already passed."""
        if not req.inputs:
            raise InvalidInput("input must not be empty", param="input")
        limit = self.limits.max_inputs_per_request
        if len(req.inputs) > limit:
            raise InvalidInput(
                f"{len(req.inputs)} inputs in one request; the limit is {limit} "
                "(max_inputs_per_request): send them in several requests",
                param="input",
            )
        chars = self.limits.max_input_chars
        for i, x in enumerate(req.inputs):
            if len(x) > chars:
                what = "characters" if isinstance(x, str) else "token ids"
                raise InvalidInput(
                    f"input {i} has {len(x)} {what}; the limit is {chars} (max_input_chars)",
                    param="input",
                )
        remaining = req.remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the request's deadline passed before it was started")

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        """Validate what the ingress can know about ``req`` and run it on its model."""
        self.check_limits(req)
        backend = self.backend(req.model, req.version)
        if not await backend.ready():  # answer now; never queue behind a model with no replica
            raise ModelNotReady(
                f"model {req.model!r} is not ready: no running replica; retry shortly",
                param="model",
            )
        info = await self.info(req.model, wait=True, version=req.version)
        if req.dimensions is not None and not 1 <= req.dimensions <= info.dim:
            raise InvalidInput(
                f"dimensions must be between 1 and {info.dim}, got {req.dimensions}",
                param="dimensions",
            )
        self.in_flight += 1
        try:
            result = await backend.embed(req)
        finally:
            self.in_flight -= 1
        self.metrics.observe_embedding(req.model, req.protocol, len(req.inputs), result)
        return result
