"""Texts longer than a model's token limit, embedded whole: windows of the limit
(``long_inputs: chunk``) and late chunking (one vector per chunk of a text, each pooled from
that chunk's token outputs of a pass over the whole text). Pure functions of token ids and
arrays; no Ray, no HTTP.

A text's token ids are framed: ``head`` tokens before its own (the leading special tokens and
a prompt's tokens) and ``tail`` after (the trailing special tokens). A window repeats the frame
around up to ``room = limit - head - tail`` of the text's own tokens, and shares ``overlap`` of
them with the window before, so every window is a well-formed input of the model's limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from serve_app.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class Frame:
    """How a model frames one text's ids: ``head`` tokens before the text's own (special
    tokens, prompt), ``tail`` after; ``limit`` the model's token limit, ``overlap`` the
    tokens a window shares with the one before."""

    head: int
    tail: int
    limit: int
    overlap: int = 0

    @property
    def room(self) -> int:
        """The text's own tokens one window holds."""
        return self.limit - self.head - self.tail

    def check(self) -> None:
        """Refuse a frame whose windows could not advance (a prompt nearly the limit, or an
        overlap of the whole room)."""
        if self.room <= self.overlap:
            raise InvalidInput(
                f"a window of {self.limit} tokens holds {self.room} of the text's own after "
                f"{self.head + self.tail} special and prompt tokens, not more than the overlap "
                f"of {self.overlap}: it cannot split this text", param="input")

    def starts(self, body: int) -> list[int]:
        """Where each window's part of a text of ``body`` own tokens starts: every
        ``room - overlap`` tokens, until a window reaches the end."""
        self.check()
        step, out, at = self.room - self.overlap, [0], 0
        while at + self.room < body:
            at += step
            out.append(at)
        return out

    def windows(self, seq: Sequence[int]) -> list[list[int]]:
        """``seq`` (its frame included) as windows of at most ``limit`` tokens, each framed
        the same way; ``[seq]`` when it fits."""
        if len(seq) <= self.limit:
            return [list(seq)]
        head, tail = list(seq[: self.head]), list(seq[len(seq) - self.tail:])
        body = seq[self.head: len(seq) - self.tail]
        return [head + list(body[a: a + self.room]) + tail for a in self.starts(len(body))]


class Plan(Protocol):
    """How a request's windows' outputs become its answer, one row (or chunk) at a time."""

    def finish(self, outputs: Any) -> np.ndarray: ...

    def token_counts(self) -> np.ndarray: ...


class Windows(list[list[int]]):
    """Every window of a request's inputs, in order, and the ``plan`` that turns their
    outputs into the request's answer."""

    __slots__ = ("plan",)

    def __init__(self, windows: Sequence[Sequence[int]], plan: Plan) -> None:
        # as they are: a window may be a PromptIds, whose prompt stays out of pooling
        super().__init__(w if isinstance(w, list) else list(w) for w in windows)
        self.plan = plan

    @classmethod
    def of(cls, windows: Sequence[Sequence[Sequence[int]]], combine: str = "mean") -> Windows:
        """Each input's windows (``long_inputs: chunk``), pooled back to one vector each
        (:class:`Windowed`)."""
        return cls([w for one in windows for w in one], Windowed.of(windows, combine))


@dataclass(frozen=True, slots=True)
class Windowed:
    """Inputs split into windows (a :class:`Plan`): input ``i``'s windows are rows
    ``starts[i]:starts[i + 1]`` of a pass's outputs (int64 ``[n + 1]``), each weighted by its
    tokens; ``combine``: ``mean`` (token-weighted), or a SPLADE model's ``max`` / ``sum`` (its
    pooling over tokens, carried over the windows)."""

    starts: np.ndarray
    tokens: np.ndarray
    combine: str = "mean"

    @classmethod
    def of(cls, windows: Sequence[Sequence[Sequence[int]]], combine: str = "mean"
           ) -> Windowed:
        """The plan for ``windows`` (each input's list of windows)."""
        starts = np.zeros(len(windows) + 1, dtype=np.int64)
        np.cumsum([len(w) for w in windows], out=starts[1:])
        tokens = np.fromiter((len(s) for w in windows for s in w), np.int64, int(starts[-1]))
        return cls(starts, tokens, combine)

    def finish(self, pooled: np.ndarray) -> np.ndarray:
        """Each input's vector from its windows' pooled vectors ``[windows, dim]``: their mean
        weighted by the windows' tokens (or their maximum, or sum), not normalized."""
        if self.combine != "mean":
            reduce = np.maximum if self.combine == "max" else np.add
            return reduce.reduceat(pooled, self.starts[:-1], axis=0).astype(np.float32)
        weighted = pooled * self.tokens[:, None].astype(pooled.dtype)
        sums = np.add.reduceat(weighted, self.starts[:-1], axis=0)
        totals = np.add.reduceat(self.tokens, self.starts[:-1]).astype(pooled.dtype)
        return (sums / totals[:, None]).astype(np.float32)

    def token_counts(self) -> np.ndarray:
        """Tokens embedded per input, every window's counted."""
        return np.add.reduceat(self.tokens, self.starts[:-1])


