"""What the tests share: the texts, an in-process app and its client, the one fake model
backend, gRPC request building, the bad-input matrix, and (from :mod:`serve_app.testing`) real
servers, metrics scraping and variant checkpoints. Test modules import this module, never one
another."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from fastapi.testclient import TestClient

from serve_app.config.schema import CorsOptions, LimitOptions
from serve_app.engine.embedding import EmbeddingEngine
from serve_app.engine.quantize import reduce_dimensions
from serve_app.errors import DeadlineExceeded
from serve_app.frontend.auth import ApiKeys
from serve_app.frontend.context import ServerContext
from serve_app.frontend.dataplane import DataPlane
from serve_app.frontend.http.app import create_http_app
from serve_app.frontend.http.route import TEI_PATHS, protocol_of
from serve_app.frontend.metrics import Metrics
from serve_app.frontend.registry import ModelBackend, Registry
from serve_app.frontend.v2.codec import join_bytes_tensor
from serve_app.frontend.v2.proto import inference_pb2 as pb
from serve_app.frontend.v2.proto import inference_pb2_grpc as pb_grpc
from serve_app.frontend.v2.servicer import GrpcInference, add_inference_servicer
from serve_app.runtime.runner import ModelRunner
from serve_app.testing.metrics import sample, scrape, scraped_total  # noqa: F401  (re-exported)
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
from serve_app.testing.texts import SENTENCE, TEXTS  # noqa: F401  (re-exported)
from serve_app.testing.variants import make_variants  # noqa: F401  (re-exported)
from serve_app.types import (
    EmbedRequest,
    EmbedResult,
    ModelInfo,
    Task,
    Token,
    TokenizeRequest,
    TokenizeResult,
)

REPO = Path(__file__).resolve().parent.parent

#: The robustness server's limits and admission bound (tests/conftest.py's robust_server), which
#: the bad-input matrix (tests/test_bad_input.py) also runs in process under.
ROBUST_LIMITS = {"max_inputs_per_request": 64, "max_input_chars": 5000,
                 "max_body_bytes": 256 * 1024}
ROBUST_QUEUE = 64
#: The variants server's variants (tests/conftest.py's variants_server), how many a replica
#: holds, and its own calibration corpus (its int8 codes are compared on it).
VARIANTS = [f"v{i}" for i in range(6)]
MAX_LOADED = 2
VARIANT_CORPUS = [f"calibration text number {i} about {w}" for i, w in
                  enumerate(["cats", "the weather", "stock prices", "python code", "a recipe"] * 8)]


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
        self.is_full = False

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

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResult:
        """One token per character, as the fake counts them."""
        return TokenizeResult(tuple(
            tuple(Token(ord(ch), ch, False, i, i + 1) for i, ch in enumerate(text))
            for text in req.texts))

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

    def full(self) -> bool:
        return self.is_full


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


# -- the bad-input matrix: every protocol, each case its 4xx (or gRPC code) -----------------------
# Run whole in process (tests/test_bad_input.py: the same frontend and replica code, no Ray)
# and by sample against the robustness server (tests/test_robustness.py), both under
# ROBUST_LIMITS.

MAX_INPUTS = ROBUST_LIMITS["max_inputs_per_request"]
MAX_CHARS = ROBUST_LIMITS["max_input_chars"]
MAX_BODY = ROBUST_LIMITS["max_body_bytes"]
LONG = "word " * 400  # over MiniLM's 256 tokens
OAI = "/v1/embeddings"
V1 = "/v1/models/embedding:predict"
V2 = "/v2/models/embedding/infer"
JSON = {"content-type": "application/json"}


def oai_body(**body: Any) -> bytes:
    return json.dumps({"model": "embedding", **body}).encode()


def v2_body(texts: list[Any], datatype: str = "BYTES", shape: list[int] | None = None,
            **extra: Any) -> bytes:
    inp = {"name": "text", "shape": shape or [len(texts)], "datatype": datatype, "data": texts}
    return json.dumps({"inputs": [inp], **extra}).encode()


def v2_binary(case: str, raw: bytes, header_len: str | None = None) -> tuple:
    """A matrix case: one binary BYTES input of ``raw``, refused with a 400."""
    head = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    headers = {"inference-header-content-length": header_len or str(len(head))}
    return (case, "POST", V2, head + raw, headers, 400)


BIG = "x" * (MAX_BODY + 10)
# (id, method, path, body, extra headers, status)
HTTP_CASES: list[tuple[str, str, str, bytes, dict[str, str], int]] = [
    ("oai-malformed-json", "POST", OAI, b'{"model": "embedding", "input": ', JSON, 400),
    ("oai-body-is-a-list", "POST", OAI, b"[1, 2]", JSON, 400),
    ("oai-empty-body", "POST", OAI, b"", JSON, 400),
    ("oai-missing-input", "POST", OAI, oai_body(), JSON, 400),
    ("oai-missing-model", "POST", OAI, b'{"input": "x"}', JSON, 400),
    ("oai-model-not-a-string", "POST", OAI, b'{"input": "x", "model": 5}', JSON, 400),
    ("oai-input-null", "POST", OAI, oai_body(input=None), JSON, 400),
    ("oai-input-number", "POST", OAI, oai_body(input=5), JSON, 400),
    ("oai-input-empty-string", "POST", OAI, oai_body(input=""), JSON, 400),
    ("oai-input-empty-list", "POST", OAI, oai_body(input=[]), JSON, 400),
    ("oai-input-mixed-types", "POST", OAI, oai_body(input=["a", 3]), JSON, 400),
    ("oai-input-empty-token-list", "POST", OAI, oai_body(input=[[]]), JSON, 400),
    ("oai-token-id-out-of-vocab", "POST", OAI, oai_body(input=[[101, 999999, 102]]), JSON, 400),
    ("oai-negative-token-id", "POST", OAI, oai_body(input=[-1, 5]), JSON, 400),
    ("oai-dimensions-zero", "POST", OAI, oai_body(input="x", dimensions=0), JSON, 400),
    ("oai-dimensions-negative", "POST", OAI, oai_body(input="x", dimensions=-5), JSON, 400),
    ("oai-dimensions-huge", "POST", OAI, oai_body(input="x", dimensions=10**12), JSON, 400),
    ("oai-dimensions-string", "POST", OAI, oai_body(input="x", dimensions="8"), JSON, 400),
    ("oai-encoding-format", "POST", OAI, oai_body(input="x", encoding_format="int4"), JSON, 400),
    ("oai-unknown-model", "POST", OAI, b'{"model": "nope", "input": "x"}', JSON, 404),
    ("oai-too-many-inputs", "POST", OAI, oai_body(input=["a"] * (MAX_INPUTS + 1)), JSON, 400),
    ("oai-input-too-long", "POST", OAI, oai_body(input="y" * (MAX_CHARS + 1)), JSON, 400),
    ("oai-too-many-tokens-no-truncate", "POST", OAI, oai_body(input=LONG, truncate=False), JSON,
     400),
    ("oai-oversize-body", "POST", OAI, oai_body(input=BIG), JSON, 413),
    ("oai-invalid-utf8", "POST", OAI, b'{"model": "embedding", "input": "\xff\xfe"}', JSON, 400),
    ("oai-text-plain", "POST", OAI, b"embed this please", {"content-type": "text/plain"}, 400),
    ("oai-bad-timeout-header", "POST", OAI, oai_body(input="x"), {"x-request-timeout": "soon"},
     400),
    ("oai-openai-prefix-bad", "POST", "/openai/v1/embeddings", oai_body(input={}), JSON, 400),
    ("oai-wrong-method", "GET", OAI, b"", {}, 405),
    ("v1-malformed-json", "POST", V1, b'{"instances": [', JSON, 400),
    ("v1-instances-a-string", "POST", V1, b'{"instances": "abc"}', JSON, 400),
    ("v1-instances-empty", "POST", V1, b'{"instances": []}', JSON, 400),
    ("v1-instances-numbers", "POST", V1, b'{"instances": [1, 2]}', JSON, 400),
    ("v1-instances-null-item", "POST", V1, b'{"instances": ["a", null]}', JSON, 400),
    ("v1-no-instances", "POST", V1, b'{"data": ["x"]}', JSON, 400),
    ("v1-unknown-model", "POST", "/v1/models/nope:predict", b'{"instances": ["x"]}', JSON, 404),
    ("v1-bad-gzip", "POST", V1, b"not gzip", {**JSON, "content-encoding": "gzip"}, 400),
    ("v1-unsupported-encoding", "POST", V1, b"{}", {**JSON, "content-encoding": "br"}, 400),
    ("v1-gzip-bomb", "POST", V1, gzip.compress(b'{"instances": ["' + b"a" * 4_000_000 + b'"]}'),
     {**JSON, "content-encoding": "gzip"}, 413),
    ("v1-truncate-not-bool", "POST", V1, b'{"instances": ["x"], "truncate": "no"}', JSON, 400),
    ("v2-datatype-fp32", "POST", V2, v2_body([1.0], datatype="FP32"), JSON, 400),
    ("v2-shape-mismatch", "POST", V2, v2_body(["a"], shape=[3]), JSON, 400),
    ("v2-shape-2d", "POST", V2, v2_body(["a", "b"], shape=[1, 2]), JSON, 400),
    ("v2-negative-shape", "POST", V2, v2_body(["a"], shape=[-1]), JSON, 400),
    ("v2-two-inputs", "POST", V2, json.dumps({"inputs": [
        {"name": "a", "shape": [1], "datatype": "BYTES", "data": ["x"]},
        {"name": "b", "shape": [1], "datatype": "BYTES", "data": ["y"]}]}).encode(), JSON, 400),
    ("v2-no-inputs", "POST", V2, b'{"id": "1"}', JSON, 400),
    ("v2-data-not-strings", "POST", V2, v2_body([{"a": 1}]), JSON, 400),
    ("v2-unknown-output", "POST", V2, v2_body(["a"], outputs=[{"name": "logits"}]), JSON, 400),
    ("v2-dimensions-string", "POST", V2, v2_body(["a"], parameters={"dimensions": "x"}), JSON, 400),
    ("v2-dimensions-huge", "POST", V2, v2_body(["a"], parameters={"dimensions": 99999}), JSON, 400),
    ("v2-timeout-negative", "POST", V2, v2_body(["a"], parameters={"timeout": -5}), JSON, 400),
    ("v2-unknown-model", "POST", "/v2/models/nope/infer", v2_body(["a"]), JSON, 404),
    ("v2-unknown-version", "POST", "/v2/models/embedding/versions/9/infer", v2_body(["a"]), JSON,
     404),
    v2_binary("v2-binary-header-too-long", join_bytes_tensor([b"a"]), header_len="99999"),
    v2_binary("v2-binary-header-not-int", join_bytes_tensor([b"a"]), header_len="abc"),
    v2_binary("v2-binary-invalid-utf8", join_bytes_tensor([b"\xff\xfe"])),
    v2_binary("v2-binary-truncated-element", b"\x09\x00\x00\x00ab"),
    ("v2-oversize-body", "POST", V2, v2_body([BIG]), JSON, 413),
    # text-embeddings-inference's routes: 422 invalid, 400 empty, its error body
    ("tei-malformed-json", "POST", "/embed", b'{"inputs": ', JSON, 422),
    ("tei-missing-inputs", "POST", "/embed", b'{"normalize": true}', JSON, 422),
    ("tei-inputs-number", "POST", "/embed", b'{"inputs": 5}', JSON, 422),
    ("tei-inputs-empty-list", "POST", "/embed", b'{"inputs": []}', JSON, 400),
    ("tei-inputs-empty-string", "POST", "/embed", b'{"inputs": ""}', JSON, 400),
    ("tei-inputs-nested-too-deep", "POST", "/embed", b'{"inputs": [[["a"]]]}', JSON, 422),
    ("tei-direction-upper", "POST", "/embed",
     b'{"inputs": "a", "truncation_direction": "LEFT"}', JSON, 422),
    ("tei-dimensions-zero", "POST", "/embed", b'{"inputs": "a", "dimensions": 0}', JSON, 422),
    ("tei-dimensions-huge", "POST", "/embed", b'{"inputs": "a", "dimensions": 99999}', JSON,
     422),
    ("tei-normalize-string", "POST", "/embed", b'{"inputs": "a", "normalize": "no"}', JSON, 422),
    ("tei-too-many-tokens-no-truncate", "POST", "/embed",
     orjson.dumps({"inputs": LONG, "truncate": False}), JSON, 422),
    ("tei-too-many-inputs", "POST", "/embed", orjson.dumps({"inputs": ["a"] * (MAX_INPUTS + 1)}),
     JSON, 422),
    ("tei-unknown-model", "POST", "/embed", b'{"inputs": "a", "model": "nope"}', JSON, 404),
    ("tei-oversize-body", "POST", "/embed", orjson.dumps({"inputs": BIG}), JSON, 413),
    ("tei-unknown-prompt", "POST", "/embed", b'{"inputs": "a", "prompt_name": "nope"}', JSON,
     422),
    ("tei-root-empty", "POST", "/", b'{"inputs": []}', JSON, 400),
    ("tei-similarity-no-sentences", "POST", "/similarity",
     b'{"inputs": {"source_sentence": "a", "sentences": []}}', JSON, 400),
    ("tei-similarity-flat", "POST", "/similarity", b'{"inputs": ["a", "b"]}', JSON, 422),
    ("tei-tokenize-empty", "POST", "/tokenize", b'{"inputs": ""}', JSON, 400),
    ("tei-tokenize-ids", "POST", "/tokenize", b'{"inputs": [1, 2]}', JSON, 422),
    ("tei-decode-empty", "POST", "/decode", b'{"ids": []}', JSON, 400),
    ("tei-decode-empty-nested", "POST", "/decode", b'{"ids": [[]]}', JSON, 400),
    ("tei-decode-out-of-vocab", "POST", "/decode", b'{"ids": [999999]}', JSON, 422),
    ("tei-decode-negative", "POST", "/decode", b'{"ids": [-1]}', JSON, 422),
    ("tei-decode-strings", "POST", "/decode", b'{"ids": ["a"]}', JSON, 422),
    ("tei-info-unknown-model", "GET", "/info?model=nope", b"", {}, 404),
    ("tei-predict-no-classifier", "POST", "/predict", b'{"inputs": "a"}', JSON, 424),
    ("tei-predict-three-strings", "POST", "/predict", b'{"inputs": ["a", "b", "c"]}', JSON,
     422),
    ("tei-predict-batch-item-empty-list", "POST", "/predict", b'{"inputs": [["a"], []]}', JSON,
     422),
    ("tei-predict-empty", "POST", "/predict", b'{"inputs": []}', JSON, 400),
    ("tei-predict-number", "POST", "/predict", b'{"inputs": 3}', JSON, 422),
    ("tei-predict-raw-scores-string", "POST", "/predict",
     b'{"inputs": "a", "raw_scores": "yes"}', JSON, 422),
    ("tei-embed-sparse-no-splade-model", "POST", "/embed_sparse", b'{"inputs": "a"}', JSON,
     424),
    ("tei-embed-sparse-named-dense-model", "POST", "/embed_sparse",
     b'{"inputs": "a", "model": "embedding"}', JSON, 424),
    ("tei-embed-all-empty", "POST", "/embed_all", b'{"inputs": []}', JSON, 400),
    ("tei-embed-all-too-long", "POST", "/embed_all",
     orjson.dumps({"inputs": LONG, "truncate": False}), JSON, 422),
    ("oai-classify-no-classifier", "POST", "/v1/classify", b'{"input": "a"}', JSON, 400),
    ("oai-classify-input-number", "POST", "/v1/classify", b'{"input": 5}', JSON, 400),
    ("oai-classify-not-a-classifier", "POST", "/classify",
     b'{"input": "a", "model": "embedding"}', JSON, 400),
    ("oai-max-active-dims-dense", "POST", OAI, oai_body(input="x", max_active_dims=3), JSON,
     400),
    ("v2-max-active-dims-dense", "POST", V2, v2_body(["a"], parameters={"max_active_dims": 3}),
     JSON, 400),
    ("v2-return-probabilities-dense", "POST", V2,
     v2_body(["a"], parameters={"return_probabilities": True}), JSON, 400),
    ("v2-scores-output-dense", "POST", V2, v2_body(["a"], outputs=[{"name": "scores"}]), JSON,
     400),
]


def assert_error_shape(path: str, r: Any, status: int) -> None:
    """``r`` (an httpx or TestClient response) has ``status`` and the error body of the
    protocol that ``path`` belongs to, with a request id."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    if path.split("?")[0] in TEI_PATHS:  # text-embeddings-inference's error body
        assert set(body) == {"error", "error_type"} and body["error"], body
        assert body["error_type"] == {400: "Empty", 424: "Backend"}.get(status, "Validation")
        assert r.headers.get("x-request-id")
        return
    assert set(body) == {"error"}, body
    if protocol_of(path) == "openai":
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert err["type"] == "invalid_request_error"
    else:
        assert isinstance(body["error"], str) and body["error"]
    assert r.headers.get("x-request-id")


