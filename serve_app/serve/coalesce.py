"""Requests to one model deployment, sent together when they arrive together (two-level
batching).

Every call from the ingress to a model replica costs a Ray round trip and the replica's own
per-call handling, which for a short text cost more than its share of a forward pass. So the
requests that reach the coalescer within one turn of the event loop (under load, those whose
bodies arrived in one read of the sockets) go as one call, sent at the end of that turn; the
replica runs each request of a call through its queue as it would have alone (its own deadline,
priority and admission), so passes still form across calls, and answers each request's result
or error in order. Nothing is ever held for a later call: a lone request goes at once, and a
request the replica would refuse (its admission bound) is refused as fast as without
coalescing, never queued in front of it. No Ray here
(:class:`serve_app.serve.handles.HandleBackend` wires it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Q = TypeVar("Q")
R = TypeVar("R")

#: the most requests one call carries
MAX_CALL = 256


class Coalescer(Generic[Q, R]):
    """Sends ``Q`` requests through ``send`` (one call for a list of them, answering a result or
    an exception per request, in order): those submitted in one turn of the event loop as one
    call."""

    def __init__(self, send: Callable[[list[Q]], Awaitable[Sequence[R | BaseException]]]
                 ) -> None:
        self._send = send
        self._pending: list[tuple[Q, asyncio.Future[R]]] = []
        self._flying: set[asyncio.Task[None]] = set()  # held here: the loop keeps weak ones
        self.calls = 0  # calls sent, for tests and statistics

    async def submit(self, req: Q) -> R:
        """``req``'s result, or its error raised; cancelling the wait leaves the call (and the
        other requests in it) alone."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)  # at the end of this turn of the loop
        self._pending.append((req, future))
        return await future

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        loop = asyncio.get_running_loop()
        for i in range(0, len(pending), MAX_CALL):
            batch = [(q, f) for q, f in pending[i:i + MAX_CALL] if not f.done()]
            if batch:
                self.calls += 1
                task = loop.create_task(self._run(batch))
                self._flying.add(task)
                task.add_done_callback(self._flying.discard)

    async def _run(self, batch: list[tuple[Q, asyncio.Future[R]]]) -> None:
        try:
            results: Sequence[R | BaseException] = await self._send([q for q, _ in batch])
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        except Exception as e:  # the call failed whole: every request in it
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
