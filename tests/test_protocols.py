"""Every HTTP route and error shape, in process: the real engine behind the real FastAPI app,
without Ray (the same model replica and queue a Serve replica uses)."""

from __future__ import annotations

import base64
import gzip
import json

import numpy as np
import orjson
import pytest

from serve_app.config.schema import ModelConfig
from serve_app.engine.embedding import EmbeddingEngine
from serve_app.frontend.v2.codec import join_bytes_tensor
from tests.helpers import SENTENCE, FakeBackend, app_client, replica, sample, scrape


@pytest.fixture(scope="module")
def tiny_engine(tiny_model):
    return EmbeddingEngine(ModelConfig(model_id=str(tiny_model(pooling="cls"))))


@pytest.fixture(scope="module")
def client(engine, tiny_engine):
    backends = {"embedding": replica(engine), "tiny": replica(tiny_engine, "tiny")}
    with app_client(backends, server_name="test-server") as c:
        yield c


def assert_openai_error(r, status, code=None, param=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param


def assert_kserve_error(r, status, contains=""):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    assert contains in body["error"]


# -- OpenAI ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/embeddings", "/openai/v1/embeddings"])
def test_openai_float(client, engine, path):
    r = client.post(path, json={"input": [SENTENCE, "hi"], "model": "embedding"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "embedding"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in body["data"])
    ref, counts = engine.embed([SENTENCE, "hi"])
    np.testing.assert_allclose([d["embedding"] for d in body["data"]], ref, atol=1e-7)
    assert body["usage"] == {"prompt_tokens": int(counts.sum()), "total_tokens": int(counts.sum())}


def test_openai_single_string_and_kserve_case(client):
    body = client.post("/v1/embeddings", json={"input": SENTENCE, "model": "embedding"}).json()
    assert len(body["data"]) == 1 and len(body["data"][0]["embedding"]) == 384
    assert body["usage"]["prompt_tokens"] == 8


def test_openai_base64_is_the_same_float32_bytes(client, engine):
    r = client.post("/v1/embeddings", json={"input": [SENTENCE], "model": "embedding",
                                            "encoding_format": "base64"})
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), "<f4")
    np.testing.assert_array_equal(vec, engine.embed([SENTENCE])[0][0])


def test_openai_token_ids(client, engine):
    ids = engine.tokenizer([SENTENCE, "hi there"])["input_ids"]
    one = client.post("/v1/embeddings", json={"input": ids[0], "model": "embedding"}).json()
    many = client.post("/v1/embeddings", json={"input": ids, "model": "embedding"}).json()
    ref, _ = engine.embed([SENTENCE, "hi there"])
    np.testing.assert_allclose(one["data"][0]["embedding"], ref[0], atol=1e-6)
    np.testing.assert_allclose([d["embedding"] for d in many["data"]], ref, atol=1e-6)
    assert many["usage"]["prompt_tokens"] == len(ids[0]) + len(ids[1])


def test_openai_dimensions_and_unknown_fields(client, engine):
    body = client.post("/v1/embeddings", json={"input": SENTENCE, "model": "embedding",
                                               "dimensions": 32, "user": "u1",
                                               "something_new": True}).json()
    vec = np.array(body["data"][0]["embedding"])
    full = engine.embed([SENTENCE])[0][0][:32]
    np.testing.assert_allclose(vec, full / np.linalg.norm(full), rtol=1e-5, atol=1e-7)


def test_openai_routes_by_model_name(client, tiny_engine):
    body = client.post("/v1/embeddings", json={"input": SENTENCE, "model": "tiny"}).json()
    assert body["model"] == "tiny" and len(body["data"][0]["embedding"]) == 32
    np.testing.assert_allclose(body["data"][0]["embedding"], tiny_engine.embed([SENTENCE])[0][0],
                               atol=1e-6)


