"""Hold under bad input, overload and faults: the default entry point (``python -m serve_app``,
the model inside the ingress replica) on loopback with small limits.

- Bad input, a sample of each protocol's cases of the matrix (all of which
  tests/test_bad_input.py runs in process): each gets its 4xx (or gRPC code) in the protocol's
  own error format, and the server then still answers a normal request correctly.
- The bulk client through the server's 429s (its other runs: tests/test_e2e_bulk.py).
- Overload: far more concurrent work than the queue bound; the excess gets 429 at once, every
  accepted request succeeds, and memory returns to its baseline.
- Fault: the model's process is killed under load; no request gets a 500 or hangs, only the
  requests that process was serving go unanswered, and the model recovers to 100% success.
- Soak (opt-in, ``--soak-seconds N``): steady load, zero errors, RSS flat.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter

import grpc
import httpx
import numpy as np
import pytest

from serve_app.frontend.v2.proto import inference_pb2_grpc as pb_grpc
from tests.helpers import (
    HTTP_CASES,
    LONG,
    OAI,
    SENTENCE,
    check_bad_http_case,
    grpc_cases,
    infer_request,
    settle_rss,
)

pytestmark = pytest.mark.e2e

@pytest.fixture(scope="module")
def server(robust_server):
    """tests/conftest.py's robust_server: the model inside the ingress replica, small limits."""
    return robust_server


@pytest.fixture(scope="module")
def reference(engine):
    return engine.embed([SENTENCE])[0][0]


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


# -- the bad-input matrix, by sample --------------------------------------------------------------
# Every case runs in process (tests/test_bad_input.py); through the real server, each protocol's
# error shape, the replica-side checks and the body limits (HAProxy and Serve in front).

HTTP_SAMPLES = ["oai-malformed-json", "oai-token-id-out-of-vocab", "oai-oversize-body",
                "oai-wrong-method", "v1-instances-empty", "v1-gzip-bomb", "v2-datatype-fp32",
                "v2-binary-invalid-utf8", "v2-oversize-body", "v2-unknown-model",
                "tei-malformed-json", "tei-inputs-empty-list", "tei-oversize-body",
                "tei-predict-no-classifier", "tei-predict-three-strings",
                "oai-classify-no-classifier"]
GRPC_SAMPLES = ["grpc-empty-input", "grpc-invalid-utf8-raw", "grpc-no-truncate",
                "grpc-unknown-model", "grpc-oversize"]
HTTP_SAMPLE_CASES = [c for c in HTTP_CASES if c[0] in HTTP_SAMPLES]
GRPC_SAMPLE_CASES = [c for c in grpc_cases() if c[0] in GRPC_SAMPLES]


def assert_still_serving(http: httpx.Client, reference: np.ndarray) -> None:
    r = http.post(OAI, json={"model": "embedding", "input": SENTENCE})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], reference, atol=1e-5)


@pytest.mark.parametrize("case", HTTP_SAMPLE_CASES, ids=[c[0] for c in HTTP_SAMPLE_CASES])
def test_bad_http_input_gets_its_4xx_and_the_server_keeps_serving(http, reference, case):
    check_bad_http_case(http, reference, case)


@pytest.mark.parametrize("case", GRPC_SAMPLE_CASES, ids=[c[0] for c in GRPC_SAMPLE_CASES])
def test_bad_grpc_input_gets_its_code_and_the_server_keeps_serving(stub, reference, case):
    _, request, code = case
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(request, timeout=30)
    assert e.value.code() == code and e.value.details()
    ok = stub.ModelInfer(infer_request([SENTENCE], raw=True), timeout=30)
    np.testing.assert_allclose(np.frombuffer(ok.raw_output_contents[0], "<f4"), reference,
                               atol=1e-5)


def test_start_up_progress_is_logged_in_order(server):
    text = server.log.read_text(errors="replace")
    steps = ["model 'embedding': starting", "resolving sentence-transformers/all-MiniLM-L6-v2",
             "resolved sentence-transformers/all-MiniLM-L6-v2 to", "loaded sentence-transformers",
             "model 'embedding': warming up", "model 'embedding': warmed up in"]
    at = [text.find(step) for step in steps]
    assert all(i >= 0 for i in at), dict(zip(steps, at, strict=True))
    assert at == sorted(at)
    assert "ready after" in text[at[-1]:].splitlines()[0]


def test_request_id_is_echoed_once_through_serve(http):
    r = http.post(OAI, json={"model": "embedding", "input": "x"}, headers={"x-request-id": "r-42"})
    assert r.headers.get_list("x-request-id") == ["r-42"]
    r = http.post(OAI, json={"model": "embedding", "input": ""})
    (rid,) = r.headers.get_list("x-request-id")
    assert rid


