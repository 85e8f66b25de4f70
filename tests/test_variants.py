"""Variants without Ray: their configuration, a replica's host of them (load, check against
the base, bounded wait, reports), lazy calibration, shared forward threads, and their metrics.
The routing and eviction Serve does are tested through a real server in test_e2e_variants.py."""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from pydantic import ValidationError
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import quantize_embeddings

from serve_app.config.schema import AppConfig, ModelConfig
from serve_app.config.variants import VariantOptions
from serve_app.engine.embedding import EmbeddingEngine
from serve_app.engine.reranker import RerankEngine
from serve_app.errors import Misrouted, ModelNotFound, ModelNotReady, Overloaded
from serve_app.frontend.metrics import Metrics
from serve_app.runtime.batch_queue import BatchQueue, Work
from serve_app.runtime.runner import ModelRunner, ReplicaResources
from serve_app.runtime.variants import Residency, Variant, VariantHost, describe, differences
from serve_app.types import EmbedRequest, RerankRequest, VariantReport
from tests.helpers import TEXTS, make_variants, sample, scrape

CORPUS = [f"calibration sentence {i} about {w}" for i, w in
          enumerate(["rain", "tax law", "soup", "rust code"] * 5)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, minilm_dir):
    root = tmp_path_factory.mktemp("variants")
    made = make_variants(minilm_dir, root / "dir", ["alpha", "beta"])
    other = make_variants(minilm_dir, root / "other", ["cls-pooled"], pooling="cls")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    return {**made, **other, "dir": root / "dir", "corpus": corpus}


# -- configuration ---------------------------------------------------------------------------