@pytest.mark.parametrize(
    ("payload", "status", "param", "code"),
    [
        ({"input": [], "model": "embedding"}, 400, "input", None),
        ({"input": "", "model": "embedding"}, 400, "input", None),
        ({"input": ["ok", ""], "model": "embedding"}, 400, "input", None),
        ({"input": ["ok", 5], "model": "embedding"}, 400, "input", None),
        ({"input": [1, "a"], "model": "embedding"}, 400, "input", None),
        ({"input": [[1, 2], []], "model": "embedding"}, 400, "input", None),
        ({"input": [True], "model": "embedding"}, 400, "input", None),
        ({"input": {"a": 1}, "model": "embedding"}, 400, "input", None),
        ({"input": None, "model": "embedding"}, 400, "input", None),
        ({"input": 3.5, "model": "embedding"}, 400, "input", None),
        ({"input": [99999999], "model": "embedding"}, 400, "input", None),
        ({"input": [101, -5, 102], "model": "embedding"}, 400, "input", None),
        ({"model": "embedding"}, 400, "input", None),
        ({"input": "x"}, 400, "model", None),
        ({"input": "x", "model": 7}, 400, "model", None),
        ({"input": "x", "model": "nope"}, 404, "model", "model_not_found"),
        ({"input": "x", "model": "embedding", "dimensions": 0}, 400, "dimensions", None),
        ({"input": "x", "model": "embedding", "dimensions": 385}, 400, "dimensions", None),
        ({"input": "x", "model": "embedding", "dimensions": "8"}, 400, "dimensions", None),
        ({"input": "x", "model": "embedding", "encoding_format": "int4"}, 400,
         "encoding_format", None),
    ],
)
def test_openai_bad_requests(client, payload, status, param, code):
    r = client.post("/v1/embeddings", json=payload)
    assert_openai_error(r, status, code=code, param=param)
    assert "detail" not in r.text


@pytest.mark.parametrize(
    "raw", [b"", b"{", b"[1, 2]", b"null", b'"text"', b"\xff\xfe", b'{"input": "x", "model": }']
)
def test_openai_malformed_bodies(client, raw):
    r = client.post("/v1/embeddings", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(r, 400)


def test_openai_wrong_method_and_path_keep_the_openai_shape(client):
    assert_openai_error(client.get("/v1/embeddings"), 405)
    assert_openai_error(client.post("/openai/v1/nothing", json={}), 404)


def test_openai_model_list_and_retrieve(client):
    body = client.get("/openai/v1/models").json()
    assert body["object"] == "list"
    assert {m["id"] for m in body["data"]} == {"embedding", "tiny"}
    assert all(m["object"] == "model" and m["owned_by"] == "serve_app" for m in body["data"])
    assert client.get("/openai/v1/models/tiny").json()["id"] == "tiny"
    assert_openai_error(client.get("/openai/v1/models/nope"), 404, code="model_not_found")


# -- KServe V1 --------------------------------------------------------------------------------


def test_root_and_v1_model_routes(client):
    assert client.get("/").json() == {"status": "alive"}
    listing = client.get("/v1/models").json()
    assert listing["models"] == ["embedding", "tiny"] and listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["embedding", "tiny"]
    status = client.get("/v1/models/embedding").json()
    assert status["name"] == "embedding" and status["ready"] is True
    assert status["id"] == "embedding" and status["object"] == "model"
    assert_kserve_error(client.get("/v1/models/nope"), 404, "nope")


@pytest.mark.parametrize("key", ["instances", "inputs"])
def test_v1_predict(client, engine, key):
    r = client.post("/v1/models/embedding:predict", json={key: [SENTENCE, "hi"]})
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()["predictions"], engine.embed([SENTENCE, "hi"])[0],
                               atol=1e-7)


@pytest.mark.parametrize(
    ("payload", "status", "contains"),
    [
        ({"instances": []}, 400, "must not be empty"),
        ({"instances": "text"}, 400, "must be a list"),
        ({"instances": ["a", 1]}, 400, "instances[1]"),
        ({"instances": [["a"]]}, 400, "must be a string"),
        ({"instance": ["a"]}, 400, "'instances'"),
        ({}, 400, "'instances'"),
    ],
)
def test_v1_bad_requests(client, payload, status, contains):
    assert_kserve_error(client.post("/v1/models/embedding:predict", json=payload), status, contains)


def test_v1_unknown_model_and_malformed_json(client):
    assert_kserve_error(client.post("/v1/models/nope:predict", json={"instances": ["a"]}), 404)
    assert_kserve_error(client.post("/v1/models/embedding:predict", content=b"{nope"), 400,
                        "not valid JSON")
    assert_kserve_error(client.post("/v1/models/embedding:predict", content=b"[1]"), 400)


# -- Open Inference (V2) REST -------------------------------------------------------------------


def v2_body(texts, shape=None, datatype="BYTES", **extra):
    inp = {"name": "text", "shape": shape or [len(texts)], "datatype": datatype, "data": texts}
    return {"inputs": [inp], **extra}


def test_v2_server_routes(client):
    assert client.get("/v2").json() == {"name": "test-server", "version": "0.1.0",
                                        "extensions": ["binary_tensor_data"]}
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}


@pytest.mark.parametrize("prefix", ["/v2/models/embedding", "/v2/models/embedding/versions/1"])
def test_v2_model_routes(client, prefix):
    meta = client.get(prefix).json()
    assert meta["name"] == "embedding" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "output-0", "datatype": "FP32", "shape": [-1, 384]}]
    assert client.get(f"{prefix}/ready").json() == {"name": "embedding", "ready": True}