async def held_by_the_replica(c: httpx.AsyncClient, inputs: int, busy: asyncio.Task) -> None:
    """Until the model's replica holds ``inputs`` inputs (the ``busy`` request, admitted) and
    computes them: tokenized, none left waiting for a pass, a pass running."""
    started = time.monotonic()

    async def computing() -> bool:
        s = (await c.get("/v2/models/embedding/stats")).json()["model_stats"][0]
        return (s["queued_inputs"] >= inputs and s["running_passes"] > 0
                and not s["queued_by_priority"])

    while not await computing():
        assert not busy.done() and time.monotonic() - started < 60
        await asyncio.sleep(0.02)  # polling interval


def test_health_answers_while_the_model_computes(server, http):
    """Probes never queue behind inference: live and ready answer while a long request is
    still being computed."""

    async def main() -> tuple[list[int], bool]:
        async with httpx.AsyncClient(base_url=server, timeout=60) as c:
            busy = asyncio.create_task(c.post(OAI, json={"model": "embedding",
                                                         "input": [LONG] * 48}))
            await held_by_the_replica(c, 48, busy)
            codes = [(await c.get(path)).status_code
                     for path in ("/v2/health/live", "/v2/health/ready", "/",
                                  "/v2/models/embedding/ready")]
            still_running = not busy.done()
            assert (await busy).status_code == 200
            return codes, still_running

    codes, still_running = asyncio.run(main())
    assert codes == [200, 200, 200, 200]
    assert still_running  # the probes were answered before the long request finished


# -- the bulk client against the small queue ---------------------------------------------------

@pytest.fixture(scope="module")
def corpus(bulk_corpus):
    return bulk_corpus


def test_client_cli_embeds_a_file_in_order_through_429s(server, corpus, tmp_path):
    """3 batches of 32 in flight against a queue of 64 inputs: the server refuses some with
    429, the client backs off and retries, and every row comes out once, in order."""
    import subprocess
    import sys

    path, _, expected = corpus
    out = tmp_path / "vectors.npy"
    run = subprocess.run(
        [sys.executable, "-m", "serve_app.tools.client", str(path), str(out), "--url", server,
         "--batch-size", "32", "--concurrency", "3", "--no-progress"],
        capture_output=True, text=True, timeout=600, check=True)
    report = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"client: {report}")
    assert report["inputs"] == 3000 and report["batches"] == 94 and report["retries"] > 0
    vectors = np.load(out)
    assert vectors.shape == (3000, 384)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert not (tmp_path / "vectors.npy.partial").exists()


# -- overload ----------------------------------------------------------------------------------

async def flood(url: str, n: int, inputs: int) -> list[tuple[int, float, dict | None, dict]]:
    """``n`` requests at once, each of ``inputs`` texts: (status, seconds, body, headers)."""
    texts = [f"flood text number {i} with a few words" for i in range(inputs)]
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        async def one() -> tuple[int, float, dict | None, dict]:
            t0 = time.perf_counter()
            r = await c.post(OAI, json={"model": "embedding", "input": texts})
            return r.status_code, time.perf_counter() - t0, r.json(), dict(r.headers)

        return await asyncio.gather(*(one() for _ in range(n)))


def test_overload_gets_fast_429s_accepted_requests_succeed_memory_returns(server, http,
                                                                          reference):
    for _ in range(3):  # warm every path once, so the baseline is the steady state
        asyncio.run(flood(server, 8, 8))
    baseline = settle_rss(server)
    results = []
    for _ in range(3):
        results += asyncio.run(flood(server, 200, 16))  # 3200 inputs at once vs a queue of 64
    statuses = Counter(s for s, *_ in results)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[429] > statuses[200] > 0, statuses
    ok = [(t, b) for s, t, b, _ in results if s == 200]
    refused = [(t, b, h) for s, t, b, h in results if s == 429]
    for _, body in ok:
        assert len(body["data"]) == 16 and len(body["data"][0]["embedding"]) == 384
    for _, body, headers in refused:
        assert headers["retry-after"] == "1"
        assert "queue limit" in body["error"]["message"]
    # refusals do not queue: the median refusal returns well before the median success
    assert np.median([t for t, *_ in refused]) < np.median([t for t, _ in ok])
    after = settle_rss(server)
    print(f"overload: {dict(statuses)}; 429 p50 {np.median([t for t, *_ in refused]) * 1e3:.0f}"
          f" ms, 200 p50 {np.median([t for t, _ in ok]) * 1e3:.0f} ms; RSS "
          f"{baseline / 2**20:.0f} -> {after / 2**20:.0f} MiB")
    assert after < baseline * 1.10, (baseline, after)
    assert_still_serving(http, reference)


def test_a_request_deadline_is_kept_while_the_model_is_busy(server, http):
    """A request queued behind a long forward pass gives up at its deadline (504), and its
    work is dropped in the replica instead of being computed for nobody."""

    def dropped() -> int:
        return http.get("/v2/models/embedding/stats").json()["model_stats"][0]["dropped"]

    before = dropped()

    async def main() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=server, timeout=60) as c:
            busy = asyncio.create_task(c.post(OAI, json={"model": "embedding",
                                                         "input": [LONG] * 32}))
            await held_by_the_replica(c, 32, busy)
            late = await c.post(OAI, json={"model": "embedding", "input": ["late"] * 32},
                                headers={"x-request-timeout": "0.05"})
            return await busy, late

    busy, late = asyncio.run(main())
    assert busy.status_code == 200
    assert late.status_code == 504, late.text
    assert late.headers["retry-after"] == "1"
    assert "deadline" in late.json()["error"]["message"]
    assert dropped() - before == 32


