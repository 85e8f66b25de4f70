"""The two application builders (serve_app.serve.topology): what each binds and the options each
gives Serve, what the colocated one refuses, and how ``topology: auto`` picks. No Ray cluster:
the built Application's deployments are inspected."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from serve_app.config.schema import AppConfig
from serve_app.serve import topology
from serve_app.serve.app import build_app


def _deployments(app: Any) -> tuple[Any, dict[str, Any]]:
    """The ingress deployment and the model deployments it is bound to, by name."""
    ingress = app._bound_deployment
    return ingress, {name: a._bound_deployment for name, a in ingress.init_args[0].items()}


def test_build_app_dispatches_on_the_resolved_topology():
    _, models = _deployments(build_app({}))
    assert models == {}  # auto: one CPU model, nothing differs, colocated
    _, models = _deployments(build_app({"topology": "separate"}))
    assert list(models) == ["model-embedding-v1"]


def test_separate_gives_each_model_its_own_options_unchanged():
    cfg = AppConfig.model_validate({"topology": "separate", "models": [
        {"name": "a", "deployment": {"num_cpus": 2, "memory": 2**30, "health_check_period_s": 3,
                                     "max_replicas_per_node": 1}},
        {"name": "b", "deployment": {"num_replicas": None, "autoscaling_config": {
            "min_replicas": 1, "max_replicas": 5, "upscale_delay_s": 2}}}]})
    ingress, models = _deployments(topology.separate(cfg))
    a, b = models["model-a-v1"], models["model-b-v1"]
    assert a.ray_actor_options == {"num_cpus": 2, "num_gpus": 0.0, "memory": 2**30}
    assert (a.num_replicas, a.max_ongoing_requests) == (1, 4096)
    assert a._deployment_config.health_check_period_s == 3
    assert a._deployment_config.graceful_shutdown_timeout_s == 20
    assert a._replica_config.max_replicas_per_node == 1
    scaling = b._deployment_config.autoscaling_config
    assert (scaling.max_replicas, scaling.upscale_delay_s) == (5, 2)
    assert (scaling.target_ongoing_requests, scaling.downscale_delay_s) == (16, 60)
    # the ingress keeps its own bound: it holds no model
    assert ingress.max_ongoing_requests == 1024 and ingress.ray_actor_options == {"num_cpus": 0}


def test_the_ingress_passes_rays_options_through_too():
    ingress, _ = _deployments(build_app({"topology": "separate", "ingress": {
        "num_replicas": None, "autoscaling_config": {"min_replicas": 2, "max_replicas": 6},
        "max_ongoing_requests": 512, "health_check_timeout_s": 7}}))
    assert ingress._deployment_config.autoscaling_config.max_replicas == 6
    assert ingress.max_ongoing_requests == 512
    assert ingress._deployment_config.health_check_timeout_s == 7


def test_colocated_reserves_every_models_resources_in_the_ingress():
    cfg = AppConfig.model_validate({"topology": "colocated", "ingress": {"num_cpus": 0.5},
                                    "models": [
        {"name": "a", "deployment": {"num_cpus": 2, "memory": 1000, "resources": {"n": 1}}},
        {"name": "b", "deployment": {"num_cpus": 1, "num_gpus": 1, "memory": 500,
                                     "resources": {"n": 0.5, "m": 1}}}]})
    ingress, models = _deployments(topology.colocated(cfg))
    assert models == {}
    assert ingress.ray_actor_options == {"num_cpus": 3.5, "num_gpus": 1, "memory": 1500,
                                         "resources": {"n": 1.5, "m": 1}}


def test_colocated_admits_every_input_its_models_may_hold_so_the_excess_gets_429():
    """Serve queues a request past ``max_ongoing_requests`` in front of the replica, unbounded
    and unrefused; only the model, inside the replica, refuses input past its bound (429). So
    the colocated ingress takes its own requests plus every input its models may hold."""
    cfg = AppConfig.model_validate({"topology": "colocated", "ingress": {
        "max_ongoing_requests": 100}, "models": [
        {"name": "a"}, {"name": "b", "max_queued_inputs": 64,
                        "deployment": {"max_ongoing_requests": 4096}}]})
    opts = topology.colocated_ingress_options(cfg)
    assert opts["max_ongoing_requests"] == 100 + 4096 + 64
    ingress, _ = _deployments(build_app(cfg))
    assert ingress.max_ongoing_requests == 100 + 4096 + 64
    separate = AppConfig.model_validate({**cfg.model_dump(), "topology": "separate"})
    assert _deployments(build_app(separate))[0].max_ongoing_requests == 100


@pytest.mark.parametrize(("deployment", "named"), [
    ({"num_replicas": 2}, "deployment.num_replicas (2)"),
    ({"num_replicas": None, "autoscaling_config": {"max_replicas": 3}},
     "deployment.autoscaling_config"),
    ({"max_ongoing_requests": 8192}, "deployment.max_ongoing_requests (8192)"),
    ({"health_check_period_s": 1, "health_check_timeout_s": 5},
     "deployment.health_check_period_s (1); model 'embedding' v1: "
     "deployment.health_check_timeout_s (5)"),
    ({"graceful_shutdown_timeout_s": 60}, "deployment.graceful_shutdown_timeout_s (60)"),
    ({"max_replicas_per_node": 1}, "deployment.max_replicas_per_node (1)"),
])
def test_colocated_refuses_each_model_option_it_would_ignore(deployment, named):
    args = {"topology": "colocated", "models": [{"deployment": deployment}]}
    with pytest.raises(ValidationError, match="would ignore model 'embedding' v1: ") as e:
        AppConfig.model_validate(args)
    message = str(e.value)
    assert named in message
    assert "Set these under ingress" in message and "topology separate" in message
    # auto sees the same and keeps the model's own deployment, where the option applies
    auto = AppConfig.model_validate({**args, "topology": "auto"})
    assert not auto.colocated
    assert list(_deployments(build_app(auto))[1]) == ["model-embedding-v1"]
    # the builder refuses it too, whatever config reaches it
    with pytest.raises(ValueError, match="would ignore"):
        topology.colocated(auto)


@pytest.mark.parametrize("deployment", [
    {"num_replicas": 2},  # the ingress's count: what colocated gives it anyway
    {"max_ongoing_requests": 4096, "graceful_shutdown_timeout_s": 20},  # serve_app's defaults
    {"autoscaling_config": None},
    {"num_cpus": 2, "memory": 10, "num_gpus": 1, "resources": {"n": 1}},  # reserved by ingress
])
def test_colocated_takes_what_it_honours_or_changes_nothing(deployment):
    cfg = AppConfig.model_validate({"topology": "colocated", "ingress": {"num_replicas": 2},
                                    "models": [{"deployment": deployment}]})
    assert cfg.colocation_ignored() == [] and cfg.colocated
    assert _deployments(topology.colocated(cfg))[1] == {}


def test_colocated_refuses_variants():
    cfg = AppConfig.model_validate({"models": [{"variants": {"models": ["org/x"]}}]})
    assert not cfg.colocated
    with pytest.raises(ValueError, match="variants need their model's own deployment"):
        topology.colocated(cfg)


@pytest.mark.parametrize(("args", "colocated"), [
    ({"models": [{"deployment": {"num_replicas": 1, "max_ongoing_requests": 4096}}]}, True),
    ({"models": [{"deployment": {"health_check_period_s": 1}}]}, False),
    ({"models": [{"deployment": {"memory": 2**30}}]}, True),  # reserved by the ingress alike
    ({"ingress": {"num_replicas": 2}}, False),  # the model's own count is 1
    ({"ingress": {"num_replicas": None, "autoscaling_config": {"max_replicas": 2}}}, False),
])
def test_auto_colocates_only_where_nothing_differs(args, colocated):
    assert AppConfig.model_validate(args).colocated is colocated
