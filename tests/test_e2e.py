"""End to end: a config served through the default entry point on loopback, real clients, the
real model."""

from __future__ import annotations

import asyncio
import base64
import contextlib

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as triton_http
import yaml
from sentence_transformers import SentenceTransformer
from tritonclient.utils import InferenceServerException

from serve_app.env import DIRECT_INGRESS_KEYS
from tests.helpers import BIN, SENTENCE, TEXTS, free_port, running, serve_config, start_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(e2e_server):
    """tests/conftest.py's e2e_server: the default model and a tiny one, and a second app."""
    return e2e_server


@pytest.fixture(scope="module")
def reference(minilm_dir):
    return SentenceTransformer(str(minilm_dir), device="cpu").encode(TEXTS)


def test_openai_sdk_float_base64_dimensions(oai, reference, engine):
    r = oai.embeddings.create(model="embedding", input=TEXTS)
    floats = np.array([d.embedding for d in r.data], dtype=np.float32)
    np.testing.assert_allclose(floats, reference, atol=1e-5)
    counts = engine.embed(TEXTS)[1]
    assert counts[-1] == 256  # the long text is truncated, and usage counts what was embedded
    assert r.usage.prompt_tokens == r.usage.total_tokens == int(counts.sum())
    b64 = oai.embeddings.create(model="embedding", input=TEXTS, encoding_format="base64")
    decoded = np.array([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in b64.data])
    np.testing.assert_array_equal(decoded, floats)
    cut = oai.embeddings.create(model="embedding", input=SENTENCE, dimensions=128)
    v = np.array(cut.data[0].embedding)
    assert v.shape == (128,) and abs(np.linalg.norm(v) - 1) < 1e-5


def test_kserve_reference_case_through_openai(oai, minilm_dir):
    r = oai.embeddings.create(model="embedding", input=SENTENCE)
    ref = SentenceTransformer(str(minilm_dir), device="cpu").encode([SENTENCE])[0]
    assert len(r.data[0].embedding) == 384
    np.testing.assert_allclose(r.data[0].embedding, ref, atol=1e-6)
    assert r.usage.prompt_tokens == 8


