"""Serve configs (``serve run``'s YAML): reading a file as the command line and the offline job
do (the file, and the validated :class:`AppConfig` of each serve_app application in it, those
whose ``import_path`` is :data:`serve_app.IMPORT_PATH`), and building one (:func:`serve_config`)
as the KServe-style command line and the test harness do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from serve_app import GRPC_SERVICER, IMPORT_PATH
from serve_app.config.schema import AppConfig, ModelConfig


def read_serve_config(path: str | Path) -> tuple[dict[str, Any], dict[str, AppConfig]]:
    """The Serve config in ``path`` and each serve_app application's config by application
    name, validated strictly now (before Ray starts). A ``ValueError`` (pydantic's
    ``ValidationError`` is one) or ``OSError`` says what is wrong."""
    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict) or not config.get("applications"):
        raise ValueError(f"{path}: not a Serve config (it lists no applications)")
    ours = {str(app.get("name", "default")): AppConfig.model_validate(app.get("args") or {})
            for app in config["applications"] if app.get("import_path") == IMPORT_PATH}
    return config, ours


def model_from_serve_config(path: str | Path, model: str | None = None,
                            version: str | None = None, app: str | None = None) -> ModelConfig:
    """The model entry a Serve config serves: its serve_app application (``app``, or the first
    one), then ``model`` (default: its first model) at ``version`` (default: its default)."""
    _, apps = read_serve_config(path)
    if app is not None and app not in apps:
        raise ValueError(f"{path} has no serve_app application {app!r}")
    if not apps:
        raise ValueError(f"{path} has no serve_app application")
    cfg = apps[app] if app is not None else next(iter(apps.values()))
    name = model or cfg.models[0].name
    try:
        return cfg.model(name, version)
    except KeyError:
        served = sorted({m.name for m in cfg.models})
        raise ValueError(f"{path} serves no model {name!r} (version {version}); "
                         f"models: {served}") from None


def serve_config(args: dict[str, Any], host: str, http_port: int, grpc_port: int | None = None,
                 proxy_location: str | None = None,
                 more_apps: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    """A Serve config serving serve_app (``args``: an :class:`AppConfig` as a dict) at ``/`` on
    ``host:http_port``, with V2 gRPC on ``grpc_port`` when given, and ``more_apps`` beside."""
    config: dict[str, Any] = {
        "http_options": {"host": host, "port": http_port},
        "applications": [{"name": "serve_app", "route_prefix": "/", "import_path": IMPORT_PATH,
                          "args": args}, *more_apps],
    }
    if proxy_location is not None:
        config["proxy_location"] = proxy_location
    if grpc_port is not None:
        config["grpc_options"] = {"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]}
    return config
