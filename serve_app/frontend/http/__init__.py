"""HTTP: the FastAPI app (:mod:`.app`: routes, the middleware around every request), what the
protocols share (:mod:`.route`: a request's :class:`~serve_app.frontend.pipeline.Call`, body
and timed answer; :mod:`.bodies`: JSON in and out; :mod:`.error_bodies`: domain errors as
each protocol's error answer), and one module per protocol: OpenAI (:mod:`.openai`), KServe V1
(:mod:`.kserve_v1`), Open Inference V2 REST (:mod:`.v2`), reranking in TEI's and Cohere's
shapes (:mod:`.rerank`). A protocol module translates its wire format to the internal types
and back; no protocol module imports another.
"""
