"""The one place a model replica forms forward passes. Plain asyncio, no Ray.

Requests enter as :class:`Work` (one request's token ids) and wait in :class:`BatchQueue`, which
forms each pass once:

- the highest priority first (1 is the highest; Triton's convention), and within a priority the
  oldest request first, each request's texts longest first (so a large request's passes pad
  little); a pass holds one priority's work only, so a query never waits inside a pass of bulk
  texts;
- no priority starves: while lower priorities wait, every ``fair_every``-th pass serves the
  priority of the oldest waiting request instead, so a lower priority gets at least one pass in
  ``fair_every``;
- at most ``max_batch_size`` texts and ``max_batch_tokens`` padded tokens (texts x the longest
  one) per pass (:func:`serve_app.engine.batching.fits_pass`); a single text over the token
  budget still gets a pass of its own;
- work whose caller went away (its task is done or being cancelled) or whose deadline passed is
  dropped here, the one place a deadline is checked, before it reaches the model.

A pass starts as soon as the model is idle (or, with ``wait_s``, once an idle model's first
pass has waited that long for company), so while passes run, arrivals pile up and the next pass
is full. With ``passes`` > 1, that many passes run at once on their own threads, each on its
share of the replica's torch threads; work of a higher priority than every running pass starts
a pass on a free thread at once.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serve_app.engine.batching import fits_pass
from serve_app.errors import DeadlineExceeded
from serve_app.types import DEFAULT_PRIORITY

#: While lower priorities wait, one pass in this many serves the oldest waiting request's priority
#: (the default of the config's ``batching.fair_every``).
FAIR_EVERY = 4
#: A pass of at most this many padded tokens is small: its time is mostly the pass's own fixed
#: cost, which the queue measures to decide whether a lone small pass runs inline.
SMALL_PASS_TOKENS = 64
#: turns of the event loop a pass that may run inline waits for arrivals to join it
INLINE_YIELDS = 8
#: Fewer texts than a full share of a pass get a pass of their own beside running ones when it
#: would take this long: long texts gain little from joining later ones, and every worker runs
#: its pass on threads of its own (the CPU backends fix them at load), which would sit idle
SPLIT_S = 0.02
#: Passes of at least this many padded tokens time the queue's seconds per token (smaller ones
#: are mostly their fixed cost, which would make short texts look long)
LARGE_PASS_TOKENS = 1024

Seqs = list[list[int]]
#: what one forward pass answers: float32 ``[n, dim]``, or one array per sequence (outputs
#: whose shape differs between sequences, such as every token's vector)
Rows = np.ndarray | list[np.ndarray]
#: computes one forward pass: token-id sequences -> :data:`Rows`
Compute = Callable[[Seqs], Rows]


def _timed(compute: Compute, seqs: Seqs) -> tuple[Rows, float]:
    """``compute(seqs)`` and its seconds, measured on the thread that runs it."""
    t0 = time.perf_counter()
    return compute(seqs), time.perf_counter() - t0


def _expired() -> DeadlineExceeded:
    return DeadlineExceeded("the request's deadline passed while it waited for the model")


@dataclass(eq=False, slots=True)
class Work:
    """One request's token-id sequences on their way through the queue.

    ``future`` gets the outputs in input order once every sequence has run (float32
    ``[n, dim]``, or a list of arrays from a pass that answers those), or the error that ended
    the request. ``owner`` is the task that awaits it: once that task is done
    or being cancelled, nobody wants the answer. ``deadline`` is wall-clock (``time.time()``).
    ``priority``: its priority, 1 the highest.
    """

    seqs: Seqs
    future: asyncio.Future[Any]
    deadline: float | None = None
    owner: asyncio.Task[Any] | None = None
    priority: int = DEFAULT_PRIORITY
    arrival: int = 0  # the queue's arrival number
    order: list[int] = field(default_factory=list)  # indices longest first
    taken: int = 0  # how many of ``order`` are in a pass already
    left: int = 0  # sequences not computed yet
    out: np.ndarray | list[Any] | None = None
    passes: dict[int, float] = field(default_factory=dict)  # pass number -> its seconds

    def __post_init__(self) -> None:
        self.order = sorted(range(len(self.seqs)), key=lambda i: -len(self.seqs[i]))
        self.left = len(self.seqs)

    @property
    def untaken(self) -> int:
        return len(self.order) - self.taken

    def unwanted(self) -> bool:
        """The answer is no longer wanted: resolved already, caller gone, or deadline passed."""
        if self.future.done():
            return True
        if self.owner is not None and (self.owner.done() or self.owner.cancelling() > 0):
            return True
        return self.deadline is not None and time.time() > self.deadline

    def drop(self) -> None:
        if not self.future.done():
            if self.deadline is not None and time.time() > self.deadline:
                self.future.set_exception(_expired())
            else:
                self.future.cancel()

    @property
    def inference_s(self) -> float:
        return sum(self.passes.values())


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


Pass = list[tuple[Work, int]]  # (request, index of one of its sequences)


class BatchQueue:
    """Forms forward passes from queued :class:`Work` and runs them (see the module doc).

    ``compute`` runs a pass on one of ``passes`` worker threads. A pass starts whenever none
    runs; another starts beside running ones only when at least ``max_batch_size // passes``
    texts wait, so a few stragglers join the next full pass instead of taking a worker (and its
    cores) for a pass of one text, unless they are of a higher priority than every running pass,
    or their own pass would take :data:`SPLIT_S` or more (long texts: batching them with later
    ones gains little, and a worker would sit idle while they wait; large passes are timed per
    padded token as they run).
    Passes starting at the same moment split the waiting texts between them. ``solo``, when
    given, computes a pass that is alone (nothing else runs or waits); no other pass starts
    until it ends, so it may use every thread of the replica. ``executor``: the threads passes
    run on, when several queues of one replica (a model's variants) share ``passes`` threads.
    ``wait_s``: when work arrives at an idle queue, how long the first pass waits for more to
    join it (it starts at once when ``max_batch_size`` texts wait); 0, the default, starts it at
    once. ``fair_every``: see the module doc. ``inline_s``: a small pass (at most
    :data:`SMALL_PASS_TOKENS` padded tokens) that is alone runs on the event loop itself when
    small passes have measured at most this long: handing it to a forward thread and back
    costs more than that at low load (two thread wake-ups); 0 never.
    """

    def __init__(self, compute: Compute, max_batch_size: int, max_batch_tokens: int,
                 passes: int = 1, solo: Compute | None = None,
                 executor: ThreadPoolExecutor | None = None, wait_s: float = 0.0,
                 fair_every: int = FAIR_EVERY, inline_s: float = 0.0) -> None:
        self._compute = compute
        self._inline_s = inline_s
        self._small_s: float | None = None  # small passes' compute seconds, averaged
        self._token_s: float | None = None  # large passes' seconds per padded token, averaged
        self._solo = solo
        self._max_size = max_batch_size
        self._max_tokens = max_batch_tokens
        self._passes = passes
        self._fill = max(1, max_batch_size // passes)
        self._wait_s = wait_s
        self._window: asyncio.TimerHandle | None = None  # the idle queue's wait, while open
        self._window_over = False
        self._fair_every = fair_every
        self._waiting: dict[int, collections.deque[Work]] = {}
        self._queued: collections.Counter[int] = collections.Counter()  # texts waiting by priority
        self._arrivals = itertools.count()
        self._workers: set[asyncio.Task[None]] = set()
        self._forming = 0  # workers started whose pass is not formed yet
        self._running: collections.Counter[int] = collections.Counter()  # passes by priority
        self._passed_over = 0  # passes of a higher priority formed while a lower one waited
        self._solo_running = False
        self._executor = executor or ThreadPoolExecutor(passes, thread_name_prefix="forward")
        self.stats = BatchStats()
        self._unreported: list[tuple[int, int]] = []

    @property
    def queued(self) -> int:
        """Texts waiting for a pass."""
        return self._queued.total()

    def queued_by_priority(self) -> dict[int, int]:
        """Texts waiting for a pass, per priority."""
        return {priority: n for priority, n in sorted(self._queued.items()) if n}

    @property
    def running(self) -> int:
        """Passes running (or about to)."""
        return len(self._workers)

    def put(self, works: Iterable[Work]) -> None:
        """Queue ``works`` (in order) and start the passes they allow."""
        for w in works:
            w.arrival = next(self._arrivals)
            self._waiting.setdefault(w.priority, collections.deque()).append(w)
            self._queued[w.priority] += w.untaken
        self._start_passes()

    def take_passes(self) -> tuple[tuple[int, int], ...]:
        """The (texts, tokens) of each pass finished since the last call."""
        out, self._unreported = tuple(self._unreported), []
        return out

    def _urgent(self) -> bool:
        """Work waits of a higher priority than every running pass."""
        running = [priority for priority, n in self._running.items() if n]
        waiting = [priority for priority, n in self._queued.items() if n]
        return bool(running and waiting) and min(waiting) < min(running)

    def _held_for_company(self) -> bool:
        """Whether an idle queue's first pass still waits (``wait_s``) for more work."""
        if self._workers or not self._wait_s or self.queued >= self._max_size:
            return False
        if self._window_over:
            return False
        if self._window is None:
            self._window = asyncio.get_running_loop().call_later(self._wait_s, self._window_ends)
        return True

    def _window_ends(self) -> None:
        self._window, self._window_over = None, True
        self._start_passes()

    def _start_passes(self) -> None:
        while self.queued and len(self._workers) < self._passes and not self._solo_running:
            if (self._workers and self.queued < self._fill and not self._urgent()
                    and not self._long_wait()):
                return  # a running pass ends soon and takes these
            if self._held_for_company():
                return
            if self._window is not None:
                self._window.cancel()
            self._window, self._window_over = None, False
            worker = asyncio.get_running_loop().create_task(self._run_pass())
            self._forming += 1
            self._workers.add(worker)
            worker.add_done_callback(self._pass_ended)

    def _pass_ended(self, worker: asyncio.Task[None]) -> None:
        self._workers.discard(worker)
        self._start_passes()

    def _long_wait(self) -> bool:
        """Whether the waiting texts' own pass would take :data:`SPLIT_S` or more (unknown
        until passes have been timed: no)."""
        if self._token_s is None:
            return False
        width = count = 0
        for waiting in self._waiting.values():
            for w in waiting:
                for i in w.order[w.taken:]:
                    width = max(width, len(w.seqs[i]))
                    count += 1
        return count * width * self._token_s >= SPLIT_S

    def _next_priority(self) -> int | None:
        """The priority the next pass serves: the highest waiting, or on every fair_every-th pass
        while lower priorities wait, the priority of the oldest waiting request."""
        priorities = sorted(priority for priority, q in self._waiting.items() if q)
        if not priorities:
            return None
        if len(priorities) == 1:
            self._passed_over = 0
            return priorities[0]
        self._passed_over += 1
        if self._passed_over < self._fair_every:
            return priorities[0]
        self._passed_over = 0
        return min(priorities, key=lambda priority: self._waiting[priority][0].arrival)

    def _form(self) -> tuple[Pass, int]:
        """The next pass and its priority: that priority's oldest work first, each one's texts
        longest first, within the count and padded-token budgets; unwanted work is dropped on
        the way."""
        priority = self._next_priority()
        while priority is not None:  # a priority whose work was all unwanted forms nothing
            batch = self._form_at(priority)
            if batch:
                return batch, priority
            priority = self._next_priority()
        return [], DEFAULT_PRIORITY

    def _form_at(self, priority: int) -> Pass:
        waiting = self._waiting[priority]
        cap = min(self._max_size, -(-self._queued[priority] // max(1, self._forming)))
        batch: Pass = []
        width = 0
        while waiting:
            w = waiting[0]
            if w.unwanted():
                waiting.popleft()
                self._queued[priority] -= w.untaken
                self.stats.dropped += w.untaken
                w.drop()
                continue
            while w.untaken:
                i = w.order[w.taken]
                wider = max(width, len(w.seqs[i]))
                if batch and not fits_pass(len(batch) + 1, wider, cap, self._max_tokens):
                    return batch
                batch.append((w, i))
                width = wider
                w.taken += 1
                self._queued[priority] -= 1
            waiting.popleft()
        return batch

    def _small_is_quick(self) -> bool:
        """Whether a small pass has taken less than the hop to a forward thread and back."""
        return self._small_s is not None and self._small_s <= self._inline_s

    async def _run_pass(self) -> None:
        if len(self._workers) == 1 and self._small_is_quick():
            # this pass may run inline, blocking the loop: first let the requests already
            # arriving join it, or under load every request would run alone, inline, one
            # after the other; a gRPC request takes several turns of the loop to arrive
            # (docs/benchmarks.md, "Capacity")
            for _ in range(INLINE_YIELDS):
                await asyncio.sleep(0)
        batch, priority = self._form()
        self._forming -= 1
        if not batch:
            return
        seqs = [w.seqs[i] for w, i in batch]
        single = not self.queued and len(self._workers) == 1
        alone = self._solo is not None and single
        compute = self._solo if alone and self._solo is not None else self._compute
        self._solo_running = alone
        self._running[priority] += 1
        padded = len(seqs) * max(len(q) for q in seqs)
        small = padded <= SMALL_PASS_TOKENS
        inline = single and small and self._small_is_quick()
        t0 = time.perf_counter()
        try:
            if inline:  # shorter than the hop to a forward thread and back
                vectors, took = _timed(compute, seqs)
            else:
                vectors, took = await asyncio.get_running_loop().run_in_executor(
                    self._executor, _timed, compute, seqs)
            if small:
                self._small_s = took if self._small_s is None else 0.8 * self._small_s + 0.2 * took
            if padded >= LARGE_PASS_TOKENS:  # a small pass's time is mostly its fixed cost
                per_token = took / padded
                self._token_s = (per_token if self._token_s is None
                                 else 0.8 * self._token_s + 0.2 * per_token)
        except Exception as e:  # every request in the pass fails; the queue lives on
            for w, _ in batch:
                if not w.future.done():
                    w.future.set_exception(e)
            return
        finally:
            self._solo_running = False
            self._running[priority] -= 1
        seconds = time.perf_counter() - t0
        tokens = sum(len(s) for s in seqs)
        self.stats.record(len(seqs), tokens, seconds)
        self._unreported.append((len(seqs), tokens))
        number = self.stats.passes
        for row, (w, i) in enumerate(batch):
            if w.future.done():
                continue
            if w.out is None:
                w.out = (np.empty((len(w.seqs), vectors.shape[1]), dtype=np.float32)
                         if isinstance(vectors, np.ndarray) else [None] * len(w.seqs))
            w.out[i] = vectors[row]
            w.passes[number] = seconds
            w.left -= 1
            if not w.left:
                w.future.set_result(w.out)
