"""What a killed server leaves running, stopped before the next one starts. No Ray import here.

- HAProxy that Ray started from its ``haproxy-serve`` config directory and whose Ray worker is
  gone (left by a server run without :mod:`serve_app.launch.haproxy`'s wrapper, e.g. a plain
  ``serve run``), or whose Ray is gone even while its worker has not noticed yet: it would keep
  the HTTP port and answer every request with an error.
- Ray's own agents (DashboardAgent, RuntimeEnvAgent), which outlive a killed raylet: they
  notice, then hang reporting it to a GCS that is gone.
"""


from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

_MANAGER = "ray::HAProxyManager"
_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command's name: state, parent pid, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _parent(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[1]) if fields else 0


def _running(pid: int) -> bool:
    fields = _stat(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def _under_raylet(pid: int) -> bool:
    """Whether ``pid``'s parent is a running raylet (Ray starts its workers and agents so)."""
    parent = _cmdline(_parent(pid))
    return bool(parent) and parent[0].endswith("/raylet")


def _haproxy_orphan(pid: int, cmd: list[str], config_dir: str) -> bool:
    """HAProxy on a config under ``config_dir`` whose HAProxyManager is gone, or whose
    HAProxyManager's raylet is (its Ray was killed; the worker would notice in seconds, while
    a new server is already waiting for the port)."""
    if not cmd[0].endswith("haproxy") or "-f" not in cmd[:-1]:
        return False
    if not cmd[cmd.index("-f") + 1].startswith(config_dir.rstrip("/") + "/"):
        return False
    manager = _parent(pid)
    parent = _cmdline(manager)
    return not parent or not parent[0].startswith(_MANAGER) or not _under_raylet(manager)


def _agent_orphan(pid: int, cmd: list[str]) -> bool:
    """A Ray agent whose raylet is gone: it notices, then hangs reporting it to a dead GCS."""
    return cmd[0].startswith(_AGENTS) and not _under_raylet(pid)


def orphans(config_dir: str) -> list[int]:
    """Pids of processes a killed server left behind: HAProxy run on a config file under
    ``config_dir`` whose Ray worker is gone (nothing will ever stop it), and Ray agents whose
    raylet is gone."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        cmd = _cmdline(pid)
        if cmd and _running(pid) and (_haproxy_orphan(pid, cmd, config_dir)
                                      or _agent_orphan(pid, cmd)):
            found.append(pid)
    return found


def stop_orphans(config_dir: str, wait_s: float = 5.0) -> list[int]:
    """Stop every :func:`orphans` process and wait (at most ``wait_s``) until it is gone, so
    its ports are free: SIGTERM, then SIGKILL for what still runs halfway. Returns the pids."""
    pids = orphans(config_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s / 2
        while time.monotonic() < deadline and any(_running(p) for p in pids):
            time.sleep(0.05)
    return pids

