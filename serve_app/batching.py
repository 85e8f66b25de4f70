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
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serve_app.engine import EmbeddingEngine, plan_parallelism, reduce_dimensions
from serve_app.errors import DeadlineExceeded, InvalidInput, Overloaded
from serve_app.types import EmbedRequest, EmbedResult

Seqs = list[list[int]]

#: Requests this short (in characters, or token ids) are tokenized on the event loop: a few
#: tens of microseconds, less than the two thread switches of the tokenizer pool.
INLINE_TOKENIZE_CHARS = 512


@dataclass(eq=False, slots=True)
class Group:
    """Token ids of at most ``max_batch_size`` texts of one request, and what tells whether the
    request still wants them: its deadline and its task (done or being cancelled: the caller
    went away)."""

    seqs: Seqs
    deadline: float | None = None
    owner: asyncio.Task[Any] | None = None
    pass_id: int = -1  # set by the batcher: which forward pass ran it, and for how long
    compute_s: float = 0.0

    def __len__(self) -> int:
        return len(self.seqs)

    def expired(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

    def abandoned(self) -> bool:
        return self.owner is not None and (self.owner.done() or self.owner.cancelling() > 0)


def _expired() -> DeadlineExceeded:
    return DeadlineExceeded("the request's deadline passed while it waited for the model")


@dataclass
class BatchStats:
    """The forward passes run so far: how many, with how many texts, and their compute time."""

    passes: int = 0
    texts: int = 0
    tokens: int = 0
    dropped: int = 0
    sizes: collections.Counter[int] = field(default_factory=collections.Counter)
    nanos: collections.Counter[int] = field(default_factory=collections.Counter)

    def record(self, n: int, tokens: int, seconds: float) -> None:
        self.passes += 1
        self.texts += n
        self.tokens += tokens
        self.sizes[n] += 1
        self.nanos[n] += int(seconds * 1e9)

    def as_dict(self) -> dict[str, Any]:
        return {
            "passes": self.passes,
            "texts": self.texts,
            "tokens": self.tokens,
            "dropped": self.dropped,
            "mean_batch": self.texts / self.passes if self.passes else 0.0,
            "max_batch": max(self.sizes) if self.sizes else 0,
            "batches": [
                {"batch_size": k, "count": v, "ns": self.nanos[k]}
                for k, v in sorted(self.sizes.items())
            ],
        }


class DrainBatcher:
    """Runs ``compute`` (token-id sequences -> float32 ``[n, dim]``) on up to ``passes`` worker
    threads (forward passes at once). Each pass takes the groups pending, oldest first, up to
    ``max_batch_size`` sequences, or up to its share when other passes are starting at the same
    moment (so the groups of one request spread over the idle workers).

    A pass starts whenever no pass runs. Another starts beside running ones only when at least
    ``max_batch_size // passes`` sequences wait: a few stragglers wait for the running pass to
    end and join the next full one, instead of taking a worker (and a core) for a pass of one
    or two texts, which under many small requests halves every batch.

    ``solo``, when given, computes a pass that is alone: no other pass runs and nothing else
    waits (a lone request under light load). It may use all the replica's threads; no other
    pass starts until it ends, so threads are never oversubscribed.

    Groups whose request has gone (cancelled, disconnected) or whose deadline has passed are
    dropped before they reach the model."""

    def __init__(self, compute: Callable[[Seqs], np.ndarray], max_batch_size: int,
                 passes: int = 1, solo: Callable[[Seqs], np.ndarray] | None = None) -> None:
        self._compute = compute
        self._solo = solo
        self._solo_running = False
        self._max = max_batch_size
        self._pending: collections.deque[tuple[Group, asyncio.Future[np.ndarray]]] = (
            collections.deque()
        )
        self._queued = 0  # sequences in _pending
        self._passes = passes
        self._fill = max(1, max_batch_size // passes)
        self._busy = 0
        self._workers: set[asyncio.Task[None]] = set()
        self._executor = ThreadPoolExecutor(passes, thread_name_prefix="forward")
        self.stats = BatchStats()
        self._unreported: list[tuple[int, int]] = []

    def take_passes(self) -> tuple[tuple[int, int], ...]:
        """The (inputs, tokens) of each pass finished since the last call."""
        out, self._unreported = tuple(self._unreported), []
        return out

    async def run(self, groups: Sequence[Group]) -> list[np.ndarray | BaseException]:
        """Vectors for each group, in order, or the exception that group ended with (so one
        expired group does not fail the others of its ``@serve.batch``). Each group must hold
        <= max_batch_size sequences."""
        loop = asyncio.get_running_loop()
        futures = []
        for g in groups:
            fut: asyncio.Future[np.ndarray] = loop.create_future()
            self._pending.append((g, fut))
            self._queued += len(g)
            futures.append(fut)
        self._start_passes()
        return list(await asyncio.gather(*futures, return_exceptions=True))

    def _start_passes(self) -> None:
        """Start a pass on each idle worker that has enough to do (see the class doc)."""
        while self._pending and len(self._workers) < self._passes and not self._solo_running:
            if self._workers and self._queued < self._fill:
                return  # a running pass ends soon and takes these
            worker = asyncio.get_running_loop().create_task(self._one_pass())
            self._workers.add(worker)
            worker.add_done_callback(self._pass_ended)

    def _pass_ended(self, worker: asyncio.Task[None]) -> None:
        self._workers.discard(worker)
        self._start_passes()

    def _pop(self) -> tuple[Group, asyncio.Future[np.ndarray]]:
        group, fut = self._pending.popleft()
        self._queued -= len(group)
        return group, fut

    def _take(self) -> list[tuple[Group, asyncio.Future[np.ndarray]]]:
        taken: list[tuple[Group, asyncio.Future[np.ndarray]]] = []
        size = 0
        starting = len(self._workers) - self._busy  # passes about to take, this one included
        cap = min(self._max, -(-self._queued // max(1, starting)))
        while self._pending:
            group, fut = self._pending[0]
            if fut.done() or group.abandoned() or group.expired():
                self._pop()  # nobody waits for it: it never reaches the model
                self.stats.dropped += len(group)
                if not fut.done():
                    if group.expired():
                        fut.set_exception(_expired())
                    else:
                        fut.cancel()
                continue
            if taken and size + len(group) > cap:
                break
            taken.append(self._pop())
            size += len(group)
        return taken

    async def _one_pass(self) -> None:
        taken = self._take()
        if not taken:
            return
        flat = [s for group, _ in taken for s in group.seqs]
        alone = not self._pending and len(self._workers) == 1
        compute = self._solo if alone and self._solo is not None else self._compute
        t0 = time.perf_counter()
        self._busy += 1
        self._solo_running = compute is self._solo
        try:
            vectors = await asyncio.get_running_loop().run_in_executor(
                self._executor, compute, flat)
        except Exception as e:  # hand the failure to every waiter; the batcher lives on
            for _, fut in taken:
                if not fut.done():
                    fut.set_exception(e)
            return
        finally:
            self._busy -= 1
            self._solo_running = False
        seconds = time.perf_counter() - t0
        tokens = sum(len(x) for x in flat)
        self.stats.record(len(flat), tokens, seconds)
        self._unreported.append((len(flat), tokens))
        start = 0
        for group, fut in taken:
            group.pass_id, group.compute_s = self.stats.passes, seconds
            if not fut.done():
                fut.set_result(vectors[start : start + len(group)])
            start += len(group)


def forward_batcher(engine: EmbeddingEngine, passes: int, threads: int) -> DrainBatcher:
    """The batcher of a replica owning ``threads`` torch threads that runs ``passes`` forward
    passes at once: each pass on its share of the threads, a pass alone on all of them (a lone
    short text: 8.8 ms on 2 threads against 9.6 ms on 1; docs/architecture.md)."""
    if passes == 1:
        return DrainBatcher(engine.embed_ids, engine.max_batch_size)
    _, share = plan_parallelism(threads, engine.device, passes)
    return DrainBatcher(functools.partial(engine.embed_ids, threads=share),
                        engine.max_batch_size, passes,
                        solo=functools.partial(engine.embed_ids, threads=threads)
                        if threads > share else None)


class InputBound:
    """A bound on the inputs held at once (tokenizing, queued, computing), counted in inputs
    rather than requests. Past it a request is refused at once with :class:`Overloaded`, so a
    flood gets fast 429s instead of a queue that grows until requests time out."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.refused = 0

    @contextlib.contextmanager
    def hold(self, model: str, n: int, scale: int = 1) -> Iterator[None]:
        """Hold ``n`` inputs of ``model`` for the ``with`` block; the bound is ``limit * scale``
        (``scale``: replicas behind it)."""
        limit = self.limit * max(1, scale)
        if self.held + n > limit:
            self.refused += 1
            raise Overloaded(
                f"model {model!r} is at its queue limit ({self.held} of {limit} inputs held); "
                "retry after a short wait"
            )
        self.held += n
        try:
            yield
        finally:
            self.held -= n


class ModelRunner:
    """Turns one :class:`EmbedRequest` into an :class:`EmbedResult` with a loaded engine.

    Admits a request only while the replica's inputs stay within ``max_queued_inputs``
    (:class:`InputBound`). Tokenizes on a small thread pool (overlapping the forward pass),
    splits the token ids into groups of at most ``max_batch_size`` (and into at least
    ``parallel_passes`` groups when it has that many texts, so parallel passes share one request)
    and hands each group to ``submit`` (in a replica, the ``@serve.batch`` method), then applies
    ``dimensions``. The result carries what the replica measured (stage times, truncations,
    finished passes).
    """

    def __init__(
        self,
        engine: EmbeddingEngine,
        submit: Callable[[Group], Awaitable[np.ndarray | BaseException]],
        max_queued_inputs: int = 4096,
        passes: Callable[[], tuple[tuple[int, int], ...]] = tuple,
        tokenizer_threads: int = 2,
        parallel_passes: int = 1,
    ) -> None:
        self.engine = engine
        self._submit = submit
        self._passes = passes
        self._group = engine.max_batch_size
        self._spread = parallel_passes
        self._tokenize_pool = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="tokenize")
        self.bound = InputBound(max_queued_inputs)

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        with self.bound.hold(req.model, len(req.inputs)):
            return await self._embed(req)

    async def _embed(self, req: EmbedRequest) -> EmbedResult:
        if req.dimensions is not None and not 1 <= req.dimensions <= self.engine.dim:
            raise InvalidInput(
                f"dimensions must be between 1 and {self.engine.dim}, got {req.dimensions}",
                param="dimensions",
            )
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        if sum(len(x) for x in req.inputs) <= INLINE_TOKENIZE_CHARS:
            seqs, truncated = self.engine.prepare(req.inputs, req.truncate)
        else:
            seqs, truncated = await loop.run_in_executor(
                self._tokenize_pool,
                functools.partial(self.engine.prepare, req.inputs, req.truncate),
            )
        t1 = time.perf_counter()
        owner = asyncio.current_task()
        size = min(self._group, -(-len(seqs) // self._spread))
        groups = [Group(seqs[i : i + size], req.deadline, owner)
                  for i in range(0, len(seqs), size)]
        if groups[0].expired():
            raise _expired()
        parts = await asyncio.gather(*(self._submit(g) for g in groups))
        waited = time.perf_counter() - t1
        for p in parts:
            if isinstance(p, BaseException):
                raise p
        arrays: list[np.ndarray] = parts  # type: ignore[assignment]
        vectors = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        if req.dimensions is not None and req.dimensions != self.engine.dim:
            vectors = reduce_dimensions(vectors, req.dimensions)
        counts = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        inference = sum({g.pass_id: g.compute_s for g in groups}.values())
        return EmbedResult(embeddings=vectors, token_counts=counts, truncated=truncated,
                           tokenize_s=t1 - t0, queue_s=max(0.0, waited - inference),
                           inference_s=inference, passes=self._passes())


def replica_stats(batcher: DrainBatcher, runner: ModelRunner) -> dict[str, Any]:
    """What ``/v2/models/{name}/stats`` reports of one replica."""
    return {**batcher.stats.as_dict(), "refused": runner.bound.refused,
            "queued_inputs": runner.bound.held}
