"""One model in one replica, without Ray: admission, tokenizing, the batch queue, the answer.

:class:`ModelReplica` is a :class:`serve_app.dataplane.ModelBackend`: the colocated ingress holds
it directly, a model deployment serves it over Ray, tests and benchmarks call it in process. In a
Serve replica its requests enter the queue through ``@serve.batch`` (``enter``; see
:mod:`serve_app.deployments`); elsewhere they enter it directly.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from serve_app.engine import EmbeddingEngine, plan_parallelism, reduce_dimensions
from serve_app.errors import InvalidInput, Overloaded
from serve_app.scheduler import BatchQueue, Work
from serve_app.types import EmbedRequest, EmbedResult, ModelInfo

#: Requests this short (in characters, or token ids) are tokenized on the event loop, where
#: that costs less than the two thread switches of the tokenizer pool.
INLINE_TOKENIZE_CHARS = 512

Enter = Callable[[Work], Awaitable[Any]]


class ModelReplica:
    """Embeds :class:`EmbedRequest` objects with ``engine``.

    A request is admitted only while the inputs held (tokenizing, queued, in a pass) stay within
    ``max_queued_inputs``; past it the request is refused at once with :class:`Overloaded`: the
    replica's one admission bound. Short requests (``inline_chars``) are tokenized on the event
    loop, others on a small thread pool. ``passes`` forward passes run at once, sharing
    ``threads`` torch threads; a pass alone runs on all of them (``solo``). Each special case
    won a same-run A/B (docs/benchmarks.md).
    """

    def __init__(self, engine: EmbeddingEngine, name: str, version: str = "1",
                 max_queued_inputs: int = 4096, passes: int = 1, threads: int = 1,
                 solo: bool = True, inline_chars: int = INLINE_TOKENIZE_CHARS) -> None:
        self.engine = engine
        self.limit = max_queued_inputs
        self.held = 0
        self.refused = 0
        self._inline = inline_chars
        _, share = plan_parallelism(threads, engine.device, passes)
        compute = functools.partial(engine.forward, threads=share)
        whole = functools.partial(engine.forward, threads=threads)
        self.queue = BatchQueue(compute, engine.max_batch_size, engine.max_batch_tokens, passes,
                                solo=whole if solo and threads > share else None)
        self._tokenize_pool = ThreadPoolExecutor(2, thread_name_prefix="tokenize")
        self._info = engine.info(name, version)
        self._enter: Enter = self._put

    def enter_through(self, enter: Enter) -> None:
        """Send work to the queue through ``enter`` (a ``@serve.batch`` function that passes
        its works on to :meth:`put`) instead of directly."""
        self._enter = enter

    def put(self, works: list[Work]) -> list[None]:
        """Queue ``works``: what ``enter`` must finally call."""
        self.queue.put(works)
        return [None] * len(works)

    async def _put(self, work: Work) -> None:
        self.queue.put([work])

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        n = len(req.inputs)
        if not n:  # the data plane refuses these; here a Work of no texts would never resolve
            raise InvalidInput("input must not be empty", param="input")
        if self.held + n > self.limit:
            self.refused += 1
            raise Overloaded(
                f"model {req.model!r} is at its queue limit ({self.held} of {self.limit} inputs "
                "held); retry after a short wait"
            )
        self.held += n
        try:
            return await self._embed(req)
        finally:
            self.held -= n

    async def _embed(self, req: EmbedRequest) -> EmbedResult:
        t0 = time.perf_counter()
        if sum(len(x) for x in req.inputs) <= self._inline:
            seqs, truncated = self.engine.prepare(req.inputs, req.truncate)
        else:  # off the event loop, which keeps answering while a long request is tokenized
            seqs, truncated = await asyncio.get_running_loop().run_in_executor(
                self._tokenize_pool,
                functools.partial(self.engine.prepare, req.inputs, req.truncate))
        t1 = time.perf_counter()
        work = Work(seqs, asyncio.get_running_loop().create_future(), req.deadline,
                    asyncio.current_task())
        await self._enter(work)
        vectors = await work.future
        waited = time.perf_counter() - t1
        if req.dimensions is not None and req.dimensions != self.engine.dim:
            vectors = reduce_dimensions(vectors, req.dimensions)
        counts = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        inference = work.inference_s
        return EmbedResult(embeddings=vectors, token_counts=counts, truncated=truncated,
                           tokenize_s=t1 - t0, queue_s=max(0.0, waited - inference),
                           inference_s=inference, passes=self.queue.take_passes())

    async def info(self) -> ModelInfo:
        return self._info

    async def ready(self) -> bool:
        return True

    def queued_inputs(self) -> int:
        return self.held

    async def stats(self) -> dict[str, Any]:
        """What ``/v2/models/{name}/stats`` reports of this replica."""
        return {**self.queue.stats.as_dict(), "refused": self.refused,
                "queued_inputs": self.held}
