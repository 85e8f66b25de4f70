"""``build_app``: the Serve import path (``serve_app.serve:build_app``)."""

from __future__ import annotations

import os
from typing import Any

import ray
from ray.serve import Application

from serve_app.config.schema import AppConfig
from serve_app.serve import topology


def largest_node_cpus() -> float:
    """CPUs of the largest alive node: what a model's ``num_cpus: all`` reserves (this
    machine's CPUs when no Ray runs here, as when a config is checked offline)."""
    if not ray.is_initialized():
        return float(os.cpu_count() or 1)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return max((float(n["Resources"].get("CPU", 0)) for n in nodes), default=1.0) or 1.0


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    """Validate ``args`` as :class:`AppConfig` (strictly: unknown keys are errors), resolve
    ``num_cpus: all`` against the cluster, and build the topology ``cfg.colocated`` names
    (:func:`serve_app.serve.topology.colocated` or :func:`~serve_app.serve.topology.separate`)."""
    cfg = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    if any(m.deployment.num_cpus == "all" for m in cfg.models):
        cfg = cfg.with_node_cpus(largest_node_cpus())
    return topology.colocated(cfg) if cfg.colocated else topology.separate(cfg)
