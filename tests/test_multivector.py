"""Beyond one vector per text, in process: PyLate (ColBERT) checkpoints served with ``task:
multivector`` against PyLate's own ``encode`` and ``colbert_scores``, and BGE-M3's dense, sparse
and multi-vector outputs against FlagEmbedding's ``BGEM3FlagModel``, each reference computed by
the library itself in its own environment (tests/references.py)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serve_app.config.schema import ModelConfig
from serve_app.engine.backends import installed
from serve_app.engine.embedding import EmbeddingEngine
from serve_app.engine.m3 import M3Engine
from serve_app.engine.multivector import MultiVectorEngine
from serve_app.errors import InvalidInput, ModelLoadError
from serve_app.runtime.load import engine_class
from serve_app.runtime.runner import ModelRunner
from serve_app.types import (
    EmbedRequest,
    EmbedResult,
    MultiEmbedResult,
    RerankRequest,
    SparseEmbedResult,
    TokenEmbedResult,
)
from tests.conftest import (
    COLBERT_DOCUMENTS,
    COLBERT_QUERIES,
    COLBERT_VARIANTS,
    M3_MAX_LENGTH,
    M3_TEXTS,
)

BACKENDS = ["torch", *(b for b in ("onnxruntime", "openvino") if installed(b))]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SERVE_APP_CACHE", str(tmp_path_factory.getbasetemp() / "mv-cache"))


def run(runner: ModelRunner, **kw) -> object:
    return asyncio.run(runner.embed(EmbedRequest(model="m", **kw)))


# -- PyLate ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(COLBERT_VARIANTS))
def test_colbert_vectors_equal_pylate_encode_both_ways(colbert, variant):
    engine = MultiVectorEngine(ModelConfig(model_id=str(colbert / variant), task="multivector"),
                               num_threads=2)
    want = np.load(colbert / f"{variant}.npz")
    runner = ModelRunner(engine, "m")
    # prompt_name query (input_type query, at the data plane) picks the query side; none is
    # a document
    queries = run(runner, inputs=tuple(COLBERT_QUERIES), prompt_name="query")
    documents = run(runner, inputs=tuple(COLBERT_DOCUMENTS))
    assert isinstance(queries, TokenEmbedResult) and isinstance(documents, TokenEmbedResult)
    for result, prefix, n in ((queries, "q", len(COLBERT_QUERIES)),
                              (documents, "d", len(COLBERT_DOCUMENTS))):
        for i in range(n):
            ref = want[f"{prefix}{i}"]
            assert result.matrix(i).shape == ref.shape, (prefix, i)
            np.testing.assert_allclose(result.matrix(i), ref, atol=1e-5)
    if variant != "plain":  # a query is exactly its length: the expansion is answered
        assert all(queries.matrix(i).shape[0] == 16 for i in range(len(COLBERT_QUERIES)))
    # usage counts the tokens each text fed the model
    assert documents.token_counts[3] == 3 + (variant != "plain")  # [CLS] ([D]) short [SEP]


def test_colbert_on_every_backend_and_maxsim_equals_colbert_scores(colbert):
    want = np.load(colbert / "default.npz")
    for backend in BACKENDS:
        engine = MultiVectorEngine(ModelConfig(model_id=str(colbert / "default"),
                                               task="multivector", backend=backend),
                                   num_threads=2)
        for i, got in enumerate(engine.encode_texts(COLBERT_DOCUMENTS)):
            np.testing.assert_allclose(got, want[f"d{i}"], atol=1e-5)
        runner = ModelRunner(engine, "m")
        for q, query in enumerate(COLBERT_QUERIES):
            scored = asyncio.run(runner.rerank(RerankRequest(
                model="m", query=query, documents=tuple(COLBERT_DOCUMENTS))))
            np.testing.assert_allclose(scored.scores, want["scores"][q], rtol=1e-5, atol=1e-4)
            # the query's tokens are counted once, with the first document's
            assert len(scored.token_counts) == len(COLBERT_DOCUMENTS)


def test_colbert_refuses_what_it_cannot_answer(colbert):
    engine = MultiVectorEngine(ModelConfig(model_id=str(colbert / "default"),
                                           task="multivector"), num_threads=2)
    runner = ModelRunner(engine, "m")
    long = COLBERT_DOCUMENTS[2]
    for kw, match in (({"inputs": ((101, 2054, 102),)}, "not token ids"),
                      ({"inputs": (long,), "long_inputs": "chunk"}, "embeds no text whole"),
                      ({"inputs": (long,), "long_inputs": "error"}, "document length of 48"),
                      ({"inputs": ("a",), "outputs": ("tokens",)}, "answers the outputs"),
                      ({"inputs": (long,), "chunk_tokens": 8}, "dense embedding model")):
        with pytest.raises(InvalidInput, match=match):
            run(runner, **kw)
    assert run(runner, inputs=(long,)).truncated == 1
    assert engine.info("m", "1").task == "multivector"
    # a ColBERT directory is not a dense model
    with pytest.raises(ModelLoadError, match="task: multivector"):
        EmbeddingEngine(ModelConfig(model_id=str(colbert / "default")), num_threads=1)


# -- BGE-M3 ------------------------------------------------------------------------------------

def test_bge_m3_outputs_equal_flagembedding(bge_m3):
    folder, npz = bge_m3
    want = np.load(npz)
    cfg = ModelConfig(model_id=str(folder), max_length=M3_MAX_LENGTH)
    assert engine_class(cfg) is M3Engine
    engine = M3Engine(cfg, num_threads=2)
    assert engine.info("m", "1").outputs == ("pooled", "tokens", "sparse", "multivector")
    runner = ModelRunner(engine, "m")
    texts = tuple(M3_TEXTS)
    every = run(runner, inputs=texts, outputs=("sparse", "pooled", "multivector"))
    assert isinstance(every, MultiEmbedResult)
    sparse, dense, multi = every.parts
    assert isinstance(dense, EmbedResult) and isinstance(sparse, SparseEmbedResult)
    assert isinstance(multi, TokenEmbedResult) and sparse.dim == engine.vocab_size
    np.testing.assert_allclose(dense.embeddings, want["dense"], atol=1e-5)
    for i in range(len(texts)):
        indices, values = sparse.row(i)
        np.testing.assert_array_equal(indices, want[f"lexical_ids{i}"])
        np.testing.assert_allclose(values, want[f"lexical_weights{i}"], atol=1e-5)
        np.testing.assert_allclose(multi.matrix(i), want[f"colbert{i}"], atol=1e-5)
    assert every.truncated == 1  # the last text is cut at 32 tokens, as FlagEmbedding cuts it
    # each output alone: the dense one runs as any dense model's passes do
    alone = run(runner, inputs=texts)
    assert isinstance(alone, EmbedResult)
    np.testing.assert_allclose(alone.embeddings, want["dense"], atol=1e-5)
    pruned = run(runner, inputs=texts, outputs=("sparse",), max_active_dims=3)
    assert isinstance(pruned, SparseEmbedResult)
    for i in range(len(texts)):
        indices, values = pruned.row(i)
        order = np.argsort(-want[f"lexical_weights{i}"], kind="stable")[:3]
        assert set(indices.tolist()) == set(want[f"lexical_ids{i}"][order].tolist())


def test_bge_m3_refuses_outputs_that_do_not_come_together(bge_m3):
    engine = M3Engine(ModelConfig(model_id=str(bge_m3[0]), max_length=M3_MAX_LENGTH),
                      num_threads=1)
    runner = ModelRunner(engine, "m")
    for kw, match in (({"outputs": ("tokens", "sparse")}, "one to a request"),
                      ({"outputs": ("sparse",), "long_inputs": "chunk"}, "long_inputs chunk")):
        with pytest.raises(InvalidInput, match=match):
            run(runner, inputs=("a text",), **kw)


def test_a_matrix_answer_counts_toward_the_payload_limit(colbert):
    from serve_app.config.schema import LimitOptions
    from serve_app.errors import PayloadTooLarge
    from tests.helpers import app_client, replica

    engine = MultiVectorEngine(ModelConfig(model_id=str(colbert / "default"),
                                           task="multivector"), num_threads=1)
    # 24 floats a row: 1 KiB holds 10 rows; a query is 16, "short" as a document 4
    with pytest.raises(PayloadTooLarge, match="payload limit of 1024 bytes"):
        run(ModelRunner(engine, "m"), inputs=("q",), prompt_name="query",
            max_answer_bytes=1024)
    limits = LimitOptions(max_body_bytes=1024)
    with app_client({"colbert": replica(engine, "colbert")}, limits=limits,
                    tasks={"colbert": "multivector"}) as client:
        ok = client.post("/v1/embeddings", json={"model": "colbert", "input": "short"})
        assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 4
        big = client.post("/v1/embeddings", json={"model": "colbert", "input": "short",
                                                   "input_type": "query"})
        assert big.status_code == 413 and "max_body_bytes" in big.json()["error"]["message"]
        tei = client.post("/embed_all", json={"model": "colbert", "inputs": ["short"] * 3})
        assert tei.status_code == 413 and tei.json()["error_type"]
        # TEI's root route and /info know a multi-vector model
        root = client.post("/", json={"model": "colbert", "inputs": "short"})
        assert root.status_code == 200 and np.shape(root.json()) == (1, 4, 24)
        info = client.get("/info", params={"model": "colbert"}).json()
        assert info["model_type"] == {"embedding": {"pooling": "multivector"}}
        v2 = client.get("/v2/models/colbert").json()
        assert v2["parameters"]["outputs"] == ["pooled", "multivector"]
        assert v2["parameters"]["query_length"] == 16
