"""Ray Serve deployments: thin shims over the engine, the batcher and the HTTP app.

With ``app.py`` these are the only modules that import Ray.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

import numpy as np
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve_app.auth import ApiKeys
from serve_app.batching import Group, InputBound, ModelRunner, forward_batcher, replica_stats
from serve_app.config import AppConfig, ModelConfig
from serve_app.engine import EmbeddingEngine, pick_device, plan_parallelism
from serve_app.errors import DeadlineExceeded, ModelNotReady, Overloaded, ServeAppError
from serve_app.http import create_http_app, enable_access_log
from serve_app.local import LocalBackend
from serve_app.metrics import Metrics
from serve_app.protocols.v2_grpc import GrpcInference
from serve_app.router import ModelBackend, Router
from serve_app.types import EmbedRequest, EmbedResult, ModelInfo

log = logging.getLogger(__name__)  # under "serve_app": see _log_through_serve
_serve_log = logging.getLogger("ray.serve")


def _log_through_serve() -> None:
    """Send serve_app's own loggers (engine start-up progress, warnings) to the replica's Serve
    log file, and to stderr, which Ray streams to the console of the process that started it:
    throughput-optimized mode keeps Serve's own per-request lines off stderr, but start-up
    progress and errors belong on the console."""
    ours = logging.getLogger("serve_app")
    if not ours.handlers:
        for handler in _serve_log.handlers:
            ours.addHandler(handler)
        if not any(type(h) is logging.StreamHandler for h in ours.handlers):
            # the process's own stderr: in that mode Serve points sys.stderr at its log file
            console = logging.StreamHandler(sys.__stderr__)
            console.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(message)s"))
            ours.addHandler(console)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def _count_texts(groups: list[Group]) -> int:
    return sum(len(g) for g in groups)


def load_engine(cfg: ModelConfig) -> tuple[EmbeddingEngine, int, int]:
    """Load and warm up ``cfg``'s engine, logging each step (Serve reports a replica ready only
    after its ``__init__``, so after warm-up); returns it, the forward passes to run at once
    and the replica's torch threads (shared among the passes)."""
    t0 = time.perf_counter()
    # Set explicitly: Ray gives fractional actors OMP_NUM_THREADS=1, and a colocated ingress
    # owns the CPUs of every model it holds.
    threads = cfg.threads
    passes, per_pass = plan_parallelism(threads, pick_device(cfg.device),
                                        cfg.batching.parallel_passes)
    log.info("model %r: starting (%s, %d forward pass(es) at once, %d torch thread(s) each)",
             cfg.name, cfg.model_id, passes, per_pass)
    engine = EmbeddingEngine(cfg, num_threads=per_pass)
    log.info("model %r: warming up", cfg.name)
    warm = engine.warmup()
    log.info("model %r: warmed up in %.2fs; ready after %.2fs", cfg.name, warm,
             time.perf_counter() - t0)
    return engine, passes, threads


