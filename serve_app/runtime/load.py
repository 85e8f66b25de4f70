"""A model runner from its config: the engine loaded and warmed up, its forward passes and
threads planned for the CPUs its replica owns, logged step by step (Serve reports a replica
ready only once its constructor returns, so after the warm-up). No Ray."""

from __future__ import annotations

import logging
import time

from serve_app.config.schema import ModelConfig
from serve_app.engine.backends import choose
from serve_app.engine.classifier import ClassifyEngine
from serve_app.engine.embedding import EmbeddingEngine, pick_device, plan_parallelism
from serve_app.engine.m3 import M3Engine, is_m3
from serve_app.engine.model_files import resolve_model_dir
from serve_app.engine.multivector import MultiVectorEngine
from serve_app.engine.reranker import RerankEngine
from serve_app.engine.sparse import SparseEngine
from serve_app.runtime.runner import ModelRunner, ReplicaResources
from serve_app.types import Task

log = logging.getLogger(__name__)

#: the engine of each task
ENGINES: dict[Task, type[EmbeddingEngine] | type[ClassifyEngine]] = {
    "embedding": EmbeddingEngine, "rerank": RerankEngine, "classify": ClassifyEngine,
    "sparse": SparseEngine, "multivector": MultiVectorEngine}


def engine_class(cfg: ModelConfig) -> type[EmbeddingEngine] | type[ClassifyEngine]:
    """The engine of ``cfg``'s task; for an embedding model with BGE-M3's heads beside it,
    the engine that answers them too."""
    if cfg.task == "embedding" and is_m3(resolve_model_dir(cfg.model_id, cfg.model_revision)):
        return M3Engine
    return ENGINES[cfg.task]


def passes_of(cfg: ModelConfig) -> tuple[int, int]:
    """Forward passes at once and threads each, for ``cfg``'s replica. Set
    explicitly: Ray gives fractional actors OMP_NUM_THREADS=1, and a colocated ingress owns the
    CPUs of every model it holds."""
    return plan_parallelism(cfg.threads, pick_device(cfg.device), cfg.batching.parallel_passes)


def load_runner(cfg: ModelConfig, shared: ReplicaResources | None = None,
                variant: bool = False) -> ModelRunner:
    """Load ``cfg``'s model and warm it up. A model with variants shares its threads and input
    bound with them (``shared``). A ``variant`` skips the warm-up (its base warmed this
    process's kernels already; a warm-up would double its load time to spare its first
    request a few milliseconds) and calibrates on its first int8/uint8 request; it checks its
    engine's fidelity on a sample of the calibration corpus instead of the whole."""
    t0 = time.perf_counter()
    threads = cfg.threads
    passes, per_pass = passes_of(cfg)
    backend = choose(cfg.backend, cfg.precision, cfg.dtype, pick_device(cfg.device))[0]
    log.info("model %r: starting (%s on %s, %d forward pass(es) at once, %d thread(s) each)",
             cfg.name, cfg.model_id, backend, passes, per_pass)
    engine = engine_class(cfg)(cfg, num_threads=per_pass, passes=passes)
    if variant:
        engine.verify()
    else:
        log.info("model %r: warming up", cfg.name)
        warm = engine.warmup(threads)
        log.info("model %r: warmed up in %.2fs; ready after %.2fs", cfg.name, warm,
                 time.perf_counter() - t0)
    return ModelRunner(engine, cfg.name, cfg.version, cfg.max_queued_inputs, passes, threads,
                       shared=shared, batch_wait_s=cfg.batching.batch_wait_timeout_s,
                       fair_every=cfg.batching.fair_every,
                       inline_pass_s=cfg.batching.inline_pass_s)
