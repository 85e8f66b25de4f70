"""Every engine backend against the reference libraries, the conversion cache, the fidelity gate
and ``backend: auto``'s choice. In process: no server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from sentence_transformers import CrossEncoder, SentenceTransformer
from sentence_transformers.util import quantize_embeddings

from serve_app.config.schema import ModelConfig
from serve_app.engine import backends, convert
from serve_app.engine.backends import choose, cpu_has_bf16
from serve_app.engine.embedding import EmbeddingEngine
from serve_app.engine.quantize import calibration_texts
from serve_app.engine.reranker import RerankEngine
from serve_app.errors import ModelLoadError
from serve_app.runtime.load import load_runner

CPU_BACKENDS = ["onnxruntime", "openvino"]
TEXTS = ["a short one", "The quick brown fox jumps over the lazy dog. " * 6, "ünïcödé ✓ 漢字",
         "def f(x):\n    return x + 1"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A conversion cache of this test's own."""
    monkeypatch.setenv("SERVE_APP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def st_encode(path, texts, **kw) -> np.ndarray:
    return SentenceTransformer(str(path), device="cpu").encode(texts, **kw)


def assert_same(vectors: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    cos = (vectors * expected).sum(1) / (np.linalg.norm(vectors, axis=1)
                                         * np.linalg.norm(expected, axis=1))
    assert cos.min() >= 0.99999


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "lasttoken", "mean_sqrt_len"])
def test_every_pooling_mode_equals_sentence_transformers(tiny_model, backend, pooling):
    path = tiny_model(pooling=pooling, normalize=pooling != "max")
    engine = EmbeddingEngine(ModelConfig(model_id=str(path), backend=backend))
    assert engine.backend.name == backend
    assert_same(engine.embed(TEXTS)[0], st_encode(path, TEXTS))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_the_default_model_with_prompts_left_out_of_pooling(tiny_model, backend):
    path = tiny_model(prompt="query: ", include_prompt=False)
    engine = EmbeddingEngine(ModelConfig(model_id=str(path), backend=backend))
    assert_same(engine.embed(TEXTS, prompt_name="query")[0],
                st_encode(path, TEXTS, prompt_name="query"))


@pytest.fixture(scope="module")
def minilm_st(minilm_dir):
    """sentence-transformers' vectors of TEXTS and of the calibration corpus."""
    st = SentenceTransformer(str(minilm_dir), device="cpu")
    return st.encode(TEXTS), st.encode(calibration_texts())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_minilm_and_its_int8_codes_equal_sentence_transformers(minilm_st, backend):
    engine = EmbeddingEngine(ModelConfig(backend=backend), num_threads=2)
    engine.warmup(2)
    vectors = engine.embed(TEXTS)[0]
    reference, corpus = minilm_st
    assert_same(vectors, reference)
    assert engine.calibration is not None
    expected = quantize_embeddings(reference, "int8", calibration_embeddings=corpus)
    got = engine.calibration.encode(vectors, "int8")
    # a value on a bucket's edge may land either side of it: at most one step, rarely
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    f = engine.info("m", "1").engine["fidelity"]
    assert f["measured"] and f["min"] >= 0.99999 and f["inputs"] == len(calibration_texts())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("saved_by", ["transformers", "sentence-transformers"])
def test_rerankers_equal_cross_encoder(cross_encoder, backend, saved_by):
    path = cross_encoder(saved_by=saved_by, activation="Sigmoid")
    engine = RerankEngine(ModelConfig(model_id=str(path), task="rerank", backend=backend))
    engine.warmup()
    docs = ["Paris is the capital of France.", "Bananas are yellow.", "x " * 200]
    expected = CrossEncoder(str(path), device="cpu").predict(
        [("capital of France?", d) for d in docs])
    np.testing.assert_allclose(engine.rerank("capital of France?", docs), expected, atol=1e-5)
    assert engine.fidelity is not None and engine.fidelity.min >= 0.99999


