"""The model runtime: one model in one process, as a replica runs it. :mod:`.runner` admits a
request against the replica's input bound, tokenizes it and waits for its answer;
:mod:`.batch_queue` is the one place forward passes form; :mod:`.variants` holds a model's
fine-tuned variants beside it.

Plain asyncio over the engine. No Ray, no HTTP: it imports the engine, the config,
:mod:`serve_app.types` and :mod:`serve_app.errors`, never the frontend.
"""