# -- fault: the model replica dies under load --------------------------------------------------

async def steady_load(url: str, stop: asyncio.Event, clients: int, deadline_s: float,
                      log: list[tuple[float, int, float]]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=deadline_s + 5) as c:
        async def client(i: int) -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = await c.post(OAI, json={"model": "embedding", "input": f"text {i}"},
                                     headers={"x-request-timeout": str(deadline_s)})
                    status = r.status_code
                except httpx.HTTPError:
                    status = -1  # no answer at all
                log.append((time.monotonic(), status, time.perf_counter() - t0))
                if status != 200:
                    await asyncio.sleep(0.2)  # what a client does on a retryable error

        await asyncio.gather(*(client(i) for i in range(clients)))


def test_replica_killed_under_load_fails_cleanly_and_recovers(server, http, reference):
    """The process holding the model dies under load. In the colocated default that process is
    the ingress replica itself: the requests it was serving lose their connection (nothing is
    left to answer them), as do those sent in the instant before HAProxy sees it gone, and the
    rest are held by Serve's fallback proxy until Serve's
    replacement serves (each answered, none with a 500). With a separate model deployment the
    ingress answers 503 at once and keeps every deadline."""
    deadline_s = 8.0
    log: list[tuple[float, int, float]] = []
    colocated = not server.processes_named("ServeReplica:serve_app:model-embedding")

    async def main() -> float:
        stop = asyncio.Event()
        load = asyncio.create_task(steady_load(server, stop, 6, deadline_s, log))
        started = time.monotonic()
        while sum(s == 200 for _, s, _ in log) < 30:  # the load runs: 30 answers
            assert not load.done() and time.monotonic() - started < 60, log[-3:]
            await asyncio.sleep(0.05)  # polling interval
        (replica,) = (server.processes_named("ServeReplica:serve_app:model-embedding")
                      or server.processes_named("ServeReplica:serve_app:Ingress"))
        killed_at = time.monotonic()
        os.kill(replica.pid, signal.SIGKILL)
        # run on until 5 s in a row have been all successes (the replacement serves), or 120 s
        while time.monotonic() - killed_at < 120:
            await asyncio.sleep(1)
            window = [s for t, s, _ in log if t > max(killed_at + 1, time.monotonic() - 5)]
            if time.monotonic() - killed_at > 8 and len(window) > 10 and set(window) == {200}:
                break
        stop.set()
        await load
        return killed_at

    killed_at = asyncio.run(main())
    statuses = Counter(s for _, s, _ in log)
    failed = [(t - killed_at, s) for t, s, _ in log if s != 200]
    recovery = max((t for t, _ in failed), default=0.0)
    print(f"fault ({'colocated' if colocated else 'separate'}): {dict(statuses)} over "
          f"{len(log)} requests; last failure {recovery:.1f}s after the kill; slowest request "
          f"{max(d for *_, d in log):.1f}s")
    assert set(statuses) <= {200, 503, 504, -1}, statuses  # retryable, never a 500
    if colocated:
        # Unanswered: the requests the dead process was serving, and those HAProxy sent it in
        # the moment before it saw the process gone (they fail at once). None sent later.
        lost = [(t, d) for t, s, d in log if s == -1]
        assert all(t - d <= killed_at + 0.5 for t, d in lost), lost
    else:
        assert -1 not in statuses
        assert max(d for _, _, d in log) <= deadline_s + 2  # nobody waited past the deadline
    last = [s for t, s, _ in log if t > log[-1][0] - 5]
    assert len(last) > 10 and set(last) == {200}, Counter(last)  # recovered to 100%
    assert http.get("/v2/health/ready").status_code == 200
    assert_still_serving(http, reference)


# -- soak (opt-in) -----------------------------------------------------------------------------

def test_soak_steady_load_zero_errors_flat_memory(server, request):
    seconds = request.config.getoption("--soak-seconds")
    if not seconds:
        pytest.skip("soak runs only with --soak-seconds N")
    log: list[tuple[float, int, float]] = []
    rss: list[int] = []

    async def main() -> None:
        stop = asyncio.Event()
        load = asyncio.create_task(steady_load(server, stop, 8, 30, log))
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            await asyncio.sleep(5)
            rss.append(server.rss_bytes())
        stop.set()
        await load

    asyncio.run(main())
    statuses = Counter(s for _, s, _ in log)
    quarter = rss[len(rss) // 4]
    print(f"soak: {len(log)} requests in {seconds}s, {dict(statuses)}; RSS at 1/4 "
          f"{quarter / 2**20:.0f} MiB, end {rss[-1] / 2**20:.0f} MiB, "
          f"max {max(rss) / 2**20:.0f} MiB")
    assert set(statuses) == {200}, statuses
    assert rss[-1] < quarter * 1.10
