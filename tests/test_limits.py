"""Request limits, deadlines, request ids and CORS, in process (the real engine, no Ray)."""

from __future__ import annotations

import gzip
import json

import orjson
import pytest

from serve_app.config.schema import AppConfig, CorsOptions, LimitOptions
from serve_app.frontend.v2.codec import join_bytes_tensor
from serve_app.types import EmbedRequest
from tests.helpers import FakeBackend, app_client, make_dataplane, replica

LIMITS = LimitOptions(max_inputs_per_request=8, max_input_chars=100, max_body_bytes=4096)
LONG = "word " * 400  # about 400 tokens: over MiniLM's 256


@pytest.fixture(scope="module")
def client(engine):
    limits = LimitOptions(max_inputs_per_request=8, max_input_chars=3000, max_body_bytes=8192)
    with app_client({"embedding": replica(engine)}, limits=limits) as c:
        yield c


def openai_body(inputs, **extra):
    return {"model": "embedding", "input": inputs, **extra}


def v2_body(texts, **params):
    return {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES",
                        "data": texts}], "parameters": params}


# -- limits ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path,body", [
    ("/v1/embeddings", openai_body(["x"] * 9)),
    ("/v1/models/embedding:predict", {"instances": ["x"] * 9}),
    ("/v2/models/embedding/infer", v2_body(["x"] * 9)),
])
def test_too_many_inputs_is_a_400_naming_the_limit(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code == 400
    assert "9 inputs" in r.text and "limit is 8" in r.text and "max_inputs_per_request" in r.text


@pytest.mark.parametrize("path,body", [
    ("/v1/embeddings", openai_body(["ok", "y" * 3001])),
    ("/v1/models/embedding:predict", {"instances": ["ok", "y" * 3001]}),
    ("/v2/models/embedding/infer", v2_body(["ok", "y" * 3001])),
])
def test_over_long_text_is_refused_before_tokenizing(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code == 400
    assert "input 1 has 3001 characters" in r.text and "limit is 3000" in r.text


def test_body_over_the_limit_is_a_413_in_each_protocols_shape(client):
    big = openai_body(["z" * 2000] * 5)
    r = client.post("/v1/embeddings", json=big)
    assert r.status_code == 413 and r.json()["error"]["message"].startswith("request body exceeds")
    r = client.post("/v1/models/embedding:predict", json={"instances": ["z" * 2000] * 5})
    assert r.status_code == 413 and "8192 bytes" in r.json()["error"]
    # without Content-Length (chunked): counted while reading
    r = client.post("/v2/models/embedding/infer", content=iter([b"{" + b" " * 5000] * 2))
    assert r.status_code == 413


def test_a_gzip_bomb_is_a_413_not_a_memory_spike(client):
    bomb = gzip.compress(b'{"model": "embedding", "input": "' + b"a" * 5_000_000 + b'"}')
    assert len(bomb) < 8192
    r = client.post("/v1/embeddings", content=bomb,
                    headers={"content-encoding": "gzip", "content-type": "application/json"})
    assert r.status_code == 413


@pytest.mark.parametrize("path,body,truncated", [
    ("/v1/embeddings", openai_body(LONG, truncate=False), openai_body(LONG)),
    ("/v1/models/embedding:predict", {"instances": [LONG], "truncate": False},
     {"instances": [LONG]}),
    ("/v2/models/embedding/infer", v2_body([LONG], truncate=False), v2_body([LONG])),
])
def test_truncation_is_on_by_default_and_can_be_refused(client, path, body, truncated):
    assert client.post(path, json=truncated).status_code == 200
    r = client.post(path, json=body)
    assert r.status_code == 400
    assert "has 402 tokens, more than the model's limit of 256" in r.text


@pytest.mark.parametrize("path,body", [
    ("/v1/embeddings", openai_body("x", truncate="no")),
    ("/v1/models/embedding:predict", {"instances": ["x"], "truncate": 1}),
    ("/v2/models/embedding/infer", v2_body(["x"], truncate="false")),
])
def test_truncate_must_be_a_boolean(client, path, body):
    assert client.post(path, json=body).status_code == 400


def test_limits_reach_the_data_plane_from_the_config():
    cfg = AppConfig.model_validate({"limits": {"max_inputs_per_request": 3}})
    dataplane = make_dataplane({}, limits=cfg.limits)
    with pytest.raises(Exception, match="limit is 3"):
        dataplane.check(EmbedRequest(model="m", inputs=("a",) * 4))
    with pytest.raises(Exception, match="max_body_bytes"):
        AppConfig.model_validate({"limits": {"max_body_bytes": 10}})
    with pytest.raises(Exception, match="extra"):
        AppConfig.model_validate({"limits": {"max_inputs": 3}})


# -- deadlines ---------------------------------------------------------------------------------

def test_deadlines_from_headers_and_v2_parameters():
    slow = FakeBackend("embedding", delay=2.0)
    with app_client({"embedding": slow}) as c:
        r = c.post("/v1/embeddings", json=openai_body("x"), headers={"x-request-timeout": "0.2"})
        assert r.status_code == 504 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "server_error"
        r = c.post("/v1/models/embedding:predict", json={"instances": ["x"]},
                   headers={"x-stainless-timeout": "0.2"})  # what the openai SDK sends
        assert r.status_code == 504 and "deadline" in r.json()["error"]
        r = c.post("/v2/models/embedding/infer", json=v2_body(["x"], timeout=200_000))
        assert r.status_code == 504
        assert slow.expired == 3  # each gave up at its deadline, none waited for the answer
        for bad in ("soon", "0", "-1", "nan"):
            r = c.post("/v1/embeddings", json=openai_body("x"), headers={"x-request-timeout": bad})
            assert r.status_code == 400, bad
        r = c.post("/v2/models/embedding/infer", json=v2_body(["x"], timeout=-5))
        assert r.status_code == 400 and "microseconds" in r.text


def test_a_generous_deadline_does_not_change_the_answer(client):
    r = client.post("/v1/embeddings", json=openai_body("x"), headers={"x-request-timeout": "30"})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
    plain = client.post("/v1/embeddings", json=openai_body("x"))
    assert plain.status_code == 200
    assert r.json()["data"] == plain.json()["data"] and r.json()["usage"] == plain.json()["usage"]


# -- request ids, CORS -------------------------------------------------------------------------

def test_request_id_is_echoed_or_created(client):
    r = client.post("/v1/embeddings", json=openai_body("x"), headers={"x-request-id": "abc-1"})
    assert r.headers["x-request-id"] == "abc-1"
    r = client.post("/v1/embeddings", json=openai_body([]))
    assert r.status_code == 400 and len(r.headers["x-request-id"]) == 32
    assert client.get("/v2/health/live").headers["x-request-id"]


def test_access_log_has_ids_and_no_text(engine, caplog):
    from serve_app.frontend.http.app import access_log
    secret = "my private medical note"
    with app_client({"embedding": replica(engine)}) as c, \
            caplog.at_level("INFO", access_log.name):
        c.post("/v1/embeddings", json=openai_body(secret), headers={"x-request-id": "rid-7"})
        c.post("/v2/models/embedding/infer", json=v2_body([secret]))
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == access_log.name]
    assert records[0] == {**records[0], "request_id": "rid-7", "protocol": "openai",
                          "route": "/v1/embeddings", "status": 200, "model": "embedding",
                          "tokens": 6}
    assert {"ms", "tokenization_ms", "queue_ms", "inference_ms"} <= set(records[0])
    assert records[1]["model"] == "embedding" and records[1]["protocol"] == "v2"
    assert all(secret not in r.getMessage() for r in caplog.records)


def test_cors_is_off_unless_configured():
    backends = {"embedding": FakeBackend("embedding")}
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST"}
    with app_client(backends) as c:
        r = c.options("/v1/embeddings", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
        r = c.post("/v1/embeddings", json=openai_body("x"), headers={"origin": "https://x"})
        assert "access-control-allow-origin" not in r.headers
    cors = CorsOptions(allow_origins=["https://app.example"])
    with app_client(backends, cors=cors) as c:
        r = c.options("/v1/embeddings", headers=preflight)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = c.options("/v1/embeddings", headers={**preflight, "origin": "https://evil.example"})
        assert r.status_code == 400
        r = c.post("/v1/embeddings", json=openai_body("x"),
                   headers={"origin": "https://app.example"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in r.headers["access-control-expose-headers"]


def test_body_limit_applies_to_the_raw_binary_v2_body(client):
    texts = [b"q" * 3000] * 3
    raw = join_bytes_tensor(texts)
    head = orjson.dumps({"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}]})
    r = client.post("/v2/models/embedding/infer", content=head + raw,
                    headers={"inference-header-content-length": str(len(head))})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]


def test_while_every_model_is_full_requests_are_refused_before_their_bodies_are_read():
    """A burst past the admission bound is answered 429 (Retry-After) without parsing: a body
    that would be a 400 is a 429 while every model is full, in each protocol's shape; routes
    that compute nothing (TEI's /tokenize) still answer; once there is room again, the body is
    read as usual."""
    fake = FakeBackend("embedding")
    with app_client({"embedding": fake}) as c:
        fake.is_full = True
        for path, shape in [("/v1/embeddings", "openai"), ("/embed", "tei"),
                            ("/v1/models/embedding:predict", "kserve")]:
            r = c.post(path, content=b'{"not json')
            assert r.status_code == 429 and r.headers["retry-after"] == "1", (path, r.text)
            body = r.json()
            error = body["error"]
            assert "queue limit" in (error["message"] if shape == "openai" else error)
            if shape == "tei":
                assert body["error_type"] == "Overloaded"
        tokens = c.post("/tokenize", json={"inputs": "hello"})
        assert tokens.status_code == 200 and len(tokens.json()[0]) == 5
        assert not fake.requests
        fake.is_full = False
        assert c.post("/v1/embeddings", content=b'{"not json').status_code == 400
