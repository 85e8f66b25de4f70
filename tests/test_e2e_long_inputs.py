"""End to end: long texts and late chunking through the default entry point, on every protocol
that names them (OpenAI, TEI, KServe V1, V2 REST and gRPC), with real clients; served vectors
equal the in-process references of tests/test_long_inputs.py."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import openai
import pytest

from serve_app.config.schema import ModelConfig
from serve_app.engine.embedding import EmbeddingEngine
from serve_app.runtime.runner import ModelRunner
from serve_app.types import EmbedRequest
from tests.test_long_inputs import DOC, late_reference

pytestmark = pytest.mark.e2e

#: the e2e server's "tiny" model: 64 tokens a window, 8 shared, 600 tokens a text at most
SPANS = [[0, 55], [56, 140], [141, 300]]
APP = {"application": "serve_app"}


@pytest.fixture(scope="module")
def server(e2e_server):
    return e2e_server


@pytest.fixture(scope="module")
def tiny(tiny_model) -> ModelRunner:
    """The e2e server's tiny model, in process."""
    return ModelRunner(EmbeddingEngine(ModelConfig(
        model_id=str(tiny_model(pooling="cls")), chunk_overlap=8, max_document_tokens=600),
        num_threads=1), "tiny")


@pytest.fixture(scope="module")
def hf(minilm_dir):
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir)), AutoModel.from_pretrained(
        str(minilm_dir)).eval()


def in_process(runner: ModelRunner, **kw) -> np.ndarray:
    return asyncio.run(runner.embed(EmbedRequest(model=runner._info.name, **kw))).embeddings


def test_openai_long_inputs_chunk_truncate_error(oai, http, tiny):
    r = oai.embeddings.create(model="tiny", input=[DOC, "short"],
                              extra_body={"long_inputs": "chunk"})
    got = np.array([d.embedding for d in r.data], dtype=np.float32)
    np.testing.assert_allclose(got, in_process(tiny, inputs=(DOC, "short"),
                                               long_inputs="chunk"), atol=1e-6)
    cut = http.post("/v1/embeddings", json={"model": "tiny", "input": [DOC, "short"]})
    # usage counts every window's tokens; a cut answer says how many texts it cut
    assert r.usage.prompt_tokens > cut.json()["usage"]["prompt_tokens"] == 64 + 3
    assert cut.headers["x-truncated-inputs"] == "1"
    whole = http.post("/v1/embeddings", json={"model": "tiny", "input": DOC,
                                              "long_inputs": "chunk"})
    assert "x-truncated-inputs" not in whole.headers
    with pytest.raises(openai.BadRequestError) as e:
        oai.embeddings.create(model="tiny", input=DOC, extra_body={"long_inputs": "error"})
    assert "more than the model's limit of 64" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # TEI's boolean says the same
        oai.embeddings.create(model="tiny", input=DOC, extra_body={"truncate": False})
    with pytest.raises(openai.BadRequestError) as e:
        oai.embeddings.create(model="tiny", input=DOC, extra_body={"long_inputs": "split"})
    assert e.value.body["param"] == "long_inputs"


def test_openai_late_chunking(oai, http, hf):
    text = DOC[:300]
    r = http.post("/v1/embeddings", json={"model": "embedding", "input": text,
                                          "chunks": SPANS})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2] and [d["offsets"] for d in data] == SPANS
    want = late_reference(hf, text, SPANS)
    np.testing.assert_allclose([d["embedding"] for d in data], want, atol=1e-5)
    sdk = oai.embeddings.create(model="embedding", input=[text], extra_body={"chunk_tokens": 16})
    offsets = [d.model_extra["offsets"] for d in sdk.data]
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text) and len(offsets) > 3
    np.testing.assert_allclose([d.embedding for d in sdk.data],
                               late_reference(hf, text, offsets), atol=1e-5)
    for body, param in (({"chunks": [[0, 500]]}, "chunks"),
                        ({"chunks": [[0, 5]], "chunk_tokens": 3}, "chunks"),
                        ({"chunks": [[0, "a"]]}, "chunks"), ({"chunk_tokens": 0}, "chunk_tokens")):
        bad = http.post("/v1/embeddings", json={"model": "embedding", "input": text, **body})
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"]["param"] == param and bad.json()["error"]["type"]
    two = http.post("/v1/embeddings", json={"model": "embedding", "input": [text, text],
                                            "chunk_tokens": 8})
    assert two.status_code == 400 and "one text" in two.json()["error"]["message"]


