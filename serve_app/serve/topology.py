"""The two shapes of the Serve application, one builder each: :func:`separate` (the ingress and
one deployment per model) and :func:`colocated` (the models inside the ingress replicas).
:func:`serve_app.serve.app.build_app` picks one by ``AppConfig.colocated``.

Each builder applies every config field it is given or refuses it, naming it: a field a shape
would ignore is an error, not a silent default.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve_app.config.schema import AppConfig
from serve_app.serve.deployments import Ingress, ModelDeployment


def separate(cfg: AppConfig) -> Application:
    """The ingress bound to one model deployment per model, each with its model's own
    deployment options. Every field of the config applies here; nothing is refused."""
    models = {
        m.deployment_name: ModelDeployment.options(  # type: ignore[attr-defined]
            name=m.deployment_name, **m.deployment.serve_options()
        ).bind(m)
        for m in cfg.models
    }
    return Ingress.options(**cfg.ingress.serve_options()).bind(  # type: ignore[attr-defined]
        models, cfg)


def colocated(cfg: AppConfig) -> Application:
    """The ingress alone, each replica loading every model (:func:`colocated_ingress_options`).
    Refuses a model's deployment options that only a deployment of its own would apply
    (:meth:`AppConfig.check_colocatable`) and variants (their routing needs one)."""
    if any(m.variants for m in cfg.models):
        raise ValueError("variants need their model's own deployment: use topology separate")
    cfg.check_colocatable()
    return Ingress.options(**colocated_ingress_options(cfg)).bind(  # type: ignore[attr-defined]
        {}, cfg)


def colocated_ingress_options(cfg: AppConfig) -> dict[str, Any]:
    """``Deployment.options`` of an ingress that holds the models: each replica reserves the
    models' CPUs, GPUs, memory and custom resources besides its own, and accepts
    ``ingress.max_ongoing_requests`` requests plus every input its models may hold.

    Serve holds a request beyond ``max_ongoing_requests`` in its queue in front of the replica,
    unbounded and unanswered; only inside the replica does a model refuse input past its
    ``max_queued_inputs`` (429). With as many slots as the models hold inputs, every request
    that could be refused reaches its model, and the ingress's own share is left for probes,
    metadata and requests being parsed or refused."""
    opts = cfg.ingress.serve_options()
    actor = opts["ray_actor_options"]
    actor["num_cpus"] = actor["num_cpus"] + sum(m.deployment.cpus for m in cfg.models)
    if gpus := sum(m.deployment.num_gpus for m in cfg.models):
        actor["num_gpus"] = gpus
    if memory := sum(m.deployment.memory or 0 for m in cfg.models):
        actor["memory"] = memory
    custom: dict[str, float] = {}
    for m in cfg.models:
        for name, amount in m.deployment.resources.items():
            custom[name] = custom.get(name, 0.0) + amount
    if custom:
        actor["resources"] = custom
    opts["max_ongoing_requests"] = (cfg.ingress.max_ongoing_requests
                                    + sum(m.max_queued_inputs for m in cfg.models))
    return opts
