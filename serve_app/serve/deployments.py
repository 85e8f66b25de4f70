"""The Ray Serve deployments, thin shims: :class:`ModelDeployment` holds one model's runner
(and its variants, through Serve's model multiplexing); :class:`Ingress` holds the frontend
(the HTTP app and the gRPC servicer over one data plane) and, colocated, the models' runners
themselves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config.schema import AppConfig, ModelConfig
from serve_app.errors import ServeAppError
from serve_app.frontend.auth import ApiKeys
from serve_app.frontend.context import ServerContext
from serve_app.frontend.dataplane import DataPlane
from serve_app.frontend.http.app import create_http_app, enable_access_log
from serve_app.frontend.metrics import Metrics
from serve_app.frontend.registry import ModelBackend, build_registry
from serve_app.frontend.v2.servicer import GrpcInference
from serve_app.runtime.load import load_runner, passes_of
from serve_app.runtime.runner import ModelRunner, ReplicaResources
from serve_app.runtime.variants import Residency, Variant, VariantHost
from serve_app.serve.handles import HandleBackend, ReplicaCensus, VariantBackend
from serve_app.serve.logs import log_through_serve
from serve_app.types import (
    AnyEmbedResult,
    ClassifyRequest,
    ClassifyResult,
    DecodeRequest,
    DecodeResult,
    EmbedRequest,
    Measured,
    ModelInfo,
    RerankRequest,
    RerankResult,
    TokenizeRequest,
    TokenizeResult,
)

log = logging.getLogger(__name__)  # under "serve_app": see serve.logs


R = TypeVar("R", bound=Measured)


@serve.deployment
class ModelDeployment:
    """One model's replica (the separate topology): its runner
    (:func:`serve_app.runtime.load.load_runner`) built in ``__init__``, then
    :class:`EmbedRequest` (a reranker :class:`RerankRequest`, a classifier
    :class:`ClassifyRequest`) objects in, results out.

    With ``variants``, a request whose multiplexed model id names a variant goes to that variant's
    model (:class:`serve_app.runtime.variants.VariantHost`), loaded through ``@serve.multiplexed``,
    and every answer carries the replica's :class:`serve_app.types.VariantReport`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        log_through_serve()
        self.host: VariantHost | None = None
        if cfg.variants is None:
            self.model = load_runner(cfg)
            return
        # the base and its variants share the replica's CPUs and its one input bound
        shared = ReplicaResources.of(passes_of(cfg)[0], cfg.max_queued_inputs)
        self.model = load_runner(cfg, shared)
        host = self.host = VariantHost(
            cfg, self.model.engine.info(cfg.name, cfg.version),
            functools.partial(load_runner, shared=shared, variant=True),
            serve.get_replica_context().replica_id.unique_id)

        async def load_variant(name: str) -> Variant:
            return await host.load(name)

        # wired here, not on the class: the most a replica holds comes from the config
        self._load_variant = serve.multiplexed(
            max_num_models_per_replica=cfg.variants.max_loaded)(load_variant)

    async def _model(self, holders: tuple[str, ...]) -> ModelRunner:
        """The model a request names: a variant by its multiplexed model id, else the base."""
        name = serve.get_multiplexed_model_id()
        if self.host is None or not name:
            return self.model
        return await self.host.get(name, self._load_variant, holders)

    async def _reported(self, run: Callable[[ModelRunner], Awaitable[R]],
                        holders: tuple[str, ...]) -> R:
        """``run`` on the model the request names; its answer, or its error, carries this
        replica's report of its variants. ``holders``: the replicas the ingress heard hold the
        variant (:meth:`serve_app.runtime.variants.VariantHost.get`)."""
        if self.host is None:
            return await run(self.model)
        try:
            result = await run(await self._model(holders))
        except ServeAppError as e:
            e.variants = self.host.report()
            raise
        return dataclasses.replace(result, variants=self.host.report())

    async def embed(self, req: EmbedRequest, holders: tuple[str, ...] = ()
                    ) -> AnyEmbedResult:
        return await self._reported(lambda model: model.embed(req), holders)

    async def rerank(self, req: RerankRequest, holders: tuple[str, ...] = ()) -> RerankResult:
        return await self._reported(lambda model: model.rerank(req), holders)

    async def classify(self, req: ClassifyRequest, holders: tuple[str, ...] = ()
                       ) -> ClassifyResult:
        return await self._reported(lambda model: model.classify(req), holders)

    async def many(self, kind: str, reqs: list[EmbedRequest | RerankRequest | ClassifyRequest]
                   ) -> list[Measured | BaseException]:
        """The requests of one coalesced call (:mod:`serve_app.serve.coalesce`; a model without
        variants), each run as if it came alone: each one's result or error, in order.
        ``kind``: the runner's method (``embed``, ``rerank`` or ``classify``)."""
        assert kind in ("embed", "rerank", "classify"), kind
        run: Callable[[Any], Awaitable[Measured]] = getattr(self.model, kind)
        return list(await asyncio.gather(*(run(r) for r in reqs), return_exceptions=True))

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResult:
        return await self.model.tokenize(req)  # variants share the base's tokenizer

    async def decode(self, req: DecodeRequest) -> DecodeResult:
        return await self.model.decode(req)

    async def info(self) -> ModelInfo:
        return await self.model.info()

    async def stats(self) -> dict[str, Any]:
        """The statistics of the model a request names; a variant this replica does not hold
        has none (``loaded`` false). A replica with variants adds theirs (``variants``)."""
        if self.host is None:
            return await self.model.stats()
        name = serve.get_multiplexed_model_id()
        model: ModelRunner | None = self.model
        if name:  # a variant: its statistics only where it is held
            held = self.host.resident.get(name)
            model = None if held is None else held.model
        own = {} if model is None else await model.stats()
        return {**own, "loaded": model is not None, "variants": self.host.stats()}