@dataclass(frozen=True, slots=True)
class LateChunks:
    """A text's late-chunking plan (a :class:`Plan`): ``windows`` (token ids) to run for every
    token's output,
    which output row stands for each of the text's own tokens (``rows``: int64
    ``[tokens, 2]``, window and row), and each chunk's own tokens (``members``, indices into
    the text's tokens) and ``spans`` (int64 ``[chunks, 2]`` character offsets)."""

    windows: list[list[int]]
    rows: np.ndarray
    members: list[np.ndarray]
    spans: np.ndarray
    #: the model's pooling: ``max`` takes each chunk's tokens' maximum, any other their mean
    mode: str = "mean"

    def finish(self, outputs: Sequence[np.ndarray]) -> np.ndarray:
        """Each chunk's vector ``[chunks, hidden]`` from the windows' token outputs (one
        ``[len(window), hidden]`` array per window), not normalized."""
        states = np.stack([outputs[w][r] for w, r in self.rows])
        reduce = np.max if self.mode == "max" else np.mean
        return np.stack([reduce(states[m], axis=0) for m in self.members]).astype(np.float32)

    def token_counts(self) -> np.ndarray:
        """The tokens embedded for the one text, every window's counted."""
        return np.array([sum(len(w) for w in self.windows)], dtype=np.int64)


def late_chunks(seq: Sequence[int], offsets: Sequence[tuple[int, int]], frame: Frame,
                chunks: Sequence[tuple[int, int]] | None, chunk_tokens: int | None,
                text_length: int, mode: str = "mean") -> LateChunks:
    """Plan late chunking of one text: ``seq`` its framed token ids, ``offsets`` the
    character ``[start, end)`` of each of its own tokens (``seq[head:len - tail]``) in the
    text of ``text_length`` characters. ``chunks``: the chunks' character offsets; or
    ``chunk_tokens``: a chunk every that many tokens. A token belongs to the chunk its first
    character is in; with windows, a token the overlap holds twice is taken from the window
    where it has more context (the overlap is split in half)."""
    body = len(seq) - frame.head - frame.tail
    if body <= 0:
        raise InvalidInput("the text has no tokens to chunk", param="input")
    assert len(offsets) == body
    starts = np.fromiter((a for a, _ in offsets), np.int64, body)
    if chunk_tokens is not None:
        groups = [np.arange(a, min(a + chunk_tokens, body)) for a in range(0, body, chunk_tokens)]
        spans = np.array([[offsets[g[0]][0], offsets[g[-1]][1]] for g in groups], np.int64)
    else:
        assert chunks is not None
        groups = []
        for i, (a, b) in enumerate(chunks):
            if not 0 <= a < b <= text_length:
                raise InvalidInput(
                    f"chunk {i} [{a}, {b}] is not a non-empty span of the text's "
                    f"{text_length} characters", param="chunks")
            members = np.flatnonzero((starts >= a) & (starts < b))
            if not len(members):
                raise InvalidInput(f"chunk {i} [{a}, {b}] holds no token of the text",
                                   param="chunks")
            groups.append(members)
        spans = np.array(chunks, np.int64).reshape(-1, 2)
    if len(seq) <= frame.limit:
        windows = [list(seq)]
        rows = np.stack([np.zeros(body, np.int64), np.arange(body) + frame.head], axis=1)
    else:
        windows = frame.windows(seq)
        firsts = frame.starts(body)
        # each token from the window it lies deepest in: the overlap split in half
        owner = np.zeros(body, np.int64)
        for w, a in enumerate(firsts[1:], start=1):
            owner[a + frame.overlap // 2:] = w
        first = np.asarray(firsts, np.int64)[owner]
        rows = np.stack([owner, np.arange(body) - first + frame.head], axis=1)
    return LateChunks(windows, rows, groups, spans, mode)