def test_openai_sdk_errors_and_models(oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.embeddings.create(model="nope", input="x")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        oai.embeddings.create(model="embedding", input=[])
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        oai.embeddings.create(model="embedding", input=[[101, 999999, 102]])  # replica-side check
    assert {m.id for m in oai.models.list()} == {"embedding", "tiny", "colbert", "m3"}
    assert oai.models.retrieve("tiny").id == "tiny"


def test_tritonclient_http(server, reference):
    client = triton_http.InferenceServerClient(server.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("embedding")
    meta = client.get_model_metadata("embedding")
    assert meta["outputs"][0] == {"name": "output-0", "datatype": "FP32", "shape": [-1, 384]}
    arr = np.array([t.encode() for t in TEXTS], dtype=object)
    inp = triton_http.InferInput("text", [len(TEXTS)], "BYTES")
    inp.set_data_from_numpy(arr)  # binary tensor extension in and out
    binary = client.infer("embedding", [inp], request_id="r1")
    assert binary.get_response()["id"] == "r1"
    out = binary.as_numpy("output-0")
    assert out.dtype == np.float32 and out.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(out, reference, atol=1e-5)
    inp2 = triton_http.InferInput("text", [len(TEXTS), 1], "BYTES")
    inp2.set_data_from_numpy(arr.reshape(-1, 1), binary_data=False)
    as_json = client.infer("embedding", [inp2], model_version="1",
                           outputs=[triton_http.InferRequestedOutput("output-0",
                                                                     binary_data=False)],
                           request_compression_algorithm="gzip")
    np.testing.assert_array_equal(as_json.as_numpy("output-0"), out)
    with pytest.raises(InferenceServerException, match="not served"):
        client.infer("nope", [inp])
    bad = triton_http.InferInput("text", [1], "FP32")
    bad.set_data_from_numpy(np.zeros(1, np.float32))
    with pytest.raises(InferenceServerException, match="must be BYTES"):
        client.infer("embedding", [bad])


def test_kserve_v1_with_httpx(server, reference):
    with httpx.Client(base_url=server, timeout=30) as c:
        r = c.post("/v1/models/embedding:predict", json={"instances": TEXTS})
        assert r.status_code == 200
        np.testing.assert_allclose(r.json()["predictions"], reference, atol=1e-5)
        assert c.get("/v1/models/embedding").json()["ready"] is True
        assert c.get("/v1/models").json()["models"] == ["embedding", "tiny", "colbert", "m3"]
        bad = c.post("/v1/models/embedding:predict", json={"instances": []})
        assert bad.status_code == 400 and set(bad.json()) == {"error"}
        assert c.post("/v1/models/nope:predict", json={"instances": ["a"]}).status_code == 404
        assert c.post("/v1/models/embedding:predict", content=b"{oops").status_code == 400


def test_every_protocol_gives_the_same_vector(server, oai):
    texts = ["parity across protocols", SENTENCE]
    via_openai = np.array([d.embedding for d in oai.embeddings.create(model="embedding",
                                                                      input=texts).data])
    with httpx.Client(base_url=server, timeout=30) as c:
        via_v1 = np.array(c.post("/v1/models/embedding:predict",
                                 json={"instances": texts}).json()["predictions"])
        v2 = c.post("/v2/models/embedding/infer", json={"inputs": [
            {"name": "text", "shape": [2], "datatype": "BYTES", "data": texts}]}).json()
        via_v2 = np.array(v2["outputs"][0]["data"]).reshape(2, -1)
    kserve_path = httpx.post(f"{server}/openai/v1/embeddings",
                             json={"model": "embedding", "input": texts}).json()
    via_openai_kserve_path = np.array([d["embedding"] for d in kserve_path["data"]])
    for other in (via_v1, via_v2, via_openai_kserve_path):
        np.testing.assert_array_equal(other.astype(np.float32), via_openai.astype(np.float32))


def test_second_model_is_routed_by_name(server, tiny_model):
    from serve_app.config.schema import ModelConfig
    from serve_app.engine.embedding import EmbeddingEngine

    local = EmbeddingEngine(ModelConfig(model_id=str(tiny_model(pooling="cls"))))
    r = httpx.post(f"{server}/v1/embeddings", json={"model": "tiny", "input": [SENTENCE]}).json()
    assert len(r["data"][0]["embedding"]) == 32
    np.testing.assert_allclose(r["data"][0]["embedding"], local.embed([SENTENCE])[0][0], atol=1e-6)


def test_large_request_is_split_and_kept_in_order(server):
    texts = [f"document number {i} about topic {i % 7}" for i in range(100)]
    with httpx.Client(base_url=server, timeout=60) as c:
        together = np.array(c.post("/v1/models/embedding:predict",
                                   json={"instances": texts}).json()["predictions"])
        alone = np.array([c.post("/v1/models/embedding:predict",
                                 json={"instances": [t]}).json()["predictions"][0]
                          for t in texts[::25]])
    assert together.shape == (100, 384)
    np.testing.assert_allclose(together[::25], alone, atol=1e-5)


def test_batches_fill_under_concurrent_load(server):
    """32 clients, one short text each, several rounds: the model must see real batches."""

    async def load() -> None:
        async with httpx.AsyncClient(base_url=server, timeout=60) as c:
            async def one_client(i: int) -> None:
                for j in range(8):
                    r = await c.post("/v1/embeddings",
                                     json={"model": "embedding", "input": f"client {i} says {j}"})
                    assert r.status_code == 200

            await asyncio.gather(*(one_client(i) for i in range(32)))

    stats_url = f"{server}/v2/models/embedding/stats"
    before = httpx.get(stats_url).json()["model_stats"][0]
    asyncio.run(load())
    after = httpx.get(stats_url).json()["model_stats"][0]
    texts = after["inference_count"] - before["inference_count"]
    passes = after["execution_count"] - before["execution_count"]
    assert texts == 256
    mean_batch = texts / passes
    # One text per request: without batching across requests every pass would hold exactly 1.
    # (Seen here on 2 cores: about 4.7 alone, 2.0 while the other pytest worker loads the
    # cores; the proxy and ingress, not the model, limit arrivals.)
    print(f"\nmean batch {mean_batch:.1f} texts over {passes} passes")
    assert mean_batch >= 1.5, f"mean batch {mean_batch:.1f} over {passes} passes"


def test_server_keeps_serving_after_bad_input(server, oai):
    for payload in (b"", b"[", b'{"input": 5, "model": "embedding"}', b"\x00" * 100):
        r = httpx.post(f"{server}/v1/embeddings", content=payload)
        assert 400 <= r.status_code < 500
    assert len(oai.embeddings.create(model="embedding", input="still fine").data) == 1


def test_metrics_match_known_traffic_through_serve(server):
    """The replica's measurements ride back to the ingress through Ray: after known traffic to
    the tiny model, every counter moved by exactly that traffic."""
    from tests.helpers import sample, scrape

    def tiny() -> dict[str, float]:
        r = httpx.get(f"{server}/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        m = scrape(r.text)
        return {
            "inputs": sample(m, "serve_app_embedded_inputs_total", model="tiny",
                             protocol="kserve_v1"),
            "tokens": sample(m, "serve_app_embedded_tokens_total", model="tiny",
                             protocol="kserve_v1"),
            "truncated": sample(m, "serve_app_truncated_inputs_total", model="tiny"),
            "inference": sample(m, "serve_app_stage_seconds_count", model="tiny",
                                stage="inference"),
            "batched": sample(m, "serve_app_batch_inputs_sum", model="tiny"),
            "errors": sample(m, "serve_app_errors_total", protocol="kserve_v1",
                             kind="InvalidInput"),
        }

    before = tiny()
    ok = httpx.post(f"{server}/v1/models/tiny:predict", json={"instances": ["a b", "w " * 200]})
    bad = httpx.post(f"{server}/v1/models/tiny:predict", json={"instances": []})
    assert ok.status_code == 200 and bad.status_code == 400
    tokens = int(ok.headers["x-compute-tokens"])
    assert tokens == 4 + 64  # the tiny model cuts at 64 tokens
    assert float(ok.headers["x-inference-time"]) > 0
    after = tiny()
    delta = {k: after[k] - before[k] for k in after}
    assert delta == {"inputs": 2, "tokens": tokens, "truncated": 1, "inference": 1,
                     "batched": 2, "errors": 1}


# -- V2 over gRPC, through Ray Serve's gRPC proxy ------------------------------------------------


@pytest.fixture(scope="module")
def grpc_target(server):
    return server.grpc


def test_tritonclient_grpc(grpc_target, reference):
    import tritonclient.grpc as triton_grpc

    # Two applications run here: behind HAProxy, gRPC calls name theirs (with one application,
    # as every shipped config has, no metadata is needed: test_cli)
    app = {"application": "serve_app"}
    client = triton_grpc.InferenceServerClient(grpc_target)
    assert client.is_server_live(headers=app) and client.is_server_ready(headers=app)
    assert client.is_model_ready("embedding", headers=app)
    assert client.get_server_metadata(headers=app).name == "e2e"
    meta = client.get_model_metadata("embedding", headers=app)
    assert [list(o.shape) for o in meta.outputs] == [[-1, 384]]
    inp = triton_grpc.InferInput("text", [len(TEXTS)], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
    result = client.infer("embedding", [inp], request_id="g-1", headers=app)
    assert result.get_response().id == "g-1"
    out = result.as_numpy("output-0")
    assert out.dtype == np.float32 and out.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(out, reference, atol=1e-5)
    cut = client.infer("embedding", [inp], parameters={"dimensions": 64},
                       headers=app).as_numpy("output-0")
    assert cut.shape == (len(TEXTS), 64)
    with pytest.raises(InferenceServerException) as e:
        client.infer("nope", [inp], headers=app)
    assert e.value.status() == "StatusCode.NOT_FOUND"
    bad = triton_grpc.InferInput("text", [1], "FP32")
    bad.set_data_from_numpy(np.zeros(1, np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("embedding", [bad], headers=app)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "BYTES" in e.value.message()


def test_grpcio_stub_every_method_and_both_styles(grpc_target, server):
    import grpc

    from serve_app.frontend.v2.proto import inference_pb2 as pb
    from serve_app.frontend.v2.proto import inference_pb2_grpc as pb_grpc
    from tests.helpers import infer_request

    app = (("application", "serve_app"),)  # two applications run here (see above)
    with grpc.insecure_channel(grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), metadata=app).live
        assert stub.ServerReady(pb.ServerReadyRequest(), metadata=app).ready
        assert stub.ModelReady(pb.ModelReadyRequest(name="tiny"), metadata=app).ready
        assert stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=app).name == "e2e"
        tiny = stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"), metadata=app)
        assert tiny.outputs[0].shape == [-1, 32]
        texts = ["parity across protocols", SENTENCE]
        as_contents = stub.ModelInfer(infer_request(texts, id="c"), metadata=app)
        as_raw = stub.ModelInfer(infer_request(texts, raw=True, id="r"), metadata=app)
        a = np.array(as_contents.outputs[0].contents.fp32_contents, np.float32).reshape(2, -1)
        b = np.frombuffer(as_raw.raw_output_contents[0], "<f4").reshape(2, -1)
        np.testing.assert_array_equal(a, b)
        assert (as_contents.id, as_raw.id) == ("c", "r")
        http = httpx.post(f"{server}/v1/embeddings",
                          json={"model": "embedding", "input": texts}).json()
        np.testing.assert_array_equal(
            np.array([d["embedding"] for d in http["data"]], np.float32), a)
        for req, code in (
            (infer_request([]), grpc.StatusCode.INVALID_ARGUMENT),
            (infer_request([b"\xff"], raw=True), grpc.StatusCode.INVALID_ARGUMENT),
            (infer_request(["a"], model="nope"), grpc.StatusCode.NOT_FOUND),
        ):
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(req, metadata=app)
            assert e.value.code() == code, e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), metadata=app)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        still = stub.ModelInfer(infer_request(["still serving"]), metadata=app)
        assert still.outputs[0].shape == [1, 384]


def test_grpc_application_metadata_routes_to_other_apps(grpc_target):
    import grpc

    from serve_app.frontend.v2.proto import inference_pb2_grpc as pb_grpc
    from tests.helpers import infer_request

    with grpc.insecure_channel(grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        other = stub.ModelInfer(infer_request(["hi"], model="other-tiny"),
                                metadata=(("application", "other"),))
        assert list(other.outputs[0].shape) == [1, 32]
        with pytest.raises(grpc.RpcError) as e:  # serve_app lacks it
            stub.ModelInfer(infer_request(["hi"], model="other-tiny"),
                            metadata=(("application", "serve_app"),))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "other-tiny" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:  # HAProxy routes by the metadata alone
            stub.ModelInfer(infer_request(["hi"], model="other-tiny"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "application" in e.value.details().lower()


_FALLBACK = ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")
_RANGES = DIRECT_INGRESS_KEYS


def _ports_of(server, keys: tuple[str, ...]) -> set[str]:
    """The values of ``keys`` the replicas of ``server`` were started with."""
    import psutil

    seen = set()
    for proc in server.processes_named("ServeReplica:"):
        with contextlib.suppress(psutil.Error):
            env = proc.environ()
            seen.add(" ".join(env.get(k, "") for k in keys))
    return seen


def test_a_second_server_on_the_machine_answers_only_its_own_requests(server, tmp_path,
                                                                      tiny_model):
    """A second ``python -m serve_app`` beside the running one, left to pick its own fixed
    ports while the defaults are held by another server's fallback proxy (a listener with
    SO_REUSEPORT, which Serve's proxy would share) and its own direct-ingress window: it takes
    free ports and a window the running one's replicas are not in, and each server answers
    only with its own models."""
    import socket

    held = []
    try:
        for port in (8500, 9500):
            sock = socket.socket()
            held.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("", port))
            sock.listen()
    except OSError:
        pytest.skip("Serve's default fallback-proxy ports are taken on this machine")
    solo = serve_config(free_port(), {"models": [{
        "name": "solo", "model_id": str(tiny_model(pooling="mean")),
        "deployment": {"num_cpus": 0.5}}]})
    try:
        # nor the direct-ingress ranges tests/conftest.py gives this worker's servers
        with start_server(solo, tmp_path, unset=_FALLBACK + _RANGES) as second:
            (ports,) = _ports_of(second, _FALLBACK)
            assert len(ports.split()) == 2 and not {"8500", "9500"} & set(ports.split()), ports
            (mine,), (theirs,) = _ports_of(second, _RANGES), _ports_of(server, _RANGES)
            low, high = (int(x) for x in mine.split()[:2])  # its HTTP window
            assert high - low == 99 and not low <= int(theirs.split()[0]) <= high, (mine, theirs)
            for _ in range(20):
                a = httpx.post(f"{server}/v1/embeddings",
                               json={"model": "embedding", "input": "hi"})
                b = httpx.post(f"{second}/v1/embeddings", json={"model": "solo", "input": "hi"})
                assert a.status_code == 200 and len(a.json()["data"][0]["embedding"]) == 384
                assert b.status_code == 200 and len(b.json()["data"][0]["embedding"]) == 32
    finally:
        for sock in held:
            sock.close()


def test_api_keys_through_serve(tmp_path, tiny_model):
    """A config with auth: the OpenAI SDK's key, gRPC metadata, open health routes."""
    import tritonclient.grpc as triton_grpc

    port, grpc_port = free_port(), free_port()
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "grpc_options": {"port": grpc_port, "grpc_servicer_functions": [
            "serve_app.frontend.v2.add_inference_servicer"]},
        "applications": [{
            "name": "serve_app", "route_prefix": "/", "import_path": "serve_app.serve:build_app",
            "args": {"models": [{"name": "tiny", "model_id": str(tiny_model(pooling="cls")),
                                 "deployment": {"num_cpus": 0.5}}],
                     "auth": {"api_keys_env": "SERVE_APP_TEST_KEYS"}},
        }],
    }
    cfg = tmp_path / "auth.yaml"
    cfg.write_text(yaml.safe_dump(config))
    key = "sk-e2e-abcdef"
    with running([str(BIN / "serve"), "run", str(cfg)], f"http://127.0.0.1:{port}",
                 tmp_path / "serve.log", extra_env={"SERVE_APP_TEST_KEYS": key}) as url:
        ok = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        assert len(ok.embeddings.create(model="tiny", input="hi").data[0].embedding) == 32
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.embeddings.create(model="tiny", input="hi")
        assert e.value.code == "invalid_api_key"
        assert httpx.post(f"{url}/v1/models/tiny:predict",
                          json={"instances": ["hi"]}).status_code == 401
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        text = triton_grpc.InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"hi"], dtype=object))
        with pytest.raises(InferenceServerException) as g:
            client.infer("tiny", [text])
        assert g.value.status() == "StatusCode.UNAUTHENTICATED"
        out = client.infer("tiny", [text], headers={"authorization": f"Bearer {key}"})
        assert out.as_numpy("output-0").shape == (1, 32)
        assert client.is_server_live()
        log = (tmp_path / "serve.log").read_text()
    assert key not in log


@pytest.mark.parametrize("protocol", ["openai-base64", "kserve-v1", "v2-binary", "grpc"])
def test_benchmark_load_generator_smoke(server, protocol):
    """bench/load.py against the real server for a moment: no errors, every vector counted."""
    import json
    import subprocess
    import sys

    from tests.helpers import REPO

    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "load.py"), "--protocol", protocol,
         "--workload", "W3", "--url", server, "--grpc", server.grpc,
         "--duration", "1", "--application", "serve_app"],
        capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["errors"] == 0 and result["requests"] >= 1
    assert result["embeddings"] == 32 * result["requests"]
