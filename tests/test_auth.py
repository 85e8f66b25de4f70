"""Optional API keys over HTTP (every inference and model route) and gRPC metadata."""

from __future__ import annotations

import grpc
import pytest
from pydantic import ValidationError

from serve_app.config.schema import AppConfig, AuthOptions
from serve_app.errors import Unauthorized
from serve_app.frontend.auth import ApiKeys
from serve_app.frontend.context import ServerContext
from serve_app.frontend.v2.proto import inference_pb2 as pb
from tests.helpers import FakeBackend, app_client, grpc_serving, infer_request, make_dataplane

KEY = "sk-test-0123456789"
V2_BODY = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}
GUARDED = [
    ("POST", "/v1/embeddings", {"input": "hi", "model": "embedding"}, "openai"),
    ("POST", "/openai/v1/embeddings", {"input": "hi", "model": "embedding"}, "openai"),
    ("GET", "/openai/v1/models", None, "openai"),
    ("GET", "/openai/v1/models/embedding", None, "openai"),
    ("GET", "/v1/models", None, "kserve"),
    ("GET", "/v1/models/embedding", None, "kserve"),
    ("POST", "/v1/models/embedding:predict", {"instances": ["hi"]}, "kserve"),
    ("GET", "/v2", None, "kserve"),
    ("GET", "/v2/models/embedding", None, "kserve"),
    ("GET", "/v2/models/embedding/ready", None, "kserve"),
    ("GET", "/v2/models/embedding/stats", None, "kserve"),
    ("POST", "/v2/models/embedding/infer", V2_BODY, "kserve"),
    ("POST", "/v2/models/embedding/versions/1/infer", V2_BODY, "kserve"),
]


@pytest.fixture(scope="module")
def client():
    with app_client({"embedding": FakeBackend("embedding")}, api_keys=("other-key", KEY)) as c:
        yield c


@pytest.mark.parametrize(("method", "path", "body", "shape"), GUARDED,
                         ids=[f"{m} {p}" for m, p, _, _ in GUARDED])
@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {KEY}", "Bearer", KEY])
def test_http_routes_refuse_missing_or_wrong_keys(client, method, path, body, shape, header):
    headers = {"Authorization": header} if header is not None else {}
    r = client.request(method, path, json=body, headers=headers)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    assert KEY not in r.text
    if shape == "openai":
        assert r.json()["error"]["code"] == "invalid_api_key"
    else:
        assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)


@pytest.mark.parametrize(("method", "path", "body", "shape"), GUARDED,
                         ids=[f"{m} {p}" for m, p, _, _ in GUARDED])
def test_http_routes_accept_the_right_key(client, method, path, body, shape):
    r = client.request(method, path, json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", ["/", "/v2/health/live", "/v2/health/ready", "/metrics"])
def test_probes_and_scrapes_need_no_key(client, path):
    assert client.get(path).status_code == 200


def test_grpc_methods_need_the_key_except_health():
    dataplane = make_dataplane({"embedding": FakeBackend("embedding")})
    with grpc_serving(dataplane, ServerContext(api_keys=ApiKeys([KEY]))) as stub:
        assert stub.ServerLive(pb.ServerLiveRequest()).live
        assert stub.ServerReady(pb.ServerReadyRequest()).ready
        calls = [
            ("ModelInfer", infer_request(["hi"])),
            ("ModelMetadata", pb.ModelMetadataRequest(name="embedding")),
            ("ModelReady", pb.ModelReadyRequest(name="embedding")),
            ("ServerMetadata", pb.ServerMetadataRequest()),
        ]
        for method, request in calls:
            for metadata in (None, (("authorization", "Bearer nope"),)):
                with pytest.raises(grpc.RpcError) as e:
                    getattr(stub, method)(request, metadata=metadata)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert KEY not in e.value.details()
            good = (("authorization", f"Bearer {KEY}"),)
            assert getattr(stub, method)(request, metadata=good)


def test_keys_come_from_a_file_or_an_environment_variable(tmp_path, monkeypatch):
    f = tmp_path / "keys"
    f.write_text("k1\n\nk2, k3\n")
    monkeypatch.setenv("TEST_SERVE_APP_KEYS", "k4")
    opts = AuthOptions(api_keys_file=str(f), api_keys_env="TEST_SERVE_APP_KEYS")
    assert opts.load_keys() == ["k1", "k2", "k3", "k4"]
    assert AuthOptions().load_keys() == []
    assert AppConfig().auth == AuthOptions()


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        (AuthOptions(api_keys_file="/no/such/file"), "cannot read api_keys_file"),
        (AuthOptions(api_keys_env="TEST_SERVE_APP_UNSET"), "not set"),
    ],
)
def test_a_named_but_missing_key_source_is_an_error(opts, match, monkeypatch):
    monkeypatch.delenv("TEST_SERVE_APP_UNSET", raising=False)
    with pytest.raises(ValueError, match=match):
        opts.load_keys()


def test_an_empty_key_source_is_an_error(tmp_path):
    f = tmp_path / "keys"
    f.write_text("\n")
    with pytest.raises(ValueError, match="holds no key"):
        AuthOptions(api_keys_file=str(f)).load_keys()


def test_check_is_off_without_keys_and_strict_with_them():
    ApiKeys().check(None)
    keys = ApiKeys([KEY])
    keys.check(f"Bearer {KEY}")
    keys.check(f"bearer {KEY}")
    for bad in (None, "", "Bearer ", f"Bearer {KEY}x", f"Token {KEY}"):
        with pytest.raises(Unauthorized):
            keys.check(bad)


def test_auth_config_is_strict():
    with pytest.raises(ValidationError, match="Extra inputs"):
        AppConfig.model_validate({"auth": {"api_key_file": "/x"}})
