"""The environment variables serve_app reads, all of them, and the ones it sets for Ray."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def ray_address() -> str:
    """Where the command line's Ray runs: ``RAY_ADDRESS`` if set, else a Ray of its own.

    Like KServe's runtime, ``python -m serve_app`` is self-contained; it joins a cluster only
    when told to, never one that an earlier ``ray start`` on the machine happened to record.
    """
    return os.environ.get("RAY_ADDRESS") or "local"


def ray_serve_env() -> dict[str, str]:
    """What Ray Serve's high-throughput mode needs in the environment of every Ray process: Ray
    reads these once, when it starts, never from a Serve config. HAProxy in front sends each HTTP
    request straight to an ingress replica (no Python proxy hop); throughput-optimized mode
    calls replicas over gRPC and runs their code on the event loop. ``python -m serve_app``
    applies them before it starts Ray (a value the environment already has wins); README tells
    ``serve run`` users to export them, and the RayServices set them in their containers.
    """
    cpus = os.cpu_count() or 1
    env = {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        # one HAProxy thread keeps up with a small machine and leaves its cores to the model
        "RAY_SERVE_HAPROXY_NBTHREAD": "1" if cpus <= 4 else "2",
    }
    wrapper = wrapper_path()
    if wrapper is not None:  # HAProxy stops when its Ray worker dies (serve_app.launch.haproxy)
        env["RAY_SERVE_HAPROXY_BINARY_PATH"] = wrapper
    return env


def haproxy_config_dir() -> str:
    """Where Ray writes its HAProxy config (``RAY_SERVE_HAPROXY_CONFIG_FILE_LOC``'s folder)."""
    return os.path.dirname(
        os.environ.get("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "/tmp/haproxy-serve/haproxy.cfg"))


def grpc_default_application() -> str:
    """The Serve application that gRPC calls without ``application`` metadata go to.

    Read from ``SERVE_APP_GRPC_APPLICATION`` (default ``serve_app``, the name every shipped
    config gives the application).
    """
    return os.environ.get("SERVE_APP_GRPC_APPLICATION", "serve_app")

def wrapper_path() -> str | None:
    """The ``serve-app-haproxy`` command installed beside this Python, if it is."""
    path = Path(sys.executable).parent / "serve-app-haproxy"
    return str(path) if os.access(path, os.X_OK) else None
