"""Run serve_app as a child process on loopback, from Python: the benchmarks and the end-to-end
tests start their servers with it, a notebook can too.

:func:`start_server` runs the default entry point (``python -m serve_app --config``, as ``make
serve`` does) on a config; :func:`running` any command line. Each server runs in a session of
its own, with a Ray of its own, and is stopped by its pid, within bounded waits, whatever
happens."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from serve_app.config.serve_yaml import serve_config as build_serve_config

BIN = Path(sys.executable).parent


def haproxy_ports_env() -> dict[str, str]:
    """The ports Ray Serve binds at fixed defaults (HAProxy's stats and Prometheus ports, the
    fallback proxy's HTTP and gRPC ports) moved to free ones: servers may start side by side,
    where the launcher's own choice (:func:`serve_app.env.instance_env`) could race."""
    from serve_app.env import FIXED_PORTS

    return {key: str(free_port()) for key in FIXED_PORTS}


def process_tree(pid: int) -> list:
    """Process ``pid`` and every process under it, as psutil objects."""
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` and every process under it together."""
    import psutil

    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


#: The command line of every server :func:`running` started in this process, in order (the
#: test suite reports how many it started).
STARTED: list[list[str]] = []


class Server(str):
    """The base URL of a running server (a ``str``), with its process in ``proc``, its log in
    ``log`` and, when it serves gRPC, its ``host:port`` in ``grpc`` (else None)."""

    proc: subprocess.Popen
    log: Path
    grpc: str | None = None

    def processes(self) -> list:
        """The server process and every process under it (Ray's included), as psutil objects."""
        return process_tree(self.proc.pid)

    def rss_bytes(self) -> int:
        """Resident memory of every process of the stack together."""
        return tree_rss_bytes(self.proc.pid)

    def processes_named(self, fragment: str) -> list:
        """Processes of the stack whose command line contains ``fragment``."""
        import psutil

        found = []
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                if fragment in " ".join(p.cmdline()):
                    found.append(p)
        return found


def serve_config(http_port: int, args: dict, grpc_port: int | None = None,
                 more_apps: tuple[dict, ...] = ()) -> dict:
    """A Serve config on loopback: serve_app (``args``) at ``/``, gRPC when ``grpc_port``."""
    return build_serve_config(args, "127.0.0.1", http_port, grpc_port, proxy_location="HeadOnly",
                              more_apps=more_apps)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    """``predicate()``'s first truthy value, polled every ``interval`` for ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout}s")


#: The ports :func:`free_port` hands out, ``LOW-HIGH`` (``SERVE_APP_TEST_PORTS``; default
#: 20000-29999): below the kernel's ephemeral range (32768-60999 on Linux), which every bind to
#: port 0 draws from (Ray's own servers, another free_port), above Ray's worker ports
#: (10002-19999), and apart from Serve's direct-ingress ranges (30000, 40000). HAProxy and
#: gRPC servers bind with SO_REUSEPORT: a port handed out twice would be shared, not refused.
#: Processes that start servers side by side (xdist workers) each get a range of their own.
PORTS_ENV = "SERVE_APP_TEST_PORTS"
_given: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, never handed out before by this process."""
    import random

    low, high = (int(x) for x in os.environ.get(PORTS_ENV, "20000-29999").split("-"))
    for _ in range(1000):
        port = random.randint(low, high)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port in {low}-{high}")


def stop_process(proc: subprocess.Popen, timeout: float = 45.0) -> None:
    """SIGTERM the server (it drains, then shuts Serve and its Ray down), then SIGKILL its
    process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"server not ready after {timeout}s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def running(cmd: list[str], url: str, log: Path, timeout: float = 240.0,
            extra_env: dict[str, str] | None = None, unset: tuple[str, ...] = (),
            cwd: Path | None = None) -> Iterator[Server]:
    """Run ``cmd`` in its own session, in ``cwd`` (default this one), until it serves ``url``;
    always stop it afterwards. ``unset``: variables of this environment it does not get."""
    # RAY_ADDRESS=local: start a Ray of its own, never join one recorded in
    # /tmp/ray/ray_current_cluster by an earlier `ray start`.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
           "RAY_ADDRESS": "local", **haproxy_ports_env(), **(extra_env or {})}
    for key in unset:
        env.pop(key, None)
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=cwd)
    STARTED.append(cmd)
    try:
        _wait_ready(url, proc, log, timeout)
        server = Server(url)
        server.proc = proc
        server.log = log
        yield server
    finally:
        stop_process(proc)


@contextlib.contextmanager
def start_server(config: dict, tmp: Path, extra_env: dict[str, str] | None = None,
                 dashboard: bool = False, unset: tuple[str, ...] = (),
                 cwd: Path | None = None) -> Iterator[Server]:
    """``python -m serve_app --config`` (the default entry point, ``make serve``) of ``config``
    (written to ``tmp``) until it is ready; stopped afterwards. ``cwd``: where it runs, which
    decides the serve_app it imports (``-m`` puts the working directory first on the path of
    the launcher and of every Ray worker, ahead of PYTHONPATH)."""
    import yaml

    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{config['http_options']['port']}"
    cmd = [str(BIN / "python"), "-m", "serve_app", "--config", str(path)]
    with running(cmd + (["--dashboard"] if dashboard else []), url, tmp / "serve.log",
                 extra_env=extra_env, unset=unset, cwd=cwd) as server:
        if "grpc_options" in config:
            server.grpc = f"127.0.0.1:{config['grpc_options']['port']}"
        yield server
