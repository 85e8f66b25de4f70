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


#: Run by Ray in each worker process of the server's job (controller, proxies, replicas) before
#: any Serve code: the job's ``worker_process_setup_hook`` (serve_app.launch.lifecycle.serve).
WORKER_SETUP_HOOK = "serve_app.env.without_dataframes"

#: Libraries Ray imports in every process of a server when they are installed, for objects no
#: server process of serve_app handles (see :func:`without_dataframes`).
DATAFRAME_LIBRARIES = ("pandas", "pyarrow")


def without_dataframes() -> None:
    """Make ``import pandas`` and ``import pyarrow`` fail in this process, as if they were not
    installed.

    When they are installed (serve_app's ``data`` extra, the Ray Data job, brings both), Ray
    imports them in every process it runs: Ray Serve imports pandas only to encode a DataFrame
    that a deployment returns, and Ray's serializers import pyarrow to register Ray Data's
    Arrow types. The server's processes never handle either, and each library held tens of MB
    in every one of them. A process that already imported one keeps it.
    """
    for name in DATAFRAME_LIBRARIES:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


#: Ray's default folder for HAProxy's files; each server started by ``python -m serve_app``
#: keeps its own in a subfolder named by its pid (:func:`instance_env`).
HAPROXY_ROOT = "/tmp/haproxy-serve"
#: Ports Ray Serve binds at fixed defaults: HAProxy's stats page and Prometheus endpoint, and
#: the Python proxy HAProxy falls back to (HTTP, gRPC) while no replica is in its backends.
FIXED_PORTS = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101,
               "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": 8500,
               "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": 9500}
#: Ray Serve's direct-ingress port ranges (each replica's own HTTP and gRPC servers); one
#: server takes a window of _WINDOW ports of each.
_DIRECT_INGRESS = {"HTTP": (30000, 31000), "GRPC": (40000, 41000)}
_WINDOW = 100
#: The variables that bound those ranges: MIN and MAX of HTTP, then of gRPC.
DIRECT_INGRESS_KEYS = tuple(f"RAY_SERVE_DIRECT_INGRESS_{end}_{proto}_PORT"
                            for proto in _DIRECT_INGRESS for end in ("MIN", "MAX"))


def haproxy_config_dir() -> str:
    """The folder HAProxy's config files are under: the folder of
    ``RAY_SERVE_HAPROXY_CONFIG_FILE_LOC`` where set, else :data:`HAPROXY_ROOT` (each server's
    subfolder is under it)."""
    loc = os.environ.get("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC")
    return os.path.dirname(loc) if loc else HAPROXY_ROOT


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is free
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def instance_env(pid: int) -> dict[str, str]:
    """What a server of its own Ray (``python -m serve_app``, process ``pid``) must not share
    with another one on the same machine, for the variables the environment does not set.

    Ray Serve binds HAProxy's stats and metrics ports and its fallback proxy's ports at fixed
    numbers, with SO_REUSEPORT, and lets every replica bind its direct-ingress ports from one
    fixed range. Its replicas' HTTP servers refuse a taken port (and move to the next), but
    their gRPC servers were seen sharing one (Ray asks gRPC for no SO_REUSEPORT with a string
    where gRPC reads an integer): a second server binds the same ports, and the kernel hands
    one server's requests to the other's proxy or replicas. It keeps HAProxy's
    files in a folder per Ray node that nothing removes. Here each server gets the fixed
    ports while they are free (else free ones), the first window of direct-ingress ports
    nothing listens on, and a folder of its own for HAProxy's files (``HAPROXY_ROOT/<pid>``,
    removed when it stops: :func:`remove_instance_dirs`)."""
    folder = f"{HAPROXY_ROOT}/{pid}"
    env = {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{folder}/haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{folder}/admin.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": folder,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{folder}/server-state",
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{folder}/metrics.sock",
    }
    for key, port in FIXED_PORTS.items():
        if key not in os.environ:
            env[key] = str(port if _port_free(port) else _free_port())
    if not any(key in os.environ for key in DIRECT_INGRESS_KEYS):  # else the environment's
        for offset in range(0, _DIRECT_INGRESS["HTTP"][1] - _DIRECT_INGRESS["HTTP"][0], _WINDOW):
            if all(_port_free(low + offset + i) for low, _ in _DIRECT_INGRESS.values()
                   for i in range(_WINDOW)):
                break
        else:  # a listener in every window: Serve's own start of the range
            offset = 0
        for proto, (low, _) in _DIRECT_INGRESS.items():
            env[f"RAY_SERVE_DIRECT_INGRESS_MIN_{proto}_PORT"] = str(low + offset)
            env[f"RAY_SERVE_DIRECT_INGRESS_MAX_{proto}_PORT"] = str(low + offset + _WINDOW - 1)
    return {k: v for k, v in env.items() if k not in os.environ}


def remove_instance_dirs(including: int | None = None) -> None:
    """Remove the :func:`instance_env` folders of servers whose process is gone, and that of
    process ``including`` (a server that is stopping)."""
    import shutil

    root = Path(HAPROXY_ROOT)
    for entry in root.glob("[0-9]*") if root.is_dir() else ():
        if entry.name.isdigit() and (int(entry.name) == including
                                     or not Path(f"/proc/{entry.name}").exists()):
            shutil.rmtree(entry, ignore_errors=True)


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
