"""Clients written for text-embeddings-inference, unchanged, against a real server through the
default entry point (tests/conftest.py's separate_server: the prompted default model, a
reranker, a classifier and a SPLADE model, each in a deployment of its own): llama-index's
``TextEmbeddingsInference``, chromadb's ``HuggingFaceEmbeddingServer``, huggingface_hub's
``InferenceClient``, haystack's TEI embedders (dense and sparse) and ranker; each against
sentence-transformers or transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
from sentence_transformers import CrossEncoder, SentenceTransformer, SparseEncoder

from tests.conftest import CLASSIFIER_LABELS
from tests.test_tasks import pipeline_scores

pytestmark = pytest.mark.e2e

TEXTS = ["What is Deep Learning?", "Cats are carnivores and eat meat.", "ça coûte 5 €"]
QUERY, DOCS = "what do cats eat", ["Cats eat meat.", "Stocks fell today.", "Kittens need food."]


@pytest.fixture(scope="module")
def server(separate_server):
    return separate_server


@pytest.fixture(scope="module")
def st(prompted_minilm):
    return SentenceTransformer(str(prompted_minilm), device="cpu")


def test_llama_index_text_embeddings_inference(server, st):
    from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference

    embedder = TextEmbeddingsInference(model_name="embedding", base_url=str(server), timeout=60)
    np.testing.assert_allclose(embedder.get_text_embedding_batch(TEXTS), st.encode(TEXTS),
                               atol=1e-5)
    np.testing.assert_allclose(embedder.get_query_embedding(QUERY), st.encode(QUERY), atol=1e-5)


def test_chromadb_huggingface_embedding_server(server, st):
    from chromadb.utils.embedding_functions import HuggingFaceEmbeddingServer

    embed = HuggingFaceEmbeddingServer(url=f"{server}/embed")
    np.testing.assert_allclose(np.array(embed(TEXTS)), st.encode(TEXTS), atol=1e-5)


# huggingface_hub refuses every URL while HF_HUB_OFFLINE is set (read when it is imported), and
# the tests' process sets it: its clients run in a process of their own without it
_HF_CLIENTS = r"""
import json, sys
from huggingface_hub import InferenceClient
from haystack_integrations.components.embedders.huggingface_api import (
    HuggingFaceAPIDocumentEmbedder, HuggingFaceAPITextEmbedder)
from haystack import Document

url, texts = sys.argv[1], json.loads(sys.argv[2])
out = {}
client = InferenceClient(base_url=url)  # POST / : the model's task picks the route
out["feature_extraction"] = client.feature_extraction(texts[0]).tolist()
out["feature_extraction_left"] = client.feature_extraction(
    texts[1], truncation_direction="left", normalize=False).tolist()
top = InferenceClient(base_url=url + "/predict").text_classification(texts[0])
out["text_classification"] = [top.label, top.score] if not isinstance(top, list) else [
    top[0].label, top[0].score]
out["sentence_similarity"] = InferenceClient(base_url=url + "/similarity").sentence_similarity(
    texts[0], other_sentences=texts[1:])
api = {"url": url}
text = HuggingFaceAPITextEmbedder(api_type="text_embeddings_inference", api_params=api,
                                  normalize=True)
out["haystack_text"] = text.run(text=texts[0])["embedding"]
docs = HuggingFaceAPIDocumentEmbedder(api_type="text_embeddings_inference", api_params=api,
                                      normalize=True, batch_size=2)
