"""text-embeddings-inference's API and the new tasks (classification, sparse vectors, every
token's vector) through every protocol in process: the HTTP app and the gRPC servicer over real
replicas of a dense model, a classifier, a SPLADE model and a reranker, against
sentence-transformers and transformers."""

from __future__ import annotations

import numpy as np
import pytest
from sentence_transformers import CrossEncoder, SentenceTransformer, SparseEncoder

from serve_app.config.schema import LimitOptions, ModelConfig
from serve_app.engine.classifier import ClassifyEngine
from serve_app.engine.embedding import EmbeddingEngine
from serve_app.engine.reranker import RerankEngine
from serve_app.engine.sparse import SparseEngine
from serve_app.frontend.v2.codec import join_bytes_tensor, split_bytes_tensor
from serve_app.frontend.v2.proto import inference_pb2 as pb
from tests.conftest import CLASSIFIER_LABELS
from tests.helpers import app_client, grpc_serving, infer_request, make_dataplane, replica
from tests.test_tasks import pipeline_scores

TEXTS = ["What is Deep Learning?", "ça coûte 5 € 🙂", "the cat sat on the mat"]
PAIR = ["a man is eating", "someone eats food"]
QUERY, DOCS = "what do cats eat", ["Cats eat meat.", "Stocks fell today.", "Kittens need food."]


@pytest.fixture(scope="module")
def paths(prompted_minilm, classifier, splade, cross_encoder):
    return {"embedding": prompted_minilm, "classifier": classifier(), "splade": splade(),
            "reranker": cross_encoder()}


@pytest.fixture(scope="module")
def dataplane(paths):
    embedder = EmbeddingEngine(ModelConfig(model_id=str(paths["embedding"])), num_threads=2)
    classify = ClassifyEngine(ModelConfig(model_id=str(paths["classifier"]), task="classify"),
                              num_threads=2)
    sparse = SparseEngine(ModelConfig(model_id=str(paths["splade"]), task="sparse"),
                          num_threads=2)
    rerank = RerankEngine(ModelConfig(model_id=str(paths["reranker"]), task="rerank"))
    backends = {"embedding": replica(embedder), "classifier": replica(classify, "classifier"),
                "splade": replica(sparse, "splade"), "reranker": replica(rerank, "reranker")}
    return make_dataplane(backends, limits=LimitOptions(max_inputs_per_request=8), tasks={
        "classifier": "classify", "splade": "sparse", "reranker": "rerank"})


@pytest.fixture(scope="module")
def client(dataplane):
    with app_client(dataplane) as c:
        yield c


@pytest.fixture(scope="module")
def st(paths):
    return SentenceTransformer(str(paths["embedding"]), device="cpu")


@pytest.fixture(scope="module")
def sparse_ref(paths):
    model = SparseEncoder(str(paths["splade"]), device="cpu")
    return lambda texts, **kw: model.encode(texts, convert_to_tensor=True, **kw).to_dense().numpy()


@pytest.fixture(scope="module")
def class_ref(paths):
    return lambda inputs, **kw: pipeline_scores(paths["classifier"], inputs, CLASSIFIER_LABELS,
                                                **kw)


def sparse_of(rows: list[list[dict]]) -> np.ndarray:
    out = np.zeros((len(rows), 30522), dtype=np.float32)
    for i, row in enumerate(rows):
        for item in row:
            out[i, item["index"]] = item["value"]
    return out


# -- /embed and friends ------------------------------------------------------------------------

def test_embed_equals_sentence_transformers_in_every_input_shape(client, st):
    one = client.post("/embed", json={"inputs": TEXTS[0]})
    assert one.status_code == 200, one.text
    assert np.array(one.json()).shape == (1, 384)  # always 2-D
    np.testing.assert_allclose(one.json()[0], st.encode(TEXTS[0]), atol=1e-6)
    many = client.post("/embed", json={"inputs": TEXTS, "normalize": True, "truncate": True})
    np.testing.assert_allclose(many.json(), st.encode(TEXTS), atol=1e-6)
    assert many.headers["x-compute-characters"] == str(sum(map(len, TEXTS)))
    assert many.headers["x-compute-type"] == "cpu"
    assert int(many.headers["x-compute-tokens"]) > 3
    ids = st.tokenizer(TEXTS[0])["input_ids"]
    by_ids = client.post("/embed", json={"inputs": [ids, TEXTS[0]]}).json()
    np.testing.assert_allclose(by_ids[0], by_ids[1], atol=1e-6)
    assert client.post("/embed", json={"inputs": ids}).json() == [by_ids[0]]


