"""V2 gRPC in process: a real grpc.aio server with the adapter, real grpcio stubs, no Ray."""

from __future__ import annotations

import sys

import grpc
import numpy as np
import pytest

from serve_app.frontend.context import ServerContext
from serve_app.frontend.v2.codec import join_bytes_tensor
from serve_app.frontend.v2.proto import inference_pb2 as pb
from serve_app.frontend.v2.servicer import _contents
from tests.helpers import (
    REPO,
    SENTENCE,
    FakeBackend,
    grpc_serving,
    infer_request,
    make_dataplane,
    replica,
    sample,
    scrape,
)


@pytest.fixture(scope="module")
def stub(engine):
    dataplane = make_dataplane(
        {"embedding": replica(engine), "loading": FakeBackend("loading", loads=False),
         "broken": FakeBackend("broken", error=RuntimeError("a bug"))},
        server_name="grpc-test", ready_timeout_s=0.2, load_timeout_s=0.5,
    )
    with grpc_serving(dataplane) as s:
        yield s


def test_health_and_metadata(stub):
    assert stub.ServerLive(pb.ServerLiveRequest()).live is True
    assert stub.ServerReady(pb.ServerReadyRequest()).ready is False  # "loading" never loads
    assert stub.ModelReady(pb.ModelReadyRequest(name="embedding")).ready is True
    assert stub.ModelReady(pb.ModelReadyRequest(name="embedding", version="1")).ready is True
    assert stub.ModelReady(pb.ModelReadyRequest(name="loading")).ready is False
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert (meta.name, meta.version, list(meta.extensions)) == (
        "grpc-test", "0.1.0", ["binary_tensor_data"])
    m = stub.ModelMetadata(pb.ModelMetadataRequest(name="embedding"))
    assert m.name == "embedding" and list(m.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in m.inputs] == [("text", "BYTES", [-1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in m.outputs] == [
        ("output-0", "FP32", [-1, 384])]


@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize("shape", [None, [2, 1]])
def test_infer_both_content_styles(stub, engine, raw, shape):
    resp = stub.ModelInfer(infer_request([SENTENCE, "wörld"], raw=raw, shape=shape, id="r-7"))
    assert resp.id == "r-7" and resp.model_name == "embedding" and resp.model_version == "1"
    (out,) = resp.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("output-0", "FP32", [2, 384])
    if raw:  # answered in the style asked
        assert not out.contents.fp32_contents and len(resp.raw_output_contents) == 1
        vectors = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(2, 384)
    else:
        assert not resp.raw_output_contents
        vectors = np.array(out.contents.fp32_contents, dtype=np.float32).reshape(2, 384)
    np.testing.assert_array_equal(vectors, engine.embed([SENTENCE, "wörld"])[0])
    assert resp.parameters["prompt_tokens"].int64_param == int(
        engine.embed([SENTENCE, "wörld"])[1].sum())


def test_infer_parameters_are_honoured(stub):
    req = infer_request([SENTENCE], raw=True)
    req.parameters["dimensions"].int64_param = 64
    resp = stub.ModelInfer(req)
    v = np.frombuffer(resp.raw_output_contents[0], "<f4")
    assert list(resp.outputs[0].shape) == [1, 64] and abs(np.linalg.norm(v) - 1) < 1e-5
    long = infer_request(["word " * 400])
    long.parameters["truncate"].bool_param = False
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(long)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than the model's limit of 256" in e.value.details()
    assert stub.ModelInfer(infer_request(["word " * 400])).outputs[0].shape == [1, 384]


def _bad(kind):
    req = infer_request(["a"])
    if kind == "two inputs":
        req.inputs.append(req.inputs[0])
    elif kind == "both styles":
        req.raw_input_contents.append(join_bytes_tensor([b"a"]))
    elif kind == "raw count":
        req = infer_request(["a"], raw=True)
        req.raw_input_contents.append(b"")
    elif kind == "bad output":
        req.outputs.add(name="logits")
    elif kind == "dims type":
        req.parameters["dimensions"].string_param = "8"
    return req


@pytest.mark.parametrize(
    ("req", "code", "contains"),
    [
        (infer_request(["a"], datatype="FP32"), "INVALID_ARGUMENT", "must be BYTES"),
        (infer_request(["a", "b"], shape=[3]), "INVALID_ARGUMENT", "holds 2 elements"),
        (infer_request(["a"], shape=[1, 2]), "INVALID_ARGUMENT", "expected [n] or [n, 1]"),
        (infer_request([]), "INVALID_ARGUMENT", "is empty"),
        (infer_request([b"\xff\xfe"]), "INVALID_ARGUMENT", "not valid UTF-8"),
        (infer_request([b"\xff\xfe"], raw=True), "INVALID_ARGUMENT", "not valid UTF-8"),
        (pb.ModelInferRequest(model_name="embedding"), "INVALID_ARGUMENT", "exactly one input"),
        (_bad("two inputs"), "INVALID_ARGUMENT", "exactly one input"),
        (_bad("both styles"), "INVALID_ARGUMENT", "both contents and raw_input_contents"),
        (_bad("raw count"), "INVALID_ARGUMENT", "2 entries for 1 input"),
        (_bad("bad output"), "INVALID_ARGUMENT", "unknown output 'logits'"),
        (_bad("dims type"), "INVALID_ARGUMENT", "must be an integer"),
        (infer_request(["a"], model="nope"), "NOT_FOUND", "not served here"),
        (infer_request(["a"], model_version="9"), "NOT_FOUND", "no version '9'"),
        (infer_request(["a"], model="loading"), "UNAVAILABLE", "not ready"),
        (infer_request(["a"], model="broken"), "INTERNAL", "internal server error"),
    ],
)
def test_infer_errors(stub, req, code, contains):
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(req)
    assert e.value.code() == getattr(grpc.StatusCode, code)
    assert contains in e.value.details()


def test_truncated_raw_bytes_are_invalid_argument(stub):
    req = infer_request(["a"])
    del req.inputs[0].contents.bytes_contents[:]
    req.raw_input_contents.append(b"\x09\x00\x00\x00abc")
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("call", "request_", "code"),
    [
        ("ModelMetadata", pb.ModelMetadataRequest(name="nope"), "NOT_FOUND"),
        ("ModelMetadata", pb.ModelMetadataRequest(name="loading"), "UNAVAILABLE"),
        ("ModelMetadata", pb.ModelMetadataRequest(name="embedding", version="3"), "NOT_FOUND"),
        ("ModelReady", pb.ModelReadyRequest(name="nope"), "NOT_FOUND"),
    ],
)
def test_metadata_errors(stub, call, request_, code):
    with pytest.raises(grpc.RpcError) as e:
        getattr(stub, call)(request_)
    assert e.value.code() == getattr(grpc.StatusCode, code)


def test_server_keeps_serving_after_errors(stub):
    for req in (infer_request([]), infer_request(["a"], model="nope")):
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(req)
    assert stub.ModelInfer(infer_request(["fine"])).outputs[0].shape == [1, 384]


def test_grpc_calls_are_counted_per_method_status_and_error_kind(engine):
    context = ServerContext()
    with grpc_serving(make_dataplane({"embedding": replica(engine)}), context) as s:
        s.ModelInfer(infer_request([SENTENCE, "hi"]))
        with pytest.raises(grpc.RpcError):
            s.ModelInfer(infer_request(["x"], model="nope"))
        s.ModelReady(pb.ModelReadyRequest(name="embedding"))
        with pytest.raises(grpc.RpcError) as e:
            req = infer_request(["x"])
            req.parameters["timeout"].int64_param = -1
            s.ModelInfer(req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    m = scrape(context.metrics.render().decode())
    calls = dict(protocol="v2_grpc", route="ModelInfer", method="RPC")
    assert sample(m, "serve_app_requests_total", **calls, status="OK") == 1
    assert sample(m, "serve_app_requests_total", **calls, status="NOT_FOUND") == 1
    assert sample(m, "serve_app_requests_total", **calls, status="INVALID_ARGUMENT") == 1
    assert sample(m, "serve_app_requests_total", protocol="v2_grpc", route="ModelReady",
                  method="RPC", status="OK") == 1
    assert sample(m, "serve_app_errors_total", protocol="v2_grpc", kind="ModelNotFound") == 1
    assert sample(m, "serve_app_embedded_inputs_total", model="embedding",
                  protocol="v2_grpc") == 2
    assert sample(m, "serve_app_stage_seconds_count", model="embedding", stage="encode") == 1


def test_contents_bytes_equal_the_slow_path():
    v = np.random.default_rng(0).standard_normal((5, 300)).astype(np.float32)
    slow = pb.InferTensorContents(fp32_contents=v.ravel().tolist())
    fast = _contents(v)
    assert fast == slow
    assert np.array_equal(np.array(fast.fp32_contents, np.float32), v.ravel())


def test_generated_modules_match_the_proto(tmp_path):
    """Regenerating with scripts/gen_proto.py changes nothing."""
    import subprocess

    subprocess.run([sys.executable, str(REPO / "scripts" / "gen_proto.py"), str(tmp_path)],
                   check=True, capture_output=True)
    for name in ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py"):
        fresh = (tmp_path / "serve_app" / "frontend" / "v2" / "proto" / name).read_text()
        assert fresh == (REPO / "serve_app" / "frontend" / "v2" / "proto" / name).read_text(), name


@pytest.mark.parametrize("order", ["tritonclient first", "serve_app first"])
def test_coexists_with_tritonclient_in_one_process(order):
    """Both register inference.* message types; ours live in a private descriptor pool."""
    import subprocess

    ours = "from serve_app.frontend.v2.proto import inference_pb2, inference_pb2_grpc"
    theirs = "import tritonclient.grpc"
    code = "; ".join([theirs, ours] if order == "tritonclient first" else [ours, theirs])
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_grpc_reaches_each_version(engine, tiny_model):
    from serve_app.config.schema import ModelConfig
    from serve_app.engine.embedding import EmbeddingEngine

    tiny = EmbeddingEngine(ModelConfig(model_id=str(tiny_model(pooling="cls"))))
    dataplane = make_dataplane({"embedding": replica(engine)}, versions={"embedding": "1"},
                          others={("embedding", "2"): replica(tiny, "embedding", "2")})
    with grpc_serving(dataplane) as s:
        meta = s.ModelMetadata(pb.ModelMetadataRequest(name="embedding", version="2"))
        assert list(meta.versions) == ["1", "2"] and list(meta.outputs[0].shape) == [-1, 32]
        assert s.ModelReady(pb.ModelReadyRequest(name="embedding", version="2")).ready
        v2 = s.ModelInfer(infer_request([SENTENCE], model_version="2"))
        assert v2.model_version == "2" and list(v2.outputs[0].shape) == [1, 32]
        v1 = s.ModelInfer(infer_request([SENTENCE]))
        assert v1.model_version == "1" and list(v1.outputs[0].shape) == [1, 384]
        with pytest.raises(grpc.RpcError) as e:
            s.ModelInfer(infer_request([SENTENCE], model_version="9"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "versions" in e.value.details()
