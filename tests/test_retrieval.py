"""Retrieval without a server: compact encodings, prompts and the reranker, each against
sentence-transformers; the replica batching rerank pairs across requests; the data plane's
prompt rules."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from sentence_transformers import CrossEncoder, SentenceTransformer
from sentence_transformers.util import quantize_embeddings

from serve_app.config.schema import ModelConfig
from serve_app.engine.embedding import EmbeddingEngine
from serve_app.engine.quantize import (
    Calibration,
    calibration_texts,
    quantize,
    ranges_of,
    reduce_dimensions,
)
from serve_app.engine.reranker import RerankEngine
from serve_app.errors import InvalidInput, ModelLoadError
from serve_app.frontend.prompts import resolve_prompt
from serve_app.types import NO_PROMPT, EmbedRequest, ModelInfo, RerankRequest
from tests.helpers import SENTENCE, TEXTS, replica

QUERY = "what do cats eat"
DOCS = ["Cats are carnivores and eat meat.", "The stock market fell today.",
        "Kittens need food rich in protein.", "", "word " * 200]


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# -- compact encodings -------------------------------------------------------------------------

@pytest.mark.parametrize("encoding", ["int8", "uint8", "binary", "ubinary"])
def test_quantize_equals_sentence_transformers(encoding):
    rng = np.random.default_rng(0)
    calib, vectors = _unit(rng, 300, 384), _unit(rng, 40, 384)
    vectors[0] = calib.max(axis=0) * 1.5  # out of the calibrated range: clipped by both
    ours = quantize(vectors, encoding, ranges_of(calib))
    theirs = quantize_embeddings(vectors, encoding, calibration_embeddings=calib)
    assert ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours, theirs)


def test_binary_packs_sign_bits_and_pads_the_last_byte():
    v = np.array([[1, -1, 1, 1, -1, -1, -1, 1, 0.5, -0.5]], np.float32)
    assert quantize(v, "ubinary").tolist() == [[0b10110001, 0b10000000]]
    assert quantize(v, "binary").tolist() == [[0b10110001 - 128, 0b10000000 - 128]]


def test_calibration_ranges_follow_dimensions():
    calib = _unit(np.random.default_rng(1), 200, 64)
    cal = Calibration(calib)
    np.testing.assert_array_equal(cal.ranges(), ranges_of(calib))
    np.testing.assert_array_equal(cal.ranges(16), ranges_of(reduce_dimensions(calib, 16)))
    cut = reduce_dimensions(_unit(np.random.default_rng(2), 3, 64), 16)
    np.testing.assert_array_equal(
        cal.encode(cut, "int8"),
        quantize_embeddings(cut, "int8", calibration_embeddings=reduce_dimensions(calib, 16)))
    assert cal.encode(cut, "ubinary").shape == (3, 2)


def test_calibration_corpus_ships_and_can_be_replaced(tmp_path):
    texts = calibration_texts()
    assert len(set(texts)) == len(texts) >= 100
    own = tmp_path / "corpus.txt"
    own.write_text("one\n\ntwo\n")
    assert calibration_texts(str(own)) == ["one", "two"]
    own.write_text("alone\n")
    with pytest.raises(ValueError, match="fewer than 2"):
        calibration_texts(str(own))


def test_int8_bytes_do_not_depend_on_the_batch_and_match_sentence_transformers(engine,
                                                                                 minilm_dir):
    engine.warmup()
    model = replica(engine)

    async def run():
        alone = await model.embed(EmbedRequest("embedding", (SENTENCE,), encoding="int8"))
        mixed = await model.embed(EmbedRequest("embedding", tuple(TEXTS), encoding="int8"))
        return alone.embeddings, mixed.embeddings

    alone, mixed = asyncio.run(run())
    assert alone.dtype == np.int8 and alone.shape == (1, 384)
    np.testing.assert_array_equal(alone[0], mixed[0])
    st = SentenceTransformer(str(minilm_dir), device="cpu")
    expected = quantize_embeddings(st.encode(TEXTS), "int8",
                                   calibration_embeddings=st.encode(calibration_texts()))
    # one step apart at most, where float rounding puts a value on a bucket edge
    assert np.abs(mixed.astype(int) - expected.astype(int)).max() <= 1
    assert (mixed == expected).mean() > 0.99
    info = engine.info("embedding", "1")
    assert info.int8_ranges is not None and info.int8_ranges.shape == (2, 384)
    assert info.calibration_texts == len(calibration_texts())


# -- prompts -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompted(prompted_minilm):
    return (EmbeddingEngine(ModelConfig(model_id=str(prompted_minilm)), num_threads=2),
            SentenceTransformer(str(prompted_minilm), device="cpu"))


@pytest.mark.parametrize("name", ["query", "document", "plain", None])
def test_prompts_equal_sentence_transformers(prompted, name):
    engine, st = prompted
    texts = [SENTENCE, "long text " * 300]
    vectors, counts = engine.embed(texts, prompt_name=name)
    np.testing.assert_allclose(vectors, st.encode(texts, prompt_name=name), atol=1e-5)
    prefix = {"query": "query: ", "document": "passage: "}.get(name or "", "")
    assert counts[0] == len(st.tokenizer(prefix + SENTENCE)["input_ids"])  # the prompt counts
    assert counts[1] == 256


@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "lasttoken", "mean_sqrt_len"])
@pytest.mark.parametrize("include_prompt", [False, True])
def test_prompt_left_out_of_pooling_as_sentence_transformers_leaves_it(tiny_model, pooling,
                                                                       include_prompt):
    """A pooling config in sentence-transformers 6's form, ``include_prompt: false`` (the prompt
    attends but is not pooled) or true, with the model's default prompt, or none."""
    d = tiny_model(pooling=pooling, prompt="Represent this query: ",
                   include_prompt=include_prompt)
    engine = EmbeddingEngine(ModelConfig(model_id=str(d)))
    assert engine.include_prompt is include_prompt and engine.pooling == pooling
    st = SentenceTransformer(str(d), device="cpu")
    texts = [SENTENCE, "short", "long text " * 50]
    np.testing.assert_allclose(engine.embed(texts)[0], st.encode(texts), atol=1e-5)
    np.testing.assert_allclose(engine.embed(texts, prompt_name=NO_PROMPT)[0],
                               st.encode(texts, prompt=""), atol=1e-5)


