"""The internal request and result types: the only objects that cross from ingress to replica.

They are frozen, hold plain Python and numpy values, and pickle cheaply; no FastAPI, pydantic or
protobuf object ever reaches a model replica.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: One input: a text, or the model tokenizer's complete token ids for one text.
Input = str | tuple[int, ...]


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    """Embed ``inputs`` with model ``model``.

    - ``inputs``: non-empty; each a ``str`` or a tuple of token ids (special tokens included).
    - ``truncate``: cut texts at the model's token limit (True) or refuse longer ones (False).
    - ``dimensions``: keep the first N values of each vector and L2-normalize again.
    - ``request_id``: the caller's id, for logs.
    """

    model: str
    inputs: tuple[Input, ...]
    truncate: bool = True
    dimensions: int | None = None
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class EmbedResult:
    """``embeddings``: float32 array ``[n, dim]`` in input order; ``token_counts``: int64 ``[n]``,
    the tokens each input used after truncation, special tokens included."""

    embeddings: np.ndarray
    token_counts: np.ndarray

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