def test_v2_infer_json(client, engine):
    r = client.post("/v2/models/embedding/infer", json=v2_body([SENTENCE, "hi"], id="req-1"))
    body = r.json()
    assert r.status_code == 200 and body["id"] == "req-1"
    assert body["model_name"] == "embedding" and body["model_version"] == "1"
    (out,) = body["outputs"]
    assert out["name"] == "output-0" and out["datatype"] == "FP32" and out["shape"] == [2, 384]
    np.testing.assert_allclose(np.array(out["data"]).reshape(2, 384),
                               engine.embed([SENTENCE, "hi"])[0], atol=1e-7)
    assert body["parameters"]["prompt_tokens"] == 11


def test_v2_infer_nested_data_versions_and_parameters(client, engine):
    r = client.post("/v2/models/embedding/versions/1/infer",
                    json=v2_body([[SENTENCE], ["hi"]], shape=[2, 1],
                                 parameters={"dimensions": 16}))
    out = r.json()["outputs"][0]
    assert out["shape"] == [2, 16]
    assert r.json()["id"]  # a fresh id when the request has none


def test_v2_binary_request_and_response(client, engine):
    texts = [SENTENCE.encode(), "wörld".encode()]
    raw = join_bytes_tensor(texts)
    header = orjson.dumps({
        "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "output-0", "parameters": {"binary_data": True}}],
    })
    r = client.post("/v2/models/embedding/infer", content=header + raw,
                    headers={"Inference-Header-Content-Length": str(len(header)),
                             "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:n])
    size = meta["outputs"][0]["parameters"]["binary_data_size"]
    assert size == 2 * 384 * 4 and len(r.content) == n + size
    vecs = np.frombuffer(r.content[n:], "<f4").reshape(2, 384)
    np.testing.assert_array_equal(vecs, engine.embed([SENTENCE, "wörld"])[0])


def test_v2_gzip_request(client):
    body = gzip.compress(orjson.dumps(v2_body(["hi"])))
    r = client.post("/v2/models/embedding/infer", content=body,
                    headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, 384]


@pytest.mark.parametrize(
    ("payload", "contains"),
    [
        (v2_body(["a"], datatype="FP32"), "must be BYTES"),
        (v2_body(["a", "b"], shape=[3]), "holds 2 elements"),
        (v2_body(["a"], shape=[1, 2]), "expected [n] or [n, 1]"),
        (v2_body([]), "is empty"),
        (v2_body([1]), "must be a string"),
        ({"inputs": []}, "exactly one input"),
        ({"inputs": [v2_body(["a"])["inputs"][0]] * 2}, "given twice"),
        ({"inputs": [v2_body(["a"])["inputs"][0],
                     {**v2_body(["b"])["inputs"][0], "name": "other"}]}, "exactly one input"),
        ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES"}]}, "no 'data'"),
        ({"inputs": [{"name": "text", "datatype": "BYTES", "data": ["a"]}]}, "shape"),
        ({}, "inputs"),
        (v2_body(["a"], outputs=[{"name": "logits"}]), "unknown output 'logits'"),
        (v2_body(["a"], parameters={"dimensions": 0}), "dimensions must be between"),
        (v2_body(["a"], parameters={"dimensions": "x"}), "must be an integer"),
        (v2_body(["a"], parameters={"truncate": "no"}), "must be a boolean"),
        (v2_body(["word " * 400], parameters={"truncate": False}), "more than the model's limit"),
    ],
)
def test_v2_bad_requests(client, payload, contains):
    assert_kserve_error(client.post("/v2/models/embedding/infer", json=payload), 400, contains)


@pytest.mark.parametrize(
    ("content", "headers", "contains"),
    [
        (b"{}", {"Inference-Header-Content-Length": "x"}, "must be an integer"),
        (b"{}", {"Inference-Header-Content-Length": "99"}, "outside the body"),
        (b"not json", None, "not valid JSON"),
        (b"\x00\x01", {"Content-Encoding": "gzip"}, "not valid gzip"),
        (b"{}", {"Content-Encoding": "br"}, "unsupported Content-Encoding"),
    ],
)
def test_v2_bad_binary_requests(client, content, headers, contains):
    r = client.post("/v2/models/embedding/infer", content=content, headers=headers)
    assert_kserve_error(r, 400, contains)


def test_v2_binary_leftover_and_invalid_utf8(client):
    raw = join_bytes_tensor([b"\xff\xfe"])
    header = orjson.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                       "parameters": {"binary_data_size": len(raw)}}]})
    hdr = {"Inference-Header-Content-Length": str(len(header))}
    r = client.post("/v2/models/embedding/infer", content=header + raw, headers=hdr)
    assert_kserve_error(r, 400, "not valid UTF-8")
    good = join_bytes_tensor([b"ok"])
    header = orjson.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                       "parameters": {"binary_data_size": len(good)}}]})
    r = client.post("/v2/models/embedding/infer", content=header + good + b"junk",
                    headers={"Inference-Header-Content-Length": str(len(header))})
    assert_kserve_error(r, 400, "unclaimed")
    header = orjson.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                       "parameters": {"binary_data_size": 9}}]})
    r = client.post("/v2/models/embedding/infer", content=header + good,
                    headers={"Inference-Header-Content-Length": str(len(header))})
    assert_kserve_error(r, 400, "does not fit")


