# serve_app image: the official Ray image for our Ray version, plus serve_app and its model stack.
#
#   docker build -t serve-app:0.1.0 .                                  # CPU (default)
#   docker build -t serve-app:0.1.0-gpu --build-arg DEVICE=gpu .       # CUDA (torch from PyPI)
#   docker build -t serve-app:0.1.0-gte --build-arg BAKE_MODEL=thenlper/gte-base .  # offline
#
# Runs as the image's non-root user `ray` (uid 1000). KubeRay starts Ray in it; KServe runs
# `python -m serve_app ...` (see k8s/). Models are cached under HF_HOME=/models/hf, which a
# volume can back; a model baked in at build time lives there too.
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG DEVICE=cpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${DEVICE}

ARG DEVICE=cpu
# The CPU image takes torch's CPU wheel (about 200 MB instead of several GB of CUDA libraries).
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG BAKE_MODEL=""

# TOKENIZERS_PARALLELISM only matches hadolint's "sensitive name" pattern; it holds no secret.
# hadolint ignore=DL3064
ENV HF_HOME=/models/hf \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
    RAY_USAGE_STATS_ENABLED=0

USER 0
RUN mkdir -p /models/hf && chown -R 1000:100 /models
USER 1000
WORKDIR /home/ray/serve_app

COPY --chown=1000:100 constraints.txt pyproject.toml README.md ./
COPY --chown=1000:100 serve_app ./serve_app

# constraints.txt pins what CI tests; ray itself comes from the base image at the same version.
RUN if [ "$DEVICE" = "cpu" ]; then \
        pip install --no-cache-dir --index-url "$TORCH_CPU_INDEX" "torch==2.13.0"; \
    fi \
    && pip install --no-cache-dir -c constraints.txt . \
    && python -c "import serve_app.serve.app, serve_app.frontend.v2.proto.inference_pb2"

# Optional: bake a hub model into HF_HOME for clusters without internet (set HF_HUB_OFFLINE=1).
RUN if [ -n "$BAKE_MODEL" ]; then \
        python -c "import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1])" "$BAKE_MODEL"; \
    fi

VOLUME ["/models"]
# 8000/9000: Ray Serve HTTP/gRPC (RayService); 8080/8081: KServe-style command line.
EXPOSE 8000 9000 8080 8081
CMD ["python", "-m", "serve_app", "--model_name", "embedding", "--model_id", "sentence-transformers/all-MiniLM-L6-v2", "--task", "text_embedding"]
