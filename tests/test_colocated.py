"""The colocated topology through a real ``serve run``: the model inside the ingress replica,
every protocol, stats and metrics the same as with separate deployments."""

from __future__ import annotations

import grpc
import httpx
import numpy as np
import pytest

from serve_app.proto import inference_pb2_grpc as pb_grpc
from tests.servers import free_port, serve_config, serve_run
from tests.test_grpc import infer_request

pytestmark = pytest.mark.e2e
SENTENCE = "This is an example sentence."


@pytest.fixture(scope="module")
def ports():
    return {"http": free_port(), "grpc": free_port()}


@pytest.fixture(scope="module")
def server(tmp_path_factory, ports):
    config = serve_config(ports["http"], {
        "topology": "colocated",
        "models": [{"name": "embedding", "deployment": {"num_cpus": 1}}],
    }, grpc_port=ports["grpc"])
    with serve_run(config, tmp_path_factory.mktemp("colocated")) as s:
        yield s


def test_every_protocol_answers_from_the_ingress_replica(server, ports, engine):
    expected = engine.embed([SENTENCE])[0][0]
    assert not server.find("model-embedding")  # no model deployment at all
    assert server.find("ServeReplica:serve_app:Ingress")
    r = httpx.post(f"{server}/v1/embeddings", json={"model": "embedding", "input": SENTENCE})
    assert r.status_code == 200 and float(r.headers["x-inference-time"]) > 0
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], expected, atol=1e-5)
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
    assert bad.status_code == 400
