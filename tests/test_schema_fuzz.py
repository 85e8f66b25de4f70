"""Schema fuzzing: schemathesis generates requests from the app's own OpenAPI document, valid
and invalid (its positive and negative modes), for every operation; none may get a 5xx. The real
engine (a tiny model) serves them, so generated inputs really reach a model."""

from __future__ import annotations

import contextlib

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from serve_app.config.schema import LimitOptions, ModelConfig
from serve_app.engine.embedding import EmbeddingEngine
from serve_app.frontend.context import ServerContext
from serve_app.frontend.http.app import create_http_app
from tests.helpers import make_dataplane, replica


@pytest.fixture(scope="module")
def schema(tiny_model):
    engine = EmbeddingEngine(ModelConfig(model_id=str(tiny_model(pooling="mean"))))
    limits = LimitOptions(max_inputs_per_request=64, max_body_bytes=65536)
    dataplane = make_dataplane({"embedding": replica(engine)}, limits=limits)
    context = ServerContext(max_body_bytes=limits.max_body_bytes)
    return schemathesis.openapi.from_asgi("/openapi.json", create_http_app(dataplane, context))


def operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


def fuzz(op, mode: GenerationMode, seen: dict[str, set[int]]) -> None:
    """Run hypothesis over ``op``'s generated cases, recording the statuses seen."""

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=25, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        if mode == GenerationMode.POSITIVE:  # aim valid requests at the served model
            params = case.path_parameters or {}
            if "name" in params:
                params["name"] = "embedding"
            if "version" in params:
                params["version"] = "1"
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = "embedding"
        response = case.call()
        seen.setdefault(op.label, set()).add(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])

    run()


def test_every_operation_is_fuzzed_without_a_5xx(schema):
    ops = operations(schema)
    assert len(ops) >= 18  # every route of the three protocols is in the document
    seen: dict[str, set[int]] = {}
    for op in ops:
        fuzz(op, GenerationMode.POSITIVE, seen)
        with contextlib.suppress(Unsatisfiable):  # nothing to break in a route without inputs
            fuzz(op, GenerationMode.NEGATIVE, seen)
    print({label: sorted(codes) for label, codes in seen.items()})
    assert set(seen) == {op.label for op in ops}
    assert all(code < 500 for codes in seen.values() for code in codes)
