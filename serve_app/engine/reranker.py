"""The reranking engine: a cross-encoder scoring (query, document) pairs, on any backend
(:mod:`.backends`), no Ray and no HTTP, the same steps as the embedding engine: ``tokenize``
(pairs -> :class:`PairIds`), ``forward`` (one pass -> logits), ``scores`` (the activation).

Scores equal sentence-transformers' ``CrossEncoder.predict`` on the same directory: pairs cut
longest-first at the model's token limit, the activation the directory names (sigmoid for a
one-label model that names none).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from serve_app.config.schema import ModelConfig
from serve_app.engine.backends import Backend
from serve_app.engine.embedding import PairIds, TransformerEngine
from serve_app.engine.quantize import calibration_texts
from serve_app.errors import ModelLoadError
from serve_app.types import ModelInfo, Side

#: The activations sentence-transformers saves for cross-encoders, by the last part of their
#: dotted torch path.
ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
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


class RerankEngine(TransformerEngine):
    """One loaded cross-encoder with a single output label.

    ``forward`` returns float32 logits ``[n, 1]``; :meth:`scores` applies the activation.
    Errors in caller input raise :class:`serve_app.errors.InvalidInput`; a model that is not a
    one-label sequence classifier raises :class:`ModelLoadError`.
    """

    auto_class = "AutoModelForSequenceClassification"
    task = "rerank"
    dim = 1

    def __init__(self, cfg: ModelConfig, num_threads: int | None = None, passes: int = 1
                 ) -> None:
        super().__init__(cfg, num_threads, passes)
        labels = int(getattr(self.model_config, "num_labels", 0))
        if labels != 1:
            raise ModelLoadError(
                f"{cfg.model_id!r} has {labels} labels; serve_app reranks with cross-encoders "
                "that give one score per pair (num_labels 1)")
        self.activation = activation_name(self.settings.activation)
        self._activate = ACTIVATIONS[self.activation]
        self.loaded(f"reranker, activation={self.activation}")

    def tokenize(self, query: str, documents: Sequence[str], truncate: bool = True,
                 side: Side = "right") -> tuple[list[list[int]], int]:
        """One :class:`PairIds` per document, special tokens included, cut longest-first at
        ``max_length`` when ``truncate`` (at the end of the longer part, or with ``side``
        "left" its start; else a pair over it raises InvalidInput), and how many pairs were
        cut."""
        enc = self.tokenizer_for(side)(
            [query] * len(documents),
            list(documents),
            add_special_tokens=True,
            truncation="longest_first" if truncate else False,
            max_length=self.max_length if truncate else None,
            return_attention_mask=False,
            return_token_type_ids=True,
            verbose=False,
        )
        ids: list[list[int]] = enc["input_ids"]
        types = enc.get("token_type_ids")
        pairs: list[list[int]] = []
        for i, seq in enumerate(ids):
            if not truncate:
                self.check_length(i, len(seq), "document")
            # where the document starts: its first token of type 1 (models without token
            # types never read it)
            first = types[i].index(1) if types is not None and 1 in types[i] else len(seq)
            pairs.append(PairIds(seq, first))
        encodings = getattr(enc, "encodings", None)
        if not truncate:
            return pairs, 0
        if encodings:
            return pairs, sum(1 for e in encodings if e.overflowing)
        return pairs, sum(1 for p in pairs if len(p) >= self.max_length)

    def run(self, backend: Backend, seqs: Sequence[Sequence[int]], threads: int | None = None
            ) -> np.ndarray:
        """One pass over exactly ``seqs``: float32 logits ``[n, 1]``."""
        with torch.inference_mode():
            return backend.run(self.feeds(seqs), threads).cpu().numpy()

    def fidelity_inputs(self, n: int) -> list[list[int]]:
        """``n`` pairs of calibration texts, each text the query of the next."""
        texts = calibration_texts(self.cfg.calibration_corpus)[: n + 1]
        pairs: list[list[int]] = []
        for query, document in itertools.pairwise(texts):
            pairs += self.tokenize(query, [document])[0]
        return pairs

    def scores(self, logits: np.ndarray, raw: bool = False) -> np.ndarray:
        """float32 ``[n]`` scores from logits ``[n, 1]``: the activation, or raw logits."""
        flat = logits.reshape(-1).astype(np.float32)
        return flat if raw else self._activate(flat).astype(np.float32)

    def rerank(self, query: str, documents: Sequence[str], raw: bool = False) -> np.ndarray:
        """Scores ``[n]`` for whole-set callers (warm-up, tests): one pass."""
        pairs, _ = self.tokenize(query, documents)
        return self.scores(self.forward(pairs), raw)

    def warmup(self, threads: int | None = None) -> float:
        """Run a short and a full-length pass once so the first request pays no set-up cost,
        and measure the engine's fidelity, on ``threads`` torch threads (as
        :meth:`serve_app.engine.embedding.EmbeddingEngine.warmup`)."""
        t0 = time.perf_counter()
        self.rerank("warm up", ["warm up"] * min(8, self.max_batch_size))
        self.forward([PairIds([self.pad_id] * self.max_length, self.max_length // 2)], threads)
        self.verify()
        return time.perf_counter() - t0

    def info(self, name: str, version: str) -> ModelInfo:
        return ModelInfo(name=name, version=version, dim=1, max_length=self.max_length,
                         vocab_size=self.vocab_size, model_id=self.cfg.model_id,
                         pooling="none", normalize=False, task="rerank",
                         engine=self.engine_info())