def test_unknown_prompt_names_the_models_prompts(prompted):
    with pytest.raises(InvalidInput, match=r"no prompt 'passage'.*'document', 'plain', 'query'"):
        prompted[0].embed([SENTENCE], prompt_name="passage")


def _info(prompts: dict[str, str], default: str | None = None) -> ModelInfo:
    return ModelInfo("m", "1", 8, 512, 30522, "m", "mean", True,
                     prompts=tuple(prompts.items()), default_prompt=default)


@pytest.mark.parametrize(
    "prompts, default, input_type, expected",
    [
        ({"query": "q: ", "document": "d: "}, None, "query", "query"),
        ({"query": "q: ", "document": "d: "}, None, "search_document", "document"),
        ({"search_query": "sq: ", "search_document": "sd: "}, None, "query", "search_query"),
        ({"query": "q: ", "passage": "p: "}, None, "document", "passage"),
        # no document prompt: documents get none, not the model's default (a query prompt)
        ({"query": "Represent this: "}, "query", "document", NO_PROMPT),
        ({}, None, "query", NO_PROMPT),
    ],
)
def test_input_type_picks_the_models_prompt_for_that_side(prompts, default, input_type,
                                                          expected):
    req = resolve_prompt(EmbedRequest("m", ("a",), input_type=input_type),
                         _info(prompts, default))
    assert req.prompt_name == expected and req.input_type is None


@pytest.mark.parametrize(
    "req, message",
    [
        (EmbedRequest("m", ("a",), prompt_name="nope"), r"no prompt 'nope'; its prompts: \['q'\]"),
        (EmbedRequest("m", ("a",), input_type="code"), "input_type must be one of"),
        (EmbedRequest("m", ("a",), prompt_name="q", input_type="query"), "not both"),
        (EmbedRequest("m", ((1, 2),), prompt_name="q"), "token-id inputs"),
    ],
)
def test_prompt_errors(req, message):
    with pytest.raises(InvalidInput, match=message):
        resolve_prompt(req, _info({"q": "q: "}))


