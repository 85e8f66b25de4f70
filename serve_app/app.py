"""``build_app``: the Serve import path (``serve_app.app:build_app``)."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve_app.config import AppConfig
from serve_app.deployments import EmbeddingModel, Ingress


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    """Validate ``args`` as :class:`AppConfig` (strictly: unknown keys are errors) and bind one
    model deployment per model plus the ingress."""
    cfg = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    models = {} if cfg.topology == "colocated" else {
        m.deployment_name: EmbeddingModel.options(  # type: ignore[attr-defined]
            name=m.deployment_name, **m.deployment.serve_options()
        ).bind(m)
        for m in cfg.models
    }
    return Ingress.options(**cfg.ingress_options()).bind(  # type: ignore[attr-defined]
        models, cfg
    )
