"""Requests to one model deployment, sent as few calls as keep it busy (two-level batching).

Every call from the ingress to a model replica costs a Ray round trip and the replica's own
per-call handling, which for a short text cost more than its share of a forward pass. So the
ingress sends a request at once while fewer than ``depth`` calls to the model are in flight,
and otherwise holds it until one returns, then sends everything held as one call; the replica
runs each request of a call through its queue as it would have alone (its own deadline,
priority and admission), so passes still form across calls, and answers each request's result
or error in order. A lone request never waits; under load a call carries what arrived during
the previous one.

Priorities: a request is held only behind a call that holds work of its priority or a higher
one, never behind calls of lower-priority (bulk) work alone, so a query is sent at once beside
a running bulk job. No Ray here (:class:`serve_app.serve.handles.HandleBackend` wires it).
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
    """Sends ``Q`` requests through ``send`` (one call for a list of them, answering a result
    or an exception per request, in order); ``depth()``: how many calls may be in flight before
    requests are held; ``priority(q)``: a request's priority (1 the highest)."""

    def __init__(self, send: Callable[[list[Q]], Awaitable[Sequence[R | BaseException]]],
                 depth: Callable[[], int], priority: Callable[[Q], int]) -> None:
        self._send = send
        self._depth = depth
        self._priority = priority
        self._held: list[tuple[Q, asyncio.Future[R]]] = []
        self._flying: list[int] = []  # each call in flight: its best (lowest) priority
        self.calls = 0  # calls sent, for tests and statistics

    async def submit(self, req: Q) -> R:
        """``req``'s result, or its error raised; cancelling the wait leaves the call (and
        the other requests in it) alone."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        level = self._priority(req)
        if len(self._flying) < self._depth() or all(p > level for p in self._flying):
            self._start([(req, future)])
        else:
            self._held.append((req, future))
        return await future

    def _start(self, batch: list[tuple[Q, asyncio.Future[R]]]) -> None:
        self._flying.append(min(self._priority(q) for q, _ in batch))
        self.calls += 1
        asyncio.get_running_loop().create_task(self._run(batch, self._flying[-1]))

    def _flush(self) -> None:
        self._held = [(q, f) for q, f in self._held if not f.done()]  # callers gone
        while self._held and len(self._flying) < self._depth():
            batch, self._held = self._held[:MAX_CALL], self._held[MAX_CALL:]
            self._start(batch)

    async def _run(self, batch: list[tuple[Q, asyncio.Future[R]]], level: int) -> None:
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
        finally:
            self._flying.remove(level)
            self._flush()

    def held(self) -> int:
        return len(self._held)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Coalescer(flying={self._flying}, held={len(self._held)})"