def check_bad_http_case(client: Any, reference: np.ndarray,
                        case: tuple[str, str, str, bytes, dict[str, str], int]) -> None:
    """One case of :data:`HTTP_CASES` against ``client`` (httpx or TestClient): its 4xx in its
    protocol's shape, and then a good request still answers with ``reference``."""
    _, method, path, body, headers, status = case
    r = client.request(method, path, content=body, headers=headers)
    if status == 405:
        assert r.status_code == 405
    else:
        assert_error_shape(path, r, status)
    ok = client.post(OAI, json={"model": "embedding", "input": SENTENCE})
    assert ok.status_code == 200, ok.text
    np.testing.assert_allclose(ok.json()["data"][0]["embedding"], reference, atol=1e-5)


def settle_rss(server: Any, at_most: float = 8.0) -> int:
    """The whole stack's resident memory once it has settled: readings 0.5 s apart until one
    is within 0.5% of the one before (at least 1.5 s, at most ``at_most``)."""
    started = time.monotonic()
    last = server.rss_bytes()
    while True:
        time.sleep(0.5)  # between readings
        now = server.rss_bytes()
        elapsed = time.monotonic() - started
        if elapsed >= at_most or (elapsed >= 1.5 and abs(now - last) <= 0.005 * last):
            return now
        last = now


