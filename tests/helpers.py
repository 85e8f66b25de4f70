"""What the tests share: the texts, an in-process app and its client, the one fake model
backend, gRPC request building, metrics scraping, and (from :mod:`serve_app.testing.server`) real
servers. Test modules import this module, never one another."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from serve_app.config.schema import CorsOptions, LimitOptions
from serve_app.engine.embedding import EmbeddingEngine
from serve_app.engine.quantize import reduce_dimensions
from serve_app.errors import DeadlineExceeded
from serve_app.frontend.auth import ApiKeys
from serve_app.frontend.context import ServerContext
from serve_app.frontend.dataplane import DataPlane
from serve_app.frontend.http.app import create_http_app
from serve_app.frontend.metrics import Metrics
from serve_app.frontend.registry import ModelBackend, Registry
from serve_app.frontend.v2.codec import join_bytes_tensor
from serve_app.frontend.v2.proto import inference_pb2 as pb
from serve_app.frontend.v2.proto import inference_pb2_grpc as pb_grpc
from serve_app.frontend.v2.servicer import GrpcInference, add_inference_servicer
from serve_app.runtime.runner import ModelRunner
from serve_app.testing.server import (  # noqa: F401  (re-exported for the end-to-end tests)
    BIN,
    Server,
    free_port,
    haproxy_ports_env,
    process_tree,
    running,
    serve_config,
    start_server,
    stop_process,
    tree_rss_bytes,
    wait_for,
)
from serve_app.types import EmbedRequest, EmbedResult, ModelInfo, Task

REPO = Path(__file__).resolve().parent.parent
SENTENCE = "This is an example sentence."
TEXTS = [SENTENCE, "Der schnelle braune Fuchs.", "東京は日本の首都です。", "long text " * 300]


def replica(engine: EmbeddingEngine, name: str = "embedding", version: str = "1",
            **kw: Any) -> ModelRunner:
    """``engine`` served in process as a replica serves it (its requests enter the queue
    directly, where a Serve replica has ``@serve.batch`` in front)."""
    return ModelRunner(engine, name, version, **kw)


def make_dataplane(backends: Mapping[str, ModelBackend], *,
                   versions: Mapping[str, str] | None = None,
                   others: Mapping[tuple[str, str], ModelBackend] | None = None,
                   tasks: Mapping[str, Task] | None = None, **kw: Any) -> DataPlane:
    """A data plane over plain mappings (:meth:`Registry.of`); ``kw`` as :class:`DataPlane`."""
    return DataPlane(Registry.of(backends, versions=versions, others=others, tasks=tasks), **kw)


@contextlib.contextmanager
def app_client(backends: Mapping[str, ModelBackend] | DataPlane, *,
               limits: LimitOptions | None = None, api_keys: tuple[str, ...] = (),
               cors: CorsOptions | None = None, metrics: Metrics | None = None,
               **dataplane_kw: Any) -> Iterator[TestClient]:
    """A TestClient of the HTTP app over ``backends`` (or a ready data plane)."""
    limits = limits or LimitOptions()
    dp = backends if isinstance(backends, DataPlane) else make_dataplane(
        backends, limits=limits, **dataplane_kw)
    context = ServerContext(metrics or Metrics(), ApiKeys(api_keys), limits.max_body_bytes)
    with TestClient(create_http_app(dp, context, cors)) as client:
        yield client


def assert_valid_serve_config(raw: dict) -> None:
    """Ray's schema for the file, our strict schema for the args, and no key either ignores."""
    from ray.serve.schema import ServeDeploySchema

    from serve_app.config.schema import AppConfig

    schema = ServeDeploySchema.model_validate(raw)
    _assert_no_dropped_keys(raw, schema)
    for app in raw["applications"]:
        assert app["import_path"] == "serve_app.serve:build_app"
        AppConfig.model_validate(app.get("args") or {})


def _assert_no_dropped_keys(raw: dict, schema: Any) -> None:
    """Ray Serve drops unknown keys silently: every key in the file must be a schema field."""
    known = set(type(schema).__fields__) if hasattr(type(schema), "__fields__") else set()
    unknown = set(raw) - known
    assert not unknown, f"keys Ray Serve would ignore: {sorted(unknown)}"
    for section in ("http_options", "grpc_options"):
        if section in raw:
            sub = getattr(schema, section)
            assert not set(raw[section]) - set(type(sub).__fields__), section
    for app_raw, app in zip(raw["applications"], schema.applications, strict=True):
        assert not set(app_raw) - set(type(app).__fields__), app_raw.get("name")