# -- the reranker ------------------------------------------------------------------------------

def _predict(path, pairs, **kw):
    return CrossEncoder(str(path), device="cpu").predict(pairs, **kw)


def test_reranker_scores_equal_cross_encoder_predict(cross_encoder):
    import torch

    path = cross_encoder()
    engine = RerankEngine(ModelConfig(model_id=str(path), task="rerank"))
    assert engine.activation == "Sigmoid" and engine.max_length == 128
    pairs = [(QUERY, d) for d in DOCS]
    scores = engine.rerank(QUERY, DOCS)
    np.testing.assert_allclose(scores, _predict(path, pairs), atol=1e-6)
    assert np.ptp(scores) > 0.05  # the scores tell documents apart
    raw = engine.rerank(QUERY, DOCS, raw=True)
    np.testing.assert_allclose(raw, _predict(path, pairs, activation_fn=torch.nn.Identity()),
                               atol=1e-5)


@pytest.mark.parametrize("activation", ["Identity", "Tanh"])
def test_reranker_takes_the_activation_sentence_transformers_saved(cross_encoder, activation):
    path = cross_encoder(saved_by="sentence-transformers", activation=activation)
    engine = RerankEngine(ModelConfig(model_id=str(path), task="rerank"))
    assert engine.activation == activation
    np.testing.assert_allclose(engine.rerank(QUERY, DOCS),
                               _predict(path, [(QUERY, d) for d in DOCS]), atol=1e-5)


def test_long_pairs_are_cut_longest_first_as_sentence_transformers_cuts_them(cross_encoder):
    path = cross_encoder(max_position_embeddings=32)
    engine = RerankEngine(ModelConfig(model_id=str(path), task="rerank"))
    query = "a long question about " * 10
    docs = ["short", "a document " * 30, "mid sized document text"]
    pairs, truncated = engine.tokenize(query, docs)
    assert truncated == 3 and all(len(p) == 32 for p in pairs)
    np.testing.assert_allclose(engine.rerank(query, docs),
                               _predict(path, [(query, d) for d in docs]), atol=1e-6)
    with pytest.raises(InvalidInput, match=r"document 0 has .* tokens"):
        engine.tokenize(query, docs, truncate=False)


def test_models_that_are_not_one_label_cross_encoders_are_refused(cross_encoder, minilm_dir):
    with pytest.raises(ModelLoadError, match="has 2 labels"):
        RerankEngine(ModelConfig(model_id=str(cross_encoder(labels=2)), task="rerank"))


def test_rerank_pairs_of_many_requests_share_passes(cross_encoder):
    engine = RerankEngine(ModelConfig(model_id=str(cross_encoder()), task="rerank"))
    model = replica(engine, "reranker")
    queries = [QUERY, "stock prices", "kitten food", "weather"]

    async def run():
        return await asyncio.gather(*(model.rerank(RerankRequest("reranker", q, tuple(DOCS)))
                                      for q in queries))

    results = asyncio.run(run())
    for q, r in zip(queries, results, strict=True):
        np.testing.assert_allclose(r.scores, engine.rerank(q, DOCS), atol=1e-6)
        assert r.prompt_tokens == sum(len(p) for p in engine.tokenize(q, DOCS)[0])
    stats = asyncio.run(model.stats())
    assert stats["texts"] == 4 * len(DOCS) and stats["passes"] < 4


def test_a_replica_answers_only_its_task(engine, cross_encoder):
    reranker = replica(RerankEngine(ModelConfig(model_id=str(cross_encoder()), task="rerank")),
                       "reranker")
    with pytest.raises(InvalidInput, match="is a reranker"):
        asyncio.run(reranker.embed(EmbedRequest("reranker", ("a",))))
    with pytest.raises(InvalidInput, match="not a reranker"):
        asyncio.run(replica(engine).rerank(RerankRequest("embedding", "q", ("a",))))
