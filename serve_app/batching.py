"""Request-to-forward-pass scheduling inside a model replica. Plain asyncio, no Ray.

Why a drain loop behind ``@serve.batch``: Ray's batch queue closes a batch after
``batch_wait_timeout_s`` even while the previous one still runs, then parks it on a semaphore.
Under load that yields many thin batches. Here ``@serve.batch`` is only the collection window;
its batches land in :class:`DrainBatcher`, which runs one forward at a time and each time takes
everything pending (up to ``max_batch_size`` texts). While the model computes, arrivals pile up,
so the next pass is full.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serve_app.engine import EmbeddingEngine, reduce_dimensions
from serve_app.errors import InvalidInput
from serve_app.types import EmbedRequest, EmbedResult

Seqs = list[list[int]]


@dataclass
class BatchStats:
    """The forward passes run so far: how many, with how many texts, and their compute time."""

    passes: int = 0
    texts: int = 0
    sizes: collections.Counter[int] = field(default_factory=collections.Counter)
    nanos: collections.Counter[int] = field(default_factory=collections.Counter)

    def record(self, n: int, seconds: float) -> None:
        self.passes += 1
        self.texts += n
        self.sizes[n] += 1
        self.nanos[n] += int(seconds * 1e9)

    def as_dict(self) -> dict[str, Any]:
        return {
            "passes": self.passes,
            "texts": self.texts,
            "mean_batch": self.texts / self.passes if self.passes else 0.0,
            "max_batch": max(self.sizes) if self.sizes else 0,
            "batches": [
                {"batch_size": k, "count": v, "ns": self.nanos[k]}
                for k, v in sorted(self.sizes.items())
            ],
        }


class DrainBatcher:
    """Runs ``compute`` (token-id sequences -> float32 ``[n, dim]``) on one worker thread, each
    pass taking every group pending, oldest first, up to ``max_batch_size`` sequences."""

    def __init__(self, compute: Callable[[Seqs], np.ndarray], max_batch_size: int) -> None:
        self._compute = compute
        self._max = max_batch_size
        self._pending: collections.deque[tuple[Seqs, asyncio.Future[np.ndarray]]] = (
            collections.deque()
        )
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self.stats = BatchStats()

    async def run(self, groups: Sequence[Seqs]) -> list[np.ndarray]:
        """Vectors for each group, in order. Each group must hold <= max_batch_size sequences."""
        loop = asyncio.get_running_loop()
        futures = []
        for g in groups:
            fut: asyncio.Future[np.ndarray] = loop.create_future()
            self._pending.append((g, fut))
            futures.append(fut)
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return list(await asyncio.gather(*futures))

    def _take(self) -> list[tuple[Seqs, asyncio.Future[np.ndarray]]]:
        taken: list[tuple[Seqs, asyncio.Future[np.ndarray]]] = []
        size = 0
        while self._pending:
            group, fut = self._pending[0]
            if fut.done():  # the caller went away: drop its work before it reaches the model
                self._pending.popleft()
                continue
            if taken and size + len(group) > self._max:
                break
            self._pending.popleft()
            taken.append((group, fut))
            size += len(group)
        return taken

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            taken = self._take()
            if not taken:
                continue
            flat = [s for group, _ in taken for s in group]
            t0 = time.perf_counter()
            try:
                vectors = await loop.run_in_executor(self._executor, self._compute, flat)
            except Exception as e:  # hand the failure to every waiter; the loop lives on
                for _, fut in taken:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.stats.record(len(flat), time.perf_counter() - t0)
            start = 0
            for group, fut in taken:
                if not fut.done():
                    fut.set_result(vectors[start : start + len(group)])
                start += len(group)


class ModelRunner:
    """Turns one :class:`EmbedRequest` into an :class:`EmbedResult` with a loaded engine.

    Tokenizes on a small thread pool (overlapping the forward pass), splits the token ids into
    groups of at most ``max_batch_size`` and hands each group to ``submit`` (in a replica, the
    ``@serve.batch`` method), then applies ``dimensions``.
    """

    def __init__(
        self,
        engine: EmbeddingEngine,
        submit: Callable[[Seqs], Awaitable[np.ndarray]],
        tokenizer_threads: int = 2,
    ) -> None:
        self.engine = engine
        self._submit = submit
        self._group = engine.max_batch_size
        self._tokenize_pool = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="tokenize")

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        if req.dimensions is not None and not 1 <= req.dimensions <= self.engine.dim:
            raise InvalidInput(
                f"dimensions must be between 1 and {self.engine.dim}, got {req.dimensions}",
                param="dimensions",
            )
        loop = asyncio.get_running_loop()
        seqs = await loop.run_in_executor(
            self._tokenize_pool,
            functools.partial(self.engine.prepare, req.inputs, req.truncate),
        )
        groups = [seqs[i : i + self._group] for i in range(0, len(seqs), self._group)]
        parts = await asyncio.gather(*(self._submit(g) for g in groups))
        vectors = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if req.dimensions is not None and req.dimensions != self.engine.dim:
            vectors = reduce_dimensions(vectors, req.dimensions)
        counts = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        return EmbedResult(embeddings=vectors, token_counts=counts)