def fake_vector(text: str | tuple[int, ...], dim: int) -> np.ndarray:
    """A unit vector that depends on the text alone."""
    seed = int.from_bytes(hashlib.sha256(repr(text).encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


class FakeBackend:
    """The one test double of :class:`serve_app.frontend.registry.ModelBackend`: no model, each
    input a :func:`fake_vector` of ``dim`` floats and one token per character.

    ``ready``: what readiness says. ``loads``: False makes ``info`` never answer (a model still
    loading). ``delay``: seconds before an answer; a request whose deadline comes first gets
    :class:`DeadlineExceeded` (counted in ``expired``). ``error``: raised by ``embed``.
    ``requests`` records what reached the backend."""

    def __init__(self, name: str = "fake", dim: int = 8, *, ready: bool = True,
                 loads: bool = True, delay: float = 0.0, error: Exception | None = None,
                 version: str = "1") -> None:
        self._info = ModelInfo(name, version, dim, 512, 30522, f"fake/{name}", "mean", True)
        self.is_ready = ready
        self.loads = loads
        self.delay = delay
        self.error = error
        self.requests: list[EmbedRequest] = []
        self.expired = 0

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        self.requests.append(req)
        if self.delay:
            remaining = req.remaining()
            try:
                await asyncio.wait_for(asyncio.sleep(self.delay),
                                       None if remaining is None else max(remaining, 0))
            except TimeoutError:
                self.expired += 1
                raise DeadlineExceeded("the deadline passed in the backend") from None
        if self.error is not None:
            raise self.error
        vectors = np.stack([fake_vector(x, self._info.dim) for x in req.inputs])
        if req.dimensions is not None:
            vectors = reduce_dimensions(vectors, req.dimensions)
        counts = np.array([len(x) for x in req.inputs], np.int64)
        return EmbedResult(embeddings=vectors, token_counts=counts)

    async def info(self) -> ModelInfo:
        if not self.loads:
            await asyncio.sleep(3600)
        return self._info

    async def stats(self) -> dict[str, Any]:
        return {"texts": 0, "passes": 0, "batches": []}

    async def ready(self) -> bool:
        return self.is_ready

    def queued_inputs(self) -> int:
        return 0


def infer_request(texts: list[str | bytes], raw: bool = False, shape: list[int] | None = None,
                  datatype: str = "BYTES", model: str = "embedding",
                  **kw: Any) -> pb.ModelInferRequest:
    """A V2 gRPC ModelInferRequest of ``texts``: in ``bytes_contents``, or ``raw`` bytes."""
    inp = pb.ModelInferRequest.InferInputTensor(name="text", datatype=datatype,
                                                shape=shape or [len(texts)])
    req = pb.ModelInferRequest(model_name=model, inputs=[inp], **kw)
    data = [t.encode() if isinstance(t, str) else t for t in texts]
    if raw:
        req.raw_input_contents.append(join_bytes_tensor(data))
    else:
        req.inputs[0].contents.bytes_contents.extend(data)
    return req


class LoopStub:
    """A grpcio aio stub whose calls run to completion on ``loop``, where the server runs too
    (one thread: grpc.aio servers stall when their loop lives in a background thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 stub: pb_grpc.GRPCInferenceServiceStub) -> None:
        self._loop = loop
        self._stub = stub

    def __getattr__(self, method: str) -> Any:
        rpc = getattr(self._stub, method)
        return lambda request, metadata=None: self._loop.run_until_complete(
            rpc(request, metadata=metadata, timeout=30))


@contextlib.contextmanager
def grpc_serving(dataplane: DataPlane,
                 context: ServerContext | None = None) -> Iterator[LoopStub]:
    """A grpc.aio server on a loopback port with the V2 servicer over ``dataplane``, and a
    stub for it."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # grpc.aio initialises itself from the current loop

    async def start() -> tuple[Any, Any]:  # grpc.aio objects bind to the loop they are made on
        import grpc

        server = grpc.aio.server()
        add_inference_servicer(GrpcInference(dataplane, context or ServerContext()), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")

    server, channel = loop.run_until_complete(start())
    try:
        yield LoopStub(loop, pb_grpc.GRPCInferenceServiceStub(channel))
    finally:
        loop.run_until_complete(channel.close())
        loop.run_until_complete(server.stop(0))
        asyncio.set_event_loop(None)
        loop.close()


def scrape(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text as {(sample name, labels but ``replica``): value}, with every sample
    labelled with the one ingress replica that served the scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = [smp for fam in text_string_to_metric_families(text) for smp in fam.samples]
    assert len({smp.labels.get("replica") for smp in samples}) == 1
    return {(smp.name, frozenset((k, v) for k, v in smp.labels.items() if k != "replica")):
            smp.value for smp in samples}


def sample(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scraped_total(client: Any, name: str, **labels: str) -> float:
    """``name`` summed over every series whose labels include ``labels``, scraped now from the
    server ``client`` (an ``httpx.Client`` on its base URL) talks to."""
    want = set(labels.items())
    return sum(v for (n, ls), v in scrape(client.get("/metrics").text).items()
               if n == name and want <= ls)


#: Files of a checkpoint that hold its weights or their config: what a variant writes anew.
_WEIGHT_FILES = {"model.safetensors", "pytorch_model.bin", "config.json"}


def make_variants(base: Path, out: Path, names: list[str], scale: float = 0.05,
                  pooling: str | None = None) -> dict[str, Path]:
    """Stand-ins for checkpoints fine-tuned from ``base`` (a sentence-transformers directory),
    one sub-directory of ``out`` per name: ``base``'s files linked, its weights each moved by
    seeded noise of ``scale`` times the weight's spread, so every variant embeds differently
    while keeping the base's width, tokenizer, pooling (unless ``pooling`` names another mode:
    then not a variant of ``base``) and prompts."""
    import torch
    import transformers

    model = transformers.AutoModel.from_pretrained(base)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    made = {}
    for i, name in enumerate(names):
        d = out / name
        d.mkdir(parents=True)
        for f in base.iterdir():
            if f.name not in _WEIGHT_FILES and not (pooling and f.name == "1_Pooling"):
                (d / f.name).symlink_to(f)
        if pooling:
            (d / "1_Pooling").mkdir()
            (d / "1_Pooling" / "config.json").write_text(json.dumps(
                {"word_embedding_dimension": model.config.hidden_size, "pooling_mode": pooling}))
        noise = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for k, w in model.state_dict().items():
                if w.is_floating_point() and w.numel() > 1:
                    spread = original[k].std()
                    w.copy_(original[k] + torch.randn(w.shape, generator=noise) * scale * spread)
        model.save_pretrained(d)
        made[name] = d
    return made
