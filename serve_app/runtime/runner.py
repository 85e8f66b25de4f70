"""One model in one process, without Ray: admission, tokenizing, the batch queue, the answer
(vectors, or reranking scores).

:class:`ModelRunner` is a :class:`serve_app.frontend.registry.ModelBackend`: the colocated
ingress holds it directly, a model deployment serves it over Ray, tests and benchmarks call it in
process; in every case its requests enter its :class:`BatchQueue` directly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from serve_app.engine.classifier import ClassifyEngine
from serve_app.engine.embedding import EmbeddingEngine, plan_parallelism
from serve_app.engine.long_inputs import LateChunks, Windows
from serve_app.engine.m3 import Heads, M3Engine
from serve_app.engine.multivector import MultiVectorEngine, maxsim
from serve_app.engine.quantize import Calibration, quantize, reduce_dimensions
from serve_app.engine.reranker import RerankEngine
from serve_app.engine.sparse import SparseEngine, prune_rows
from serve_app.errors import EmptyInput, InvalidInput, Overloaded, PayloadTooLarge, wrong_task
from serve_app.runtime.batch_queue import FAIR_EVERY, BatchQueue, Work
from serve_app.types import (
    AnyEmbedResult,
    ChunkEmbedResult,
    ClassifyRequest,
    ClassifyResult,
    DecodeRequest,
    DecodeResult,
    EmbedRequest,
    EmbedResult,
    ModelInfo,
    MultiEmbedResult,
    Output,
    RerankRequest,
    RerankResult,
    SparseEmbedResult,
    TokenEmbedResult,
    TokenizeRequest,
    TokenizeResult,
    chars,
)

#: Requests this short (in characters, or token ids) are tokenized on the event loop, where
#: that costs less than the two thread switches of the tokenizer pool.
INLINE_TOKENIZE_CHARS = 512

#: threads of a replica's tokenizer pool (long requests are tokenized there)
TOKENIZER_THREADS = 2

Prepare = Callable[[], tuple[list[list[int]], int]]
T = TypeVar("T")


@dataclass
class Admission:
    """The inputs a replica holds (tokenizing, queued, in a pass) against its bound, ``limit``,
    and the requests it refused."""

    limit: int
    held: int = 0
    refused: int = 0


@dataclass(frozen=True)
class ReplicaResources:
    """What the models of one replica share (a model and its variants): ``forward`` runs their
    forward passes, at most its thread count at once among them; ``tokenize`` tokenizes their
    long requests; ``admission`` is the replica's one input bound, whichever model holds them."""

    forward: ThreadPoolExecutor
    tokenize: ThreadPoolExecutor
    admission: Admission

    @classmethod
    def of(cls, passes: int, max_queued_inputs: int) -> ReplicaResources:
        return cls(ThreadPoolExecutor(passes, thread_name_prefix="forward"),
                   ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tokenize"),
                   Admission(max_queued_inputs))


Engine = EmbeddingEngine | ClassifyEngine


def _row_width(engine: EmbeddingEngine, req: EmbedRequest) -> int:
    """The floats of each per-token vector ``req``'s answer holds (0: none)."""
    if isinstance(engine, MultiVectorEngine):
        return engine.dim
    if "multivector" in req.outputs and isinstance(engine, M3Engine):
        return engine.multivector_dim
    return int(getattr(engine.model_config, "hidden_size", 0)) if "tokens" in req.outputs else 0


def _within(prepare: Prepare, limit: int, width: int) -> tuple[list[list[int]], int]:
    """``prepare()``, refused when its per-token vectors (at most a row a token) would hold
    more than ``limit`` bytes."""
    seqs, cut = prepare()
    rows = sum(len(s) for s in seqs)
    if rows * width * 4 > limit:
        raise PayloadTooLarge(
            f"the answer would hold up to {rows} vectors of {width} floats "
            f"({rows * width * 4} bytes), more than the payload limit of {limit} bytes "
            "(max_body_bytes); send fewer or shorter texts")
    return seqs, cut