def test_v2_unknown_model_and_version(client):
    assert_kserve_error(client.post("/v2/models/nope/infer", json=v2_body(["a"])), 404, "nope")
    assert_kserve_error(client.post("/v2/models/embedding/versions/7/infer",
                                    json=v2_body(["a"])), 404, "no version '7'")
    assert_kserve_error(client.get("/v2/models/nope"), 404)
    assert_kserve_error(client.get("/v2/models/nope/ready"), 404)
    assert_kserve_error(client.get("/v2/models/embedding/versions/2/ready"), 404)


def test_openapi_document_declares_request_bodies(client):
    doc = client.get("/openapi.json").json()
    post = doc["paths"]["/v1/embeddings"]["post"]
    assert "input" in post["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert "/v2/models/{name}/infer" in doc["paths"]


def test_v2_statistics_count_forward_passes(client):
    before = client.get("/v2/models/tiny/stats").json()["model_stats"][0]
    client.post("/v2/models/tiny/infer", json=v2_body(["a", "b", "c"]))
    after = client.get("/v2/models/tiny/versions/1/stats").json()["model_stats"][0]
    assert after["name"] == "tiny" and after["version"] == "1"
    assert after["inference_count"] == before["inference_count"] + 3
    assert after["execution_count"] == before["execution_count"] + 1
    sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in after["batch_stats"]}
    assert sizes.get(3, 0) >= 1
    assert_kserve_error(client.get("/v2/models/nope/stats"), 404)


def test_metrics_count_known_traffic(engine):
    long_text = "word " * 400
    with app_client({"embedding": replica(engine)}) as c:
        for _ in range(3):
            c.post("/v1/embeddings", json={"input": [SENTENCE, "hi"], "model": "embedding"})
        c.post("/v1/models/embedding:predict", json={"instances": []})
        c.post("/v1/models/embedding:predict", json={"instances": [long_text, "x"]})
        c.post("/v1/embeddings", json={"input": "x", "model": "nope"})
        c.post("/v2/models/embedding/infer", json=v2_body([SENTENCE]))
        stats = c.get("/v2/models/embedding/stats").json()["model_stats"][0]
        m = scrape(c.get("/metrics").text)
    ok_openai = dict(method="POST", protocol="openai", route="/v1/embeddings", status="200")
    assert sample(m, "serve_app_requests_total", **ok_openai) == 3
    assert sample(m, "serve_app_requests_total", method="POST", protocol="kserve_v1",
                  route="/v1/models/{name}:predict", status="400") == 1
    assert sample(m, "serve_app_request_seconds_count", protocol="v2",
                  route="/v2/models/{name}/infer") == 1
    assert sample(m, "serve_app_errors_total", protocol="kserve_v1", kind="InvalidInput") == 1
    assert sample(m, "serve_app_errors_total", protocol="openai", kind="ModelNotFound") == 1
    assert sample(m, "serve_app_embedded_inputs_total", model="embedding", protocol="openai") == 6
    assert sample(m, "serve_app_embedded_inputs_total", model="embedding",
                  protocol="kserve_v1") == 2
    assert sample(m, "serve_app_embedded_inputs_total", model="embedding", protocol="v2") == 1
    tokens = (3 * engine.embed([SENTENCE, "hi"])[1].sum() + engine.embed([long_text, "x"])[1].sum()
              + engine.embed([SENTENCE])[1].sum())
    assert sum(v for (name, _), v in m.items()
               if name == "serve_app_embedded_tokens_total") == tokens
    assert sample(m, "serve_app_truncated_inputs_total", model="embedding") == 1
    for stage in ("tokenize", "queue", "inference", "encode"):  # one per embedding request
        assert sample(m, "serve_app_stage_seconds_count", model="embedding", stage=stage) == 5
    # every forward pass is in the batch histograms exactly once, with its inputs and tokens
    assert sample(m, "serve_app_batch_inputs_count", model="embedding") == stats["execution_count"]
    assert sample(m, "serve_app_batch_inputs_sum", model="embedding") == stats["inference_count"]
    assert sample(m, "serve_app_batch_tokens_sum", model="embedding") == tokens
    assert sample(m, "serve_app_queued_inputs", model="embedding") == 0