def test_embed_options(client, st):
    raw = client.post("/embed", json={"inputs": TEXTS, "normalize": False}).json()
    pooled = SentenceTransformer(modules=[st[0], st[1]], device="cpu")  # no Normalize
    np.testing.assert_allclose(raw, pooled.encode(TEXTS), atol=1e-5)
    assert abs(np.linalg.norm(raw[0]) - 1) > 1e-3
    cut = client.post("/embed", json={"inputs": TEXTS, "dimensions": 64}).json()
    assert np.array(cut).shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1, atol=1e-6)
    query = client.post("/embed", json={"inputs": TEXTS, "prompt_name": "query"}).json()
    np.testing.assert_allclose(query, st.encode(TEXTS, prompt_name="query"), atol=1e-6)
    long = "first words " + "middle " * 300 + "last words"
    for direction in ("left", "Left", "right", "Right"):
        r = client.post("/embed", json={"inputs": long, "truncation_direction": direction})
        assert r.status_code == 200, r.text
    left = client.post("/embed", json={"inputs": long, "truncation_direction": "Left"}).json()
    st.tokenizer.truncation_side = "left"
    try:
        np.testing.assert_allclose(left[0], st.encode(long), atol=1e-6)
    finally:
        st.tokenizer.truncation_side = "right"
    # Weaviate's text2vec-huggingface sends an 'options' object: ignored, as TEI ignores it
    weaviate = client.post("/embed", json={"inputs": [TEXTS[0]],
                                           "options": {"waitForModel": True}})
    assert weaviate.status_code == 200 and weaviate.json() == client.post(
        "/embed", json={"inputs": [TEXTS[0]]}).json()


def test_embed_all_answers_every_tokens_vector(client, paths):
    from transformers import AutoModel, AutoTokenizer

    r = client.post("/embed_all", json={"inputs": TEXTS[:2]})
    assert r.status_code == 200, r.text
    tok = AutoTokenizer.from_pretrained(str(paths["embedding"]))
    model = AutoModel.from_pretrained(str(paths["embedding"]))
    import torch

    for text, got in zip(TEXTS[:2], r.json(), strict=True):
        with torch.no_grad():
            want = model(**tok(text, return_tensors="pt")).last_hidden_state[0].numpy()
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_embed_sparse_equals_sparse_encoder(client, sparse_ref):
    r = client.post("/embed_sparse", json={"inputs": TEXTS, "model": "splade"})
    assert r.status_code == 200, r.text
    body = r.json()
    want = sparse_ref(TEXTS)
    np.testing.assert_allclose(sparse_of(body), want, atol=1e-4)
    for row, w in zip(body, want, strict=True):
        assert [x["index"] for x in row] == np.flatnonzero(w).tolist()  # non-zero, ascending
    pruned = client.post("/embed_sparse", json={"inputs": TEXTS, "model": "splade",
                                                "max_active_dims": 8}).json()
    np.testing.assert_allclose(sparse_of(pruned), sparse_ref(TEXTS, max_active_dims=8),
                               atol=1e-4)
    # the SPLADE model's /embed is its dense vector, unnormalized only, as in TEI
    dense = client.post("/embed", json={"inputs": TEXTS, "normalize": False,
                                        "model": "splade"})
    np.testing.assert_allclose(dense.json(), want, atol=1e-4)
    refused = client.post("/embed", json={"inputs": TEXTS, "model": "splade"})
    assert refused.status_code == 424 and refused.json() == {
        "error": "`normalize` is not available for SPLADE models", "error_type": "Backend"}


def test_predict_in_every_input_shape(client, class_ref):
    single = client.post("/predict", json={"inputs": TEXTS[0]})
    assert single.status_code == 200, single.text
    (want,) = class_ref([TEXTS[0]])
    body = single.json()
    assert [x["label"] for x in body] == [CLASSIFIER_LABELS[i] for i in np.argsort(-want)]
    for x in body:
        assert x["score"] == pytest.approx(want[CLASSIFIER_LABELS.index(x["label"])], abs=2e-6)
    assert client.post("/predict", json={"inputs": [TEXTS[0]]}).json() == body
    pair = client.post("/predict", json={"inputs": PAIR}).json()
    (want_pair,) = class_ref([tuple(PAIR)])
    assert pair[0]["score"] == pytest.approx(want_pair.max(), abs=2e-6)
    batch = client.post("/predict", json={"inputs": [[TEXTS[1]], PAIR, [TEXTS[2]]]}).json()
    assert len(batch) == 3 and batch[1] == pair
    want_batch = class_ref([TEXTS[1], tuple(PAIR), TEXTS[2]])
    for row, w in zip(batch, want_batch, strict=True):
        assert row[0]["score"] == pytest.approx(w.max(), abs=2e-6)
    raw = client.post("/predict", json={"inputs": TEXTS[0], "raw_scores": True}).json()
    logits = class_ref([TEXTS[0]], function_to_apply="none")[0]
    assert sorted(x["score"] for x in raw) == pytest.approx(sorted(logits), abs=2e-5)


