"""serve_app: HuggingFace text embeddings on Ray Serve, wire-compatible with KServe and OpenAI."""

__version__ = "0.1.0"

#: The Serve import path of the application (Serve config ``import_path``).
IMPORT_PATH = "serve_app.serve:build_app"
#: What registers the V2 gRPC service on Serve's gRPC proxy (``grpc_servicer_functions``).
GRPC_SERVICER = "serve_app.frontend.v2.add_inference_servicer"
