"""The GPU entry point: configs/k8s-gpu.yaml's Serve config (fp16 model replicas on one GPU each,
fed by CPU ingress replicas: ``topology: auto`` picks separate deployments) through
``python -m serve_app --config`` on loopback, every protocol, vectors against
sentence-transformers. Skipped without CUDA; ``bench/gpu.sh`` runs it on a GPU machine."""

from __future__ import annotations

import grpc
import httpx
import numpy as np
import pytest
import torch
import yaml

from serve_app.frontend.v2.proto import inference_pb2_grpc as pb_grpc
from tests.helpers import REPO, TEXTS, free_port, infer_request, start_server

pytestmark = [
    pytest.mark.gpu, pytest.mark.e2e,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def gpu_config(http: int, grpc_port: int) -> dict:
    """configs/k8s-gpu.yaml on loopback: free ports, one model replica (this machine's GPU)."""
    config = yaml.safe_load((REPO / "configs" / "k8s-gpu.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=http)
    config["grpc_options"]["port"] = grpc_port
    model = config["applications"][0]["args"]["models"][0]
    model["deployment"]["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    return config


def test_gpu_config_serves_every_protocol_in_fp16(tmp_path, minilm_dir):
    from sentence_transformers import SentenceTransformer

    want = SentenceTransformer(str(minilm_dir), device="cpu").encode(TEXTS)
    http, grpc_port = free_port(), free_port()
    with start_server(gpu_config(http, grpc_port), tmp_path) as server:
        # the separate topology: the model replica on the GPU
        assert server.processes_named("ServeReplica:serve_app:model-embedding-v1")
        r = httpx.post(f"{server}/v1/embeddings", json={"model": "embedding", "input": TEXTS},
                       timeout=60)
        assert r.status_code == 200
        got = np.array([d["embedding"] for d in r.json()["data"]], np.float32)
        cosine = (got * want).sum(axis=1) / np.linalg.norm(want, axis=1)
        assert cosine.min() > 0.999, cosine  # fp16 against fp32
        v1 = httpx.post(f"{server}/v1/models/embedding:predict", json={"instances": TEXTS})
        np.testing.assert_allclose(v1.json()["predictions"], got, atol=1e-6)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            resp = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                infer_request(TEXTS, raw=True), timeout=60)
        np.testing.assert_allclose(
            np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(len(TEXTS), -1), got,
            atol=1e-6)
        burst = [httpx.post(f"{server}/v1/embeddings",
                            json={"model": "embedding", "input": TEXTS[:2] * 64}, timeout=60)
                 for _ in range(4)]
        assert {b.status_code for b in burst} == {200}


def test_reranker_prompts_and_int8_in_fp16_on_gpu(cross_encoder, prompted_minilm):
    """The retrieval paths on CUDA in fp16 against sentence-transformers in fp32 on the CPU:
    reranking scores, prompted vectors, and int8 codes on ranges calibrated on the GPU."""
    from sentence_transformers import CrossEncoder, SentenceTransformer
    from sentence_transformers.util import quantize_embeddings

    from serve_app.config.schema import ModelConfig
    from serve_app.engine.embedding import EmbeddingEngine
    from serve_app.engine.quantize import calibration_texts
    from serve_app.engine.reranker import RerankEngine

    query = "what do cats eat"
    docs = ["Cats are carnivores and eat meat.", "The stock market fell today.", "word " * 200]
    ce = cross_encoder()
    gpu = RerankEngine(ModelConfig(model_id=str(ce), task="rerank", device="cuda"))
    assert gpu.dtype == torch.float16
    want = CrossEncoder(str(ce), device="cpu").predict([(query, d) for d in docs])
    np.testing.assert_allclose(gpu.rerank(query, docs), want, atol=5e-3)

    engine = EmbeddingEngine(ModelConfig(model_id=str(prompted_minilm), device="cuda"))
    engine.warmup()
    st = SentenceTransformer(str(prompted_minilm), device="cpu")
    got, _ = engine.embed(TEXTS, prompt_name="query")
    ref = st.encode(TEXTS, prompt_name="query")
    cosine = (got * ref).sum(axis=1) / np.linalg.norm(ref, axis=1)
    assert cosine.min() > 0.999, cosine
    assert engine.calibration is not None
    codes = engine.calibration.encode(got, "int8")
    expected = quantize_embeddings(ref, "int8",
                                   calibration_embeddings=st.encode(calibration_texts()))
    assert np.abs(codes.astype(int) - expected.astype(int)).max() <= 3
    assert (codes == expected).mean() > 0.8