def grpc_cases() -> list[tuple[str, pb.ModelInferRequest, Any]]:
    """(id, request, the grpc.StatusCode it gets): made anew each call (requests are
    mutable)."""
    import grpc

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    two_raw = infer_request(["a"], raw=True)
    two_raw.raw_input_contents.append(b"")
    dims = infer_request(["a"])
    dims.parameters["dimensions"].int64_param = 0
    no_trunc = infer_request([LONG])
    no_trunc.parameters["truncate"].bool_param = False
    return [
        ("grpc-empty-input", infer_request([]), invalid),
        ("grpc-fp32", infer_request(["a"], datatype="FP32"), invalid),
        ("grpc-invalid-utf8-raw", infer_request([b"\xff"], raw=True), invalid),
        ("grpc-invalid-utf8-contents", infer_request([b"\xc3\x28"]), invalid),
        ("grpc-shape-mismatch", infer_request(["a"], shape=[2]), invalid),
        ("grpc-two-raw-contents", two_raw, invalid),
        ("grpc-dimensions-zero", dims, invalid),
        ("grpc-too-many-inputs", infer_request(["a"] * (MAX_INPUTS + 1)), invalid),
        ("grpc-input-too-long", infer_request(["y" * (MAX_CHARS + 1)]), invalid),
        ("grpc-no-truncate", no_trunc, invalid),
        ("grpc-unknown-model", infer_request(["a"], model="nope"), grpc.StatusCode.NOT_FOUND),
        ("grpc-unknown-version", infer_request(["a"], model_version="9"),
         grpc.StatusCode.NOT_FOUND),
        ("grpc-oversize", infer_request(["z" * (MAX_CHARS - 1)] * 60),
         grpc.StatusCode.RESOURCE_EXHAUSTED),
    ]