out["haystack_documents"] = [d.embedding for d in docs.run(
    documents=[Document(content=t) for t in texts])["documents"]]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def hf_clients(server) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    done = subprocess.run([sys.executable, "-c", _HF_CLIENTS, str(server), json.dumps(TEXTS)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_huggingface_hub_inference_client(hf_clients, st, classifier):
    np.testing.assert_allclose(hf_clients["feature_extraction"], [st.encode(TEXTS[0])],
                               atol=1e-5)
    pooled = SentenceTransformer(modules=[st[0], st[1]], device="cpu")  # not normalized
    np.testing.assert_allclose(hf_clients["feature_extraction_left"], [pooled.encode(TEXTS[1])],
                               atol=1e-5)
    label, score = hf_clients["text_classification"]
    (want,) = pipeline_scores(classifier(), [TEXTS[0]], CLASSIFIER_LABELS)
    assert label == CLASSIFIER_LABELS[int(np.argmax(want))]
    assert score == pytest.approx(want.max(), abs=1e-5)
    v = st.encode(TEXTS)
    np.testing.assert_allclose(hf_clients["sentence_similarity"], v[1:] @ v[0], atol=1e-5)


def test_haystack_tei_embedders(hf_clients, st):
    np.testing.assert_allclose(hf_clients["haystack_text"], st.encode(TEXTS[0]), atol=1e-5)
    np.testing.assert_allclose(hf_clients["haystack_documents"], st.encode(TEXTS), atol=1e-5)


def test_haystack_tei_ranker(server, cross_encoder):
    from haystack import Document
    from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker

    ranker = HuggingFaceTEIRanker(url=str(server), top_k=3)
    docs = ranker.run(query=QUERY, documents=[Document(content=d) for d in DOCS])["documents"]
    want = CrossEncoder(str(cross_encoder()), device="cpu").predict([(QUERY, d) for d in DOCS])
    assert [d.content for d in docs] == [DOCS[i] for i in np.argsort(-want, kind="stable")]
    for d in docs:
        assert d.score == pytest.approx(float(want[DOCS.index(d.content)]), abs=1e-5)


def test_haystack_tei_sparse_embedder(server, splade):
    from haystack_integrations.components.embedders.huggingface_api import (
        HuggingFaceTEISparseTextEmbedder,
    )

    embedder = HuggingFaceTEISparseTextEmbedder(api_base_url=str(server))
    sparse = embedder.run(text=TEXTS[1])["sparse_embedding"]
    want = SparseEncoder(str(splade()), device="cpu").encode(
        [TEXTS[1]], convert_to_tensor=True).to_dense().numpy()[0]
    assert sparse.indices == np.flatnonzero(want).tolist()
    np.testing.assert_allclose(sparse.values, want[sparse.indices], atol=1e-4)


def test_every_tei_route_over_ray(server, classifier):
    """The routes' answers cross from the model replicas over Ray: classify, sparse rows and
    token matrices pickle as they should; TEI's errors keep their shape."""
    with httpx.Client(base_url=str(server), timeout=60) as c:
        info = c.get("/info", headers={"X-Model": "classifier"}).json()
        assert info["model_type"]["classifier"]["label2id"] == {
            n: i for i, n in enumerate(CLASSIFIER_LABELS)}
        batch = c.post("/predict", json={"inputs": [[TEXTS[0]], [QUERY, DOCS[0]]]}).json()
        want = pipeline_scores(classifier(), [TEXTS[0], (QUERY, DOCS[0])], CLASSIFIER_LABELS)
        np.testing.assert_allclose([row[0]["score"] for row in batch], want.max(axis=1),
                                   atol=1e-5)
        tokens = c.post("/embed_all", json={"inputs": TEXTS[:2]}).json()
        assert [np.array(m).shape[1] for m in tokens] == [384, 384]
        sparse = c.post("/v1/embeddings", json={"model": "splade", "input": TEXTS}).json()
        assert all(d["embedding"]["indices"] for d in sparse["data"])
        v2 = c.post("/v2/models/classifier/infer", json={"inputs": [
            {"name": "input-0", "shape": [1], "datatype": "BYTES", "data": [TEXTS[0]]}]}).json()
        assert v2["outputs"][0]["data"] == [int(np.argmax(want[0]))]
        wrong = c.post("/predict", json={"inputs": "a", "model": "embedding"})
        assert wrong.status_code == 424 and wrong.json()["error_type"] == "Backend"
        assert c.get("/health").status_code == 200
