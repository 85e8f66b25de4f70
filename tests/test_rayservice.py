"""k8s/rayservice-cpu.yaml replayed as KubeRay runs it, on this machine: no Kubernetes here, but
what KubeRay does can be done by hand.

- A head node and one worker node, each a ``ray start --block`` with the manifest's
  ``rayStartParams`` (``--num-cpus`` of a worker from its container's CPU limit, as KubeRay
  sets it) and its container's ``env`` (Ray's high-throughput mode among it).
- ``serveConfigV2`` submitted the way KubeRay submits it: ``PUT /api/serve/applications/`` on the
  head's dashboard, then ``GET`` polled until the application runs.
- The URLs of KubeRay's probes: the raylet health through each node's dashboard agent, the GCS
  health through the head's dashboard, and each worker's Serve proxy health on the serving port.

Only what a single machine forces differs from the cluster: every port (and HAProxy's files,
which two pods keep apart in their own /tmp) is per node and free, and everything binds to
loopback. Token authentication is off, as in tests/test_cluster.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.helpers import BIN, REPO, SENTENCE, free_port, stop_process, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def manifest() -> dict:
    return yaml.safe_load((REPO / "k8s" / "rayservice-cpu.yaml").read_text())


def container_env(pod: dict) -> dict[str, str]:
    """The ray container's literal env (secret references are left out)."""
    (container,) = pod["template"]["spec"]["containers"]
    return {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}


def start_params(params: dict[str, str], loopback: dict[str, str]) -> list[str]:
    """``rayStartParams`` as ``ray start`` flags, with ``loopback`` replacing what must stay on
    this machine (hosts, fixed ports)."""
    merged = {**params, **loopback}
    return [f"--{k}={v}" for k, v in merged.items()]


def node_env(base: dict[str, str], pod: dict, name: str, temp: Path) -> dict[str, str]:
    """What a pod's ray container sees: its env, plus per-node HAProxy files and ports (in a
    cluster each pod has its own /tmp and network namespace)."""
    # short: HAProxy's socket paths (under a hashed folder Ray adds) must fit in 97 characters
    files = Path(tempfile.mkdtemp(prefix=f"h{name[0]}", dir="/tmp"))
    (temp / "cleanup").mkdir(exist_ok=True)
    (temp / "cleanup" / files.name).symlink_to(files)
    return {
        **base, **container_env(pod),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(files / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(files / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(files),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(files / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(files / "metrics.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
    }


def healthy(url: str, word: str | None = "success") -> bool:
    """What KubeRay's probe checks: ``wget ... | grep success`` (or a 2xx for the proxy)."""
    try:
        r = httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return False
    return r.is_success and (word is None or word in r.text)


class Replay:
    def __init__(self, temp: Path) -> None:
        self.temp = temp
        self.nodes: list[subprocess.Popen] = []
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.http_port, self.grpc_port = free_port(), free_port()
        self.agent_ports: list[int] = []

    def start_node(self, flags: list[str], env: dict[str, str], name: str) -> None:
        agent = free_port()
        self.agent_ports.append(agent)
        log = (self.temp / f"{name}.log").open("wb")
        self.nodes.append(subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
             f"--dashboard-agent-listen-port={agent}", *flags],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"


@pytest.fixture(scope="module")
def replay() -> Iterator[tuple[Replay, dict]]:
    rs = manifest()
    cluster = rs["spec"]["rayClusterConfig"]
    head, (worker,) = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    temp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths
    base = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1"}
    base.pop("RAY_ADDRESS", None)
    r = Replay(temp)
    try:
        r.start_node(["--head", f"--port={r.gcs_port}", f"--temp-dir={temp}",
                      f"--dashboard-port={r.dashboard_port}",
                      *start_params(head["rayStartParams"], {
                          "dashboard-host": "127.0.0.1",
                          "metrics-export-port": str(free_port())})],
                     node_env(base, head, "head", temp), "head")
        wait_for(lambda: healthy(f"{r.dashboard}/api/gcs_healthz"), 120, "the head's dashboard")
        (container,) = worker["template"]["spec"]["containers"]
        cpus = str(container["resources"]["limits"]["cpu"])  # KubeRay: --num-cpus from limits
        r.start_node([f"--address=127.0.0.1:{r.gcs_port}", f"--num-cpus={cpus}",
                      *start_params(worker.get("rayStartParams", {}), {
                          "metrics-export-port": str(free_port())})],
                     node_env(base, worker, "worker", temp), "worker")
        serve_config = yaml.safe_load(rs["spec"]["serveConfigV2"])
        serve_config["http_options"].update(host="127.0.0.1", port=r.http_port)
        serve_config["grpc_options"]["port"] = r.grpc_port
        # KubeRay: PUT the whole config, then poll the applications' status
        put = wait_for(lambda: httpx.put(f"{r.dashboard}/api/serve/applications/",
                                         json=serve_config, timeout=30), 60, "the Serve API")
        assert put.status_code == 200, put.text

        def running() -> bool:
            got = httpx.get(f"{r.dashboard}/api/serve/applications/", timeout=10)
            app = got.json().get("applications", {}).get("serve_app", {})
            assert app.get("status") != "DEPLOY_FAILED", app.get("message")
            return app.get("status") == "RUNNING"

        wait_for(running, 300, "serve_app RUNNING", interval=2)
        yield r, serve_config
    finally:
        for proc in reversed(r.nodes):
            stop_process(proc)
        for link in (temp / "cleanup").glob("*"):
            shutil.rmtree(link.resolve(), ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)


def test_kuberay_probes_pass_on_the_cpu_rayservice(replay):
    r, _ = replay
    head_agent, worker_agent = r.agent_ports
    # head: readiness and liveness
    assert healthy(f"http://127.0.0.1:{head_agent}/api/local_raylet_healthz")
    assert healthy(f"{r.dashboard}/api/gcs_healthz")
    # worker of a RayService: raylet, then the Serve proxy on the serving port
    assert healthy(f"http://127.0.0.1:{worker_agent}/api/local_raylet_healthz")
    wait_for(lambda: healthy(f"http://127.0.0.1:{r.http_port}/-/healthz", None), 60,
             "the serving port's /-/healthz")


def test_the_shipped_shape_is_the_fast_one_and_serves(replay, engine):
    import psutil

    r, _ = replay
    procs = []
    for node in r.nodes:
        root = psutil.Process(node.pid)
        for p in root.children(recursive=True):
            # a worker may exit between the listing and the read (a zombie until reaped)
            with contextlib.suppress(psutil.ZombieProcess, psutil.NoSuchProcess):
                procs.append(" ".join(p.cmdline()))
    # Ray's high-throughput mode from the manifest's env: HAProxy in front of the replicas
    assert any("haproxy" in c and "-f" in c for c in procs), procs
    # topology auto with an autoscaled model: ingress and model deployments apart
    assert any("ServeReplica:serve_app:model-embedding-v1" in c for c in procs)
    assert sum("ServeReplica:serve_app:Ingress" in c for c in procs) == 2
    url = f"http://127.0.0.1:{r.http_port}"
    got = httpx.post(f"{url}/v1/embeddings", json={"model": "embedding", "input": SENTENCE},
                     timeout=60)
    assert got.status_code == 200, got.text
    np.testing.assert_allclose(got.json()["data"][0]["embedding"],
                               engine.embed([SENTENCE])[0][0], atol=1e-5)
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
