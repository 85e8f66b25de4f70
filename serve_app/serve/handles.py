"""The model backends of the ingress over Serve's deployment handles: how the data plane
reaches a model deployment (:class:`HandleBackend`) and a variant it serves
(:class:`VariantBackend`), and which of those deployments have a running replica
(:class:`ReplicaCensus`). Ray modules, as :mod:`serve_app.serve.deployments`."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable
from typing import Any

from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle

from serve_app.errors import DeadlineExceeded, Misrouted, ModelNotReady, ServeAppError
from serve_app.runtime.variants import Residency, describe
from serve_app.serve.coalesce import Coalescer
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
    TokenizeRequest,
    TokenizeResult,
)

Call = EmbedRequest | RerankRequest | ClassifyRequest | TokenizeRequest | DecodeRequest


def _name(enum: Any) -> str:
    return str(getattr(enum, "value", enum))


class ReplicaCensus:
    """Running replicas per deployment of this application, and whether Serve is rolling out a
    new version of it, from Serve's controller, cached for ``ttl_s`` so probes and requests do
    not each ask the controller."""

    def __init__(self, app_name: str, ttl_s: float = 1.0) -> None:
        self._app = app_name
        self._ttl = ttl_s
        self._at = float("-inf")
        self._state: dict[str, tuple[int, bool]] = {}
        self._deploying = False
        self._lock = asyncio.Lock()

    def _fetch(self) -> dict[str, tuple[int, bool]]:
        app = serve.status().applications.get(self._app)
        if app is None:
            return {}
        # While Serve builds a new version of the app, it lists no deployments at all.
        self._deploying = _name(app.status) == "DEPLOYING"
        return {
            name: (sum(n for state, n in d.replica_states.items() if _name(state) == "RUNNING"),
                   _name(d.status) == "UPDATING")
            for name, d in app.deployments.items()
        }

    async def _get(self, deployment: str) -> tuple[int, bool]:
        async with self._lock:
            if time.monotonic() - self._at > self._ttl:
                self._state = await asyncio.to_thread(self._fetch)
                self._at = time.monotonic()
        return self._state.get(deployment, (0, self._deploying))

    async def serving(self, deployment: str) -> bool:
        """A replica runs, or Serve is deploying a new version: with one replica Serve stops
        the old one before the new one runs, and requests wait for it rather than fail."""
        running, updating = await self._get(deployment)
        return running > 0 or updating


def _unwrap(e: BaseException) -> BaseException:
    """The domain error a replica raised, without Ray's wrapper; other errors as they are."""
    cause = getattr(e, "cause", None)
    if isinstance(e, RayTaskError) and isinstance(cause, ServeAppError):
        return cause
    return e