def test_a_directory_lists_its_checkpoints_and_a_list_names_each(tmp_path):
    for name in ("b-2", "a.1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "not-a-checkpoint").mkdir()
    (tmp_path / "notes.txt").write_text("")
    opts = VariantOptions(directory=str(tmp_path), models=[
        "org/support-v2", "/models/legal/", {"name": "acme", "model_id": "org/acme-ft-3"}])
    assert opts.sources == {"a.1": str(tmp_path / "a.1"), "b-2": str(tmp_path / "b-2"),
                            "support-v2": "org/support-v2", "legal": "/models/legal/",
                            "acme": "org/acme-ft-3"}
    assert pickle.loads(pickle.dumps(opts)).sources == opts.sources  # travels to replicas
    assert (opts.max_loaded, opts.load_timeout_s) == (4, 30.0)


@pytest.mark.parametrize("variants, message", [
    ({"directory": "/no/such/dir"}, "is not a directory"),
    ({"models": []}, "names no checkpoint"),
    ({"models": ["org/a", "other/a"]}, r"repeated: \['a'\]"),
    ({"models": [{"name": "bad name", "model_id": "x"}]}, "bad name"),
    ({"models": ["org/a"], "max_loaded": 0}, "greater than or equal to 1"),
    ({"models": ["org/a"], "load_timeout_s": 0}, "greater than 0"),
    ({"models": ["org/a"], "max_models": 2}, "Extra inputs are not permitted"),
])
def test_bad_variant_options_are_refused(variants, message):
    with pytest.raises(ValidationError, match=message):
        ModelConfig(variants=variants)


def test_variant_names_are_unique_across_the_app_and_never_colocated():
    with pytest.raises(ValidationError, match=r"every other served name: \['other'\]"):
        AppConfig(models=[{"name": "base", "variants": {"models": ["org/other"]}},
                          {"name": "other"}])
    with pytest.raises(ValidationError, match=r"every other served name: \['x'\]"):
        AppConfig(models=[{"name": "a", "variants": {"models": ["org/x"]}},
                          {"name": "b", "variants": {"models": ["other/x"]}}])
    with pytest.raises(ValidationError, match="use topology separate or auto"):
        AppConfig(topology="colocated", models=[{"variants": {"models": ["org/x"]}}])
    assert not AppConfig(models=[{"variants": {"models": ["org/x"]}}]).colocated
    assert AppConfig(models=[{}]).colocated


# -- a replica's host ----------------------------------------------------------------------

def _host(checkpoints, load_timeout_s: float = 30.0) -> tuple[VariantHost, ModelRunner]:
    cfg = ModelConfig(calibration_corpus=str(checkpoints["corpus"]), variants={
        "directory": str(checkpoints["dir"]), "load_timeout_s": load_timeout_s,
        "models": [str(checkpoints["cls-pooled"]), "/no/such/checkpoint"]})
    shared = ReplicaResources.of(1, 4096)
    engine = EmbeddingEngine(cfg, num_threads=1)
    engine.warmup(1)
    base = ModelRunner(engine, cfg.name, shared=shared)

    def build(variant: ModelConfig) -> ModelRunner:
        engine = EmbeddingEngine(variant, num_threads=1)
        return ModelRunner(engine, variant.name, variant.version, shared=shared)

    return VariantHost(cfg, base.engine.info(cfg.name, cfg.version), build, "replica-1"), base


def test_a_variant_loads_as_its_own_model_and_reports_it(checkpoints):
    host, _ = _host(checkpoints)

    async def go():
        variant = await host.load("alpha")
        return variant, await variant.model.embed(EmbedRequest("alpha", tuple(TEXTS)))

    variant, result = asyncio.run(go())
    st = SentenceTransformer(str(checkpoints["alpha"]), device="cpu")
    np.testing.assert_allclose(result.embeddings, st.encode(TEXTS), atol=1e-5)
    assert variant.model.engine.calibration is None  # calibrated on first int8 use only
    report = host.report()
    assert report.base == "embedding" and report.replica == "replica-1"
    assert report.resident == ("alpha",) and report.evictions == ()
    [(name, seconds, ok)] = report.loads
    assert name == "alpha" and ok and 0 < seconds < 30
    assert host.report().loads == ()  # each load reported once
    assert host.stats()["loads"] == 1 and host.stats()["resident"] == ["alpha"]


def test_an_evicted_variant_is_counted_once(checkpoints):
    host, _ = _host(checkpoints)
    variant = asyncio.run(host.load("beta"))
    variant.__del__()  # Serve's multiplexer evicting it
    variant.__del__()  # Python, when the object goes
    report = host.report()
    assert report.evictions == ("beta",) and report.resident == ()
    assert host.stats()["evictions"] == 1


def test_a_variant_that_differs_from_its_base_or_cannot_load_is_its_callers_error(checkpoints):
    host, _ = _host(checkpoints)
    with pytest.raises(ModelNotReady, match="not a variant of 'embedding': pooling 'cls' where "
                                            "the base has 'mean'"):
        asyncio.run(host.load("cls-pooled"))
    with pytest.raises(ModelNotReady, match="variant 'checkpoint' failed to load"):
        asyncio.run(host.load("checkpoint"))
    with pytest.raises(ModelNotFound, match="has no variant 'gamma'"):
        asyncio.run(host.load("gamma"))
    assert [ok for _, _, ok in host.report().loads] == [False, False]
    assert host.stats()["failed_loads"] == 2 and host.resident == {}
    asyncio.run(host.load("alpha"))  # the host itself is fine


def test_a_cold_request_waits_for_the_load_only_so_long(checkpoints):
    host, base = _host(checkpoints, load_timeout_s=0.2)
    started = []

    async def go():
        release, loaded = asyncio.Event(), asyncio.Event()

        async def slow_load(name: str) -> Variant:  # a load that lasts until the test says
            started.append(name)
            await release.wait()
            variant = Variant(name, base, host)
            loaded.set()
            return variant

        with pytest.raises(ModelNotReady, match=r"still loading after 0.2s"):
            await asyncio.wait_for(host.get("alpha", slow_load), 10)
        # the caller gave up at its timeout, not when the load ended: the load still waits
        assert started == ["alpha"] and not loaded.is_set()
        release.set()
        await asyncio.wait_for(loaded.wait(), 10)  # the load went on without its first caller
        return await host.get("alpha", lambda name: asyncio.sleep(0, Variant(name, base,
                                                                               host)))

    assert asyncio.run(go()) is base
    assert started == ["alpha"]


def test_describe_a_variant_from_its_base(checkpoints):
    host, _ = _host(checkpoints)
    info = describe(host.base, "alpha", "/models/alpha")
    assert (info.name, info.model_id, info.variant_of) == ("alpha", "/models/alpha", "embedding")
    assert info.dim == host.base.dim and info.int8_ranges is None
    assert host.base.int8_ranges is not None  # the base calibrated when it warmed up
    assert differences(host.base, info) == []


def test_residency_follows_each_replicas_latest_report():
    r = Residency()
    assert r.holders("a") == ()
    r.update(VariantReport("base", "r2", ("a", "b")))
    r.update(VariantReport("base", "r1", ("a", "c")))
    r.update(None)
    assert r.holders("a") == ("r1", "r2") and r.holders("c") == ("r1",)
    r.update(VariantReport("base", "r1", ("b",)))
    assert r.holders("a") == ("r2",) and r.holders("b") == ("r1", "r2")


def test_a_replica_sends_back_a_variant_another_replica_holds(checkpoints):
    host, _ = _host(checkpoints)  # this replica: "replica-1"
    cache: dict[str, Variant] = {}  # what Serve's multiplexer keeps

    async def load(name: str) -> Variant:
        if name not in cache:
            cache[name] = await host.load(name)
        return cache[name]

    with pytest.raises(Misrouted, match="held by another replica"):
        asyncio.run(host.get("alpha", load, ("replica-2",)))
    assert host.stats()["loads"] == 0
    # told of no holder, or named among them (it held it once): it loads it
    assert asyncio.run(host.get("alpha", load, ())).engine.dim == 384
    assert asyncio.run(host.get("beta", load, ("replica-1", "replica-2"))).engine.dim == 384
    # held here: served whatever the ingress heard
    assert asyncio.run(host.get("alpha", load, ("replica-2",))) is cache["alpha"].model
    assert host.stats()["loads"] == 2


def test_a_variant_calibrates_once_on_its_first_int8_request(checkpoints):
    host, _ = _host(checkpoints)
    variant = asyncio.run(host.load("alpha")).model
    engine = variant.engine
    assert isinstance(engine, EmbeddingEngine)
    calls = []
    calibrate = engine.calibrate
    engine.calibrate = lambda: (calls.append(1), calibrate())  # type: ignore[method-assign]

    async def go():
        reqs = [EmbedRequest("alpha", tuple(TEXTS), encoding="int8") for _ in range(3)]
        return await asyncio.gather(*(variant.embed(r) for r in reqs))

    results = asyncio.run(go())
    assert calls == [1]
    st = SentenceTransformer(str(checkpoints["alpha"]), device="cpu")
    want = quantize_embeddings(st.encode(TEXTS), "int8",
                               calibration_embeddings=st.encode(CORPUS))
    for r in results:
        assert np.abs(r.embeddings.astype(int) - want.astype(int)).max() <= 1


def test_queues_sharing_a_replicas_threads_never_run_more_passes_than_it_has():
    running, most = [0], [0]
    lock = threading.Lock()

    def compute(seqs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return np.zeros((len(seqs), 2), dtype=np.float32)

    shared = ThreadPoolExecutor(1)
    queues = [BatchQueue(compute, 4, 1024, passes=2, executor=shared) for _ in range(3)]

    async def go():
        loop = asyncio.get_running_loop()
        works = [Work([[1, 2, 3]] * 3, loop.create_future()) for _ in range(12)]
        for i, w in enumerate(works):
            queues[i % 3].put([w])
        await asyncio.gather(*(w.future for w in works))

    asyncio.run(go())
    assert most[0] == 1


def test_variant_metrics_from_answers_and_errors():
    m = Metrics("ingress-1")
    m.observe_variants(VariantReport("base", "r1", ("a",), (("a", 1.5, True), ("b", 0.2, False)),
                                     ("c",)))
    err = ModelNotReady("variant 'b' failed to load")
    err.variants = VariantReport("base", "r2", (), (("b", 0.1, False),))
    m.observe_error("openai", "ModelNotReady", pickle.loads(pickle.dumps(err)).variants)
    s = scrape(m.render().decode())
    assert sample(s, "serve_app_variant_loads_total", model="a", outcome="loaded") == 1
    assert sample(s, "serve_app_variant_loads_total", model="b", outcome="failed") == 2
    assert sample(s, "serve_app_variant_load_seconds_sum", model="a") == 1.5
    assert sample(s, "serve_app_variant_evictions_total", model="c") == 1
    assert sample(s, "serve_app_variants_resident", model="base", model_replica="r1") == 1
    assert sample(s, "serve_app_variants_resident", model="base", model_replica="r2") == 0


def test_a_replica_holds_one_input_bound_for_its_base_and_variants(engine):
    shared = ReplicaResources.of(1, 5)
    base, variant = (ModelRunner(engine, name, shared=shared) for name in ("base", "variant"))
    with base._admit("base", 4):
        with pytest.raises(Overloaded, match="4 of 5 inputs held"), variant._admit("variant", 2):
            pass
        with variant._admit("variant", 1):
            assert (base.queued_inputs(), variant.queued_inputs()) == (4, 1)
    assert shared.admission.held == 0 and shared.admission.refused == 1


def test_a_rerankers_variants_score_as_their_own_checkpoints(cross_encoder, tmp_path):
    import torch
    import transformers
    from sentence_transformers import CrossEncoder

    base_dir = cross_encoder()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir)
    with torch.no_grad():
        for w in model.parameters():
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
    variant_dir = tmp_path / "ranker-ft"
    model.save_pretrained(variant_dir)
    for f in base_dir.iterdir():
        if not (variant_dir / f.name).exists():
            (variant_dir / f.name).symlink_to(f)
    cfg = ModelConfig(name="ranker", model_id=str(base_dir), task="rerank",
                      variants={"models": [str(variant_dir)]})
    shared = ReplicaResources.of(1, 4096)
    base = ModelRunner(RerankEngine(cfg, num_threads=1), "ranker", shared=shared)

    def build(variant: ModelConfig) -> ModelRunner:
        return ModelRunner(RerankEngine(variant, num_threads=1), variant.name, shared=shared)

    host = VariantHost(cfg, base.engine.info("ranker", "1"), build)
    docs = ("cats eat meat", "stocks fell")

    async def go():
        variant = await host.load("ranker-ft")
        return await variant.model.rerank(RerankRequest("ranker-ft", "what do cats eat", docs))

    scores = asyncio.run(go()).scores
    want = CrossEncoder(str(variant_dir), device="cpu").predict(
        [("what do cats eat", d) for d in docs])
    np.testing.assert_allclose(scores, want, atol=1e-5)
    assert describe(host.base, "ranker-ft", str(variant_dir)).task == "rerank"
