"""The engine: a model's files, tokenizing, one forward pass, pooling, normalizing, and the
compact encodings (:mod:`.quantize`) of its vectors, for embedding models (:mod:`.embedding`)
and cross-encoder rerankers (:mod:`.reranker`).

torch and transformers live here. No Ray, no HTTP, no asyncio: it imports only
:mod:`serve_app.config`, :mod:`serve_app.types` and :mod:`serve_app.errors`.
"""
