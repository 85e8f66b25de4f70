"""The one config tree: what a Serve config's ``applications[].args`` hold (:mod:`.schema`), a
model's fine-tuned variants (:mod:`.variants`), Ray Serve's own deployment options passed
through and checked by Ray's schema (:mod:`.ray_options`), and Serve config files
(:mod:`.serve_yaml`: reading one, building one).

Pure pydantic, validated strictly (an unknown key is an error). Imports only
:mod:`serve_app.types` and :mod:`serve_app.errors` (and Ray's schema, when a config sets Ray's
options); every layer may import it.
"""
