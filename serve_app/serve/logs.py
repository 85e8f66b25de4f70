"""Where serve_app's own log lines go inside a Serve replica."""

from __future__ import annotations

import logging
import sys

_serve_log = logging.getLogger("ray.serve")


def log_through_serve() -> None:
    """Send serve_app's own loggers (engine start-up progress, warnings) to the replica's Serve
    log file, and to stderr, which Ray streams to the console of the process that started it:
    throughput-optimized mode keeps Serve's own per-request lines off stderr, but start-up
    progress and errors belong on the console."""
    ours = logging.getLogger("serve_app")
    if not ours.handlers:
        for handler in _serve_log.handlers:
            ours.addHandler(handler)
        if not any(type(h) is logging.StreamHandler for h in ours.handlers):
            # the process's own stderr: in that mode Serve points sys.stderr at its log file
            console = logging.StreamHandler(sys.__stderr__)
            console.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(message)s"))
            ours.addHandler(console)
        ours.setLevel(logging.INFO)
        ours.propagate = False
