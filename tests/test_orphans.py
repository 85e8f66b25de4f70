"""serve_app.launch.haproxy and .orphans without Ray: the HAProxy wrapper dies with its parent, and
a start stops what a killed server left (and nothing else)."""

from __future__ import annotations

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
