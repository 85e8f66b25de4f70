"""The internal request and result types: the only objects that cross from ingress to replica.

They are frozen, hold plain Python and numpy values, and pickle cheaply; no FastAPI, pydantic or
protobuf object ever reaches a model replica.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

#: One input: a text, or the model tokenizer's complete token ids for one text.
Input = str | tuple[int, ...]


def deadline(seconds: float | None) -> float | None:
    """The wall-clock deadline ``seconds`` from now (None: none)."""
    return None if seconds is None else time.time() + seconds


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    """Embed ``inputs`` with model ``model``.

    - ``inputs``: non-empty; each a ``str`` or a tuple of token ids (special tokens included).
    - ``truncate``: cut texts at the model's token limit (True) or refuse longer ones (False).
    - ``dimensions``: keep the first N values of each vector and L2-normalize again.
    - ``version``: the model version (V2); None: the name's default version.
    - ``request_id``: the caller's id, for logs.
    - ``deadline``: wall-clock time (``time.time()``) after which the answer is useless; work
      still queued then is dropped and the caller gets :class:`DeadlineExceeded`.
    """

    model: str
    inputs: tuple[Input, ...]
    truncate: bool = True
    dimensions: int | None = None
    request_id: str = ""
    deadline: float | None = None
    version: str | None = None

    def remaining(self) -> float | None:
        """Seconds until the deadline (negative once passed); None without one."""
        return None if self.deadline is None else self.deadline - time.time()


@dataclass(frozen=True, slots=True)
class EmbedResult:
    """``embeddings``: float32 array ``[n, dim]`` in input order; ``token_counts``: int64 ``[n]``,
    the tokens each input used after truncation, special tokens included.

    What the replica measured: ``truncated`` texts; seconds spent tokenizing, waiting for a
    forward pass (``queue_s``) and in forward passes (``inference_s``); and ``passes``, the
    forward passes the replica finished since its previous answer as (inputs, tokens) pairs, so
    every pass is reported exactly once, whichever answer carries it.
    """

    embeddings: np.ndarray
    token_counts: np.ndarray
    truncated: int = 0
    tokenize_s: float = 0.0
    queue_s: float = 0.0
    inference_s: float = 0.0
    passes: tuple[tuple[int, int], ...] = ()

    @property
    def prompt_tokens(self) -> int:
        return int(self.token_counts.sum())


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the protocols need to describe a loaded model."""

    name: str
    version: str
    dim: int
    max_length: int
    vocab_size: int
    model_id: str
    pooling: str
    normalize: bool