def test_similarity_tokenize_and_decode(client, st):
    sim = client.post("/similarity", json={"inputs": {"source_sentence": TEXTS[0],
                                                      "sentences": TEXTS[1:]}})
    assert sim.status_code == 200, sim.text
    v = st.encode(TEXTS)
    np.testing.assert_allclose(sim.json(), v[1:] @ v[0], atol=1e-6)
    tok = client.post("/tokenize", json={"inputs": TEXTS[1]}).json()
    (tokens,) = tok
    assert tokens[0] == {"id": 101, "text": "[CLS]", "special": True, "start": None,
                         "stop": None}
    raw = TEXTS[1].encode()
    for t in tokens[1:-1]:  # offsets are UTF-8 bytes, as TEI's
        assert not t["special"]
        assert raw[t["start"]:t["stop"]].decode() == t["text"]
    plain = client.post("/tokenize", json={"inputs": [TEXTS[0]], "add_special_tokens": False})
    ids = [t["id"] for t in plain.json()[0]]
    assert ids == st.tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    prompted = client.post("/tokenize", json={"inputs": TEXTS[0], "prompt_name": "query"})
    assert [t["text"] for t in prompted.json()[0][1:3]] == ["query", ":"]
    decoded = client.post("/decode", json={"ids": [ids, ids[:2]]}).json()
    assert decoded == [st.tokenizer.decode(ids), st.tokenizer.decode(ids[:2])]
    assert client.post("/decode", json={"ids": ids}).json() == decoded[:1]


def test_info_describes_each_model(client):
    emb = client.get("/info").json()
    assert emb["model_type"] == {"embedding": {"pooling": "mean"}}
    assert emb["max_input_length"] == 256 and emb["max_client_batch_size"] == 8
    assert emb["model_dtype"] == "float32" and emb["auto_truncate"] is True
    assert set(emb) >= {"model_id", "model_sha", "max_concurrent_requests", "max_batch_tokens",
                        "max_batch_requests", "tokenization_workers", "version"}
    cls = client.get("/info", params={"model": "classifier"}).json()
    assert cls["model_type"] == {"classifier": {
        "id2label": {str(i): n for i, n in enumerate(CLASSIFIER_LABELS)},
        "label2id": {n: i for i, n in enumerate(CLASSIFIER_LABELS)}}}
    sparse = client.get("/info", headers={"X-Model": "splade"}).json()
    assert sparse["model_type"] == {"embedding": {"pooling": "splade"}}
    rerank = client.get("/info", params={"model": "reranker"}).json()
    assert list(rerank["model_type"]) == ["reranker"]
    assert client.get("/health").status_code == 200


def test_the_root_answers_as_the_models_task(client, st, sparse_ref, class_ref):
    emb = client.post("/", json={"inputs": TEXTS[0]})
    np.testing.assert_allclose(emb.json()[0], st.encode(TEXTS[0]), atol=1e-6)
    sparse = client.post("/", json={"inputs": TEXTS[:1]}, headers={"X-Model": "splade"})
    np.testing.assert_allclose(sparse_of(sparse.json()), sparse_ref(TEXTS[:1]), atol=1e-4)
    # huggingface_hub's text_classification sends an empty 'parameters' object
    cls = client.post("/", json={"inputs": TEXTS[0], "parameters": {}, "model": "classifier"})
    assert cls.json()[0]["score"] == pytest.approx(class_ref([TEXTS[0]])[0].max(), abs=2e-6)
    rr = client.post("/invocations", json={"query": QUERY, "texts": DOCS, "model": "reranker"})
    assert sorted(x["index"] for x in rr.json()) == [0, 1, 2]


def test_predict_on_a_reranker_and_rerank_agree(client, paths):
    want = CrossEncoder(str(paths["reranker"]), device="cpu").predict([(QUERY, d) for d in DOCS])
    batch = client.post("/predict", json={"inputs": [[QUERY, d] for d in DOCS],
                                          "model": "reranker"}).json()
    np.testing.assert_allclose([row[0]["score"] for row in batch], want, atol=1e-6)
    assert batch[0][0]["label"] == "LABEL_0"


