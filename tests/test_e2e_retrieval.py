"""Retrieval end to end: one app serving an embedding model with query/document prompts (the real
MiniLM weights) and a reranker (a tiny cross-encoder built here), each in its own model
deployment, through the default entry point on loopback (tests/conftest.py's separate_server);
the openai SDK (``extra_body``), httpx, tritonclient over HTTP and gRPC, and the bulk client,
each against sentence-transformers."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from sentence_transformers import CrossEncoder, SentenceTransformer
from sentence_transformers.util import quantize_embeddings
from tritonclient.utils import InferenceServerException

from serve_app.engine.quantize import calibration_texts
from serve_app.tools.client import BULK_PRIORITY, EmbeddingClient
from tests.helpers import SENTENCE, TEXTS, sample, scrape

pytestmark = pytest.mark.e2e

QUERY = "what do cats eat"
DOCS = ["Cats are carnivores and eat meat.", "The stock market fell today.",
        "Kittens need food rich in protein.", "word " * 200]


@pytest.fixture(scope="module")
def server(separate_server):
    """tests/conftest.py's separate_server: the prompted default model and a reranker, each in
    a model deployment of its own (the in-process tests cover the colocated path)."""
    return separate_server


@pytest.fixture(scope="module")
def st(prompted_minilm):
    return SentenceTransformer(str(prompted_minilm), device="cpu")


@pytest.fixture(scope="module")
def scores(cross_encoder):
    return CrossEncoder(str(cross_encoder()), device="cpu").predict([(QUERY, d) for d in DOCS])


def _vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in response.data])


def test_openai_sdk_prompts(oai, st):
    for extra, name in [({"prompt_name": "query"}, "query"),
                        ({"input_type": "search_document"}, "document"),
                        ({"input_type": "query"}, "query"), ({}, None)]:
        r = oai.embeddings.create(model="embedding", input=TEXTS, extra_body=extra)
        np.testing.assert_allclose(_vectors(r), st.encode(TEXTS, prompt_name=name), atol=1e-5)
    r = oai.embeddings.create(model="embedding", input=SENTENCE,
                              extra_body={"prompt_name": "query"})
    assert r.usage.prompt_tokens == len(st.tokenizer("query: " + SENTENCE)["input_ids"])
    with pytest.raises(openai.BadRequestError, match=r"its prompts: \['query', 'document'"):
        oai.embeddings.create(model="embedding", input="a", extra_body={"prompt_name": "q"})


def test_openai_sdk_compact_encodings(oai, st):
    floats = st.encode(TEXTS)
    calibration = st.encode(calibration_texts())
    for encoding in ("int8", "uint8"):
        r = oai.embeddings.create(model="embedding", input=TEXTS,
                                  extra_body={"encoding_format": encoding})
        got = _vectors(r).astype(int)
        want = quantize_embeddings(floats, encoding, calibration_embeddings=calibration)
        assert got.shape == (len(TEXTS), 384)
        assert np.abs(got - want.astype(int)).max() <= 1 and (got == want).mean() > 0.99
    for encoding in ("binary", "ubinary"):
        r = oai.embeddings.create(model="embedding", input=TEXTS,
                                  extra_body={"encoding_format": encoding, "dimensions": 128})
        got = _vectors(r)
        cut = floats[:, :128]
        want = quantize_embeddings(cut, encoding)
        assert got.shape == (len(TEXTS), 16) and (got == want).mean() > 0.99
    with pytest.raises(openai.BadRequestError, match="empty string"):
        oai.embeddings.create(model="embedding", input="")  # OpenAI's own rule on its route


def test_rerank_routes_with_httpx(server, scores):
    order = list(np.argsort(-scores, kind="stable"))
    with httpx.Client(base_url=server, timeout=60) as c:
        tei = c.post("/rerank", json={"query": QUERY, "texts": DOCS, "return_text": True})
        assert tei.status_code == 200, tei.text
        assert [x["index"] for x in tei.json()] == order
        np.testing.assert_allclose([x["score"] for x in tei.json()], scores[order], atol=1e-6)
        assert tei.json()[0]["text"] == DOCS[order[0]]
        for path in ("/v1/rerank", "/openai/v1/rerank"):
            r = c.post(path, json={"model": "reranker", "query": QUERY, "documents": DOCS,
                                   "top_n": 2, "return_documents": True})
            assert r.status_code == 200, r.text
            results = r.json()["results"]
            assert [x["index"] for x in results] == order[:2]
            assert results[0]["document"]["text"] == DOCS[order[0]]
            assert r.json()["usage"]["total_tokens"] > 4 * 5
        wrong = c.post("/v1/rerank", json={"model": "embedding", "query": QUERY,
                                           "documents": DOCS})
        assert wrong.status_code == 400 and "not a reranker" in wrong.json()["error"]["message"]
        wrong = c.post("/v1/embeddings", json={"model": "reranker", "input": "a"})
        assert wrong.status_code == 400 and "is a reranker" in wrong.json()["error"]["message"]
        empty = c.post("/rerank", json={"query": QUERY, "texts": []})
        assert empty.status_code == 400 and empty.json()["error_type"] == "Empty"
        # KServe's runtime embeds "" on V1, and so do we
        v1 = c.post("/v1/models/embedding:predict", json={"instances": ["", SENTENCE]})
        assert v1.status_code == 200, v1.text
        np.testing.assert_allclose(v1.json()["predictions"], _st_empty(), atol=1e-5)


def _st_empty() -> np.ndarray:
    from serve_app.engine.model_files import resolve_model_dir

    minilm = resolve_model_dir("sentence-transformers/all-MiniLM-L6-v2")
    return SentenceTransformer(str(minilm), device="cpu").encode(["", SENTENCE])


def test_tritonclient_http_rerank_prompts_and_int8(server, st, scores):
    client = triton_http.InferenceServerClient(server.removeprefix("http://"))
    meta = client.get_model_metadata("reranker")
    assert [i["name"] for i in meta["inputs"]] == ["query", "documents"]
    query = triton_http.InferInput("query", [1], "BYTES")
    query.set_data_from_numpy(np.array([QUERY.encode()], dtype=object))
    docs = triton_http.InferInput("documents", [len(DOCS)], "BYTES")
    docs.set_data_from_numpy(np.array([d.encode() for d in DOCS], dtype=object))
    out = client.infer("reranker", [query, docs]).as_numpy("scores")
    assert out.dtype == np.float32 and out.shape == (len(DOCS),)
    np.testing.assert_allclose(out, scores, atol=1e-6)

    text = triton_http.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"", SENTENCE.encode()], dtype=object))
    plain = client.infer("embedding", [text]).as_numpy("output-0")
    np.testing.assert_allclose(plain, _st_empty(), atol=1e-5)  # "" embeds on V2 too
    prompted = client.infer("embedding", [text], parameters={"prompt_name": "document"})
    np.testing.assert_allclose(prompted.as_numpy("output-0"),
                               st.encode(["", SENTENCE], prompt_name="document"), atol=1e-5)
    codes = client.infer("embedding", [text], parameters={"encoding_format": "int8"},
                         outputs=[triton_http.InferRequestedOutput("output-0")])
    assert codes.as_numpy("output-0").dtype == np.int8
    assert codes.as_numpy("output-0").shape == (2, 384)
    with pytest.raises(InferenceServerException, match="no prompt 'nope'"):
        client.infer("embedding", [text], parameters={"prompt_name": "nope"})


def test_tritonclient_grpc_rerank_and_ubinary(server, st, scores):
    client = triton_grpc.InferenceServerClient(server.grpc)
    query = triton_grpc.InferInput("query", [1], "BYTES")
    query.set_data_from_numpy(np.array([QUERY.encode()], dtype=object))
    docs = triton_grpc.InferInput("documents", [len(DOCS)], "BYTES")
    docs.set_data_from_numpy(np.array([d.encode() for d in DOCS], dtype=object))
    raw = client.infer("reranker", [query, docs], parameters={"raw_scores": True})
    np.testing.assert_allclose(1 / (1 + np.exp(-raw.as_numpy("scores"))), scores, atol=1e-6)
    text = triton_grpc.InferInput("text", [len(TEXTS)], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
    bits = client.infer("embedding", [text], parameters={"encoding_format": "ubinary",
                                                         "prompt_name": "query"})
    got = bits.as_numpy("output-0")
    assert got.dtype == np.uint8 and got.shape == (len(TEXTS), 48)
    want = quantize_embeddings(st.encode(TEXTS, prompt_name="query"), "ubinary")
    assert (got == want).mean() > 0.99
    meta = client.get_model_metadata("reranker")
    assert [o.name for o in meta.outputs] == ["scores"]


@pytest.mark.parametrize("protocol", ["openai", "v2", "grpc"])
def test_bulk_client_sends_the_prompt_name_at_a_low_priority(server, st, protocol):
    url = server.grpc if protocol == "grpc" else server
    waits = "serve_app_priority_queue_seconds_count"
    labels = {"model": "embedding", "priority": str(BULK_PRIORITY)}
    before = sample(scrape(httpx.get(f"{server}/metrics").text), waits, **labels)
    client = EmbeddingClient(url, protocol=protocol, batch_size=2, prompt_name="document")
    np.testing.assert_allclose(client.embed(TEXTS), st.encode(TEXTS, prompt_name="document"),
                               atol=1e-5)
    after = sample(scrape(httpx.get(f"{server}/metrics").text), waits, **labels)
    assert after - before == 2  # both batches waited at the bulk level
