"""End to end: a PyLate ColBERT model and a BGE-M3 model through the default entry point, on
every protocol that answers them (OpenAI, TEI, KServe V1, V2 REST and gRPC), with real clients;
answers equal PyLate's and FlagEmbedding's own (tests/references.py)."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.conftest import COLBERT_DOCUMENTS, COLBERT_QUERIES, M3_TEXTS

pytestmark = pytest.mark.e2e

APP = {"application": "serve_app"}


@pytest.fixture(scope="module")
def server(e2e_server):
    return e2e_server


@pytest.fixture(scope="module")
def pylate(colbert):
    return np.load(colbert / "default.npz")


@pytest.fixture(scope="module")
def flag(bge_m3):
    return np.load(bge_m3[1])


def test_openai_multivector_matrices(oai, http, pylate):
    # the SDK asks for base64 and decodes it flat: a matrix comes as its rows one after another
    docs = oai.embeddings.create(model="colbert", input=COLBERT_DOCUMENTS)
    for i, d in enumerate(docs.data):
        np.testing.assert_allclose(np.reshape(d.embedding, (-1, 24)), pylate[f"d{i}"],
                                   atol=1e-5)
    queries = oai.embeddings.create(model="colbert", input=COLBERT_QUERIES,
                                    extra_body={"input_type": "query"})
    for i, q in enumerate(queries.data):
        np.testing.assert_allclose(np.reshape(q.embedding, (-1, 24)), pylate[f"q{i}"],
                                   atol=1e-5)
    floats = http.post("/v1/embeddings", json={"model": "colbert", "input": COLBERT_DOCUMENTS})
    for i, d in enumerate(floats.json()["data"]):  # JSON floats: the matrix itself
        np.testing.assert_allclose(d["embedding"], pylate[f"d{i}"], atol=1e-5)
    packed = http.post("/v1/embeddings", json={"model": "colbert", "input": COLBERT_DOCUMENTS,
                                               "encoding_format": "base64"})
    for i, d in enumerate(packed.json()["data"]):
        rows = np.frombuffer(base64.b64decode(d["embedding"]), "<f4").reshape(-1, 24)
        np.testing.assert_allclose(rows, pylate[f"d{i}"], atol=1e-5)
    bad = http.post("/v1/embeddings", json={"model": "colbert", "input": "a",
                                            "dimensions": 8})
    assert bad.status_code == 400 and "dense vectors" in bad.json()["error"]["message"]
    bad = http.post("/v1/embeddings", json={"model": "colbert", "input": "a",
                                            "output": "sparse"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "output"


def test_tei_embed_all_and_maxsim_rerank(http, pylate):
    r = http.post("/embed_all", json={"model": "colbert", "inputs": COLBERT_DOCUMENTS})
    for i, m in enumerate(r.json()):
        np.testing.assert_allclose(m, pylate[f"d{i}"], atol=1e-5)
    q = http.post("/embed_all", json={"model": "colbert", "inputs": COLBERT_QUERIES[0],
                                      "prompt_name": "query"})
    np.testing.assert_allclose(q.json()[0], pylate["q0"], atol=1e-5)
    wrong = http.post("/embed", json={"model": "colbert", "inputs": "a"})
    assert wrong.status_code == 424 and "embed_all" in wrong.json()["error"]
    ranked = http.post("/rerank", json={"model": "colbert", "query": COLBERT_QUERIES[0],
                                        "texts": COLBERT_DOCUMENTS, "return_text": True})
    assert ranked.status_code == 200, ranked.text
    want = pylate["scores"][0]
    got = {item["index"]: item["score"] for item in ranked.json()}
    np.testing.assert_allclose([got[i] for i in range(len(COLBERT_DOCUMENTS))], want,
                               rtol=1e-5, atol=1e-4)
    assert [item["index"] for item in ranked.json()] == np.argsort(-want, kind="stable").tolist()
    cohere = http.post("/v1/rerank", json={"model": "colbert", "query": COLBERT_QUERIES[1],
                                           "documents": COLBERT_DOCUMENTS, "top_n": 2})
    top = cohere.json()["results"]
    assert [t["index"] for t in top] == np.argsort(-pylate["scores"][1])[:2].tolist()


def test_kserve_v1_multivector_and_m3_dense(http, pylate, flag):
    r = http.post("/v1/models/colbert:predict", json={"instances": COLBERT_DOCUMENTS[:2]})
    for i, m in enumerate(r.json()["predictions"]):
        np.testing.assert_allclose(m, pylate[f"d{i}"], atol=1e-5)
    dense = http.post("/v1/models/m3:predict", json={"instances": M3_TEXTS})
    np.testing.assert_allclose(dense.json()["predictions"], flag["dense"], atol=1e-5)


def test_m3_outputs_on_openai_and_tei(oai, http, flag):
    dense = oai.embeddings.create(model="m3", input=M3_TEXTS)
    np.testing.assert_allclose([d.embedding for d in dense.data], flag["dense"], atol=1e-5)
    sparse = http.post("/v1/embeddings", json={"model": "m3", "input": M3_TEXTS,
                                               "output": "sparse"}).json()["data"]
    multi = http.post("/v1/embeddings", json={"model": "m3", "input": M3_TEXTS,
                                              "output": "multivector"}).json()["data"]
    tei = http.post("/embed_sparse", json={"model": "m3", "inputs": M3_TEXTS}).json()
    for i in range(len(M3_TEXTS)):
        assert sparse[i]["embedding"]["indices"] == flag[f"lexical_ids{i}"].tolist()
        np.testing.assert_allclose(sparse[i]["embedding"]["values"],
                                   flag[f"lexical_weights{i}"], atol=1e-5)
        assert [p["index"] for p in tei[i]] == flag[f"lexical_ids{i}"].tolist()
        np.testing.assert_allclose(multi[i]["embedding"], flag[f"colbert{i}"], atol=1e-5)


def test_v2_rest_and_grpc_multivector_and_all_m3_outputs(server, pylate, flag):
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http

    rest = triton_http.InferenceServerClient(server.removeprefix("http://"))
    grpc = triton_grpc.InferenceServerClient(server.grpc)
    meta = rest.get_model_metadata("m3")
    assert [o["name"] for o in meta["outputs"]] == [
        "output-0", "indices", "values", "offsets", "multivector", "multivector_offsets"]
    assert [o["name"] for o in rest.get_model_metadata("colbert")["outputs"]] == [
        "multivector", "multivector_offsets"]
    m3_outputs = ("output-0", "indices", "values", "offsets", "multivector",
                  "multivector_offsets")
    for mod, client, kw in ((triton_http, rest, {}), (triton_grpc, grpc, {"headers": APP})):
        def infer(model, texts, outputs=(), params=None, mod=mod, client=client, kw=kw):
            inp = mod.InferInput("text", [len(texts)], "BYTES")
            inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
            asked = [mod.InferRequestedOutput(n) for n in outputs] or None
            return client.infer(model, [inp], outputs=asked, parameters=params or {}, **kw)

        docs = infer("colbert", COLBERT_DOCUMENTS)
        rows, offsets = docs.as_numpy("multivector"), docs.as_numpy("multivector_offsets")
        assert offsets.dtype == np.int64 and offsets[-1] == len(rows)
        for i in range(len(COLBERT_DOCUMENTS)):
            np.testing.assert_allclose(rows[offsets[i]:offsets[i + 1]], pylate[f"d{i}"],
                                       atol=1e-5)
        query = infer("colbert", COLBERT_QUERIES[:1], params={"input_type": "query"})
        np.testing.assert_allclose(query.as_numpy("multivector"), pylate["q0"], atol=1e-5)
        # every BGE-M3 output from one request (one forward pass)
        every = infer("m3", M3_TEXTS, m3_outputs)
        np.testing.assert_allclose(every.as_numpy("output-0"), flag["dense"], atol=1e-5)
        indices, values = every.as_numpy("indices"), every.as_numpy("values")
        sparse_at, multi_at = every.as_numpy("offsets"), every.as_numpy("multivector_offsets")
        multi = every.as_numpy("multivector")
        for i in range(len(M3_TEXTS)):
            a, b = sparse_at[i], sparse_at[i + 1]
            assert indices[a:b].tolist() == flag[f"lexical_ids{i}"].tolist()
            np.testing.assert_allclose(values[a:b], flag[f"lexical_weights{i}"], atol=1e-5)
            np.testing.assert_allclose(multi[multi_at[i]:multi_at[i + 1]], flag[f"colbert{i}"],
                                       atol=1e-5)
        pruned = infer("m3", M3_TEXTS, ("offsets",), {"max_active_dims": 3})
        assert (np.diff(pruned.as_numpy("offsets")) <= 3).all()
        dense = infer("m3", M3_TEXTS)  # the default: the dense vectors only
        assert [o.name if hasattr(o, "name") else o["name"] for o in (
            dense.get_response().outputs if mod is triton_grpc
            else dense.get_response()["outputs"])] == ["output-0"]