@pytest.mark.parametrize(("path", "body", "status", "etype", "contains"), [
    ("/predict", {"inputs": ["a", "b", "c"]}, 422, "Validation", "invalid length 3"),
    ("/predict", {"inputs": [["a", "b", "c"]]}, 422, "Validation", "invalid length 3"),
    ("/predict", {"inputs": []}, 400, "Empty", "cannot be empty"),
    ("/predict", {"inputs": [["a"], [""]]}, 400, "Empty", "inputs[1]"),
    ("/predict", {"inputs": "a", "model": "embedding"}, 424, "Backend", "not a classifier"),
    ("/embed_sparse", {"inputs": "a", "model": "embedding"}, 424, "Backend",
     "SPLADE pooling"),
    ("/embed_sparse", {"inputs": "a", "model": "splade", "max_active_dims": 0}, 422,
     "Validation", "max_active_dims"),
    ("/embed_all", {"inputs": "a", "model": "splade"}, 424, "Backend",
     "not available for SPLADE"),
    ("/embed_all", {"inputs": "a", "model": "classifier"}, 424, "Backend", "not an embedding"),
    ("/embed", {"inputs": "a", "model": "classifier"}, 424, "Backend", "is a classifier"),
    ("/embed", {"inputs": "a", "model": "splade", "normalize": False, "dimensions": 4}, 422,
     "Validation", "dimensions"),
    ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]},
                     "model": "splade"}, 424, "Backend", "sparse"),
])
def test_tei_errors_are_teis(client, path, body, status, etype, contains):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error", "error_type"} and r.json()["error_type"] == etype
    assert contains in r.json()["error"], r.json()


# -- the other protocols -----------------------------------------------------------------------

