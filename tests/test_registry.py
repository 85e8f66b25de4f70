"""The model registry (frontend.registry) and the request pipeline (frontend.pipeline), without
Ray or HTTP: the registry a config builds, one lookup per request, and what a Call reads from
its transport and counts."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from serve_app.config.schema import AppConfig, ModelConfig
from serve_app.errors import InvalidInput, ModelNotFound
from serve_app.frontend.dataplane import DataPlane
from serve_app.frontend.metrics import Metrics
from serve_app.frontend.pipeline import Call
from serve_app.frontend.registry import Registry, ServedModel, build_registry
from serve_app.types import EmbedRequest, RerankRequest
from tests.helpers import FakeBackend, make_variants, sample, scrape


def _cfg(*models: dict[str, Any], **kw: Any) -> AppConfig:
    return AppConfig.model_validate({"models": list(models), **kw})


def test_build_registry_puts_each_names_default_version_first():
    cfg = _cfg({"name": "e", "version": "1"}, {"name": "e", "version": "2", "default": True},
               {"name": "r", "task": "rerank"}, {"name": "e", "version": "3"})
    made: list[tuple[str, str]] = []

    def backend_of(m: ModelConfig) -> FakeBackend:
        made.append((m.name, m.version))
        return FakeBackend(m.name)

    registry = build_registry(cfg, backend_of)
    assert sorted(made) == [("e", "1"), ("e", "2"), ("e", "3"), ("r", "1")]  # one backend each
    assert registry.names == ["e", "r"]
    assert registry.get("e").version == "2"  # the one marked default
    assert registry.versions("e") == ["2", "1", "3"]
    assert registry.get("e", "3").task == "embedding" and registry.get("r").task == "rerank"
    assert [m.name for m in registry] == ["e", "e", "e", "r"]
    assert registry.of_task("rerank") == ["r"] and registry.reranker(None) == "r"


def test_build_registry_serves_each_variant_under_its_own_name(tmp_path, minilm_dir):
    make_variants(minilm_dir, tmp_path, ["alpha", "beta"])
    cfg = _cfg({"name": "base", "variants": {"directory": str(tmp_path)}})
    seen = []

    def variant_of(m, name, source, base):
        seen.append((m.name, name, source, base))
        return FakeBackend(name)

    registry = build_registry(cfg, lambda m: FakeBackend(m.name), variant_of)
    assert registry.names == ["base", "alpha", "beta"]
    assert registry.get("alpha").variant_of == "base" and registry.get("base").variant_of is None
    assert [s[:2] for s in seen] == [("base", "alpha"), ("base", "beta")]
    base = registry.get("base").backend
    assert all(s[3] is base for s in seen)  # each variant's backend is given its base's
    assert registry.get("alpha").backend is not base
    with pytest.raises(ValueError, match="deployment of its own"):
        build_registry(cfg, lambda m: FakeBackend(m.name))


def test_lookups_name_what_is_served():
    registry = Registry.of({"a": FakeBackend("a")}, others={("a", "7"): FakeBackend("a7")})
    with pytest.raises(ModelNotFound, match=r"served models: \['a'\]"):
        registry.get("b")
    with pytest.raises(ModelNotFound, match=r"versions: \['1', '7'\]"):
        registry.get("a", "9")
    with pytest.raises(InvalidInput, match="no reranker"):
        registry.reranker(None)
    with pytest.raises(ValueError, match="twice"):
        Registry([ServedModel("a", "1", "embedding", FakeBackend()),
                  ServedModel("a", "1", "embedding", FakeBackend())])


class CountingRegistry(Registry):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.lookups = 0

    def get(self, name: str, version: str | None = None) -> ServedModel:
        self.lookups += 1
        return super().get(name, version)


def test_a_request_through_the_pipeline_looks_its_model_up_once():
    registry = CountingRegistry([ServedModel("m", "1", "embedding", FakeBackend("m", dim=4))])
    call = Call(DataPlane(registry), Metrics(), "openai")
    call.find("m")
    result = asyncio.run(call.embed_dense(EmbedRequest("m", ("hello", "world"))))
    vectors = result.embeddings
    assert registry.lookups == 1
    assert vectors.shape == (2, 4) and vectors.dtype == np.float32
    assert result.prompt_tokens == len("hello") + len("world")


def test_a_call_reads_its_transport_and_the_body_wins():
    call = Call(DataPlane(Registry([])), Metrics(), "v2", timeout_s=5.0, priority_text="3",
                priority_where="header X-Priority")
    assert call.priority() == 3 and call.priority(7) == 7
    now = time.time()
    deadline = call.deadline()
    assert deadline is not None and now + 4.5 < deadline <= time.time() + 5.0
    given = call.deadline(0.5)
    assert given is not None and given <= time.time() + 0.5
    with pytest.raises(InvalidInput, match="header X-Priority"):
        Call(DataPlane(Registry([])), Metrics(), "v2", priority_text="high",
             priority_where="header X-Priority").priority()
    assert Call(DataPlane(Registry([])), Metrics(), "v2").priority() == 0
    assert Call(DataPlane(Registry([])), Metrics(), "v2").deadline() is None


def test_an_answer_is_counted_under_its_protocol_and_timed():
    metrics = Metrics()
    registry = Registry([ServedModel("m", "1", "embedding", FakeBackend("m")),
                         ServedModel("r", "1", "rerank", FakeBackend("r"))])
    call = Call(DataPlane(registry), metrics, "v2_grpc")
    result = asyncio.run(call.run(EmbedRequest("m", ("abc",))))
    out = call.answer("m", result, lambda: "rendered", priority=2)
    assert out == "rendered" and call.model == "m"
    assert call.timings is not None and call.timings["x-compute-tokens"] == "3"
    assert set(call.timings) == {"x-compute-tokens", "x-tokenization-time", "x-queue-time",
                                 "x-inference-time", "x-compute-time", "x-total-time"}
    assert sample(scrape(metrics.render().decode()), "serve_app_embedded_inputs_total",
                  model="m", protocol="v2_grpc") == 1
    with pytest.raises(InvalidInput, match="is an embedding model"):
        asyncio.run(call.run(RerankRequest("m", "q", ("d",))))
