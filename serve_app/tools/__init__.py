"""Tools beside the server: the bulk client (``python -m serve_app.tools.client``, with its
HTTP and gRPC transports in :mod:`.transport`) and the Ray Data job
(``python -m serve_app.tools.offline``) that embeds a dataset with the engine, without a server.

The top layer: it may import anything below it but the Serve layer, and Ray (the offline job).
"""