def test_a_text_over_max_document_tokens_is_a_413_in_each_protocols_shape(http, server):
    huge = "lorem ipsum dolor " * 300  # 900+ tokens, over the tiny model's 600
    oa = http.post("/v1/embeddings", json={"model": "tiny", "input": huge,
                                           "long_inputs": "chunk"})
    assert oa.status_code == 413 and "max_document_tokens" in oa.json()["error"]["message"]
    tei = http.post("/embed", json={"model": "tiny", "inputs": huge, "chunk_tokens": 50})
    assert tei.status_code == 413 and tei.json()["error_type"]
    v2 = http.post("/v2/models/tiny/infer", json={
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [huge]}],
        "parameters": {"long_inputs": "chunk"}})
    assert v2.status_code == 413 and "max_document_tokens" in v2.json()["error"]
    # the server keeps serving
    assert http.post("/v1/embeddings", json={"model": "tiny", "input": "ok"}).status_code == 200


def test_tei_embed_long_inputs_and_late_chunking(http, tiny, hf):
    r = http.post("/embed", json={"model": "tiny", "inputs": [DOC], "long_inputs": "chunk"})
    np.testing.assert_allclose(r.json(), in_process(tiny, inputs=(DOC,), long_inputs="chunk"),
                               atol=1e-6)
    refused = http.post("/embed", json={"model": "tiny", "inputs": DOC, "truncate": False})
    assert refused.status_code == 422 and refused.json()["error_type"] == "Validation"
    text = DOC[:300]
    late = http.post("/embed", json={"model": "embedding", "inputs": text, "chunks": SPANS})
    assert json.loads(late.headers["x-chunk-offsets"]) == SPANS
    np.testing.assert_allclose(late.json(), late_reference(hf, text, SPANS), atol=1e-5)


def test_kserve_v1_long_inputs(http, tiny):
    r = http.post("/v1/models/tiny:predict", json={"instances": [DOC], "long_inputs": "chunk"})
    np.testing.assert_allclose(r.json()["predictions"],
                               in_process(tiny, inputs=(DOC,), long_inputs="chunk"), atol=1e-6)
    bad = http.post("/v1/models/tiny:predict", json={"instances": [DOC], "long_inputs": 3})
    assert bad.status_code == 400 and "long_inputs" in bad.json()["error"]


def test_v2_rest_and_grpc_long_inputs_and_late_chunking(server, tiny, hf):
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http

    text = DOC[:300]
    want_chunked = in_process(tiny, inputs=(DOC,), long_inputs="chunk")
    want_late = late_reference(hf, text, SPANS)
    rest = triton_http.InferenceServerClient(server.removeprefix("http://"))
    grpc = triton_grpc.InferenceServerClient(server.grpc)
    for mod, client, kw in ((triton_http, rest, {}), (triton_grpc, grpc, {"headers": APP})):
        def infer(model: str, value: str, parameters: dict, mod=mod, client=client, kw=kw):
            inp = mod.InferInput("text", [1], "BYTES")
            inp.set_data_from_numpy(np.array([value.encode()], dtype=object))
            return client.infer(model, [inp], parameters=parameters, **kw)

        chunked = infer("tiny", DOC, {"long_inputs": "chunk"})
        np.testing.assert_allclose(chunked.as_numpy("output-0"), want_chunked, atol=1e-6)
        cut = infer("tiny", DOC, {})
        params = (cut.get_response()["parameters"] if mod is triton_http
                  else {k: v.int64_param for k, v in cut.get_response().parameters.items()})
        assert params["truncated_inputs"] == 1
        # gRPC parameters are scalars: the chunks go as JSON text there (REST takes either)
        late = infer("embedding", text, {"chunks": json.dumps(SPANS)})
        np.testing.assert_allclose(late.as_numpy("output-0"), want_late, atol=1e-5)
        offsets = late.as_numpy("chunk_offsets")
        assert offsets.dtype == np.int64 and offsets.tolist() == SPANS
        by_tokens = infer("embedding", text, {"chunk_tokens": 16}).as_numpy("chunk_offsets")
        assert by_tokens.shape[1] == 2 and by_tokens[-1, 1] == len(text)
    r = httpx.post(f"{server}/v2/models/embedding/infer", json={
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}],
        "parameters": {"chunks": SPANS}})
    assert [o["name"] for o in r.json()["outputs"]] == ["output-0", "chunk_offsets"]
    bad = httpx.post(f"{server}/v2/models/embedding/infer", json={
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}],
        "outputs": [{"name": "chunk_offsets"}]})
    assert bad.status_code == 400 and "late chunking" in bad.json()["error"]
