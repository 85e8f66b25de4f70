"""A real multi-node Ray cluster on this machine: replicas pinned to a node by a custom resource,
that node removed and replaced, and Serve autoscaling under a bounded load.

Every node is a ``ray start --block`` process of its own (stopped by pid), with a private temp dir
(so nothing else on the machine joins this cluster). Token authentication is off for this
short-lived test cluster: Ray reads the token once per process, and this test process, which
imported Ray long before, joins as a driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from tests.helpers import BIN, SENTENCE, free_port, stop_process, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]



@dataclass
class Cluster:
    gcs: str
    env: dict[str, str]
    temp_dir: str
    http_port: int
    nodes: list[subprocess.Popen] = field(default_factory=list)

    def add_node(self, *args: str) -> subprocess.Popen:
        cmd = [str(BIN / "ray"), "start", f"--address={self.gcs}", "--node-ip-address=127.0.0.1",
               f"--dashboard-agent-listen-port={free_port()}",
               f"--metrics-export-port={free_port()}", "--block", *args]
        log = open(os.path.join(self.temp_dir, f"node{len(self.nodes)}.log"), "wb")  # noqa: SIM115
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.nodes.append(proc)
        return proc

    def alive_nodes(self) -> int:
        import ray

        return sum(1 for n in ray.nodes() if n["Alive"])


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    import ray
    from ray import serve

    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live here
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    c = Cluster(gcs=f"127.0.0.1:{port}", env=env, temp_dir=temp_dir, http_port=free_port())
    head_log = open(os.path.join(temp_dir, "head.log"), "wb")  # noqa: SIM115
    c.nodes.append(subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=1", "--include-dashboard=false", f"--temp-dir={temp_dir}",
         f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
         "--block"],
        env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        # Ask `ray status` (a separate process) until the head answers, then join once: a failed
        # ray.init leaves state behind that spoils later attempts in this process. (Each ask
        # imports Ray: ask once the GCS port takes connections.)
        wait_for(lambda: listening(port), 90, "the head's GCS port", interval=0.1)
        wait_for(lambda: subprocess.run([str(BIN / "ray"), "status", f"--address={c.gcs}"],
                                        env=env, capture_output=True).returncode == 0,
                 90, "the head node to answer", interval=1)
        ray.init(address=c.gcs, _node_ip_address="127.0.0.1", logging_level="ERROR",
                 log_to_driver=False)
        c.add_node("--num-cpus=2", '--resources={"model_node": 1}')
        wait_for(lambda: c.alive_nodes() == 2, 60, "two live nodes")
        serve.start(http_options={"host": "127.0.0.1", "port": c.http_port},
                    proxy_location="HeadOnly")
        yield c
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        for proc in reversed(c.nodes):
            stop_process(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return 0
    states = status.deployments[deployment].replica_states
    return sum(n for s, n in states.items() if str(getattr(s, "value", s)) == "RUNNING")


def test_serve_autoscales_the_model_up_and_back_down(cluster, small_corpus):
    """Under a bounded load the model deployment grows from 1 replica, then shrinks back."""
    from ray import serve

    from serve_app.serve.app import build_app

    app = build_app({"models": [{"name": "embedding", "calibration_corpus": small_corpus,
                                 "deployment": {
        "num_replicas": None, "num_cpus": 0.5,
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2,
                               "target_ongoing_requests": 1, "upscale_delay_s": 1,
                               "downscale_delay_s": 3, "look_back_period_s": 2,
                               "metrics_interval_s": 0.5}}}]})
    serve.run(app, name="autoscale", route_prefix="/autoscale")
    url = f"http://127.0.0.1:{cluster.http_port}/autoscale/v1/models/embedding:predict"
    assert running_replicas("autoscale", "model-embedding-v1") == 1
    texts = [f"{SENTENCE} {i} " * 20 for i in range(32)]  # ~32 x 180 tokens: busy requests
    peak = {"replicas": 1}

    async def load(stop: asyncio.Event) -> int:
        async with httpx.AsyncClient(timeout=60) as client:
            async def worker() -> int:
                ok = 0
                while not stop.is_set():
                    r = await client.post(url, json={"instances": texts})
                    assert r.status_code == 200, r.text
                    ok += 1
                return ok

            tasks = [asyncio.create_task(worker()) for _ in range(6)]
            deadline = time.monotonic() + 90  # bounded: at most 90 s of load
            while time.monotonic() < deadline:
                n = await asyncio.to_thread(running_replicas, "autoscale", "model-embedding-v1")
                peak["replicas"] = max(peak["replicas"], n)
                if n >= 2:
                    break
                await asyncio.sleep(1)
            stop.set()
            return sum(await asyncio.gather(*tasks))

    done = asyncio.run(load(asyncio.Event()))
    assert done > 0
    assert peak["replicas"] == 2, "the model deployment did not scale up under load"
    wait_for(lambda: running_replicas("autoscale", "model-embedding-v1") == 1, 90,
             "scaling back down to 1 replica after the load stopped", interval=1)
    serve.delete("autoscale")


def test_replicas_pinned_to_a_node_and_what_users_see_when_it_goes(cluster, engine,
                                                                   small_corpus):
    import numpy as np
    import ray
    from ray import serve

    from serve_app.serve.app import build_app

    app = build_app({
        "models": [{"name": "embedding", "calibration_corpus": small_corpus,
                    "deployment": {"num_cpus": 1, "resources": {"model_node": 1}}}],
        "ingress": {"request_timeout_s": 10},
    })
    serve.run(app, name="serve_app", route_prefix="/")
    base = f"http://127.0.0.1:{cluster.http_port}"
    # Generous timeouts where waiting is not what is tested: 2 cores carry two nodes here.
    r = httpx.post(f"{base}/v1/embeddings", json={"model": "embedding", "input": SENTENCE},
                   timeout=60)
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()["data"][0]["embedding"],
                               engine.embed([SENTENCE])[0][0], atol=1e-6)
    # Only the second node has `model_node`, and the replica holds it.
    holders = [n for n in ray.nodes() if n["Alive"] and "model_node" in n["Resources"]]
    assert len(holders) == 1
    assert ray.available_resources().get("model_node", 0) == 0

    stop_process(cluster.nodes[1])  # the model's node goes away
    wait_for(lambda: cluster.alive_nodes() == 1, 60, "the node to leave the cluster")

    # What a user sees: quick, retryable 503s in each protocol's shape, never a hang, and
    # readiness that says so.
    def unavailable() -> bool:
        ready = httpx.get(f"{base}/v2/health/ready", timeout=30)
        return ready.status_code == 503 and ready.json() == {"ready": False}

    wait_for(unavailable, 30, "readiness to turn false")
    for _ in range(3):
        t0 = time.monotonic()
        r = httpx.post(f"{base}/v1/embeddings", json={"model": "embedding", "input": "hi"},
                       timeout=15)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "server_error" and r.headers["retry-after"]
        assert "no running replica" in r.json()["error"]["message"]
        assert time.monotonic() - t0 < 5
    v1 = httpx.post(f"{base}/v1/models/embedding:predict", json={"instances": ["hi"]},
                    timeout=15)
    assert v1.status_code == 503 and "error" in v1.json()
    assert httpx.get(f"{base}/v2/health/live", timeout=15).json() == {"live": True}

    # A new node with the resource joins: Serve places the replica there and service resumes.
    cluster.add_node("--num-cpus=2", '--resources={"model_node": 1}')
    wait_for(lambda: running_replicas("serve_app", "model-embedding-v1") == 1, 120,
             "the replica to come back on the new node", interval=1)
    wait_for(lambda: httpx.get(f"{base}/v2/health/ready", timeout=30).status_code == 200, 60,
             "readiness to return")
    r = httpx.post(f"{base}/v1/embeddings", json={"model": "embedding", "input": SENTENCE},
                   timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 8
