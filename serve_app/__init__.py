"""serve_app: HuggingFace text embeddings on Ray Serve, wire-compatible with KServe and OpenAI."""

__version__ = "0.1.0"