def test_timing_headers_on_every_embedding_answer(client):
    for path, body in [("/v1/embeddings", {"input": SENTENCE, "model": "embedding"}),
                       ("/v1/models/embedding:predict", {"instances": [SENTENCE]}),
                       ("/v2/models/embedding/infer", v2_body([SENTENCE]))]:
        r = client.post(path, json=body)
        assert r.headers["x-compute-tokens"] == "8"
        parts = [float(r.headers[f"x-{k}-time"]) for k in ("tokenization", "queue", "inference")]
        assert all(p >= 0 for p in parts) and parts[2] > 0
        assert float(r.headers["x-compute-time"]) == pytest.approx(sum(parts), abs=0.01)
        assert float(r.headers["x-total-time"]) >= float(r.headers["x-compute-time"])


def test_a_model_without_a_running_replica_is_a_fast_503():
    down = FakeBackend("embedding", ready=False)
    with app_client({"embedding": down}) as c:
        r = c.post("/v1/embeddings", json={"input": "x", "model": "embedding"})
        assert_openai_error(r, 503)
        assert "no running replica" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "1"
        assert_kserve_error(c.post("/v1/models/embedding:predict", json={"instances": ["x"]}),
                            503, "retry shortly")
        assert c.get("/v2/health/ready").status_code == 503
        assert c.get("/v2/health/live").json() == {"live": True}
        assert not down.requests  # refused before any work reached the model


def test_several_versions_of_one_name(engine, tiny_engine):
    """Version 1 (the default) is the real model, version 2 a tiny one: V2 reaches each by
    version, everything without a version gets the default."""
    with app_client({"embedding": replica(engine)}, versions={"embedding": "1"},
                    others={("embedding", "2"): replica(tiny_engine, "embedding", "2")}) as c:
        meta = c.get("/v2/models/embedding").json()
        assert meta["versions"] == ["1", "2"] and meta["outputs"][0]["shape"] == [-1, 384]
        assert c.get("/v2/models/embedding/versions/2").json()["outputs"][0]["shape"] == [-1, 32]
        assert c.get("/v2/models/embedding/versions/2/ready").status_code == 200
        for version, dim in (("1", 384), ("2", 32)):
            r = c.post(f"/v2/models/embedding/versions/{version}/infer", json=v2_body([SENTENCE]))
            assert r.status_code == 200
            body = r.json()
            assert body["model_version"] == version and body["outputs"][0]["shape"] == [1, dim]
        plain = c.post("/v2/models/embedding/infer", json=v2_body([SENTENCE])).json()
        assert plain["model_version"] == "1" and plain["outputs"][0]["shape"] == [1, 384]
        oai = c.post("/v1/embeddings", json={"model": "embedding", "input": SENTENCE}).json()
        assert len(oai["data"][0]["embedding"]) == 384
        missing = c.post("/v2/models/embedding/versions/3/infer", json=v2_body([SENTENCE]))
        assert_kserve_error(missing, 404, "versions: ['1', '2']")
        stats = c.get("/v2/models/embedding/versions/2/stats").json()["model_stats"][0]
        assert stats["version"] == "2" and stats["inference_count"] == 1
        assert c.get("/v2/health/ready").status_code == 200


def test_the_engine_and_its_fidelity_in_metadata_and_metrics(tiny_model):
    engine = EmbeddingEngine(ModelConfig(model_id=str(tiny_model(pooling="cls"))))
    engine.verify()  # what a replica's warm-up does
    with app_client({"tiny": replica(engine, "tiny")}) as c:
        described = c.get("/v2/models/tiny").json()["parameters"]["engine"]
        m = scrape(c.get("/metrics").text)
    assert described["backend"] == engine.backend.name == "openvino"  # the CPU default
    assert (described["precision"], described["dtype"]) == ("exact", "float32")
    f = described["fidelity"]
    assert f["measured"] and f["reference"] == "torch float32" and f["inputs"] == 64
    assert 0.99999 <= f["min"] <= f["mean"] <= 1.0 + 1e-9
    assert sample(m, "serve_app_engine_fidelity", model="tiny", version="1", backend="openvino",
                  precision="exact", stat="min") == pytest.approx(f["min"])
