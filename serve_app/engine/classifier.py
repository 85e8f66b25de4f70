"""The sequence-classification engine: any ``AutoModelForSequenceClassification`` checkpoint
classifying texts or text pairs, on any backend (:mod:`.backends`); no Ray and no HTTP. The
same steps as the embedding engine: ``prepare`` (texts and pairs -> token ids, pairs as
:class:`PairIds`), ``run`` (one pass -> logits ``[n, labels]``), ``probabilities``.

Probabilities equal transformers' text-classification pipeline on the same directory: softmax
over the labels, sigmoid for a multi-label model (``problem_type``) or a one-label one, the
logits themselves for a regression head. Pairs are cut longest-first at the model's limit, as
the pipeline's tokenizer cuts them. The reranker (:mod:`.reranker`) is this engine with one
label and sentence-transformers' activation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from serve_app.config.schema import ModelConfig
from serve_app.engine.backends import Backend
from serve_app.engine.embedding import PairIds, TransformerEngine
from serve_app.engine.quantize import calibration_texts
from serve_app.errors import ModelLoadError
from serve_app.types import ClassifyInput, ModelInfo, Side, Task


def softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


#: what turns logits into scores, by the name transformers' pipeline gives it
FUNCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "softmax": softmax, "sigmoid": sigmoid, "none": lambda x: x}


def pipeline_function(model_config: object) -> str:
    """The function transformers' text-classification pipeline applies to this model's logits
    (its ``function_to_apply`` default): none for regression, sigmoid for multi-label or one
    label, else softmax."""
    problem = getattr(model_config, "problem_type", None)
    labels = int(getattr(model_config, "num_labels", 0))
    if problem == "regression":
        return "none"
    if problem == "multi_label_classification" or labels == 1:
        return "sigmoid"
    return "softmax"


class ClassifyEngine(TransformerEngine):
    """One loaded sequence classifier.

    ``run`` returns float32 logits ``[n, labels]``; :meth:`probabilities` applies the model's
    function. ``labels``: the label names by index (``id2label``). Errors in caller input raise
    :class:`serve_app.errors.InvalidInput`.
    """

    auto_class = "AutoModelForSequenceClassification"
    task: Task = "classify"

    def __init__(self, cfg: ModelConfig, num_threads: int | None = None, passes: int = 1
                 ) -> None:
        super().__init__(cfg, num_threads, passes)
        count = int(getattr(self.model_config, "num_labels", 0))
        if count < 1:
            raise ModelLoadError(f"{cfg.model_id!r} names no labels (num_labels {count})")
        id2label = getattr(self.model_config, "id2label", None) or {}
        self.labels = tuple(str(id2label.get(i, f"LABEL_{i}")) for i in range(count))
        self.dim = count
        self.function = pipeline_function(self.model_config)
        self._activate = FUNCTIONS[self.function]
        self.described_load()

    def described_load(self) -> None:
        self.loaded(f"classifier, {self.dim} labels, {self.function}")

    # -- steps ---------------------------------------------------------------------------------

    def pairs(self, firsts: Sequence[str], seconds: Sequence[str], truncate: bool = True,
              side: Side = "right", what: str = "input") -> tuple[list[list[int]], int]:
        """One :class:`PairIds` per (first, second), special tokens included, cut
        longest-first at ``max_length`` when ``truncate`` (at the end of the longer part, or
        with ``side`` "left" its start; else a pair over it raises InvalidInput), and how many
        pairs were cut."""
        enc = self.tokenizer_for(side)(
            list(firsts), list(seconds), add_special_tokens=True,
            truncation="longest_first" if truncate else False,
            max_length=self.max_length if truncate else None,
            return_attention_mask=False, return_token_type_ids=True, verbose=False)
        ids: list[list[int]] = enc["input_ids"]
        types = enc.get("token_type_ids")
        out: list[list[int]] = []
        for i, seq in enumerate(ids):
            if not truncate:
                self.check_length(i, len(seq), what)
            # where the second part starts: its first token of type 1 (models without token
            # types never read it)
            first = types[i].index(1) if types is not None and 1 in types[i] else len(seq)
            out.append(PairIds(seq, first))
        return out, self._cut(enc, out, truncate)

    def singles(self, texts: Sequence[str], truncate: bool = True, side: Side = "right"
                ) -> tuple[list[list[int]], int]:
        """Token ids per text, special tokens included, cut at ``max_length`` when
        ``truncate`` (else a text over it raises InvalidInput), and how many were cut."""
        enc = self.tokenizer_for(side)(
            list(texts), add_special_tokens=True, truncation=truncate,
            max_length=self.max_length if truncate else None,
            return_attention_mask=False, return_token_type_ids=False, verbose=False)
        ids: list[list[int]] = enc["input_ids"]
        if not truncate:
            for i, seq in enumerate(ids):
                self.check_length(i, len(seq))
        return ids, self._cut(enc, ids, truncate)

    def _cut(self, enc: object, ids: Sequence[Sequence[int]], truncate: bool) -> int:
        if not truncate:
            return 0
        encodings = getattr(enc, "encodings", None)  # fast tokenizers know what they cut
        if encodings:
            return sum(1 for e in encodings if e.overflowing)
        return sum(1 for seq in ids if len(seq) >= self.max_length)

    def prepare(self, inputs: Sequence[ClassifyInput], truncate: bool = True,
                side: Side = "right") -> tuple[list[list[int]], int]:
        """Token ids for texts and text pairs, in order, and how many were cut."""
        seqs: list[list[int]] = [[] for _ in inputs]
        truncated = 0
        single = [i for i, x in enumerate(inputs) if isinstance(x, str)]
        paired = [i for i, x in enumerate(inputs) if not isinstance(x, str)]
        if single:
            ids, cut = self.singles([inputs[i] for i in single], truncate,  # type: ignore[misc]
                                    side)
            truncated += cut
            for i, one in zip(single, ids, strict=True):
                seqs[i] = one
        if paired:
            ids, cut = self.pairs([inputs[i][0] for i in paired], [inputs[i][1] for i in paired],
                                  truncate, side)
            truncated += cut
            for i, one in zip(paired, ids, strict=True):
                seqs[i] = one
        return seqs, truncated

    def run(self, backend: Backend, seqs: Sequence[Sequence[int]], threads: int | None = None
            ) -> np.ndarray:
        """One pass over exactly ``seqs``: float32 logits ``[n, labels]``."""
        with torch.inference_mode():
            return backend.run(self.feeds(seqs), threads).cpu().numpy()

    def activate(self, logits: np.ndarray) -> np.ndarray:
        return self._activate(logits)

    def probabilities(self, logits: np.ndarray, raw: bool = False) -> np.ndarray:
        """float32 ``[n, labels]`` scores from logits: the model's function, or the logits."""
        logits = np.asarray(logits, dtype=np.float32).reshape(len(logits), self.dim)
        return logits if raw else self.activate(logits).astype(np.float32)

    def classify(self, inputs: Sequence[ClassifyInput], raw: bool = False) -> np.ndarray:
        """Scores ``[n, labels]`` for whole-set callers (warm-up, tests)."""
        seqs, _ = self.prepare(inputs)
        return self.probabilities(self.outputs(seqs), raw)

    def fidelity_inputs(self, n: int) -> list[list[int]]:
        return self.singles(calibration_texts(self.cfg.calibration_corpus)[:n])[0]

    def warmup(self, threads: int | None = None) -> float:
        """Run a short and a full-length pass once so the first request pays no set-up cost,
        and measure the engine's fidelity, on ``threads`` torch threads (as
        :meth:`serve_app.engine.embedding.EmbeddingEngine.warmup`)."""
        t0 = time.perf_counter()
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            self.forward(self.singles(["warm up"] * min(8, self.max_batch_size))[0])
            self.forward([PairIds([self.pad_id] * self.max_length, self.max_length // 2)])
            self.verify()
        finally:
            torch.set_num_threads(before)
        return time.perf_counter() - t0

    def info(self, name: str, version: str) -> ModelInfo:
        return ModelInfo(name=name, version=version, dim=self.dim, pooling="none",
                         normalize=False, task=self.task, **self.described())
