"""Start a Serve config the fast way, in a Ray of its own, and stop it gracefully.

``python -m serve_app`` (``make serve``, the KServe runtime) runs :func:`serve`, which imports
Ray only once it runs, so the command line answers ``--help`` and refuses bad flags quickly. It

- puts Ray Serve's high-throughput settings in the environment before Ray starts (Ray reads them
  only then; see :func:`serve_app.env.ray_serve_env`),
- stops what a killed server left running: HAProxy holding the ports, Ray's agents
  (:func:`serve_app.launch.orphans.stop_orphans`),
- keeps pandas and pyarrow out of every Ray worker of the server
  (:func:`serve_app.env.without_dataframes`; ``python -m serve_app`` keeps them out of this
  process),
- starts Ray without the dashboard unless asked (the dashboard's processes hold about as much
  memory as the rest of the stack; ``serve deploy`` and ``serve status`` need it),
- deploys the config with its application builders run in the cluster, so this process never
  imports torch, and waits until every application runs (or one fails),
- on SIGTERM or Ctrl-C drains every serve_app application (readiness false, requests in flight
  finish), then shuts Serve and Ray down, freeing every port.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from serve_app import IMPORT_PATH
from serve_app.env import (
    WORKER_SETUP_HOOK,
    haproxy_config_dir,
    instance_env,
    ray_address,
    ray_serve_env,
    remove_instance_dirs,
)
from serve_app.launch.orphans import stop_orphans

log = logging.getLogger("serve_app")


class _Stop(Exception):
    """SIGTERM or SIGINT arrived."""


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


def serve(deploy: Callable[[dict[str, float]], dict[str, Any]], dashboard: bool = False,
          grace_s: float = 20.0) -> int:
    """Start Ray, deploy ``deploy(cluster_resources)`` (a Serve config as a dict, validated by
    Serve's schema) and serve until SIGTERM/SIGINT. Returns the exit status."""
    for key, value in ray_serve_env().items():
        os.environ.setdefault(key, value)
    stale = stop_orphans(haproxy_config_dir())
    if stale:
        log.warning("serve_app: stopped processes a killed server left running (HAProxy or "
                    "Ray agents; pids %s)", stale)
    own = ray_address() == "local"  # a Ray of its own: nothing shared with another server
    if own:
        remove_instance_dirs()
        os.environ.update(instance_env(os.getpid()))

    import ray
    from ray.serve._private.api import serve_start
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    ours: list[str] = []  # serve_app applications, drained on stop
    ray.init(address=ray_address(), include_dashboard=dashboard, namespace="serve",
             logging_level=logging.WARNING,
             runtime_env={"worker_process_setup_hook": WORKER_SETUP_HOOK})
    # after ray.init, which installs a SIGTERM handler of its own that exits at once
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        schema = ServeDeploySchema.model_validate(deploy(ray.cluster_resources()))
        client = serve_start(
            http_options=schema.http_options.model_dump(),
            grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
            proxy_location=schema.proxy_location,
        )
        ours = [a.name for a in schema.applications if a.import_path == IMPORT_PATH]
        client.deploy_apps(schema, _blocking=False)
        if not _wait_running([a.name for a in schema.applications]):
            return 1
        http = schema.http_options
        log.warning("serve_app: serving on http://%s:%s (gRPC port %s)%s", http.host, http.port,
                    schema.grpc_options.port, "; dashboard on :8265" if dashboard else "")
        while True:
            time.sleep(3600)
    except _Stop as stop:
        if _cluster_alive():  # not when the signal went to Ray's processes too
            log.warning("serve_app: %s: draining", stop)
            drain_all(ours, grace_s)
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _shutdown()
        if own:
            remove_instance_dirs(including=os.getpid())


def _wait_running(apps: list[str], poll_s: float = 0.5) -> bool:
    """Wait until every application runs; False (with the reason logged) if one fails."""
    from ray import serve

    while True:
        status = serve.status().applications
        states = {name: status.get(name) for name in apps}
        named = {n: str(getattr(s.status, "value", s.status)) if s else None
                 for n, s in states.items()}
        failed = [n for n, state in named.items() if state == "DEPLOY_FAILED"]
        for name in failed:
            log.error("serve_app: application %r failed to deploy: %s", name,
                      states[name].message)  # type: ignore[union-attr]
        if failed:
            return False
        if all(state == "RUNNING" for state in named.values()):
            return True
        time.sleep(poll_s)


def drain_all(apps: list[str], timeout_s: float) -> None:
    """Drain every serve_app application in ``apps`` (see :func:`drain`), giving up after
    ``timeout_s`` plus a margin: a cluster that is already gone (its whole process group got
    the signal) must not hold the shutdown. Failures are logged, never raised."""
    def work() -> None:
        try:
            asyncio.run(_drain_apps(apps, timeout_s))
        except Exception as e:  # shutting down whatever happens: report and go on
            log.warning("serve_app: could not drain: %s", e)

    thread = threading.Thread(target=work, name="drain", daemon=True)
    thread.start()
    thread.join(timeout_s + 15)
    if thread.is_alive():
        log.warning("serve_app: draining did not finish; stopping anyway")


async def _drain_apps(apps: list[str], timeout_s: float) -> None:
    from ray import serve

    status = serve.status().applications
    # In throughput-optimized mode a handle runs on the caller's event loop, hence async.
    for name in apps:
        ingress = status[name].deployments.get("Ingress") if name in status else None
        replicas = 1 if ingress is None else sum(
            n for state, n in ingress.replica_states.items()
            if getattr(state, "value", state) == "RUNNING")
        await drain(serve.get_app_handle(name), max(1, replicas), timeout_s)


async def drain(ingress: Any, replicas: int, timeout_s: float, poll_s: float = 0.05) -> int:
    """Graceful stop, as KServe's server does on SIGTERM: readiness false at once on each of
    the ``replicas`` ingress replicas, then wait (at most ``timeout_s``) until none has requests
    in flight. Returns those left.

    A call through Serve's handle reaches one replica, chosen by Serve: ``drain`` is called
    until every replica has answered it (each answers with its id), and ``in_flight`` until each
    has last reported none."""
    deadline = time.monotonic() + timeout_s
    left: dict[str, int] = {}
    while len(left) < replicas and time.monotonic() < deadline:
        replica, n = await ingress.options(method_name="drain").remote()
        left[replica] = int(n)
    log.warning("shutting down: readiness is false on %d ingress replica(s); waiting for %d "
                "request(s) in flight", len(left), sum(left.values()))
    while any(left.values()) and time.monotonic() < deadline:
        await asyncio.sleep(poll_s)
        replica, n = await ingress.options(method_name="in_flight").remote()
        left[replica] = int(n)
    if any(left.values()):
        log.warning("%d request(s) still in flight after %gs; stopping anyway",
                    sum(left.values()), timeout_s)
    return sum(left.values())


def _cluster_alive() -> bool:
    """False once a Ray that this process started has lost a process (they were signalled or
    killed with us): nothing is left to drain then."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return node is None or bool(node.remaining_processes_alive())


def _shutdown() -> None:
    """Stop Serve's applications and Ray. A Ray of our own goes down whole (its processes, the
    replicas and HAProxy with them); in a cluster we joined only Serve is shut down."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        if ray_address() != "local":
            serve.shutdown()
    finally:
        ray.shutdown()

