"""The one config tree: what a Serve config's ``applications[].args`` hold (:mod:`.schema`), a
model's fine-tuned variants (:mod:`.variants`), and reading Serve config files.

Pure pydantic, validated strictly (an unknown key is an error). Imports only
:mod:`serve_app.types` and :mod:`serve_app.errors`; every layer may import it.
"""
