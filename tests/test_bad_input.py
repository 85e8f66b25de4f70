"""The bad-input matrix (tests/helpers.py) in process: every case of every protocol through the
real HTTP app and the real gRPC servicer over the real default model (the data plane, the
replica and its queue a Serve replica runs, under the robustness server's limits), without
Ray. Each case gets its 4xx (or gRPC code) in the protocol's own error format, and the app
then still answers a normal request correctly. tests/test_robustness.py sends a sample of each
protocol's cases to the real server."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from serve_app.config.schema import LimitOptions
from serve_app.frontend.context import ServerContext
from tests.helpers import (
    HTTP_CASES,
    ROBUST_LIMITS,
    SENTENCE,
    app_client,
    check_bad_http_case,
    grpc_cases,
    grpc_serving,
    infer_request,
    make_dataplane,
    replica,
)

LIMITS = LimitOptions(**ROBUST_LIMITS)
GRPC_CASES = grpc_cases()


@pytest.fixture(scope="module")
def reference(engine):
    return engine.embed([SENTENCE])[0][0]


@pytest.fixture(scope="module")
def client(engine):
    with app_client({"embedding": replica(engine)}, limits=LIMITS) as c:
        yield c


@pytest.fixture(scope="module")
def stub(engine):
    dataplane = make_dataplane({"embedding": replica(engine)}, limits=LIMITS)
    with grpc_serving(dataplane, ServerContext(max_body_bytes=LIMITS.max_body_bytes)) as s:
        yield s


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_bad_http_input_gets_its_4xx_and_the_app_keeps_serving(client, reference, case):
    check_bad_http_case(client, reference, case)


@pytest.mark.parametrize("case", GRPC_CASES, ids=[c[0] for c in GRPC_CASES])
def test_bad_grpc_input_gets_its_code_and_the_servicer_keeps_serving(stub, reference, case):
    _, request, code = case
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(request)
    assert e.value.code() == code and e.value.details()
    ok = stub.ModelInfer(infer_request([SENTENCE], raw=True))
    np.testing.assert_allclose(np.frombuffer(ok.raw_output_contents[0], "<f4"), reference,
                               atol=1e-5)