def test_a_conversion_is_cached_and_a_changed_model_converts_again(tiny_model, cache,
                                                                   tmp_path):
    path = tiny_model()
    first = EmbeddingEngine(ModelConfig(model_id=str(path), backend="onnxruntime"))
    assert first.graph_source == "converted"
    again = EmbeddingEngine(ModelConfig(model_id=str(path), backend="openvino"))
    assert again.graph_source == "cached"  # one graph serves both backends
    assert len(list((cache / "engines").iterdir())) == 1

    changed = tmp_path / "changed"
    shutil.copytree(path, changed)
    from transformers import BertModel

    model = BertModel.from_pretrained(changed)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.mul_(1.5)
    model.save_pretrained(changed)
    third = EmbeddingEngine(ModelConfig(model_id=str(changed), backend="onnxruntime"))
    assert third.graph_source == "converted"
    assert len(list((cache / "engines").iterdir())) == 2
    assert not np.allclose(third.embed(TEXTS)[0], first.embed(TEXTS)[0], atol=1e-3)
    assert_same(third.embed(TEXTS)[0], st_encode(changed, TEXTS))


def test_onnxruntime_runs_the_fused_graph_only_where_it_answers_the_same(tiny_model, cache,
                                                                        monkeypatch):
    """A conversion keeps ONNX Runtime's fused copy and an OpenVINO IR copy beside the plain
    graph; ONNX Runtime's float engine runs the fused one, OpenVINO its IR, int8 the plain
    one. A fusion that changed the outputs is dropped, and ONNX Runtime runs the plain graph."""
    path = tiny_model()
    ort_engine = EmbeddingEngine(ModelConfig(model_id=str(path), backend="onnxruntime"))
    entry = next((cache / "engines").iterdir())
    assert json.loads((entry / "source.json").read_text())["fused"] is True
    ops = {node.op_type for node in onnx.load(entry / convert.FUSED_GRAPH).graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= ops
    assert convert.graph_for(path, "onnxruntime", "AutoModel", ort_engine.files_digest)[0] == \
        entry / convert.FUSED_GRAPH
    # OpenVINO runs the plain graph saved as its own IR, float32 weights mapped from the .bin
    assert convert.graph_for(path, "openvino", "AutoModel", ort_engine.files_digest)[0] == \
        entry / convert.OPENVINO_GRAPH
    assert (entry / convert.OPENVINO_GRAPH).with_suffix(".bin").stat().st_size > \
        0.9 * (entry / convert.GRAPH).stat().st_size
    assert_same(ort_engine.embed(TEXTS)[0], st_encode(path, TEXTS))
    ov_engine = EmbeddingEngine(ModelConfig(model_id=str(path), backend="openvino"))
    assert ov_engine.graph_source == "cached"
    assert_same(ov_engine.embed(TEXTS)[0], st_encode(path, TEXTS))

    shutil.rmtree(cache)
    monkeypatch.setattr(convert, "FUSED_TOLERANCE", -1.0)  # every difference is too much
    plain = EmbeddingEngine(ModelConfig(model_id=str(path), backend="onnxruntime"))
    entry = next((cache / "engines").iterdir())
    assert not (entry / convert.FUSED_GRAPH).exists()
    assert json.loads((entry / "source.json").read_text())["fused"] is False
    assert_same(plain.embed(TEXTS)[0], st_encode(path, TEXTS))


def test_a_shipped_graph_is_used_as_shipped(tiny_model, cache, tmp_path):
    path = tiny_model(pooling="cls")
    EmbeddingEngine(ModelConfig(model_id=str(path), backend="onnxruntime"))  # converts
    shipped = tmp_path / "shipped"
    shutil.copytree(path, shipped)
    (shipped / "onnx").mkdir()
    graph = next((cache / "engines").iterdir()) / convert.GRAPH
    shutil.copy(graph, shipped / "onnx" / "model.onnx")
    shutil.rmtree(cache)
    for backend in CPU_BACKENDS:
        engine = EmbeddingEngine(ModelConfig(model_id=str(shipped), backend=backend))
        assert engine.graph_source == "shipped"
        assert_same(engine.embed(TEXTS)[0], st_encode(path, TEXTS))
    assert not (cache / "engines").exists()


def test_int8_quantizes_the_plain_onnx_graph(tiny_model, cache, tmp_path, monkeypatch):
    """The int8 graph is a quantization of the plain float ONNX graph: the converted one, not
    ONNX Runtime's fused copy beside it, and a model's shipped ONNX file, not its OpenVINO
    graph."""
    path = tiny_model(pooling="mean")
    seen: list[Path] = []
    real = convert.quantize_int8
    monkeypatch.setattr(convert, "quantize_int8",
                        lambda s, t, rr=False: (seen.append(s), real(s, t, rr))[1])
    convert.int8_graph_for(path, "AutoModel", "digest")
    assert seen[-1].name == convert.GRAPH and (seen[-1].parent / convert.FUSED_GRAPH).is_file()
    shipped = tmp_path / "shipped"
    shutil.copytree(path, shipped)
    for rel, source in (("onnx/model.onnx", seen[-1]),
                        ("openvino/openvino_model.xml", None)):  # not a graph it can read
        (shipped / rel).parent.mkdir()
        if source is None:
            (shipped / rel).write_text("<net/>")
        else:
            shutil.copy(source, shipped / rel)
    shutil.rmtree(cache)  # the same graph's int8 copy would be found in the cache
    convert.int8_graph_for(shipped, "AutoModel", "digest")
    assert seen[-1] == shipped / "onnx" / "model.onnx"


def test_a_degraded_engine_refuses_to_start_naming_engine_and_figure(tiny_model, cache,
                                                                     tmp_path):
    """A cached graph that is not the model's (a bad conversion): the replica's warm-up measures
    it against float32 torch and refuses, with the engine and the figure in the message."""
    good = tiny_model(pooling="mean")
    other = tmp_path / "other"
    shutil.copytree(good, other)
    from transformers import BertModel

    model = BertModel.from_pretrained(other)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(other)
    cfg = ModelConfig(model_id=str(good), backend="openvino")
    for path in (good, other):
        EmbeddingEngine(cfg.model_copy(update={"model_id": str(path)}))  # converts each

    def entry(path):
        return cache / "engines" / convert.conversion_key(convert.files_digest(path), "AutoModel")

    ir = Path(convert.OPENVINO_GRAPH)
    for name in (ir, ir.with_suffix(".bin")):  # the graph OpenVINO reads, swapped
        shutil.copy(entry(other) / name, entry(good) / name)
    with pytest.raises(ModelLoadError) as e:
        load_runner(cfg)
    message = str(e.value)
    assert "openvino float32" in message and "min_fidelity 0.99999" in message
    assert "minimum of 0.9" in message
    # the same engine with a floor it meets starts
    lenient = cfg.model_copy(update={"min_fidelity": 0.5})
    assert load_runner(lenient).engine.fidelity.min < 0.99999


def test_auto_picks_by_the_written_rule(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose("auto", "auto", "auto", cpu) == ("openvino", "exact", "float32")
    fast = "bfloat16" if cpu_has_bf16() else "float32"
    assert choose("auto", "fast", "auto", cpu) == ("openvino", "fast", fast)
    assert choose("onnxruntime", "fast", "auto", cpu) == ("onnxruntime", "fast", "float32")
    assert choose("torch", "fast", "auto", cpu) == ("torch", "fast", fast)
    assert choose("auto", "auto", "auto", cuda) == ("torch", "fast", "float16")
    assert choose("auto", "exact", "auto", cuda) == ("torch", "exact", "float32")
    assert choose("auto", "auto", "bfloat16", cpu) == ("torch", "fast", "bfloat16")
    with pytest.raises(ModelLoadError):
        choose("openvino", "auto", "auto", cuda)
    monkeypatch.setattr(backends, "installed", lambda name: name != "openvino")
    assert choose("auto", "auto", "auto", cpu)[0] == "onnxruntime"
    with pytest.raises(ModelLoadError, match="not installed"):
        choose("openvino", "auto", "auto", cpu)


def test_a_torch_dtype_and_another_backend_are_refused_at_config():
    with pytest.raises(ValueError, match="precision"):
        ModelConfig(backend="openvino", dtype="bfloat16")
    with pytest.raises(ValueError, match="is precision fast"):
        ModelConfig(dtype="bfloat16", precision="exact")


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bfloat16")
def test_fast_precision_is_bfloat16_within_its_floor(tiny_model):
    path = tiny_model()
    engine = EmbeddingEngine(ModelConfig(model_id=str(path), precision="fast"))
    engine.verify()
    assert engine.backend.describe() == "openvino bfloat16 on cpu"
    assert engine.fidelity is not None and 0.9999 <= engine.fidelity.min < 1.0
    vectors = engine.embed(TEXTS)[0]
    cos = (vectors * st_encode(path, TEXTS)).sum(1)
    assert cos.min() >= 0.9999


def test_int8_is_quantized_once_and_gated_by_its_own_floor(minilm_dir, minilm_st, cache):
    """precision int8: ONNX Runtime on a dynamically quantized copy of the float graph, made
    once and cached; its agreement measured at warm-up against float32 torch, close to
    sentence-transformers' vectors but not equal, and refused by a floor above it."""
    cfg = ModelConfig(precision="int8")
    engine = EmbeddingEngine(cfg, num_threads=2)
    assert engine.graph_source == "quantized"
    assert engine.backend.describe() == "onnxruntime int8 on cpu"
    engine.warmup(2)
    f = engine.fidelity
    assert f is not None and f.inputs == len(calibration_texts()) and 0.97 <= f.min < 0.99999
    vectors, reference = engine.embed(TEXTS)[0], minilm_st[0]
    cos = (vectors * reference).sum(1)
    assert cos.min() >= 0.97 and not np.allclose(vectors, reference, atol=1e-5)
    assert EmbeddingEngine(cfg).graph_source == "cached"
    assert sorted(p.name.startswith("int8-") for p in (cache / "engines").iterdir()) == [
        False, True]  # the float conversion it came from, and the int8 copy
    strict = ModelConfig(precision="int8", min_fidelity=0.99999)
    with pytest.raises(ModelLoadError, match="onnxruntime int8"):
        load_runner(strict)


def test_int8_rerankers_run_quantized_and_report_their_agreement(cross_encoder, cache):
    """A cross-encoder quantizes too; a tiny random one loses much to int8, so its floor is
    set by hand, and its measured agreement is what the gate saw."""
    path = cross_encoder(activation="Sigmoid")
    engine = RerankEngine(ModelConfig(model_id=str(path), task="rerank", precision="int8",
                                      min_fidelity=0.0))
    engine.warmup()
    assert engine.backend.describe() == "onnxruntime int8 on cpu"
    assert engine.fidelity is not None and 0 < engine.fidelity.min < 1
    docs = ["Paris is the capital of France.", "Bananas are yellow."]
    expected = CrossEncoder(str(path), device="cpu").predict(
        [("capital of France?", d) for d in docs])
    np.testing.assert_allclose(engine.rerank("capital of France?", docs), expected, atol=0.1)


def test_int8_weights_are_7_bit_on_a_cpu_without_vnni(cross_encoder, cache, monkeypatch):
    """Without VNNI, ONNX Runtime's 8-bit multiply-adds saturate on full-range weights, so the
    quantization there keeps 7 bits, in a cache entry of its own."""
    path = cross_encoder(activation="Sigmoid")
    seen: list[bool] = []
    real = convert.quantize_int8
    monkeypatch.setattr(convert, "quantize_int8",
                        lambda s, t, rr=False: (seen.append(rr), real(s, t, rr))[1])
    graphs = []
    for vnni in (True, False):
        monkeypatch.setattr(convert, "cpu_has_vnni", lambda vnni=vnni: vnni)
        graphs.append(convert.int8_graph_for(path, "AutoModelForSequenceClassification",
                                             "digest")[0])
    assert seen == [False, True] and graphs[0] != graphs[1]
    assert backends.cpu_has_vnni() in (True, False)


def test_int8_is_refused_where_it_cannot_run():
    assert choose("auto", "int8", "auto", torch.device("cpu")) == (
        "onnxruntime", "int8", "float32")
    with pytest.raises(ModelLoadError, match="CPU"):
        choose("auto", "int8", "auto", torch.device("cuda"))
    for bad in ({"backend": "openvino"}, {"backend": "torch"}, {"device": "cuda"},
                {"dtype": "float32"}):
        with pytest.raises(ValueError, match="int8"):
            ModelConfig(precision="int8", **bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_default_is_torch_float16_gated_like_fast(tiny_model):
    path = tiny_model()
    engine = EmbeddingEngine(ModelConfig(model_id=str(path), device="cuda"))
    engine.verify()
    assert engine.backend.describe().startswith("torch float16")
    assert engine.fidelity is not None and engine.fidelity.min >= 0.9999


@pytest.mark.parametrize("backend", ["torch", *CPU_BACKENDS])
def test_every_protocol_answers_the_same_on_every_backend(tiny_model, cross_encoder, small_corpus,
                                                          backend):
    """A replica's whole path (load_runner: conversion, warm-up, fidelity; the queue; the
    protocols' codecs) on each backend: vectors, cut dimensions, int8 codes and rerank scores
    equal the reference libraries'."""
    from sentence_transformers.util import quantize_embeddings as st_quantize

    from serve_app.engine.quantize import reduce_dimensions
    from tests.helpers import app_client

    path, ranker = tiny_model(), cross_encoder(activation="Sigmoid")
    embedder = load_runner(ModelConfig(model_id=str(path), backend=backend,
                                       calibration_corpus=small_corpus))
    reranker = load_runner(ModelConfig(name="reranker", model_id=str(ranker), task="rerank",
                                       backend=backend))
    expected = st_encode(path, TEXTS)
    corpus = st_encode(path, calibration_texts(small_corpus))
    with app_client({"embedding": embedder, "reranker": reranker},
                    tasks={"reranker": "rerank"}) as c:
        r = c.post("/v1/embeddings", json={"model": "embedding", "input": TEXTS})
        assert_same(np.array([d["embedding"] for d in r.json()["data"]], np.float32), expected)
        r = c.post("/v1/embeddings", json={"model": "embedding", "input": TEXTS,
                                           "dimensions": 16})
        np.testing.assert_allclose([d["embedding"] for d in r.json()["data"]],
                                   reduce_dimensions(expected, 16), atol=1e-5)
        r = c.post("/v1/embeddings", json={"model": "embedding", "input": TEXTS,
                                           "encoding_format": "int8"})
        codes = np.array([d["embedding"] for d in r.json()["data"]])
        want = st_quantize(expected, "int8", calibration_embeddings=corpus)
        assert np.abs(codes - want.astype(int)).max() <= 1
        r = c.post("/v1/models/embedding:predict", json={"instances": TEXTS})
        assert_same(np.array(r.json()["predictions"], np.float32), expected)
        r = c.post("/v2/models/embedding/infer", json={"inputs": [
            {"name": "text", "shape": [len(TEXTS)], "datatype": "BYTES", "data": TEXTS}]})
        out = r.json()["outputs"][0]
        assert_same(np.array(out["data"], np.float32).reshape(out["shape"]), expected)
        docs = ["Paris is the capital of France.", "Bananas are yellow."]
        r = c.post("/v1/rerank", json={"model": "reranker", "query": "capital?",
                                       "documents": docs})
        scores = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        want = CrossEncoder(str(ranker), device="cpu").predict([("capital?", d) for d in docs])
        np.testing.assert_allclose([scores[0], scores[1]], want, atol=1e-5)
        meta = c.get("/v2/models/reranker").json()["parameters"]["engine"]
        assert meta["backend"] == backend and meta["fidelity"]["min"] >= 0.99999
