"""The tasks beyond dense embedding, in process on every CPU backend, against their reference
libraries: sequence classification (transformers' text-classification pipeline), sparse SPLADE
vectors (sentence-transformers' ``SparseEncoder``), every token's vector (transformers'
``AutoModel``); and how the config and the KServe-style command line name them."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from serve_app.config.schema import ModelConfig
from serve_app.engine.backends import installed
from serve_app.engine.classifier import ClassifyEngine
from serve_app.engine.embedding import EmbeddingEngine
from serve_app.engine.reranker import RerankEngine
from serve_app.engine.sparse import SparseEngine, sparse_rows
from serve_app.errors import InvalidInput, ModelLoadError
from serve_app.launch.cli import config_from_args
from serve_app.runtime.runner import ModelRunner
from serve_app.types import ClassifyRequest, EmbedRequest, SparseEmbedResult, TokenEmbedResult
from tests.conftest import CLASSIFIER_LABELS

BACKENDS = ["torch", *(b for b in ("onnxruntime", "openvino") if installed(b))]
TEXTS = ["I love this film", "a terrible, boring movie", "word " * 200, "ça coûte 5 €"]
PAIRS = [("a man is eating", "someone eats food"), ("cats", "dog " * 200)]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SERVE_APP_CACHE", str(tmp_path_factory.getbasetemp() / "task-cache"))


def pipeline_scores(path, inputs, labels, max_length=128, **kw) -> np.ndarray:
    """transformers' text-classification pipeline's scores, one row per input in label
    order."""
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(path), top_k=None, device="cpu")
    wire = [x if isinstance(x, str) else {"text": x[0], "text_pair": x[1]} for x in inputs]
    rows = pipe(wire, truncation=True, max_length=max_length, **kw)
    return np.array([[{d["label"]: d["score"] for d in row}[name] for name in labels]
                     for row in rows])


# -- classification ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_classifier_scores_equal_the_transformers_pipeline(classifier, backend):
    path = classifier()
    engine = ClassifyEngine(ModelConfig(model_id=str(path), task="classify", backend=backend),
                            num_threads=2)
    assert engine.labels == CLASSIFIER_LABELS and engine.function == "softmax"
    inputs = [*TEXTS, *PAIRS]
    got = engine.classify(inputs)
    np.testing.assert_allclose(got, pipeline_scores(path, inputs, engine.labels), atol=2e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1, atol=1e-6)
    logits = engine.classify(inputs, raw=True)
    want = pipeline_scores(path, inputs, engine.labels, function_to_apply="none")
    np.testing.assert_allclose(logits, want, rtol=2e-5, atol=2e-5)


def test_multi_label_and_one_label_classifiers_score_with_sigmoid(classifier):
    for path in (classifier("multi_label_classification"), classifier(labels=1)):
        engine = ClassifyEngine(ModelConfig(model_id=str(path), task="classify"), num_threads=2)
        assert engine.function == "sigmoid"
        got = engine.classify(TEXTS)
        np.testing.assert_allclose(got, pipeline_scores(path, TEXTS, engine.labels), atol=2e-6)
        assert engine.labels[0] == "LABEL_0" or len(engine.labels) == 3


def test_a_reranker_classifies_pairs_with_its_own_activation(cross_encoder):
    from sentence_transformers import CrossEncoder

    path = cross_encoder("sentence-transformers", "Sigmoid")
    engine = RerankEngine(ModelConfig(model_id=str(path), task="rerank"), num_threads=2)
    runner = ModelRunner(engine, "reranker")
    result = asyncio.run(runner.classify(ClassifyRequest(model="reranker", inputs=tuple(PAIRS))))
    want = CrossEncoder(str(path), device="cpu").predict(PAIRS)
    np.testing.assert_allclose(result.scores[:, 0], want, atol=1e-6)
    assert engine.labels == ("LABEL_0",)


def test_classifier_truncation_is_counted_and_refusable(classifier):
    engine = ClassifyEngine(ModelConfig(model_id=str(classifier()), task="classify"),
                            num_threads=2)
    runner = ModelRunner(engine, "classifier")
    result = asyncio.run(runner.classify(ClassifyRequest(
        model="classifier", inputs=(TEXTS[2], PAIRS[1], "short"))))
    assert result.truncated == 2 and result.token_counts.tolist()[:2] == [128, 128]
    with pytest.raises(InvalidInput, match="128"):
        asyncio.run(runner.classify(ClassifyRequest(model="classifier", inputs=(TEXTS[2],),
                                                    truncate=False)))
    # left truncation keeps the end of the text: what the pipeline sees when cut on the left
    left = asyncio.run(runner.classify(ClassifyRequest(
        model="classifier", inputs=(TEXTS[2] + "the end",), truncation_side="left")))
    right = asyncio.run(runner.classify(ClassifyRequest(
        model="classifier", inputs=(TEXTS[2] + "the end",))))
    assert not np.allclose(left.scores, right.scores)


# -- sparse ------------------------------------------------------------------------------------

def st_sparse(path, texts, **kw) -> np.ndarray:
    from sentence_transformers import SparseEncoder

    model = SparseEncoder(str(path), device="cpu")
    return model.encode(texts, convert_to_tensor=True, **kw).to_dense().numpy()


@pytest.mark.parametrize("backend", BACKENDS)
def test_splade_vectors_equal_sparse_encoder(splade, backend):
    path = splade()
    engine = SparseEngine(ModelConfig(model_id=str(path), task="sparse", backend=backend),
                          num_threads=2)
    assert engine.dim == 30522 and engine.normalize is False
    got, _ = engine.embed(TEXTS)
    want = st_sparse(path, TEXTS)
    np.testing.assert_allclose(got, want, atol=1e-4)
    active = (want > 0).sum(axis=1)
    assert (active > 20).all() and (active < 30522 // 4).all()  # sparse, not empty
    indptr, indices, values = sparse_rows(got)
    assert np.diff(indptr).tolist() == (got != 0).sum(axis=1).tolist()
    for i in range(len(TEXTS)):
        row = slice(indptr[i], indptr[i + 1])
        assert (np.diff(indices[row]) > 0).all()  # ascending ids
        np.testing.assert_array_equal(values[row], got[i, indices[row]])


@pytest.mark.parametrize(("pooling", "activation"), [("sum", "relu"), ("max", "log1p_relu")])
def test_splade_pooling_and_activation_follow_the_directory(splade, pooling, activation):
    path = splade(pooling, activation)
    engine = SparseEngine(ModelConfig(model_id=str(path), task="sparse"), num_threads=2)
    assert engine.splade == (pooling, activation)
    np.testing.assert_allclose(engine.embed(TEXTS)[0], st_sparse(path, TEXTS), atol=1e-4)


def test_max_active_dims_keeps_what_sparse_encoder_keeps(splade):
    path = splade()
    engine = SparseEngine(ModelConfig(model_id=str(path), task="sparse"), num_threads=2)
    runner = ModelRunner(engine, "splade")
    result = asyncio.run(runner.embed(EmbedRequest(model="splade", inputs=tuple(TEXTS),
                                                   max_active_dims=16)))
    assert isinstance(result, SparseEmbedResult)
    want = st_sparse(path, TEXTS, max_active_dims=16)
    for i in range(len(TEXTS)):
        indices, values = result.row(i)
        assert len(indices) == 16
        np.testing.assert_array_equal(indices, np.flatnonzero(want[i]))
        np.testing.assert_allclose(values, want[i, indices], atol=1e-4)


def test_a_plain_masked_language_model_serves_as_splade(splade):
    """``task: sparse`` (``--pooling splade``) on a directory with no sentence-transformers
    files: max pooling of relu, as TEI and SpladePooling's defaults."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sparse_encoder.modules import SpladePooling

    path = splade(plain=True)
    engine = SparseEngine(ModelConfig(model_id=str(path), task="sparse"), num_threads=2)
    reference = SparseEncoder(modules=[Transformer(str(path), transformer_task="fill-mask"),
                                       SpladePooling()], device="cpu")
    want = reference.encode(TEXTS, convert_to_tensor=True).to_dense().numpy()
    np.testing.assert_allclose(engine.embed(TEXTS)[0], want, atol=1e-4)


