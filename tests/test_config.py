"""The typed config: strict keys, Ray Serve's options passed through and validated by Ray, and
every shipped config file."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from serve_app.config.schema import AppConfig, DeploymentOptions
from serve_app.config.variants import VariantOptions
from serve_app.serve.app import build_app
from serve_app.serve.topology import colocated_ingress_options
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
         "max_replicas \\(2\\) must be greater than or equal to min_replicas \\(3\\)"),
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
    assert auto["max_ongoing_requests"] == 4096 and auto["graceful_shutdown_timeout_s"] == 20


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
    assert colocated_ingress_options(resolved)["ray_actor_options"]["num_cpus"] == 6.0
    with pytest.raises(ValueError, match="resolved"):
        colocated_ingress_options(cfg)
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
    assert colocated_ingress_options(pinned)["ray_actor_options"]["resources"] == {
        "model_node": 1.5, "other": 1}
    assert ingress.ray_actor_options["num_gpus"] == 1
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"topology": "fused"})


# -- Ray Serve's deployment options, passed through ---------------------------------------------

@pytest.mark.parametrize(("section", "match"), [
    ({"models": [{"deployment": {"max_ongoing_request": 5000}}]}, "max_ongoing_request \\("),
    ({"models": [{"deployment": {"num_replicas": None,
                                 "autoscaling_config": {"max_replica": 4}}}]},
     "autoscaling_config.max_replica \\("),
    ({"models": [{"deployment": {"logging_config": {"log_levle": "INFO"}}}]},
     "logging_config.log_levle"),
    ({"ingress": {"max_ongoing_requets": 10}}, "max_ongoing_requets"),
])
def test_a_misspelled_serve_option_is_an_error_naming_it(section, match):
    with pytest.raises(ValidationError, match="Extra inputs are not permitted") as e:
        AppConfig.model_validate(section)
    assert e.match(match)


@pytest.mark.parametrize(("section", "match"), [
    ({"models": [{"deployment": {"max_ongoing_requests": "many"}}]},
     "max_ongoing_requests: Input should be a valid integer"),
    ({"models": [{"deployment": {"health_check_period_s": 0}}]},
     "health_check_period_s: Input should be greater than 0"),
    ({"models": [{"deployment": {"num_replicas": None,
                                 "autoscaling_config": {"max_replicas": "lots"}}}]},
     "autoscaling_config.max_replicas: Input should be a valid integer"),
    ({"ingress": {"num_replicas": "two"}}, "num_replicas"),
    ({"models": [{"deployment": {"max_replicas_per_node": 1,
                                 "placement_group_bundles": [{"CPU": 1}]}}]},
     "max_replicas_per_node is not allowed"),  # Ray's own cross-field rule
])
def test_a_serve_option_of_the_wrong_type_is_an_error_from_rays_schema(section, match):
    with pytest.raises(ValidationError, match=match):
        AppConfig.model_validate(section)


@pytest.mark.parametrize(("key", "value", "match"), [
    ("name", "mine", "names every deployment itself"),
    ("ray_actor_options", {"num_cpus": 2}, "set num_cpus, num_gpus, memory and resources"),
    ("user_config", {"a": 1}, "no reconfigure hook"),
])
@pytest.mark.parametrize("where", ["model", "ingress"])
def test_options_serve_app_sets_itself_are_refused(key, value, match, where):
    args = ({"models": [{"deployment": {key: value}}]} if where == "model"
            else {"ingress": {key: value}})
    with pytest.raises(ValidationError, match=f"{key} is set by serve_app: .*{match}"):
        AppConfig.model_validate(args)


def test_serve_options_pass_through_with_serve_apps_defaults():
    d = DeploymentOptions.model_validate({
        "num_cpus": 2, "max_replicas_per_node": 1, "health_check_period_s": 3,
        "max_queued_requests": 100, "backpressure_config": {"status_code": 429}})
    opts = d.serve_options()
    assert opts == {"num_replicas": 1, "max_ongoing_requests": 4096,
                    "graceful_shutdown_timeout_s": 20.0, "max_replicas_per_node": 1,
                    "health_check_period_s": 3, "max_queued_requests": 100,
                    "backpressure_config": {"status_code": 429},
                    "ray_actor_options": {"num_cpus": 2, "num_gpus": 0.0}}
    assert (d.num_replicas, d.max_ongoing_requests, d.graceful_shutdown_timeout_s) == (1, 4096, 20)
    assert d.autoscaling_config is None and d.cpus == 2
    scaled = DeploymentOptions.model_validate(
        {"autoscaling_config": {"max_replicas": 3, "target_ongoing_requests": 8}})
    # serve_app's autoscaling defaults fill in what is not given; no fixed count beside it
    assert scaled.num_replicas is None and "num_replicas" not in scaled.serve_options()
    assert scaled.autoscaling_config == {"target_ongoing_requests": 8, "upscale_delay_s": 10.0,
                                         "downscale_delay_s": 60.0, "max_replicas": 3}
    assert DeploymentOptions.model_validate(
        {"num_replicas": "auto"}).serve_options()["num_replicas"] == "auto"


def test_a_config_round_trips_through_its_dump():
    cfg = AppConfig.model_validate({
        "models": [{"deployment": {"num_replicas": None, "num_cpus": 2,
                                   "autoscaling_config": {"max_replicas": 2},
                                   "health_check_timeout_s": 5}}],
        "ingress": {"num_replicas": 2, "max_ongoing_requests": 2048, "model_load_timeout_s": 9}})
    again = AppConfig.model_validate(cfg.model_dump(mode="json"))
    assert again == cfg
    assert again.models[0].deployment.ray_options == {
        "num_replicas": None, "autoscaling_config": {"max_replicas": 2},
        "health_check_timeout_s": 5}
    assert (again.ingress.num_replicas, again.ingress.max_ongoing_requests) == (2, 2048)


def test_the_admission_rule_reads_the_passed_through_option():
    AppConfig.model_validate({"models": [{"max_queued_inputs": 64,
                                          "deployment": {"max_ongoing_requests": 64}}]})
    with pytest.raises(ValidationError, match=r"max_ongoing_requests \(64\) must be at least "
                                              r"max_queued_inputs \(4096\)"):
        AppConfig.model_validate({"models": [{"deployment": {"max_ongoing_requests": 64}}]})


def test_a_config_without_ray_options_validates_without_ray():
    code = ("import sys; from serve_app.config.schema import AppConfig; "
            "AppConfig.model_validate({'models': [{'deployment': {'num_cpus': 2}}]}); "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "False", out.stdout


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
