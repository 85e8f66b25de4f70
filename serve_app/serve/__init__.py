"""Ray Serve: the application builder (:mod:`.app`, the Serve import path
``serve_app.serve:build_app``) and the two shapes it builds (:mod:`.topology`: separate and
colocated, each refusing config fields it would ignore), the deployments (:mod:`.deployments`:
thin shims that hold a model runner or the frontend), the ingress's handles to model
deployments (:mod:`.handles`) and where a replica's log lines go (:mod:`.logs`).

The serving layer that imports Ray; it may import every layer below it (config, engine,
runtime, frontend), and nothing imports it but the Serve config that names it.
"""

from serve_app.serve.app import build_app

__all__ = ["build_app"]