@serve.deployment
class EmbeddingModel:
    """One model's replica: loads and warms the engine in ``__init__`` (Serve reports the
    replica ready only after it returns), then embeds :class:`EmbedRequest` objects."""

    def __init__(self, cfg: ModelConfig) -> None:
        _log_through_serve()
        self.engine, passes, threads = load_engine(cfg)
        self.batcher = forward_batcher(self.engine, passes, threads)
        self._batched.set_max_batch_size(  # type: ignore[attr-defined]
            cfg.batching.max_batch_size
        )
        self._batched.set_batch_wait_timeout_s(  # type: ignore[attr-defined]
            cfg.batching.batch_wait_timeout_s
        )
        self.runner = ModelRunner(self.engine, self._batched, cfg.max_queued_inputs,
                                  passes=self.batcher.take_passes, parallel_passes=passes)
        self._info = self.engine.info(cfg.name, cfg.version)

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        return await self.runner.embed(req)

    # max_concurrent_batches is high on purpose: closed batches go straight to the drain
    # batcher, which merges them while the model is busy (see serve_app.batching).
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002, max_concurrent_batches=4096,
                 batch_size_fn=_count_texts)
    async def _batched(self, groups: list[Group]) -> list[np.ndarray | BaseException]:
        return await self.batcher.run(groups)

    def info(self) -> ModelInfo:
        return self._info

    def stats(self) -> dict[str, Any]:
        return replica_stats(self.batcher, self.runner)


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

    async def running(self, deployment: str) -> int:
        return (await self._get(deployment))[0]

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
    """A model deployment seen from the ingress (a :class:`serve_app.router.ModelBackend`).

    ``ready`` is false while the model has no running replica (its node is gone, it is
    restarting), so the router answers 503 at once instead of queueing requests that would hang;
    during a rollout of a new version it stays true and requests wait for the new replica.
    A replica lost mid-request is the same retryable error, and so is no answer within
    ``timeout_s``. Inputs in flight from this ingress are bounded by the model's
    ``max_queued_inputs`` times its running replicas, so a flood is refused here, without a hop
    to the replicas (each of which keeps its own bound too).
    """

    def __init__(self, handle: DeploymentHandle, census: ReplicaCensus, timeout_s: float,
                 max_queued_inputs: int) -> None:
        self._name = handle.deployment_name
        self._census = census
        self._timeout_s = timeout_s
        self._bound = InputBound(max_queued_inputs)
        self._embed = handle.options(method_name="embed")
        self._info = handle.options(method_name="info")
        self._stats = handle.options(method_name="stats")

    async def ready(self) -> bool:
        return await self._census.serving(self._name)

    def queued_inputs(self) -> int:
        return self._bound.held

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        replicas = await self._census.running(self._name)
        with self._bound.hold(req.model, len(req.inputs), replicas):
            return await self._call(req)

    async def _call(self, req: EmbedRequest) -> EmbedResult:
        remaining = req.remaining()
        timeout = self._timeout_s if remaining is None else min(self._timeout_s, remaining)
        if timeout <= 0:
            raise DeadlineExceeded("the request's deadline passed before it reached the model")
        response = self._embed.remote(req)
        try:
            return await asyncio.wait_for(response, timeout)
        except RayTaskError as e:
            raise _unwrap(e) from None
        except BackPressureError:
            raise Overloaded(
                f"model {req.model!r} has too many requests queued; retry after a short wait"
            ) from None
        except RayActorError:
            raise ModelNotReady(
                f"the replica of model {req.model!r} was lost during the request; retry"
            ) from None
        except TimeoutError:
            response.cancel()  # the replica drops the work if it has not reached the model
            if remaining is not None and remaining <= self._timeout_s:
                raise DeadlineExceeded(
                    f"no answer within the request's deadline ({remaining:.3g}s)"
                ) from None
            raise ModelNotReady(
                f"model {req.model!r} gave no answer within {self._timeout_s:g}s; retry later"
            ) from None
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


@serve.deployment
@serve.ingress()
class Ingress(GrpcInference):
    """Speaks every HTTP protocol, and V2 gRPC (the RPC methods inherited from GrpcInference,
    which Ray Serve's gRPC proxy calls by name); routes by model name to the model deployments."""

    def __init__(self, models: dict[str, DeploymentHandle], cfg: AppConfig) -> None:
        _log_through_serve()
        census = ReplicaCensus(serve.get_replica_context().app_name)
        timeout = cfg.ingress.request_timeout_s

        def backend(m: ModelConfig) -> ModelBackend:
            if cfg.colocated:  # the model runs here, in this replica
                engine, passes, threads = load_engine(m)
                return LocalBackend(engine, m.name, m.version, m.max_queued_inputs, passes,
                                    threads)
            return HandleBackend(models[m.deployment_name], census, timeout, m.max_queued_inputs)

        defaults = cfg.defaults()
        backends = {m.name: backend(m) for m in defaults}
        others = {(m.name, m.version): backend(m) for m in cfg.models if m not in defaults}
        accepted = cfg.auth.load_keys()  # read here, in the replica's own environment
        log.info("API keys: %s", f"{len(accepted)} accepted" if accepted else "off")
        if cfg.ingress.access_log:
            enable_access_log()
        self.cfg = cfg
        replica = serve.get_replica_context().replica_id.unique_id
        self.router = Router(backends, server_name=cfg.server_name,
                             versions={m.name: m.version for m in defaults},
                             api_keys=ApiKeys(accepted), limits=cfg.limits, others=others,
                             metrics=Metrics(replica))
        super().__init__(self.router)

    def drain(self) -> int:
        """See :meth:`Router.drain`; the command line calls it on SIGTERM, then polls
        :meth:`in_flight` until the requests in flight have finished."""
        return self.router.drain()

    def in_flight(self) -> int:
        return self.router.in_flight

    def __serve_build_asgi_app__(self) -> Any:
        return create_http_app(self.router, self.cfg.cors, echo_request_id=False)
