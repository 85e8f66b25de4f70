"""serve_app.launch.haproxy and .orphans without Ray: the HAProxy wrapper dies with its parent, and
a start stops what a killed server left (and nothing else)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from serve_app.launch import orphans
from tests.helpers import BIN, free_port


def gone(proc: subprocess.Popen, timeout: float = 10.0) -> bool:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_the_wrapper_runs_the_real_haproxy():
    out = subprocess.run([str(BIN / "serve-app-haproxy"), "-v"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and "HAProxy version" in out.stdout


def test_haproxy_started_through_the_wrapper_dies_with_its_parent(tmp_path):
    """The parent (in a server, Ray's HAProxyManager worker) is killed with SIGKILL: HAProxy
    gets SIGTERM from the kernel and frees its port."""
    port = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(textwrap.dedent(f"""\
        defaults
            mode http
            timeout connect 1s
            timeout client 5s
            timeout server 5s
        frontend f
            bind 127.0.0.1:{port}
            http-request return status 200 content-type text/plain string ok
        """))
    pid_file = tmp_path / "haproxy.pid"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""\
        import subprocess, time
        p = subprocess.Popen([{str(BIN / "serve-app-haproxy")!r}, "-db", "-f", {str(cfg)!r}])
        open({str(pid_file)!r}, "w").write(str(p.pid))
        time.sleep(120)
        """)])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).text == "ok":
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail("HAProxy did not answer")
        haproxy = int(pid_file.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and orphans._running(haproxy):
            time.sleep(0.1)
        assert not orphans._running(haproxy)
    finally:
        parent.kill()


def test_orphaned_haproxy_under_the_config_dir_is_stopped_and_nothing_else(tmp_path):
    ours, other = tmp_path / "haproxy-serve", tmp_path / "elsewhere"

    def fake(config_dir: Path) -> subprocess.Popen:
        # a process whose command line reads like Ray's HAProxy: `.../haproxy -f DIR/haproxy.cfg`
        return subprocess.Popen(
            ["bash", "-c", f'exec -a /opt/bin/haproxy {sys.executable} -c '
                           f'"import time; time.sleep(60)" -f {config_dir}/haproxy.cfg'])

    mine, theirs = fake(ours), fake(other)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and mine.pid not in orphans.orphans(str(ours)):
            time.sleep(0.1)
        assert mine.pid in orphans.orphans(str(ours))
        assert theirs.pid not in orphans.orphans(str(ours))
        assert mine.pid in orphans.stop_orphans(str(ours))
        assert gone(mine)
        assert theirs.poll() is None
    finally:
        for p in (mine, theirs):
            p.kill()
            p.wait(10)


_INSTANCE_KEYS = (
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH", "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
    *(f"RAY_SERVE_DIRECT_INGRESS_{end}_{proto}_PORT" for end in ("MIN", "MAX")
      for proto in ("HTTP", "GRPC")),
)


def test_each_server_gets_haproxy_files_and_ports_of_its_own(monkeypatch):
    """Two servers on one machine share no HAProxy file and no port: a direct-ingress window
    with a port in use is skipped (a replica's gRPC server would share it and take the other
    server's requests), and what the environment sets is left to it."""
    import socket

    from serve_app import env
    from serve_app.env import HAPROXY_ROOT, instance_env

    for key in _INSTANCE_KEYS:
        monkeypatch.delenv(key, raising=False)
    # The gRPC range lies in the kernel's ephemeral ports, where the connections of whatever
    # else runs (the other test worker's servers) come and go: only this test's listener
    # counts as taken, the real check is asserted on it below.
    taken: set[int] = set()
    real_free = env._port_free
    monkeypatch.setattr(env, "_port_free", lambda port: port not in taken)
    first = instance_env(101)
    assert set(first) == set(_INSTANCE_KEYS)
    assert first["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] == f"{HAPROXY_ROOT}/101/haproxy.cfg"
    assert all(v.startswith(f"{HAPROXY_ROOT}/101") for k, v in first.items()
               if "PATH" in k or "FILE" in k or "BASE" in k)
    low = int(first["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"])
    assert int(first["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == low + 99
    assert int(first["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"]) - low == 10000
    busy = low + 42
    with socket.socket() as sock:  # a replica of the first server, listening
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("", busy))
        sock.listen()
        assert not real_free(busy)  # a listener with SO_REUSEPORT is seen as taken
        taken.add(busy)
        second = instance_env(102)
        other = int(second["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"])
        assert not other <= busy <= other + 99
        assert second["RAY_SERVE_HAPROXY_SOCKET_PATH"] == f"{HAPROXY_ROOT}/102/admin.sock"
        monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", str(busy))
        monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "35000")
        told = instance_env(103)
    assert "RAY_SERVE_HAPROXY_STATS_PORT" not in told
    assert not any("DIRECT_INGRESS" in key for key in told)  # one set: the ranges are the user's
    assert told["RAY_SERVE_HAPROXY_METRICS_PORT"]  # the rest still set


def test_a_servers_folder_goes_with_it(tmp_path, monkeypatch):
    """At start, the folders of servers whose process is gone are removed; at stop, its own."""
    from serve_app import env

    monkeypatch.setattr(env, "HAPROXY_ROOT", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in (str(dead.pid), str(os.getpid()), "notes"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "haproxy.cfg").write_text("global\n")
    env.remove_instance_dirs()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([str(os.getpid()), "notes"])
    env.remove_instance_dirs(including=os.getpid())
    assert [p.name for p in tmp_path.iterdir()] == ["notes"]
