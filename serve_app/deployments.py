"""Ray Serve deployments: thin shims over the engine, the batcher and the HTTP app.

With ``app.py`` these are the only modules that import Ray.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from serve_app.batching import DrainBatcher, ModelRunner, Seqs
from serve_app.config import ModelConfig
from serve_app.engine import EmbeddingEngine
from serve_app.errors import ModelNotReady, ServeAppError
from serve_app.http import create_http_app
from serve_app.protocols.v2_grpc import GrpcInference
from serve_app.router import Router
from serve_app.types import EmbedRequest, EmbedResult, ModelInfo

log = logging.getLogger("ray.serve")


def _owned_cpus() -> int:
    """Whole CPUs Ray assigned to this actor (at least 1): Ray sets OMP_NUM_THREADS=1 for
    fractional actors, so torch would otherwise run on one thread whatever it was given."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
    return max(1, int(cpus))


def _count_texts(groups: list[Seqs]) -> int:
    return sum(len(g) for g in groups)


@serve.deployment
class EmbeddingModel:
    """One model's replica: loads and warms the engine in ``__init__`` (Serve reports the
    replica ready only after it returns), then embeds :class:`EmbedRequest` objects."""

    def __init__(self, cfg: ModelConfig) -> None:
        threads = cfg.torch_threads or _owned_cpus()
        self.cfg = cfg
        self.engine = EmbeddingEngine(cfg, num_threads=threads)
        warm = self.engine.warmup()
        log.info("model %r warmed up in %.2fs", cfg.name, warm)
        self.batcher = DrainBatcher(self.engine.embed_ids, cfg.batching.max_batch_size)
        self._batched.set_max_batch_size(  # type: ignore[attr-defined]
            cfg.batching.max_batch_size
        )
        self._batched.set_batch_wait_timeout_s(  # type: ignore[attr-defined]
            cfg.batching.batch_wait_timeout_s
        )
        self.runner = ModelRunner(self.engine, self._batched)
        self._info = self.engine.info(cfg.name, cfg.version)

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        return await self.runner.embed(req)

    # max_concurrent_batches is high on purpose: closed batches go straight to the drain
    # batcher, which merges them while the model is busy (see serve_app.batching).
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002, max_concurrent_batches=4096,
                 batch_size_fn=_count_texts)
    async def _batched(self, groups: list[Seqs]) -> list[np.ndarray]:
        return await self.batcher.run(groups)

    def info(self) -> ModelInfo:
        return self._info

    def stats(self) -> dict[str, Any]:
        return self.batcher.stats.as_dict()


def _unwrap(e: BaseException) -> BaseException:
    """The domain error a replica raised, without Ray's wrapper; other errors as they are."""
    cause = getattr(e, "cause", None)
    if isinstance(e, RayTaskError) and isinstance(cause, ServeAppError):
        return cause
    return e


class HandleBackend:
    """A model deployment seen from the ingress (a :class:`serve_app.router.ModelBackend`)."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._embed = handle.options(method_name="embed")
        self._info = handle.options(method_name="info")
        self._stats = handle.options(method_name="stats")

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        try:
            return await self._embed.remote(req)
        except RayTaskError as e:
            raise _unwrap(e) from None

    async def info(self) -> ModelInfo:
        try:
            return await self._info.remote()
        except RayTaskError as e:
            raise ModelNotReady(f"model is not ready: {_unwrap(e)}") from None

    async def stats(self) -> dict[str, Any]:
        return await self._stats.remote()


@serve.deployment
@serve.ingress()
class Ingress(GrpcInference):
    """Speaks every HTTP protocol, and V2 gRPC (the RPC methods inherited from GrpcInference,
    which Ray Serve's gRPC proxy calls by name); routes by model name to the model deployments."""

    def __init__(
        self, models: dict[str, DeploymentHandle], server_name: str, versions: dict[str, str]
    ) -> None:
        backends = {name: HandleBackend(h) for name, h in models.items()}
        self.router = Router(backends, server_name=server_name, versions=versions)
        super().__init__(self.router)

    def __serve_build_asgi_app__(self) -> Any:
        return create_http_app(self.router)
