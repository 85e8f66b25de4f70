"""Variants end to end: one model entry whose fine-tuned variants (made by tests/conftest.py
from the default model) load on first use into two replicas holding two each, through the
default entry point on loopback; each protocol's real client names a variant as it names any
model, and every variant's vectors are compared with sentence-transformers on that checkpoint."""

from __future__ import annotations

import concurrent.futures

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import quantize_embeddings

from tests.helpers import MAX_LOADED, SENTENCE, TEXTS, VARIANTS, scrape, scraped_total
from tests.helpers import VARIANT_CORPUS as CORPUS

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def checkpoints(variant_checkpoints):
    return variant_checkpoints


@pytest.fixture(scope="module")
def server(variants_server):
    """tests/conftest.py's variants_server: the checkpoints above behind one model entry."""
    return variants_server


@pytest.fixture(scope="module")
def st(checkpoints):
    return {n: SentenceTransformer(str(checkpoints[n]), device="cpu") for n in VARIANTS}


def loads(http, model: str) -> float:
    return scraped_total(http, "serve_app_variant_loads_total", model=model, outcome="loaded")


def embed(http, model: str, texts=TEXTS) -> np.ndarray:
    r = http.post("/v1/embeddings", json={"model": model, "input": texts})
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]])


def test_every_variant_is_listed_and_described_before_it_loads(http):
    names = ["embedding", *VARIANTS, "broken", "cls-pooled"]
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == names
    assert http.get("/openai/v1/models").status_code == 200
    base = http.get("/v2/models/embedding").json()
    meta = http.get("/v2/models/v5").json()
    assert meta["name"] == "v5" and meta["outputs"] == base["outputs"]
    assert meta["parameters"]["variant_of"] == "embedding"
    assert "int8_ranges" not in meta["parameters"]  # not calibrated until a replica loads it
    assert http.get("/v2/models/v5/ready").json() == {"name": "v5", "ready": True}
    assert http.get("/v2/health/ready").status_code == 200
    stats = http.get("/v2/models/v5/stats").json()["model_stats"][0]
    assert stats["loaded"] is False and stats["inference_count"] == 0
    assert loads(http, "v5") == 0  # describing, probing and statistics loaded nothing


def test_each_client_names_a_variant_and_gets_its_vectors(server, http, st):
    oai = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    got = np.array([d.embedding for d in oai.embeddings.create(model="v0", input=TEXTS).data])
    np.testing.assert_allclose(got, st["v0"].encode(TEXTS), atol=1e-5)
    base = embed(http, "embedding")
    assert np.abs(got - base).max() > 1e-2  # the variant's own weights answered

    v1 = http.post("/v1/models/v1:predict", json={"instances": TEXTS})
    assert v1.status_code == 200, v1.text
    np.testing.assert_allclose(v1.json()["predictions"], st["v1"].encode(TEXTS), atol=1e-5)

    rest = triton_http.InferenceServerClient(url=server.removeprefix("http://"))
    inp = triton_http.InferInput("text", [len(TEXTS)], "BYTES")
    inp.set_data_from_numpy(np.array(TEXTS, dtype=object), binary_data=True)
    out = rest.infer("v2", [inp]).as_numpy("output-0")
    np.testing.assert_allclose(out, st["v2"].encode(TEXTS), atol=1e-5)

    rpc = triton_grpc.InferenceServerClient(url=server.grpc)
    inp = triton_grpc.InferInput("text", [len(TEXTS)], "BYTES")
    inp.set_data_from_numpy(np.array(TEXTS, dtype=object))
    out = rpc.infer("v3", [inp]).as_numpy("output-0")
    np.testing.assert_allclose(out, st["v3"].encode(TEXTS), atol=1e-5)
    assert rpc.is_model_ready("v3")


def test_a_variant_calibrates_on_its_first_int8_request(http, st):
    r = http.post("/v1/embeddings", json={"model": "v0", "input": TEXTS,
                                          "encoding_format": "int8"})
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]])
    want = quantize_embeddings(st["v0"].encode(TEXTS), "int8",
                               calibration_embeddings=st["v0"].encode(CORPUS))
    assert np.abs(got - want.astype(int)).max() <= 1 and (got == want).mean() > 0.99


def test_requests_go_to_the_replica_that_holds_their_variant(http):
    embed(http, "v0", SENTENCE)
    before = loads(http, "v0")
    assert before >= 1
    for _ in range(10):
        embed(http, "v0", SENTENCE)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: embed(http, "v0", SENTENCE), range(16)))
    # with two replicas, requests sent anywhere would have loaded it on the other one too
    assert loads(http, "v0") == before


def test_concurrent_first_requests_load_the_variant_once(http, st):
    assert loads(http, "v5") == 0
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: embed(http, "v5", [SENTENCE]), range(8)))
    for a in answers:
        np.testing.assert_allclose(a, st["v5"].encode([SENTENCE]), atol=1e-5)
    assert loads(http, "v5") == 1
    assert scraped_total(http, "serve_app_variant_load_seconds_count", model="v5") == 1
    assert 0 < scraped_total(http, "serve_app_variant_load_seconds_sum", model="v5") < 30


def test_least_recently_used_variants_make_room(http, st):
    evicted = scraped_total(http, "serve_app_variant_evictions_total")
    for name in VARIANTS:  # six variants, four places: some must go
        np.testing.assert_allclose(embed(http, name, [SENTENCE]), st[name].encode([SENTENCE]),
                                   atol=1e-5)
    embed(http, "embedding", [SENTENCE])
    assert scraped_total(http, "serve_app_variant_evictions_total") >= evicted + 2
    resident = {ls: v for (n, ls), v in scrape(http.get("/metrics").text).items()
                if n == "serve_app_variants_resident"}
    assert len(resident) == 2 and all(0 < v <= MAX_LOADED for v in resident.values())
    # an evicted variant loads again when asked, with the same vectors
    for name in VARIANTS[:2]:
        np.testing.assert_allclose(embed(http, name), st[name].encode(TEXTS), atol=1e-5)
    stats = http.get("/v2/models/embedding/stats").json()["model_stats"][0]
    assert len(stats["variants"]["resident"]) <= MAX_LOADED
    assert stats["variants"]["max_loaded"] == MAX_LOADED


def test_a_failing_variant_is_an_error_for_its_callers_only(http, st):
    def broken(model: str) -> httpx.Response:
        return http.post("/v1/embeddings", json={"model": model, "input": SENTENCE})

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        bad = pool.submit(broken, "broken")
        mismatch = pool.submit(broken, "cls-pooled")
        good = [pool.submit(embed, http, name, [SENTENCE]) for name in ("embedding", "v0")]
        r = bad.result()
        assert r.status_code == 503 and r.headers["retry-after"]
        assert "variant 'broken' failed to load" in r.json()["error"]["message"]
        r = mismatch.result()
        assert r.status_code == 503
        assert "pooling 'cls' where the base has 'mean'" in r.json()["error"]["message"]
        np.testing.assert_allclose(good[1].result(), st["v0"].encode([SENTENCE]), atol=1e-5)
        good[0].result()
    v2 = http.post("/v2/models/broken/infer", json={"inputs": [
        {"name": "text", "shape": [1], "datatype": "BYTES", "data": [SENTENCE]}]})
    assert v2.status_code == 503 and "failed to load" in v2.json()["error"]
    assert scraped_total(http, "serve_app_variant_loads_total", model="broken",
                         outcome="failed") >= 2
    # the server goes on serving every other variant
    np.testing.assert_allclose(embed(http, "v1", [SENTENCE]), st["v1"].encode([SENTENCE]),
                               atol=1e-5)
