"""HTTP: the FastAPI app (:mod:`.app`), the request pipeline every route runs
(:mod:`.common`), and one module per protocol (OpenAI, KServe V1, Open Inference V2 REST,
rerank in TEI's and Cohere's shapes). A protocol module translates its wire format to the
internal types and back; no protocol module imports another.
"""
