"""The reranking engine: a cross-encoder scoring (query, document) pairs, on any backend
(:mod:`.backends`), no Ray and no HTTP: the sequence classifier (:mod:`.classifier`) with one
label, ``tokenize`` (pairs -> :class:`PairIds`), ``run`` (one pass -> logits), ``scores``.

Scores equal sentence-transformers' ``CrossEncoder.predict`` on the same directory: pairs cut
longest-first at the model's token limit, the activation the directory names (sigmoid for a
one-label model that names none).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

from serve_app.engine.classifier import ClassifyEngine, sigmoid
from serve_app.engine.quantize import calibration_texts
from serve_app.errors import ModelLoadError
from serve_app.types import Side, Task

#: The activations sentence-transformers saves for cross-encoders, by the last part of their
#: dotted torch path.
ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Sigmoid": sigmoid,
    "Identity": lambda x: x,
    "Tanh": np.tanh,
}


def activation_name(path: str | None) -> str:
    if path is None:
        return "Sigmoid"
    name = path.rsplit(".", 1)[-1]
    if not path.startswith("torch.") or name not in ACTIVATIONS:
        raise ModelLoadError(f"unsupported cross-encoder activation {path!r}; serve_app applies "
                             f"{sorted(ACTIVATIONS)} from torch.nn")
    return name


class RerankEngine(ClassifyEngine):
    """One loaded cross-encoder with a single output label.

    ``run`` returns float32 logits ``[n, 1]``; :meth:`scores` applies the activation
    sentence-transformers saved with it (also to :meth:`probabilities`, so a reranker
    classifies pairs with the same scores). A model that is not a one-label sequence
    classifier raises :class:`ModelLoadError`.
    """

    task: Task = "rerank"

    def described_load(self) -> None:
        if self.dim != 1:
            raise ModelLoadError(
                f"{self.cfg.model_id!r} has {self.dim} labels; serve_app reranks with "
                "cross-encoders that give one score per pair (num_labels 1); serve it with "
                "task: classify")
        self.activation = activation_name(self.settings.activation)
        self._rerank_activate = ACTIVATIONS[self.activation]
        self.loaded(f"reranker, activation={self.activation}")

    def activate(self, logits: np.ndarray) -> np.ndarray:
        return self._rerank_activate(logits)

    def tokenize(self, query: str, documents: Sequence[str], truncate: bool = True,
                 side: Side = "right") -> tuple[list[list[int]], int]:
        """One :class:`PairIds` per document (:meth:`pairs` of the query with each)."""
        return self.pairs([query] * len(documents), documents, truncate, side, "document")

    def fidelity_inputs(self, n: int) -> list[list[int]]:
        """``n`` pairs of calibration texts, each text the query of the next."""
        texts = calibration_texts(self.cfg.calibration_corpus)[: n + 1]
        pairs: list[list[int]] = []
        for query, document in itertools.pairwise(texts):
            pairs += self.tokenize(query, [document])[0]
        return pairs

    def scores(self, logits: np.ndarray, raw: bool = False) -> np.ndarray:
        """float32 ``[n]`` scores from logits ``[n, 1]``: the activation, or raw logits."""
        return self.probabilities(logits, raw).reshape(-1)

    def rerank(self, query: str, documents: Sequence[str], raw: bool = False) -> np.ndarray:
        """Scores ``[n]`` for whole-set callers (warm-up, tests): one pass."""
        pairs, _ = self.tokenize(query, documents)
        return self.scores(self.forward(pairs), raw)