@serve.deployment
@serve.ingress()
class Ingress(GrpcInference):
    """Speaks every HTTP protocol, and V2 gRPC (the RPC methods inherited from GrpcInference,
    which Ray Serve's gRPC proxy calls by name); routes by model name to the model deployments."""

    def __init__(self, models: dict[str, DeploymentHandle], cfg: AppConfig) -> None:
        log_through_serve()
        census = ReplicaCensus(serve.get_replica_context().app_name)
        timeout = cfg.ingress.request_timeout_s

        residency = {m.deployment_name: Residency() for m in cfg.models if m.variants}

        def backend(m: ModelConfig) -> ModelBackend:
            if cfg.colocated:  # the model runs here, in this replica
                return load_runner(m)
            return HandleBackend(models[m.deployment_name], census, timeout,
                                 residency.get(m.deployment_name))

        def variant(m: ModelConfig, name: str, source: str, base: ModelBackend) -> ModelBackend:
            assert isinstance(base, HandleBackend)  # variants are never colocated
            assert m.variants is not None
            return VariantBackend(models[m.deployment_name], census, timeout,
                                  residency[m.deployment_name], base, name, source,
                                  m.variants.reroute_s)

        registry = build_registry(cfg, backend, variant)
        accepted = cfg.auth.load_keys()  # read here, in the replica's own environment
        log.info("API keys: %s", f"{len(accepted)} accepted" if accepted else "off")
        if cfg.ingress.access_log:
            enable_access_log()
        self.cfg = cfg
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.dataplane = DataPlane(registry, limits=cfg.limits, server_name=cfg.server_name,
                                   ready_timeout_s=cfg.ingress.probe_timeout_s,
                                   load_timeout_s=cfg.ingress.model_load_timeout_s)
        context = ServerContext(Metrics(self.replica), ApiKeys(accepted),
                                cfg.limits.max_body_bytes)
        super().__init__(self.dataplane, context)

    def drain(self) -> tuple[str, int]:
        """See :meth:`DataPlane.drain`: this replica's id and its requests in flight. The
        command line calls it on SIGTERM until every ingress replica has answered, then polls
        :meth:`in_flight` until none has any left."""
        return self.replica, self.dataplane.drain()

    def in_flight(self) -> tuple[str, int]:
        return self.replica, self.dataplane.in_flight

    def __serve_build_asgi_app__(self) -> Any:
        return create_http_app(self.dataplane, self.context, self.cfg.cors,
                               echo_request_id=False)