def test_sparse_models_refuse_what_they_cannot_answer(splade):
    engine = SparseEngine(ModelConfig(model_id=str(splade()), task="sparse"), num_threads=2)
    runner = ModelRunner(engine, "splade")
    with pytest.raises(InvalidInput, match=r"answers the outputs \['pooled', 'sparse'\]"):
        asyncio.run(runner.embed(EmbedRequest(model="splade", inputs=("a",),
                                              outputs=("tokens",))))
    with pytest.raises(InvalidInput, match="embedding model"):
        asyncio.run(runner.classify(ClassifyRequest(model="splade", inputs=("a",))))


# -- every token's vector ----------------------------------------------------------------------

def test_token_vectors_are_the_models_last_hidden_states(tiny_model):
    from transformers import AutoModel, AutoTokenizer

    path = tiny_model()
    engine = EmbeddingEngine(ModelConfig(model_id=str(path)), num_threads=2)
    runner = ModelRunner(engine, "tiny")
    texts = ("hello world", "a longer text of several words", "word " * 100)
    result = asyncio.run(runner.embed(EmbedRequest(model="tiny", inputs=texts,
                                                   outputs=("tokens",))))
    assert isinstance(result, TokenEmbedResult)
    tok, model = AutoTokenizer.from_pretrained(str(path)), AutoModel.from_pretrained(str(path))
    for i, text in enumerate(texts):
        ids = tok(text, truncation=True, max_length=64, return_tensors="pt")
        with torch.no_grad():
            want = model(**ids).last_hidden_state[0].numpy()
        assert result.matrix(i).shape == want.shape == (result.token_counts[i], 32)
        np.testing.assert_allclose(result.matrix(i), want, atol=1e-5)


# -- the config and the command line ----------------------------------------------------------

def test_tasks_and_poolings_are_checked_together():
    ModelConfig(task="sparse", pooling="splade")
    ModelConfig(task="classify", kserve_output="probabilities")
    for bad, message in [({"task": "sparse", "pooling": "mean"}, "pools with splade"),
                         ({"pooling": "splade"}, "task: sparse"),
                         ({"task": "classify", "pooling": "cls"}, "does not pool"),
                         ({"kserve_output": "logits"}, "classifier's answers")]:
        with pytest.raises(ValueError, match=message):
            ModelConfig(**bad)


def test_kserve_flags_name_the_new_tasks():
    cfg, _ = config_from_args(["--model_id", "m", "--task", "sequence_classification",
                               "--return_probabilities"])
    (model,) = cfg.models
    assert (model.task, model.kserve_output) == ("classify", "probabilities")
    cfg, _ = config_from_args(["--model_id", "m", "--pooling", "splade"])
    assert cfg.models[0].task == "sparse" and cfg.models[0].pooling == "splade"


def test_a_reranker_refuses_a_many_label_model_naming_classify(classifier):
    with pytest.raises(ModelLoadError, match="task: classify"):
        RerankEngine(ModelConfig(model_id=str(classifier()), task="rerank"))
