"""Ray Serve's own deployment options, passed through serve_app's config: checked by Ray's
schema (strictly: Ray drops keys it does not know, here each one is an error naming it), with
serve_app's defaults where they differ from Ray's, and the keys serve_app sets itself refused.
Ray is imported only to check a config that sets its options."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Self, cast, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticCustomError

#: Keys of Ray Serve's deployment options that serve_app sets itself, and what to set instead.
SET_BY_SERVE_APP = {
    "name": "serve_app names every deployment itself (Ingress, model-{name}-v{version})",
    "ray_actor_options": "set num_cpus, num_gpus, memory and resources instead: the torch "
                         "threads and a colocated ingress's reservation follow from them",
    "user_config": "serve_app's deployments have no reconfigure hook: change the config and "
                   "redeploy",
}
#: serve_app's defaults for a deployment's ``autoscaling_config``, where they differ from Ray
#: Serve's: a replica batches many requests at once, so it aims at more ongoing requests than
#: Ray's 2 and sheds replicas sooner.
AUTOSCALING_DEFAULTS: dict[str, Any] = {
    "target_ongoing_requests": 16, "upscale_delay_s": 10.0, "downscale_delay_s": 60.0}


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (``Model``, ``Optional[Union[Dict, Model]]``,
    ``List[Model]``), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (dict, Mapping):
        return None
    for arg in get_args(annotation):
        if (found := _model_in(arg)) is not None:
            return found
    return None


def _check_keys(model: type[BaseModel], data: Mapping[str, Any], where: str,
                unknown: list[str], invalid: list[str]) -> None:
    """Collect the keys of ``data`` that are not fields of ``model``, at any depth, and the errors
    ``model`` gives for ``data``. Nested dicts are checked against their own models too: Ray
    types several options as ``Union[Dict, Model]``, which accepts any dict unchecked."""
    fields = {**{f.alias: f for f in model.model_fields.values() if f.alias},
              **model.model_fields}
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            unknown.append(where + key)
            continue
        sub = _model_in(field.annotation)
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            if sub is not None and isinstance(item, dict):
                _check_keys(sub, item, f"{where}{key}{'' if i is None else f'[{i}]'}.",
                            unknown, invalid)
    try:
        model.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            loc = (where + ".".join(str(part) for part in err["loc"])).rstrip(".")
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] != "extra_forbidden":  # reported once, as unknown
                invalid.append(f"{loc}: {msg}" if loc else msg)


def check_serve_options(options: Mapping[str, Any]) -> None:
    """Validate ``options`` as keyword arguments of Ray Serve's ``Deployment.options`` with Ray's
    own schema (``ray.serve.schema.DeploymentSchema``, ``AutoscalingConfig`` and the others it
    nests), strictly: Ray drops keys it does not know, here each one is an error naming it."""
    own = sorted(set(options) & set(SET_BY_SERVE_APP))
    if own:
        raise ValueError("; ".join(f"{k} is set by serve_app: {SET_BY_SERVE_APP[k]}" for k in own))
    if (isinstance(options.get("num_replicas"), int)
            and options.get("autoscaling_config") is not None):
        raise ValueError("set either num_replicas or autoscaling_config, not both (with "
                         "autoscaling_config, num_replicas may be null or auto)")
    from ray.serve.schema import DeploymentSchema  # here: the config loads without Ray

    unknown: list[str] = []
    invalid: list[str] = []
    _check_keys(DeploymentSchema, {"name": "_", **options}, "", unknown, invalid)
    if unknown:
        raise PydanticCustomError(
            "extra_forbidden", "Extra inputs are not permitted: {keys} (neither serve_app's "
            "own fields nor options of Ray Serve's Deployment.options)",
            {"keys": ", ".join(unknown)})
    if invalid:
        raise ValueError("; ".join(dict.fromkeys(invalid)))


class ServeOptions(BaseModel):
    """The options of one Serve deployment: serve_app's own typed fields, plus any other option
    of Ray Serve's ``Deployment.options`` (num_replicas, autoscaling_config,
    max_ongoing_requests, health_check_period_s, max_replicas_per_node, ...), passed to Serve
    unchanged and validated by Ray's own schema (:func:`check_serve_options`). Ray's options
    serve_app has its own defaults for are in ``DEFAULTS`` (``num_replicas`` only without
    ``autoscaling_config``, whose own defaults are ``AUTOSCALING_DEFAULTS``)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    #: Ray Serve options serve_app gives when unset, where its defaults differ from Ray's.
    DEFAULTS: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="after")
    def _ray_validates(self) -> Self:
        if self.ray_options:  # Ray is imported only for a config that sets its options
            check_serve_options(self.ray_options)
        return self

    @property
    def ray_options(self) -> dict[str, Any]:
        """The Ray Serve options this config sets, as given."""
        return dict(self.model_extra or {})

    @property
    def autoscaling_config(self) -> dict[str, Any] | None:
        """The ``autoscaling_config`` Serve gets (``AUTOSCALING_DEFAULTS`` filled in), or None."""
        given = self.ray_options.get("autoscaling_config")
        return None if given is None else {**AUTOSCALING_DEFAULTS, **given}

    @property
    def num_replicas(self) -> int | str | None:
        """The fixed replica count (None, or Ray's ``auto``, with ``autoscaling_config``)."""
        if "num_replicas" in self.ray_options:
            return cast(int | str | None, self.ray_options["num_replicas"])
        return None if self.autoscaling_config is not None else self.DEFAULTS["num_replicas"]

    @property
    def max_ongoing_requests(self) -> int:
        return int(self.ray_options.get("max_ongoing_requests",
                                        self.DEFAULTS["max_ongoing_requests"]))

    @property
    def graceful_shutdown_timeout_s(self) -> float:
        return float(self.ray_options.get("graceful_shutdown_timeout_s",
                                          self.DEFAULTS["graceful_shutdown_timeout_s"]))

    def _serve_options(self, actor: dict[str, Any]) -> dict[str, Any]:
        """``Deployment.options``: serve_app's defaults, then the options given, then ``actor``."""
        opts = {**self.DEFAULTS, **self.ray_options, "ray_actor_options": actor}
        if self.autoscaling_config is not None:
            opts["autoscaling_config"] = self.autoscaling_config
            if self.num_replicas is None:  # the default count, or null beside autoscaling
                del opts["num_replicas"]
        return opts
