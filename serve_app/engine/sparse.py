"""The sparse (SPLADE) embedding engine: a masked-language model whose logits become one
vocabulary-sized vector per text, on any backend (:mod:`.backends`); no Ray and no HTTP.

Vectors equal sentence-transformers' ``SparseEncoder.encode`` on the same directory: the logits
of every token, masked, through ``log1p(relu(.))`` (twice ``log1p`` for the ``log1p_relu``
activation), max- (or sum-) pooled over the tokens, as the directory's ``SpladePooling`` names
it; prompts, lower-casing and the token limit as for dense models (:class:`EmbeddingEngine`,
whose steps this engine shares). ``max_active_dims`` keeps each vector's largest values, as
``SparseEncoder`` does.
"""

from __future__ import annotations

import numpy as np
import torch

from serve_app.engine.embedding import EmbeddingEngine
from serve_app.types import Output, Task

#: the most bytes of logits (texts x tokens x vocabulary, float32) one pass may hold: a
#: masked-language model's output is the vocabulary wide at every token
LOGITS_BYTES = 256 << 20


def splade_pool(logits: torch.Tensor, mask: torch.Tensor, pooling: str, activation: str
                ) -> torch.Tensor:
    """``[b, V]`` from logits ``[b, L, V]`` (changed in place) and ``mask`` ``[b, L]``."""
    logits.mul_(mask.unsqueeze(-1).to(logits.dtype)).relu_().log1p_()
    if activation == "log1p_relu":
        logits.log1p_()
    return logits.amax(dim=1) if pooling == "max" else logits.sum(dim=1)


def sparse_rows(vectors: np.ndarray, max_active_dims: int | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compressed sparse rows of ``vectors`` ``[n, V]``: (indptr ``[n + 1]`` int64, indices
    int32 ascending per row, values float32), zeros left out; with ``max_active_dims``, each
    row's largest values by magnitude only (sentence-transformers' ``max_active_dims``)."""
    if max_active_dims is not None and max_active_dims < vectors.shape[1]:
        keep = np.argpartition(-np.abs(vectors), max_active_dims - 1, axis=1)[:, :max_active_dims]
        pruned = np.zeros_like(vectors)
        np.put_along_axis(pruned, keep, np.take_along_axis(vectors, keep, axis=1), axis=1)
        vectors = pruned
    rows, cols = np.nonzero(vectors)  # row-major: each row's indices ascending
    indptr = np.zeros(len(vectors) + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=len(vectors)), out=indptr[1:])
    return indptr, cols.astype(np.int32), vectors[rows, cols].astype(np.float32)


def prune_rows(indices: list[np.ndarray], values: list[np.ndarray],
               max_active_dims: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compressed sparse rows of per-row (indices ascending, values), each row cut to its
    ``max_active_dims`` largest values when given (indices stay ascending)."""
    if max_active_dims is not None:
        for i, v in enumerate(values):
            if len(v) > max_active_dims:
                keep = np.sort(np.argpartition(-np.abs(v), max_active_dims - 1)[:max_active_dims])
                indices[i], values[i] = indices[i][keep], v[keep]
    indptr = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum([len(v) for v in values], out=indptr[1:])
    empty_i, empty_v = np.zeros(0, np.int32), np.zeros(0, np.float32)
    return (indptr, np.concatenate([empty_i, *indices]).astype(np.int32),
            np.concatenate([empty_v, *values]).astype(np.float32))


class SparseEngine(EmbeddingEngine):
    """One loaded SPLADE model (``AutoModelForMaskedLM`` with a ``SpladePooling`` module, or a
    masked-language model served with ``task: sparse``).

    Passes answer dense float32 ``[n, V]`` (the runner keeps the non-zeros); a pass holds at
    most :data:`LOGITS_BYTES` of logits. ``max_active_dims``: the model's own default pruning
    (``config_sentence_transformers.json``), None for none.
    """

    auto_class = "AutoModelForMaskedLM"
    task: Task = "sparse"
    offers: tuple[Output, ...] = ("pooled", "sparse")

    def _output_kind(self) -> tuple[str, bool, int]:
        self.splade = self.settings.splade or ("max", "relu")
        vocab = int(getattr(self.model_config, "vocab_size", 0) or self.vocab_size)
        # the logits of a pass: the vocabulary wide at every token
        budget = max(self.max_length, LOGITS_BYTES // (4 * vocab))
        self.max_batch_tokens = min(self.max_batch_tokens, budget)
        self.max_active_dims = self.settings.max_active_dims
        # a long text's windows: the maximum (or sum) of their vectors, as over its tokens
        self.window_pooling = self.splade[0]
        return "splade", bool(self.cfg.normalize), vocab

    def pool_pass(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return splade_pool(hidden, mask, *self.splade)

    def rows(self, vectors: np.ndarray, max_active_dims: int | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:func:`sparse_rows` of pooled vectors, pruned to ``max_active_dims`` (None: the
        model's default)."""
        return sparse_rows(vectors, max_active_dims or self.max_active_dims)

    def output_settings(self) -> str:
        return f"sparse splade={self.splade} normalize={self.normalize}"

    def calibrate(self, verify: bool = False) -> None:
        """No int8 ranges (compact encodings are for dense vectors); with ``verify``, measure
        the engine's fidelity on a sample of the calibration corpus."""
        if verify:
            self.verify()
