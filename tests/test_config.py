"""The typed config: strict keys, Serve options, and every shipped config file."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from serve_app.config.schema import AppConfig, DeploymentOptions
from serve_app.config.variants import VariantOptions
from serve_app.serve.app import build_app
from tests.helpers import assert_valid_serve_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_serve_the_embedded_model():
    cfg = AppConfig()
    assert [m.name for m in cfg.models] == ["embedding"]
    assert cfg.models[0].model_id == "sentence-transformers/all-MiniLM-L6-v2"


@pytest.mark.parametrize(
    "args",
    [
        {"models": [{"name": "embedding", "max_batchsize": 8}]},
        {"models": [{"batching": {"max_batch_size": 8, "wait": 1}}]},
        {"models": [{"deployment": {"num_replica": 2}}]},
        {"ingres": {}},
    ],
)
def test_misspelled_keys_are_errors(args):
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        AppConfig.model_validate(args)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"models": []}, "at least 1"),
        ({"models": [{"name": "a"}, {"name": "a"}]}, "repeated: \\['a v1'\\]"),
        ({"models": [{"name": "a", "version": "1", "default": True},
                     {"name": "a", "version": "2", "default": True}]}, "several default"),
        ({"models": [{"name": "a-v1", "version": "2"}, {"name": "a", "version": "1-v2"}]},
         "same deployment name"),
        ({"models": [{"version": "a/b"}]}, "model version must be"),
        ({"models": [{"name": "bad/name"}]}, "model name must be"),
        ({"models": [{"device": "tpu"}]}, "device"),
        ({"models": [{"batching": {"max_batch_size": 0}}]}, "greater than or equal to 1"),
        ({"models": [{"deployment": {"num_replicas": 2, "autoscaling_config": {}}}]},
         "either num_replicas or autoscaling_config"),
        ({"models": [{"deployment": {"num_replicas": None, "autoscaling_config":
                                     {"min_replicas": 3, "max_replicas": 2}}}]},
         "min_replicas must be <= max_replicas"),
    ],
)
def test_invalid_values_are_errors(args, match):
    with pytest.raises(ValidationError, match=match):
        AppConfig.model_validate(args)


def test_serve_options_carry_resources_and_scaling():
    fixed = DeploymentOptions(num_replicas=2, num_cpus=2, num_gpus=0.5,
                              resources={"model_node": 1}).serve_options()
    assert fixed["num_replicas"] == 2
    assert fixed["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.5,
                                          "resources": {"model_node": 1}}
    auto = DeploymentOptions.model_validate(
        {"num_replicas": None, "autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}
    ).serve_options()
    assert "num_replicas" not in auto and auto["autoscaling_config"]["max_replicas"] == 4


def test_several_models_bind_one_deployment_each():
    app = build_app({"topology": "separate",
                     "models": [{"name": "a"}, {"name": "b", "deployment": {"num_cpus": 0.5}},
                                {"name": "b", "version": "2"}]})
    ingress = app._bound_deployment
    models = ingress.init_args[0]
    assert sorted(models) == ["model-a-v1", "model-b-v1", "model-b-v2"]
    assert models["model-b-v1"]._bound_deployment.ray_actor_options["num_cpus"] == 0.5
    assert models["model-a-v1"]._bound_deployment.name == "model-a-v1"


@pytest.mark.parametrize(("args", "colocated"), [
    ({}, True),  # one CPU replica of each: nothing changes but a hop less
    ({"models": [{"name": "a"}, {"name": "b"}]}, True),
    ({"models": [{"deployment": {"num_gpus": 1}}]}, False),  # GPU models fed by CPU ingress
    ({"models": [{"deployment": {"num_replicas": None, "autoscaling_config": {
        "max_replicas": 4}}}]}, False),  # the model scales on its own
    ({"models": [{"deployment": {"num_replicas": 2}}]}, False),  # more model than ingress
    ({"models": [{"deployment": {"resources": {"model_node": 1}}}]}, False),  # pinned
    ({"models": [{"deployment": {"num_replicas": 2}}], "ingress": {"num_replicas": 2}}, True),
    ({"topology": "separate"}, False),
    ({"topology": "colocated", "models": [{"deployment": {"num_gpus": 1}}]}, True),
])
def test_auto_topology_colocates_only_what_scales_and_places_alike(args, colocated):
    cfg = AppConfig.model_validate(args)
    assert cfg.colocated is colocated
    models = build_app(cfg)._bound_deployment.init_args[0]
    assert bool(models) is not colocated


def test_num_cpus_all_reserves_the_largest_node_and_sets_the_threads():
    cfg = AppConfig.model_validate({"models": [{"deployment": {"num_cpus": "all"}}]})
    resolved = cfg.with_node_cpus(6.0)
    assert resolved.models[0].deployment.num_cpus == 6.0 and resolved.models[0].threads == 6
    assert resolved.ingress_options()["ray_actor_options"]["num_cpus"] == 6.0
    with pytest.raises(ValueError, match="resolved"):
        cfg.ingress_options()
    with pytest.raises(ValueError):
        DeploymentOptions(num_cpus=-1)
    with pytest.raises(ValueError):
        DeploymentOptions.model_validate({"num_cpus": "most"})
    pinned = AppConfig.model_validate({"models": [{"torch_threads": 3,
                                                   "deployment": {"num_cpus": 0.5}}]})
    assert pinned.models[0].threads == 3
    assert AppConfig().models[0].threads == 1  # 1 CPU by default


def test_default_version_is_marked_or_first_listed():
    cfg = AppConfig.model_validate({"models": [
        {"name": "a", "version": "1"}, {"name": "b", "version": "7"},
        {"name": "a", "version": "2", "default": True}, {"name": "b", "version": "8"}]})
    assert [(m.name, m.version) for m in cfg.defaults()] == [("a", "2"), ("b", "7")]
    assert cfg.model("a").version == "2" and cfg.model("a", "1").version == "1"
    with pytest.raises(KeyError):
        cfg.model("a", "3")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_are_valid_serve_configs(path):
    raw = yaml.safe_load(path.read_text())
    assert_valid_serve_config(raw)
    for app in raw["applications"]:
        build_app(app.get("args") or {})


def test_a_key_ray_would_drop_is_caught():
    raw = yaml.safe_load((CONFIGS[0]).read_text())
    raw["http_option"] = raw.pop("http_options")
    with pytest.raises(AssertionError, match="http_option"):
        assert_valid_serve_config(raw)


def test_colocated_topology_runs_the_models_inside_the_ingress():
    app = build_app({"topology": "colocated", "ingress": {"num_cpus": 0.5},
                     "models": [{"name": "a", "deployment": {"num_cpus": 2}},
                                {"name": "b", "deployment": {"num_cpus": 1, "num_gpus": 1}}]})
    ingress = app._bound_deployment
    assert ingress.init_args[0] == {}  # no model deployments
    assert ingress.ray_actor_options["num_cpus"] == 3.5
    pinned = AppConfig.model_validate({"topology": "colocated", "models": [
        {"name": "a", "deployment": {"resources": {"model_node": 1}}},
        {"name": "b", "deployment": {"resources": {"model_node": 0.5, "other": 1}}}]})
    assert pinned.ingress_options()["ray_actor_options"]["resources"] == {
        "model_node": 1.5, "other": 1}
    assert ingress.ray_actor_options["num_gpus"] == 1
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"topology": "fused"})


def test_the_timeouts_and_fairness_are_config_fields():
    cfg = AppConfig()
    assert (cfg.ingress.model_load_timeout_s, cfg.ingress.probe_timeout_s) == (30.0, 2.0)
    assert cfg.models[0].batching.fair_every == 4
    assert VariantOptions(models=["org/a"]).reroute_s == 2.0
    for bad in ({"ingress": {"probe_timeout_s": 0}}, {"ingress": {"model_load_timeout_s": -1}},
                {"models": [{"batching": {"fair_every": 0}}]},
                {"models": [{"variants": {"models": ["org/a"], "reroute_s": -1}}]}):
        with pytest.raises(ValidationError):
            AppConfig.model_validate(bad)
    assert VariantOptions(models=["org/a"], reroute_s=0).reroute_s == 0


def _fields(model: type[BaseModel], seen: set[type]) -> list[tuple[str, Any]]:
    if model in seen:
        return []
    seen.add(model)
    out = []
    for name, field in model.model_fields.items():
        out.append((f"{model.__name__}.{name}", field))
        for arg in (field.annotation, *typing.get_args(field.annotation)):
            for inner in (arg, *typing.get_args(arg)):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    out += _fields(inner, seen)
    return out


def test_every_config_field_has_a_description():
    missing = [name for name, f in _fields(AppConfig, set()) if not f.description]
    assert not missing, missing
