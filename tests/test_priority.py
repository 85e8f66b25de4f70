"""Priorities from every protocol to the queue: the body field (OpenAI, V1, rerank), the V2
parameter (REST and gRPC), the X-Priority header (any route; gRPC metadata), their errors, and
the metrics per level. The queue's order itself is tested in test_scheduler."""

from __future__ import annotations

import grpc
import pytest

from serve_app.frontend.context import ServerContext
from serve_app.frontend.metrics import Metrics
from tests.helpers import (
    FakeBackend,
    app_client,
    grpc_serving,
    infer_request,
    make_dataplane,
    sample,
    scrape,
)

OAI = "/v1/embeddings"
V1 = "/v1/models/embedding:predict"
V2 = "/v2/models/embedding/infer"


def _v2(**params):
    return {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
            "parameters": params}


@pytest.fixture()
def fake():
    return FakeBackend("embedding")


@pytest.mark.parametrize(
    "path, body, headers, level",
    [
        (OAI, {"model": "embedding", "input": "a"}, {}, 0),
        (OAI, {"model": "embedding", "input": "a", "priority": 5}, {}, 5),
        (OAI, {"model": "embedding", "input": "a"}, {"X-Priority": "7"}, 7),
        (OAI, {"model": "embedding", "input": "a", "priority": 2}, {"X-Priority": "7"}, 2),
        (V1, {"instances": ["a"], "priority": 3}, {}, 3),
        (V1, {"instances": ["a"]}, {"x-priority": "9"}, 9),
        (V2, _v2(priority=4), {}, 4),
        (V2, _v2(), {"X-Priority": "6"}, 6),
        (V2, _v2(priority=1), {"X-Priority": "6"}, 1),
    ],
)
def test_every_route_takes_a_priority(fake, path, body, headers, level):
    with app_client({"embedding": fake}) as c:
        r = c.post(path, json=body, headers=headers)
    assert r.status_code == 200, r.text
    assert fake.requests[-1].priority == level


@pytest.mark.parametrize(
    "path, body, headers, message",
    [
        (OAI, {"model": "embedding", "input": "a", "priority": -1}, {}, "priority must be"),
        (OAI, {"model": "embedding", "input": "a", "priority": 1001}, {}, "priority must be"),
        (OAI, {"model": "embedding", "input": "a"}, {"X-Priority": "high"}, "X-Priority"),
        (V1, {"instances": ["a"], "priority": True}, {}, "priority must be"),
        (V2, _v2(priority="1"), {}, "parameter 'priority'"),
        (V2, _v2(), {"X-Priority": "-3"}, "X-Priority"),
    ],
)
def test_a_bad_priority_is_a_400_in_the_protocols_shape(fake, path, body, headers, message):
    with app_client({"embedding": fake}) as c:
        r = c.post(path, json=body, headers=headers)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in (err["message"] if isinstance(err, dict) else err)
    assert not fake.requests


def test_grpc_takes_the_parameter_then_the_metadata(fake):
    with grpc_serving(make_dataplane({"embedding": fake})) as stub:
        req = infer_request(["a"])
        req.parameters["priority"].int64_param = 4
        stub.ModelInfer(req, metadata=(("x-priority", "8"),))
        stub.ModelInfer(infer_request(["a"]), metadata=(("x-priority", "8"),))
        stub.ModelInfer(infer_request(["a"]))
        assert [r.priority for r in fake.requests] == [4, 8, 0]
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(infer_request(["a"]), metadata=(("x-priority", "low"),))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_metrics_show_waiting_time_and_inputs_per_level(fake):
    metrics = Metrics("r1")
    dp = make_dataplane({"embedding": fake})
    with app_client(dp, metrics=metrics) as c:
        for level in (0, 10, 10):
            assert c.post(OAI, json={"model": "embedding", "input": ["a", "b"],
                                     "priority": level}).status_code == 200
        samples = scrape(c.get("/metrics").text)
    waits = "serve_app_priority_queue_seconds_count"
    assert sample(samples, waits, model="embedding", priority="1") == 1  # 0 is level 1
    assert sample(samples, waits, model="embedding", priority="10") == 2
    assert sample(samples, "serve_app_priority_inputs", model="embedding", priority="10") == 0
    with grpc_serving(dp, ServerContext(metrics)) as stub:
        stub.ModelInfer(infer_request(["a"]), metadata=(("x-priority", "3"),))
    assert sample(scrape(metrics.render().decode()), waits, model="embedding",
                  priority="3") == 1


def test_v2_statistics_show_texts_waiting_per_level():
    class Busy(FakeBackend):
        async def stats(self):
            return {"texts": 0, "passes": 0, "batches": [], "queued_by_priority": {1: 2, 10: 64}}

    with app_client({"embedding": Busy("embedding")}) as c:
        stats = c.get("/v2/models/embedding/stats").json()["model_stats"][0]
    assert stats["queued_by_priority"] == {"1": 2, "10": 64}
