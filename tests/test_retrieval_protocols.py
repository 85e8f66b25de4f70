"""Retrieval through every protocol in process (the HTTP app and the gRPC servicer over real
replicas): the rerank routes in TEI's and Cohere's shapes, V2 rerank tensors, prompts and compact
encodings on OpenAI and V2, KServe's empty text, and each protocol's errors."""

from __future__ import annotations

import numpy as np
import pytest
from sentence_transformers import CrossEncoder, SentenceTransformer

from serve_app.config.schema import LimitOptions, ModelConfig
from serve_app.engine.embedding import EmbeddingEngine
from serve_app.engine.reranker import RerankEngine
from serve_app.frontend.v2.codec import join_bytes_tensor
from serve_app.frontend.v2.proto import inference_pb2 as pb
from tests.helpers import SENTENCE, app_client, grpc_serving, infer_request, make_dataplane, replica

QUERY = "what do cats eat"
DOCS = ["Cats are carnivores and eat meat.", "The stock market fell today.",
        "Kittens need food rich in protein."]


@pytest.fixture(scope="module")
def models(prompted_minilm, cross_encoder):
    embedder = EmbeddingEngine(ModelConfig(model_id=str(prompted_minilm)), num_threads=2)
    embedder.warmup()
    ce_path = cross_encoder()
    reranker = RerankEngine(ModelConfig(model_id=str(ce_path), task="rerank"))
    return {
        "backends": {"embedding": replica(embedder), "reranker": replica(reranker, "reranker")},
        "st": SentenceTransformer(str(prompted_minilm), device="cpu"),
        "ce": CrossEncoder(str(ce_path), device="cpu"),
    }


@pytest.fixture(scope="module")
def dataplane(models):
    return make_dataplane(models["backends"], tasks={"reranker": "rerank"},
                     limits=LimitOptions(max_inputs_per_request=8))


@pytest.fixture(scope="module")
def client(dataplane):
    with app_client(dataplane) as c:
        yield c


@pytest.fixture(scope="module")
def expected(models):
    return models["ce"].predict([(QUERY, d) for d in DOCS])


# -- rerank routes -----------------------------------------------------------------------------