def matrices(rows: list[np.ndarray], measured: dict[str, Any]) -> TokenEmbedResult:
    """Per-input matrices ``[rows_i, dim]`` as one :class:`TokenEmbedResult`."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(m) for m in rows], out=offsets[1:])
    return TokenEmbedResult(embeddings=np.concatenate(rows), offsets=offsets, **measured)


class ModelRunner:
    """Embeds :class:`EmbedRequest` objects with an :class:`EmbeddingEngine` (dense, or sparse
    with a :class:`SparseEngine`), scores :class:`RerankRequest` objects with a
    :class:`RerankEngine`, classifies :class:`ClassifyRequest` objects with a
    :class:`ClassifyEngine` (a reranker classifies pairs too).

    A request is admitted only while the inputs held (tokenizing, queued, in a pass) stay within
    ``max_queued_inputs``; past it the request is refused at once with :class:`Overloaded`: the
    replica's one admission bound. Short requests (``inline_chars``) are tokenized on the event
    loop, others on a small thread pool. ``passes`` forward passes run at once, sharing ``threads``
    torch threads; a pass alone runs on all of them (``solo``); each of these is kept because it
    measured faster (``bench/run.py --scheduler-ab``). With ``shared`` threads and bound (the
    models of one replica) no pass runs alone, so none takes every thread. ``batch_wait_s``: how
    long an idle model waits for more requests to join a part-filled first pass;
    ``fair_every``: how often a pass serves the oldest waiting priority level;
    ``inline_pass_s``: how short a lone small pass runs on the event loop (:class:`BatchQueue`).
    Vectors are cut to ``dimensions`` and encoded
    (:mod:`serve_app.engine.quantize`) here, so compact encodings cross to the ingress compact; a
    model not calibrated at warm-up (a variant) calibrates on its first int8/uint8 request.
    Requests for every token's vector (``output: tokens``) form passes of their own, in a
    second queue made on the first such request, on the same forward threads.
    """

    def __init__(self, engine: Engine, name: str, version: str = "1",
                 max_queued_inputs: int = 4096, passes: int = 1, threads: int = 1,
                 solo: bool = True, inline_chars: int = INLINE_TOKENIZE_CHARS,
                 shared: ReplicaResources | None = None, batch_wait_s: float = 0.0,
                 fair_every: int = FAIR_EVERY, inline_pass_s: float = 0.0) -> None:
        self.engine = engine
        self._inline = inline_chars
        _, share = plan_parallelism(threads, engine.device, passes)
        compute = functools.partial(engine.serve_pass, threads=share)
        whole = functools.partial(engine.serve_pass, threads=threads)
        own = shared is None
        shared = shared or ReplicaResources.of(passes, max_queued_inputs)
        self._queue_of = functools.partial(
            BatchQueue, max_batch_size=engine.max_batch_size,
            max_batch_tokens=engine.max_batch_tokens, passes=passes, executor=shared.forward,
            wait_s=batch_wait_s, fair_every=fair_every, inline_s=inline_pass_s)
        self.queue = self._queue_of(
            compute, solo=whole if own and solo and threads > share
            and engine.backend.threads_per_call else None)
        self._queues: dict[str, BatchQueue] = {}  # see _queue_named
        self._share = share
        self._tokenize_pool = shared.tokenize
        self.admission = shared.admission
        self._held = 0  # this model's part of admission.held
        self._calibrating = asyncio.Lock()
        self._info = dataclasses.replace(engine.info(name, version),
                                         tokenizer_threads=TOKENIZER_THREADS)

    @contextmanager
    def _admit(self, model: str, n: int) -> Iterator[None]:
        if not n:  # the data plane refuses these; here a Work of no texts would never resolve
            raise EmptyInput("input must not be empty", param="input")
        a = self.admission
        if a.held + n > a.limit:
            a.refused += 1
            raise Overloaded(
                f"model {model!r} is at its queue limit ({a.held} of {a.limit} inputs "
                "held); retry after a short wait"
            )
        a.held += n
        self._held += n
        try:
            yield
        finally:
            a.held -= n
            self._held -= n

    async def _run(self, prepare: Prepare, chars: int, deadline: float | None, priority: int,
                   queue: BatchQueue | None = None) -> tuple[Any, dict[str, Any]]:
        """Tokenize (``prepare``), queue and compute one request (on ``queue``, default the
        model's): the model's output rows in input order, and what an answer reports (token
        counts, truncated, timings, passes)."""
        t0 = time.perf_counter()
        seqs, truncated = await self._off_loop(chars, prepare)
        t1 = time.perf_counter()
        work = Work(seqs, asyncio.get_running_loop().create_future(), deadline,
                    asyncio.current_task(), priority=priority)
        queue = queue or self.queue
        queue.put([work])
        out = await work.future
        waited = time.perf_counter() - t1
        if isinstance(seqs, Windows):  # inputs embedded whole, in windows
            out, counts = seqs.plan.finish(out), seqs.plan.token_counts()
        else:
            counts = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        inference = work.inference_s
        return out, {"token_counts": counts, "truncated": truncated, "tokenize_s": t1 - t0,
                     "queue_s": max(0.0, waited - inference), "inference_s": inference,
                     "passes": queue.take_passes()}

    def _queue_named(self, name: str, compute: Callable[..., Any]) -> BatchQueue:
        """The queue of passes of another kind than the model's own (every token's states,
        all of BGE-M3's outputs), made on its first request, on the same forward threads."""
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = self._queue_of(
                functools.partial(compute, threads=self._share))
        return queue

    async def embed(self, req: EmbedRequest) -> AnyEmbedResult:
        engine = self.engine
        if not isinstance(engine, EmbeddingEngine):
            raise wrong_task(req.model, self._info.task, "embedding")
        missing = [o for o in req.outputs if o not in engine.offers]
        if missing:
            raise InvalidInput(f"model {req.model!r} answers the outputs {list(engine.offers)}, "
                               f"not {missing}", param="output")
        if req.late_chunking:
            return await self._late_chunks(engine, req)
        mode = req.long_inputs or engine.cfg.long_inputs
        heads = isinstance(engine, M3Engine) and bool({"sparse", "multivector"} & set(req.outputs))
        if len(req.outputs) > 1 and (not heads or "tokens" in req.outputs):
            raise InvalidInput("only BGE-M3's dense, sparse and multi-vector outputs come "
                               "together; ask for the others one to a request", param="output")
        if mode == "chunk" and (heads or req.outputs != ("pooled",)):
            raise InvalidInput("long_inputs chunk answers one vector per input; other outputs "
                               "are answered for texts within the limit (long_inputs truncate "
                               "or error)", param="long_inputs")
        queue = None
        if heads:
            assert isinstance(engine, M3Engine)
            queue = self._queue_named("heads", engine.heads)
        elif req.outputs == ("tokens",):
            queue = self._queue_named("tokens", engine.token_pass)
        with self._admit(req.model, len(req.inputs)):
            prepare: Prepare = (
                functools.partial(engine.prepare_windows, req.inputs, req.prompt_name)
                if mode == "chunk" else
                functools.partial(engine.prepare, req.inputs, mode == "truncate",
                                  req.prompt_name, req.truncation_side))
            if req.max_answer_bytes is not None:
                prepare = functools.partial(_within, prepare, req.max_answer_bytes,
                                            _row_width(engine, req))
            out, measured = await self._run(prepare, sum(len(x) for x in req.inputs),
                                            req.deadline, req.effective_priority, queue)
        if heads:
            assert isinstance(engine, M3Engine)
            parts = [await self._head_part(engine, req, out, output, measured)
                     for output in req.outputs]
            return parts[0] if len(parts) == 1 else MultiEmbedResult(parts=tuple(parts),
                                                                     **measured)
        if req.outputs == ("tokens",) or isinstance(engine, MultiVectorEngine):
            return matrices(out, measured)
        vectors = engine.finish(out, req.normalize)
        if isinstance(engine, SparseEngine):
            indptr, indices, values = engine.rows(vectors, req.max_active_dims)
            return SparseEmbedResult(indptr=indptr, indices=indices, values=values,
                                     dim=engine.dim, **measured)
        return EmbedResult(embeddings=await self._encode(engine, req, vectors), **measured)

    async def _head_part(self, engine: M3Engine, req: EmbedRequest, rows: list[Heads],
                         output: Output, measured: dict[str, Any]
                         ) -> EmbedResult | SparseEmbedResult | TokenEmbedResult:
        """One of BGE-M3's outputs, from the texts' :class:`Heads`."""
        if output == "multivector":
            return matrices([r.multivector for r in rows], measured)
        if output == "sparse":
            indptr, indices, values = prune_rows([r.indices for r in rows],
                                                 [r.values for r in rows], req.max_active_dims)
            return SparseEmbedResult(indptr=indptr, indices=indices, values=values,
                                     dim=engine.sparse_dim, **measured)
        assert output == "pooled", output
        vectors = engine.finish(np.stack([r.dense for r in rows]), req.normalize)
        return EmbedResult(embeddings=await self._encode(engine, req, vectors), **measured)

    async def _late_chunks(self, engine: EmbeddingEngine, req: EmbedRequest
                           ) -> ChunkEmbedResult:
        """One vector per chunk of the request's one text, from its tokens' outputs of a pass
        over the whole text (:mod:`serve_app.engine.long_inputs`)."""
        if engine.task != "embedding" or req.outputs != ("pooled",):
            raise InvalidInput("late chunking answers one dense vector per chunk: it takes a "
                               "dense embedding model and pooled output", param="chunks")
        text = req.inputs[0]
        if len(req.inputs) != 1 or not isinstance(text, str):
            raise InvalidInput(f"late chunking takes one text, the document to chunk; got "
                               f"{len(req.inputs)} inputs", param="input")
        plans: list[LateChunks] = []

        def prepare() -> tuple[Windows, int]:
            plan = engine.late_chunks(text, req.prompt_name, req.chunks, req.chunk_tokens)
            plans.append(plan)
            return Windows(plan.windows, plan), 0

        with self._admit(req.model, 1):
            pooled, measured = await self._run(prepare, len(text), req.deadline,
                                               req.effective_priority,
                                               self._queue_named("tokens", engine.token_pass))
        vectors = engine.finish(pooled, req.normalize)
        return ChunkEmbedResult(embeddings=await self._encode(engine, req, vectors),
                                spans=plans[0].spans, **measured)

    async def _encode(self, engine: EmbeddingEngine, req: EmbedRequest, vectors: np.ndarray
                      ) -> np.ndarray:
        """Dense vectors as ``req`` asks for them: cut to its ``dimensions``, in its
        ``encoding``."""
        if req.dimensions is not None and req.dimensions != engine.dim:
            # cut, and normalized again unless the request asked for vectors as pooled
            vectors = (np.ascontiguousarray(vectors[:, :req.dimensions])
                       if req.normalize is False else reduce_dimensions(vectors, req.dimensions))
        if req.encoding in ("int8", "uint8"):
            calibration = engine.calibration or await self._calibrate(engine)
            return calibration.encode(vectors, req.encoding)
        if req.encoding != "float":
            return quantize(vectors, req.encoding)
        return vectors

    async def _calibrate(self, engine: EmbeddingEngine) -> Calibration:
        """Calibrate once, however many requests ask at once, off the event loop."""
        async with self._calibrating:
            if engine.calibration is None:
                await asyncio.to_thread(engine.calibrate)
        assert engine.calibration is not None
        return engine.calibration

    async def rerank(self, req: RerankRequest) -> RerankResult:
        engine = self.engine
        if isinstance(engine, MultiVectorEngine):
            return await self._maxsim(engine, req)
        if not isinstance(engine, RerankEngine):
            raise wrong_task(req.model, self._info.task, "rerank")
        with self._admit(req.model, len(req.documents)):
            prepare = functools.partial(engine.tokenize, req.query, req.documents, req.truncate,
                                        req.truncation_side)
            chars = len(req.query) * len(req.documents) + sum(map(len, req.documents))
            logits, measured = await self._run(prepare, chars, req.deadline, req.effective_priority)
        return RerankResult(scores=engine.scores(logits, req.raw_scores), **measured)

    async def _maxsim(self, engine: MultiVectorEngine, req: RerankRequest) -> RerankResult:
        """Late-interaction scores: the query's vectors (the query side) against each
        document's, in one pass; usage counts the query's tokens once."""
        with self._admit(req.model, len(req.documents) + 1):
            prepare = functools.partial(engine.rerank_inputs, req.query, req.documents,
                                        req.truncate, req.truncation_side)
            out, measured = await self._run(prepare, len(req.query) + sum(map(len, req.documents)),
                                            req.deadline, req.effective_priority)
        counts = measured["token_counts"][1:].copy()
        counts[0] += measured["token_counts"][0]
        return RerankResult(scores=maxsim(out[0], out[1:]),
                            **{**measured, "token_counts": counts})

    async def classify(self, req: ClassifyRequest) -> ClassifyResult:
        engine = self.engine
        if not isinstance(engine, ClassifyEngine):
            raise wrong_task(req.model, self._info.task, "classify")
        with self._admit(req.model, len(req.inputs)):
            prepare = functools.partial(engine.prepare, req.inputs, req.truncate,
                                        req.truncation_side)
            logits, measured = await self._run(prepare, chars(req.inputs), req.deadline,
                                               req.effective_priority)
        return ClassifyResult(scores=engine.probabilities(logits, req.raw_scores), **measured)

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResult:
        """``req``'s texts as the model tokenizes them to embed (a reranker: as they are),
        untruncated; long requests on the tokenizer pool, as embedding requests."""
        engine = self.engine
        if isinstance(engine, EmbeddingEngine):
            texts = engine.model_texts(req.texts, req.prompt_name)
        elif req.prompt_name:
            raise InvalidInput(f"model {req.model!r} has no prompts", param="prompt_name")
        else:
            texts = list(req.texts)
        tokens = await self._off_loop(sum(map(len, texts)), functools.partial(
            engine.tokens, texts, req.add_special_tokens))
        return TokenizeResult(tuple(tokens))

    async def decode(self, req: DecodeRequest) -> DecodeResult:
        texts = await self._off_loop(sum(map(len, req.ids)), functools.partial(
            self.engine.decode, req.ids, req.skip_special_tokens))
        return DecodeResult(tuple(texts))

    async def _off_loop(self, size: int, work: Callable[[], T]) -> T:
        """``work()``, on the event loop when ``size`` is small, else on the tokenizer pool (the
        event loop keeps answering while a long request is tokenized)."""
        if size <= self._inline:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, work)

    async def info(self) -> ModelInfo:
        return self._info

    async def ready(self) -> bool:
        return True

    def queued_inputs(self) -> int:
        return self._held

    def full(self) -> bool:
        return self.admission.held >= self.admission.limit

    async def stats(self) -> dict[str, Any]:
        """What ``/v2/models/{name}/stats`` reports of this replica."""
        return {**self.queue.stats.as_dict(), "refused": self.admission.refused,
                "queued_inputs": self._held, "queued_by_priority": self.queue.queued_by_priority(),
                "running_passes": self.queue.running}