def test_openai_classify_in_vllms_shape(client, class_ref):
    for path in ("/classify", "/v1/classify"):
        r = client.post(path, json={"model": "classifier", "input": [TEXTS[0], PAIR]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["id"].startswith("classify-")
        want = class_ref([TEXTS[0], tuple(PAIR)])
        for item, w in zip(body["data"], want, strict=True):
            assert item["num_classes"] == 3
            assert item["label"] == CLASSIFIER_LABELS[int(np.argmax(w))]
            np.testing.assert_allclose(item["probs"], w, atol=2e-6)
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 5
    one = client.post("/v1/classify", json={"input": TEXTS[0], "use_activation": False})
    assert one.status_code == 200  # the only classifier, unnamed
    np.testing.assert_allclose(one.json()["data"][0]["probs"],
                               class_ref([TEXTS[0]], function_to_apply="none")[0], atol=2e-5)
    wrong = client.post("/v1/classify", json={"model": "embedding", "input": "a"})
    assert wrong.status_code == 400 and "not a classifier" in wrong.json()["error"]["message"]


def test_openai_embeddings_of_a_sparse_model(client, sparse_ref):
    r = client.post("/v1/embeddings", json={"model": "splade", "input": TEXTS,
                                            "max_active_dims": 32})
    assert r.status_code == 200, r.text
    want = sparse_ref(TEXTS, max_active_dims=32)
    for item, w in zip(r.json()["data"], want, strict=True):
        emb = item["embedding"]
        assert emb["indices"] == np.flatnonzero(w).tolist()
        np.testing.assert_allclose(emb["values"], w[emb["indices"]], atol=1e-4)
    bad = client.post("/v1/embeddings", json={"model": "splade", "input": "a",
                                              "encoding_format": "base64"})
    assert bad.status_code == 400 and "indices and values" in bad.json()["error"]["message"]
    dense = client.post("/v1/embeddings", json={"model": "embedding", "input": "a",
                                                "max_active_dims": 3})
    assert dense.status_code == 400 and "dense" in dense.json()["error"]["message"]


def test_kserve_v1_classifier_and_sparse_model(client, class_ref, sparse_ref):
    r = client.post("/v1/models/classifier:predict", json={"instances": [TEXTS[0], PAIR]})
    assert r.status_code == 200, r.text
    want = class_ref([TEXTS[0], tuple(PAIR)])
    assert r.json() == {"predictions": want.argmax(axis=1).tolist()}  # KServe's default
    probs = client.post("/v1/models/classifier:predict",
                        json={"instances": [TEXTS[0]], "return_probabilities": True}).json()
    assert set(probs["predictions"][0]) == {"0", "1", "2"}
    np.testing.assert_allclose([probs["predictions"][0][k] for k in "012"], want[0], atol=2e-6)
    sparse = client.post("/v1/models/splade:predict", json={"instances": TEXTS[:2]}).json()
    w = sparse_ref(TEXTS[:2])
    for item, row in zip(sparse["predictions"], w, strict=True):
        assert item["indices"] == np.flatnonzero(row).tolist()


def v2(*inputs: tuple[str, list[str]], **extra) -> dict:
    return {"inputs": [{"name": n, "shape": [len(d)], "datatype": "BYTES", "data": d}
                       for n, d in inputs], **extra}


def test_v2_rest_classifier_as_kserve_answers(client, class_ref):
    url = "/v2/models/classifier/infer"
    r = client.post(url, json=v2(("input-0", TEXTS[:2])))  # KServe's name: any name does
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    want = class_ref(TEXTS[:2])
    assert out == {"name": "output-0", "datatype": "INT64", "shape": [2],
                   "data": want.argmax(axis=1).tolist()}
    probs = client.post(url, json=v2(("text", TEXTS[:2]),
                                     parameters={"return_probabilities": True})).json()
    (out,) = probs["outputs"]
    assert out["datatype"] == "BYTES" and out["shape"] == [2]
    import ast

    got = [ast.literal_eval(e) for e in out["data"]]  # as KServe's own e2e test reads it
    np.testing.assert_allclose([[g[j] for j in range(3)] for g in got], want, atol=2e-6)
    pairs = client.post(url, json=v2(("text", [PAIR[0]]), ("text_pair", [PAIR[1]]),
                                     outputs=[{"name": "scores"}])).json()
    (scores,) = pairs["outputs"]
    assert scores["name"] == "scores" and scores["shape"] == [1, 3]
    np.testing.assert_allclose(scores["data"], class_ref([tuple(PAIR)])[0], atol=2e-6)
    meta = client.get("/v2/models/classifier").json()
    assert meta["parameters"]["labels"] == list(CLASSIFIER_LABELS)
    assert [o["name"] for o in meta["outputs"]] == ["output-0", "scores"]


def test_v2_rest_sparse_as_compressed_rows(client, sparse_ref):
    header = {"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES",
                          "parameters": {"binary_data_size": 0}}],
              "outputs": [{"name": n, "parameters": {"binary_data": True}}
                          for n in ("indices", "values", "offsets")]}
    import orjson

    raw = join_bytes_tensor([t.encode() for t in TEXTS])
    header["inputs"][0]["parameters"]["binary_data_size"] = len(raw)
    head = orjson.dumps(header)
    r = client.post("/v2/models/splade/infer", content=head + raw,
                    headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    meta, rest = orjson.loads(r.content[:n]), memoryview(r.content)[n:]
    arrays = {}
    for out in meta["outputs"]:
        size = out["parameters"]["binary_data_size"]
        dtype = {"INT32": "<i4", "FP32": "<f4", "INT64": "<i8"}[out["datatype"]]
        arrays[out["name"]] = np.frombuffer(rest[:size], dtype)
        rest = rest[size:]
    want = sparse_ref(TEXTS)
    got = np.zeros_like(want)
    offsets = arrays["offsets"]
    for i in range(3):
        row = slice(offsets[i], offsets[i + 1])
        got[i, arrays["indices"][row]] = arrays["values"][row]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_v2_grpc_classifier_and_sparse(dataplane, class_ref, sparse_ref):
    with grpc_serving(dataplane) as stub:
        r = stub.ModelInfer(infer_request(TEXTS[:2], model="classifier"))
        (out,) = r.outputs
        assert (out.name, out.datatype) == ("output-0", "INT64")
        assert list(out.contents.int64_contents) == class_ref(TEXTS[:2]).argmax(1).tolist()
        req = infer_request(TEXTS[:2], model="classifier", raw=True,
                            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(
                                name="output-0")])
        req.parameters["return_probabilities"].bool_param = True
        r = stub.ModelInfer(req)
        assert r.outputs[0].datatype == "BYTES"
        texts = split_bytes_tensor(r.raw_output_contents[0])
        assert len(texts) == 2 and texts[0].startswith(b"{0: ")
        s = stub.ModelInfer(infer_request(TEXTS, model="splade"))
        names = [o.name for o in s.outputs]
        assert names == ["indices", "values", "offsets"]
        indices = np.array(s.outputs[0].contents.int_contents)
        values = np.array(s.outputs[1].contents.fp32_contents)
        offsets = np.array(s.outputs[2].contents.int64_contents)
        want = sparse_ref(TEXTS)
        for i in range(3):
            row = slice(offsets[i], offsets[i + 1])
            assert indices[row].tolist() == np.flatnonzero(want[i]).tolist()
            np.testing.assert_allclose(values[row], want[i, indices[row]], atol=1e-4)