class HandleBackend:
    """A model deployment seen from the ingress (a
    :class:`serve_app.frontend.registry.ModelBackend`).

    ``ready`` is false while the model has no running replica (its node is gone, it is
    restarting), so the data plane answers 503 at once instead of queueing requests that would
    hang; during a rollout of a new version it stays true and requests wait for the new replica.
    A replica lost mid-request is the same retryable error, and so is no answer within
    ``timeout_s``. The wait for an answer also ends at the request's deadline.

    Embedding, reranking and classification requests to a model without variants travel
    coalesced (:class:`serve_app.serve.coalesce.Coalescer`): those arriving in one turn of the
    event loop as one call, which the replica answers request by request
    (``ModelDeployment.many``).
    """

    def __init__(self, handle: DeploymentHandle, census: ReplicaCensus, timeout_s: float,
                 residency: Residency | None = None) -> None:
        self._name = handle.deployment_name
        self._census = census
        self._timeout_s = timeout_s
        self._residency = residency  # a model with variants: what its answers report
        self._in_flight = 0
        self._embed = handle.options(method_name="embed")
        self._rerank = handle.options(method_name="rerank")
        self._classify = handle.options(method_name="classify")
        self._info = handle.options(method_name="info")
        self._tokenize = handle.options(method_name="tokenize")
        self._decode = handle.options(method_name="decode")
        self._stats = handle.options(method_name="stats")
        self._many = handle.options(method_name="many")
        self._coalesced: dict[str, Coalescer[Any, Any]] = {
            kind: Coalescer(functools.partial(self._send_many, kind))
            for kind in ("embed", "rerank", "classify")
        } if residency is None else {}

    async def ready(self) -> bool:
        return await self._census.serving(self._name)

    def queued_inputs(self) -> int:
        return self._in_flight

    def full(self) -> bool:
        return False  # the replicas' bounds are theirs: each refuses for itself

    async def embed(self, req: EmbedRequest) -> AnyEmbedResult:
        result: AnyEmbedResult = await self._counted("embed", self._embed, req,
                                                     len(req.inputs))
        return result

    async def rerank(self, req: RerankRequest) -> RerankResult:
        result: RerankResult = await self._counted("rerank", self._rerank, req,
                                                   len(req.documents))
        return result

    async def classify(self, req: ClassifyRequest) -> ClassifyResult:
        result: ClassifyResult = await self._counted("classify", self._classify, req,
                                                     len(req.inputs))
        return result

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResult:
        result: TokenizeResult = await self._call(self._tokenize, req)
        return result

    async def decode(self, req: DecodeRequest) -> DecodeResult:
        result: DecodeResult = await self._call(self._decode, req)
        return result

    async def _counted(self, kind: str, method: DeploymentHandle,
                       req: EmbedRequest | RerankRequest | ClassifyRequest, n: int) -> Any:
        self._in_flight += n
        try:
            coalescer = self._coalesced.get(kind)
            if coalescer is None:
                return await self._call(method, req)
            return await self._waited(req, coalescer.submit(req))
        finally:
            self._in_flight -= n

    def _timeout(self, req: Call) -> tuple[float, float | None]:
        """How long to wait for ``req``'s answer, and its remaining deadline (None: none)."""
        remaining = req.remaining()
        timeout = self._timeout_s if remaining is None else max(0.0, min(self._timeout_s,
                                                                          remaining))
        return timeout, remaining

    async def _waited(self, req: Call, answer: Awaitable[Any]) -> Any:
        """``answer`` (a coalesced call's share), waited for as :meth:`_call` waits."""
        timeout, remaining = self._timeout(req)
        try:
            return await asyncio.wait_for(answer, timeout)
        except TimeoutError:  # the replica drops the work once its deadline passes
            raise self._no_answer(req.model, remaining) from None

    def _no_answer(self, model: str, remaining: float | None) -> ServeAppError:
        if remaining is not None and remaining <= self._timeout_s:
            return DeadlineExceeded(f"no answer within the request's deadline ({remaining:.3g}s)")
        return ModelNotReady(
            f"model {model!r} gave no answer within {self._timeout_s:g}s; retry later")

    async def _send_many(self, kind: str, reqs: list[Any]) -> list[Any]:
        """One call carrying ``reqs``: each one's result or error, in order (each request's
        own wait ends at its own deadline, :meth:`_waited`)."""
        timeout = max(self._timeout(r)[0] for r in reqs)
        answers: list[Any] = await self._answer(self._many.remote(kind, reqs), reqs[0].model,
                                                timeout, None)
        return answers

    async def _call(self, method: DeploymentHandle, req: Call, *args: Any) -> Any:
        timeout, remaining = self._timeout(req)
        return await self._answer(method.remote(req, *args), req.model, timeout, remaining)

    async def _answer(self, response: Any, model: str, timeout: float,
                      remaining: float | None) -> Any:
        """The answer to a call (``response``) for ``model``, waited for at most ``timeout``
        (``remaining``: the request's deadline, which a timeout is reported against); the
        replica's domain error raised as it is, a lost replica or no answer as retryable."""
        try:
            result = await asyncio.wait_for(response, timeout)
            if self._residency is not None:
                self._residency.update(getattr(result, "variants", None))
            return result
        except RayTaskError as e:
            err = _unwrap(e)
            if self._residency is not None and isinstance(err, ServeAppError):
                self._residency.update(err.variants)
            raise err from None
        except RayActorError:
            raise ModelNotReady(
                f"the replica of model {model!r} was lost during the request; retry"
            ) from None
        except TimeoutError:
            response.cancel()  # the replica drops the work if it has not reached the model
            raise self._no_answer(model, remaining) from None
        except asyncio.CancelledError:
            response.cancel()  # the client went away: so does its work
            raise

    async def info(self) -> ModelInfo:
        try:
            return await self._info.remote()
        except RayTaskError as e:
            raise ModelNotReady(f"model is not ready: {_unwrap(e)}") from None

    async def stats(self) -> dict[str, Any]:
        return await self._stats.remote()


class VariantBackend(HandleBackend):
    """A variant of a model deployment's base, seen from the ingress: its calls carry the
    variant's name as Serve's multiplexed model id, so Serve routes each to a replica that holds
    the variant (or, when none does, to one that then loads it). Its metadata is the base's
    (:func:`serve_app.runtime.variants.describe`): describing it never loads it.

    Requests arriving together load a variant once. Serve's router alone does not ensure it:
    requests it cannot match to a holder yet go to the replica holding the fewest models on
    their second try, and it hears where a variant was loaded only a moment after the load. So
    while no replica holds the variant (``residency``, from the replicas' reports) its requests
    go one at a time; afterwards each names the replicas that hold it, a replica the router
    sends it to before it has heard answers :class:`Misrouted`, and the request goes again
    (backing off from 10 ms), for up to ``reroute_s`` (the config's ``variants.reroute_s``),
    after which any replica may load it."""

    def __init__(self, handle: DeploymentHandle, census: ReplicaCensus, timeout_s: float,
                 residency: Residency, base: HandleBackend, name: str, source: str,
                 reroute_s: float = 2.0) -> None:
        super().__init__(handle.options(multiplexed_model_id=name), census, timeout_s,
                         residency)
        self._base = base
        self._variant = (name, source)
        self._cold = asyncio.Lock()
        self._reroute_s = reroute_s

    async def _call(self, method: DeploymentHandle, req: Call, *args: Any) -> Any:
        assert self._residency is not None
        if not self._residency.holders(req.model):
            async with self._cold:
                if not self._residency.holders(req.model):
                    return await super()._call(method, req)
        wait, until = 0.01, time.monotonic() + self._reroute_s
        while True:
            holders = self._residency.holders(req.model) if time.monotonic() < until else ()
            try:
                return await super()._call(method, req, holders)
            except Misrouted:
                await asyncio.sleep(wait)
                wait *= 2

    async def info(self) -> ModelInfo:
        return describe(await self._base.info(), *self._variant)

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResult:
        """The base's: a variant shares its base's tokenizer, and asking the base loads
        nothing."""
        return await self._base.tokenize(req)

    async def decode(self, req: DecodeRequest) -> DecodeResult:
        return await self._base.decode(req)
