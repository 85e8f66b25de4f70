"""Rolling update and rollback under load: serve a config through the default entry point (with
``--dashboard``), then ``serve deploy`` a changed one to the same cluster (what an operator
does), and back again. No request may fail."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import time
from collections import Counter

import httpx
import numpy as np
import pytest
import yaml

from tests.helpers import BIN, free_port, serve_config, start_server

pytestmark = pytest.mark.e2e
TEXT = "a rolling update must not drop this request"
ERRORS: list[str] = []


def config(port: int, model_dir: str) -> dict:
    return serve_config(port, {"models": [{"name": "embedding", "model_id": model_dir,
                                           "deployment": {"num_cpus": 0.5}}]})


def dashboard_address(server) -> str:
    for proc in server.processes():
        with contextlib.suppress(Exception):
            cmd = " ".join(proc.cmdline())
            if "dashboard/dashboard.py" in cmd:
                port = re.search(r"--port[= ](\d+)", cmd)
                return f"http://127.0.0.1:{port.group(1) if port else 8265}"
    raise AssertionError("no dashboard process under the server")


def serve_deploy(path, address: str) -> None:
    # the cluster uses Ray's token auth; the serve CLI reads the token from ~/.ray
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    subprocess.run([str(BIN / "serve"), "deploy", str(path), "-a", address], check=True,
                   env=env, capture_output=True, timeout=120)


async def load(url: str, stop: asyncio.Event, log: list[tuple[float, int, np.ndarray | None]],
               clients: int = 4) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        async def client() -> None:
            while not stop.is_set():
                try:
                    r = await c.post("/v1/embeddings", json={"model": "embedding", "input": TEXT})
                    vec = np.array(r.json()["data"][0]["embedding"]) if r.status_code == 200 \
                        else None
                    log.append((time.monotonic(), r.status_code, vec))
                    if r.status_code != 200 and len(ERRORS) < 3:
                        ERRORS.append(r.text[:300])
                except httpx.HTTPError:
                    log.append((time.monotonic(), -1, None))

        await asyncio.gather(*(client() for _ in range(clients)))


def test_update_and_rollback_under_load_drop_nothing(tmp_path, tiny_model):
    """Version A (mean pooling) is updated to B (CLS pooling: different vectors, as a new model
    revision would give) and rolled back to A, each while 4 clients send requests."""
    from serve_app.config.schema import ModelConfig
    from serve_app.engine.embedding import EmbeddingEngine

    a_dir, b_dir = str(tiny_model(pooling="mean")), str(tiny_model(pooling="cls"))
    vec = {k: EmbeddingEngine(ModelConfig(model_id=d)).embed([TEXT])[0][0]
           for k, d in (("A", a_dir), ("B", b_dir))}
    port = free_port()
    files = {}
    for k, d in (("A", a_dir), ("B", b_dir)):
        files[k] = tmp_path / f"{k}.yaml"
        files[k].write_text(yaml.safe_dump(config(port, d)))
    url = f"http://127.0.0.1:{port}"

    def which(v: np.ndarray) -> str:
        return min(vec, key=lambda k: float(np.abs(v - vec[k]).max()))

    (tmp_path / "server").mkdir()
    # the default entry point, with the dashboard that `serve deploy` talks to
    with start_server(config(port, a_dir), tmp_path / "server", dashboard=True) as s:
        address = dashboard_address(s)
        log: list[tuple[float, int, np.ndarray | None]] = []
        rollouts: dict[str, float] = {}

        async def main() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(load(url, stop, log))
            started = time.monotonic()
            while sum(st == 200 for _, st, _ in log) < 20:  # the load runs: 20 answers
                assert not task.done() and time.monotonic() - started < 60, (log[-3:], ERRORS)
                await asyncio.sleep(0.05)  # polling interval
            for target in ("B", "A"):
                t0 = time.monotonic()
                await asyncio.to_thread(serve_deploy, files[target], address)
                while time.monotonic() - t0 < 180:  # until 3 s of answers all come from target
                    await asyncio.sleep(0.5)
                    recent = [which(v) for t, st, v in log if t > time.monotonic() - 3
                              and v is not None]
                    if recent and set(recent) == {target} and time.monotonic() - t0 > 3:
                        rollouts[target] = time.monotonic() - t0
                        break
                else:
                    raise AssertionError(f"rollout to {target} did not finish")
            stop.set()
            await task

        asyncio.run(main())
    statuses = Counter(st for _, st, _ in log)
    served = Counter(which(v) for _, _, v in log if v is not None)
    print(f"rollout: {dict(statuses)}, answers by version {dict(served)}, update "
          f"{rollouts['B']:.1f}s, rollback {rollouts['A']:.1f}s")
    assert statuses == Counter({200: len(log)}), (statuses, ERRORS)
    assert served["B"] > 0 and served["A"] > 0
    for _, _, v in log:  # every answer is exactly one version's vector, never a mix
        assert min(float(np.abs(v - vec[k]).max()) for k in vec) < 1e-5