def test_tei_rerank(client, expected):
    r = client.post("/rerank", json={"query": QUERY, "texts": DOCS, "return_text": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["index"] for x in body] == list(np.argsort(-expected, kind="stable"))
    for x in body:
        assert x["score"] == pytest.approx(float(expected[x["index"]]), abs=1e-6)
        assert x["text"] == DOCS[x["index"]]
    assert int(r.headers["x-compute-tokens"]) > 3 * 5
    raw = client.post("/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True}).json()
    logits = {x["index"]: x["score"] for x in raw}
    for i, p in enumerate(expected):  # sigmoid(logit) is the score
        assert 1 / (1 + np.exp(-logits[i])) == pytest.approx(float(p), abs=1e-6)
        assert "text" not in raw[0]


@pytest.mark.parametrize("path", ["/v1/rerank", "/openai/v1/rerank", "/rerank"])
def test_cohere_rerank(client, expected, path):
    docs = [DOCS[0], {"text": DOCS[1]}, DOCS[2]]
    r = client.post(path, json={"model": "reranker", "query": QUERY, "documents": docs,
                                "top_n": 2, "return_documents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    order = list(np.argsort(-expected, kind="stable"))[:2]
    assert [x["index"] for x in body["results"]] == order
    for x in body["results"]:
        assert x["relevance_score"] == pytest.approx(float(expected[x["index"]]), abs=1e-6)
        assert x["document"] == {"text": DOCS[x["index"]]}
    assert body["model"] == "reranker" and body["id"]
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 15
    plain = client.post(path, json={"query": QUERY, "documents": DOCS}).json()  # one reranker
    assert len(plain["results"]) == 3 and "document" not in plain["results"][0]


@pytest.mark.parametrize(
    "path, body, status, contains",
    [
        ("/v1/rerank", {"query": QUERY, "documents": []}, 400, "at least one document"),
        ("/v1/rerank", {"query": QUERY, "documents": ["d"] * 9}, 400, "limit is 8"),
        ("/v1/rerank", {"query": "", "documents": ["d"]}, 400, "query must be a non-empty"),
        ("/v1/rerank", {"documents": ["d"]}, 400, "query"),
        ("/v1/rerank", {"query": "q", "documents": ["d"], "top_n": 0}, 400, "top_n"),
        ("/v1/rerank", {"query": "q", "documents": [1]}, 400, "documents"),
        ("/v1/rerank", {"model": "nope", "query": "q", "documents": ["d"]}, 404, "not served"),
        ("/v1/rerank", {"model": "embedding", "query": "q", "documents": ["d"]}, 400,
         "not a reranker"),
        ("/openai/v1/rerank", {"query": "q", "documents": ["d"], "truncate": False,
                               "model": "reranker"}, 200, ""),
    ],
)
def test_cohere_rerank_errors_are_openai_errors(client, path, body, status, contains):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    if status != 200:
        err = r.json()["error"]
        assert contains in err["message"] and err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body, status, etype, contains",
    [
        ({"query": QUERY, "texts": []}, 400, "Empty", "cannot be empty"),
        ({"query": "", "texts": ["d"]}, 400, "Empty", "query"),
        ({"query": QUERY, "texts": ["word " * 300], "truncate": False}, 422, "Validation",
         "tokens"),
        ({"query": QUERY, "texts": ["d"], "truncation_direction": "LEFT"}, 422, "Validation",
         "truncation_direction"),
        ({"query": QUERY, "texts": ["d"], "model": "embedding"}, 424, "Backend",
         "not a reranker"),
        (["not", "an", "object"], 422, "Validation", "JSON object"),
    ],
)
def test_tei_rerank_errors_are_tei_errors(client, body, status, etype, contains):
    r = client.post("/rerank", json=body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error", "error_type"}
    assert contains in r.json()["error"] and r.json()["error_type"] == etype


def test_embedding_routes_refuse_a_reranker(client):
    r = client.post("/v1/embeddings", json={"model": "reranker", "input": "a"})
    assert r.status_code == 400 and "is a reranker" in r.json()["error"]["message"]
    r = client.post("/v1/models/reranker:predict", json={"instances": ["a"]})
    assert r.status_code == 400 and "is a reranker" in r.json()["error"]


# -- V2 for rerankers --------------------------------------------------------------------------

def _rerank_body(query=QUERY, docs=DOCS, **params):
    return {"inputs": [{"name": "query", "shape": [1], "datatype": "BYTES", "data": [query]},
                       {"name": "documents", "shape": [len(docs)], "datatype": "BYTES",
                        "data": docs}],
            "parameters": params}


def test_v2_reranker_metadata_and_infer(client, expected):
    meta = client.get("/v2/models/reranker").json()
    assert meta["inputs"] == [{"name": "query", "datatype": "BYTES", "shape": [1]},
                              {"name": "documents", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1]}]
    assert meta["parameters"]["task"] == "rerank"
    r = client.post("/v2/models/reranker/infer", json=_rerank_body())
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "scores" and out["shape"] == [3] and out["datatype"] == "FP32"
    np.testing.assert_allclose(out["data"], expected, atol=1e-6)
    raw = client.post("/v2/models/reranker/infer", json=_rerank_body(raw_scores=True))
    np.testing.assert_allclose(1 / (1 + np.exp(-np.array(raw.json()["outputs"][0]["data"]))),
                               expected, atol=1e-6)


@pytest.mark.parametrize(
    "body, contains",
    [
        ({"inputs": [_rerank_body()["inputs"][1]]}, "two BYTES inputs"),
        (_rerank_body(query="q", docs=[]), "input 'documents' is empty"),
        ({"inputs": [{**_rerank_body()["inputs"][0], "shape": [2], "data": ["a", "b"]},
                     _rerank_body()["inputs"][1]]}, "must hold one text"),
        ({**_rerank_body(), "outputs": [{"name": "output-0"}]}, "unknown output 'output-0'"),
        (_rerank_body(raw_scores="yes"), "raw_scores"),
        (_rerank_body(prompt_name="query"), "['prompt_name'] do not apply"),
        (_rerank_body(encoding_format="int8", dimensions=4),
         "['dimensions', 'encoding_format'] do not apply"),
    ],
)
def test_v2_rerank_errors(client, body, contains):
    r = client.post("/v2/models/reranker/infer", json=body)
    assert r.status_code == 400 and contains in r.json()["error"], r.text


def test_grpc_rerank_and_compact_encodings(dataplane, expected, models):
    with grpc_serving(dataplane) as stub:
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="reranker"))
        assert [i.name for i in meta.inputs] == ["query", "documents"]
        req = pb.ModelInferRequest(model_name="reranker")
        req.inputs.add(name="query", datatype="BYTES", shape=[1])
        req.inputs.add(name="documents", datatype="BYTES", shape=[3])
        req.raw_input_contents.extend([join_bytes_tensor([QUERY.encode()]),
                                       join_bytes_tensor([d.encode() for d in DOCS])])
        resp = stub.ModelInfer(req)
        assert resp.outputs[0].name == "scores" and list(resp.outputs[0].shape) == [3]
        np.testing.assert_allclose(np.frombuffer(resp.raw_output_contents[0], "<f4"), expected,
                                   atol=1e-6)
        req = infer_request([SENTENCE])
        req.parameters["encoding_format"].string_param = "int8"
        req.parameters["prompt_name"].string_param = "query"
        typed = stub.ModelInfer(req).outputs[0]
        assert typed.datatype == "INT8" and list(typed.shape) == [1, 384]
        req = infer_request([SENTENCE], raw=True)
        req.parameters["encoding_format"].string_param = "ubinary"
        resp = stub.ModelInfer(req)
        assert resp.outputs[0].datatype == "UINT8" and list(resp.outputs[0].shape) == [1, 48]
        bits = np.frombuffer(resp.raw_output_contents[0], np.uint8)
        np.testing.assert_array_equal(bits, np.packbits(models["st"].encode(SENTENCE) > 0))
        ints = np.array(typed.contents.int_contents)
        calibration = models["backends"]["embedding"].engine.calibration
        want = calibration.encode(models["st"].encode([SENTENCE], prompt_name="query"), "int8")
        assert np.abs(ints - want[0].astype(int)).max() <= 1


# -- prompts and encodings on OpenAI and V2 ----------------------------------------------------

def _openai(client, **body):
    r = client.post("/v1/embeddings", json={"model": "embedding", "input": [SENTENCE], **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_openai_prompts(client, models):
    st = models["st"]
    query = _openai(client, prompt_name="query")
    np.testing.assert_allclose(query["data"][0]["embedding"],
                               st.encode(SENTENCE, prompt_name="query"), atol=1e-5)
    assert query["usage"]["prompt_tokens"] == len(st.tokenizer("query: " + SENTENCE)["input_ids"])
    for input_type, name in [("query", "query"), ("search_query", "query"),
                             ("document", "document"), ("search_document", "document")]:
        got = _openai(client, input_type=input_type)["data"][0]["embedding"]
        np.testing.assert_allclose(got, st.encode(SENTENCE, prompt_name=name), atol=1e-5)
    r = client.post("/v1/embeddings", json={"model": "embedding", "input": "a",
                                            "prompt_name": "passage"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt_name"
    assert "['query', 'document', 'plain']" in r.json()["error"]["message"]


def test_openai_compact_encodings(client, models):
    floats = np.array(_openai(client)["data"][0]["embedding"], np.float32)
    ranges = client.get("/v2/models/embedding").json()["parameters"]["int8_ranges"]
    lo, hi = np.array(ranges["min"], np.float32), np.array(ranges["max"], np.float32)
    assert ranges["calibration_texts"] >= 100 and lo.shape == (384,)
    for encoding, dtype, width in [("int8", np.int8, 384), ("uint8", np.uint8, 384),
                                   ("binary", np.int8, 48), ("ubinary", np.uint8, 48)]:
        got = _openai(client, encoding_format=encoding)["data"][0]["embedding"]
        assert len(got) == width and all(type(x) is int for x in got)
        assert np.iinfo(dtype).min <= min(got) and max(got) <= np.iinfo(dtype).max
    ubinary = _openai(client, encoding_format="ubinary")["data"][0]["embedding"]
    assert ubinary == np.packbits(floats > 0).tolist()
    uint8 = np.array(_openai(client, encoding_format="uint8")["data"][0]["embedding"])
    step = (hi - lo) / 255
    inside = (floats >= lo) & (floats <= hi)  # the calibrated ranges hold nearly every value
    assert inside.mean() > 0.97
    np.testing.assert_allclose((lo + (uint8 + 0.5) * step)[inside], floats[inside],
                               atol=float(step.max()))
    assert set(uint8[floats < lo]) <= {0} and set(uint8[floats > hi]) <= {255}
    cut = _openai(client, encoding_format="int8", dimensions=64)["data"][0]["embedding"]
    assert len(cut) == 64


def test_v2_prompt_and_encoding_parameters(client, models):
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [SENTENCE]}],
            "parameters": {"prompt_name": "document", "encoding_format": "binary"}}
    out = client.post("/v2/models/embedding/infer", json=body).json()["outputs"][0]
    assert out["datatype"] == "INT8" and out["shape"] == [1, 48]
    bits = np.packbits(models["st"].encode(SENTENCE, prompt_name="document") > 0)
    assert out["data"] == (bits.astype(int) - 128).tolist()
    bad = client.post("/v2/models/embedding/infer",
                      json={**body, "parameters": {"encoding_format": "base64"}})
    assert bad.status_code == 400 and "encoding_format" in bad.json()["error"]
    bad = client.post("/v2/models/embedding/infer",
                      json={**body, "parameters": {"raw_scores": True}})
    assert bad.status_code == 400 and "['raw_scores'] do not apply" in bad.json()["error"]
    meta = client.get("/v2/models/embedding").json()["parameters"]
    assert meta["prompts"] == {"query": "query: ", "document": "passage: ", "plain": ""}
    assert meta["encodings"] == ["float", "int8", "uint8", "binary", "ubinary"]


# -- empty text: KServe's behaviour on V1 and V2, OpenAI's 400 on OpenAI -----------------------

def test_empty_text_embeds_on_v1_and_v2_as_kserve_does(client, models):
    want = models["st"].encode(["", SENTENCE])
    v1 = client.post("/v1/models/embedding:predict", json={"instances": ["", SENTENCE]})
    assert v1.status_code == 200, v1.text
    np.testing.assert_allclose(v1.json()["predictions"], want, atol=1e-5)
    body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                        "data": ["", SENTENCE]}]}
    v2 = client.post("/v2/models/embedding/infer", json=body)
    assert v2.status_code == 200, v2.text
    np.testing.assert_allclose(np.reshape(v2.json()["outputs"][0]["data"], (2, 384)), want,
                               atol=1e-5)
    r = client.post("/v1/embeddings", json={"model": "embedding", "input": ""})
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]
