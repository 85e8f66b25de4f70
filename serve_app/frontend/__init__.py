"""The front of the server: every protocol, translated to the internal request types and
answered from their results. :mod:`.dataplane` finds the model a request names, checks the
request and calls the model's backend; :mod:`.http` holds one module per HTTP protocol;
:mod:`.v2` the Open Inference codec and its gRPC servicer; :mod:`.auth`, :mod:`.metrics` and
:mod:`.context` what every protocol shares.

It reaches models only through the :class:`~serve_app.frontend.registry.ModelBackend`
interface, so it imports neither the engine nor the runtime, and no Ray: the Serve layer plugs
the backends in. FastAPI lives in :mod:`.http` only.
"""
