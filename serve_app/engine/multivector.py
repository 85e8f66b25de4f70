"""The multi-vector (ColBERT-style, late interaction) engine: one L2-normalized vector per token
of each text, from a PyLate checkpoint; no Ray and no HTTP.

Vectors equal PyLate's ``ColBERT.encode`` (``is_query`` either way) on the same directory: the
text stripped and tokenized to the query or document length less one, its marker token
(``[Q] `` / ``[D] ``) put right after ``[CLS]``; a query padded to exactly its length with the
mask token (query expansion), the padding attended or not as the checkpoint says; the encoder's
last hidden states through the checkpoint's ``Dense`` projections, in order; a query keeps every
row, a document the rows of its own tokens less those of the skip-list words (punctuation);
each row L2-normalized last. A request picks the query side with ``input_type`` / ``prompt_name``
``query``; anything else is a document.

MaxSim scores a query against documents as PyLate's ``colbert_scores`` does: for each query
vector its best dot product over the document's vectors, summed.
"""

from __future__ import annotations

import dataclasses
import json
import string
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from serve_app.engine.backends import Backend
from serve_app.engine.embedding import EmbeddingEngine
from serve_app.errors import InvalidInput, ModelLoadError
from serve_app.types import Input, ModelInfo, Output, Side, Task

#: the Dense activations a checkpoint may name (PyLate's Identity; sentence-transformers' Tanh)
ACTIVATIONS = {"torch.nn.modules.linear.Identity": None, "torch.nn.modules.activation.Tanh":
               torch.tanh, "torch.nn.modules.activation.ReLU": torch.relu}
QUERY = "query"


class QueryIds(list[int]):
    """A query's token ids, expansion included: only the first ``attended`` are attended."""

    __slots__ = ("attended",)

    def __init__(self, ids: Sequence[int], attended: int) -> None:
        super().__init__(ids)
        self.attended = attended


def maxsim(query: np.ndarray, documents: Sequence[np.ndarray]) -> np.ndarray:
    """Late-interaction scores float32 ``[n]``: each query row's best dot product with a
    document's rows, summed over the query's rows."""
    return np.array([float((query @ d.T).max(axis=1).sum()) if len(d) else 0.0
                     for d in documents], dtype=np.float32)


class MultiVectorEngine(EmbeddingEngine):
    """One loaded PyLate (ColBERT) checkpoint, ``task: multivector``.

    Passes answer a list of float32 ``[rows, dim]`` arrays, one per input; ``dim`` is the last
    projection's width. ``max_length`` is the document length (queries have their own).
    """

    task: Task = "multivector"
    takes_dense = True
    offers: tuple[Output, ...] = ("pooled", "multivector")

    def _output_kind(self) -> tuple[str, bool, int]:
        cfg = self.settings.st_config
        tok = self.tokenizer
        self.query_prefix = str(cfg.get("query_prefix", "[Q] "))
        self.document_prefix = str(cfg.get("document_prefix", "[D] "))
        self.query_length = int(cfg.get("query_length", 32))
        self.document_length = int(cfg.get("document_length", 180))
        self.expand = bool(cfg.get("do_query_expansion", True))
        self.attend_expansion = self.expand and bool(cfg.get("attend_to_expansion_tokens",
                                                             False))
        words = cfg.get("skiplist_words", list(string.punctuation))
        self.skip = np.array(sorted({self._token_id(str(w)) for w in words}), dtype=np.int64)
        self.prefix_ids = {side: self._prefix_id(p) for side, p in (
            (True, self.query_prefix), (False, self.document_prefix))}
        self.expansion_id = next(int(i) for i in (tok.mask_token_id, tok.eos_token_id,
                                                   tok.pad_token_id, 0) if i is not None)
        self.max_length = self.document_length
        self.projections = [self._load_dense(path) for path in self.settings.dense]
        dim = (self.projections[-1][0].shape[0] if self.projections
               else int(self.model_config.hidden_size))
        self.multivector_dim = dim
        self._rust_sides = {side: self._side_tokenizer(side) for side in (True, False)}
        # the sides a request names with input_type / prompt_name: no prompt text for either
        self.settings.prompts.update({QUERY: "", "document": ""})
        return "multivector", True, dim

    def _token_id(self, token: str) -> int:
        """``token``'s id; the unknown token's when the vocabulary has no such token."""
        found = self.tokenizer.convert_tokens_to_ids(token)
        return found if isinstance(found, int) else int(self.tokenizer.unk_token_id or 0)

    def _prefix_id(self, prefix: str) -> int | None:
        if not prefix:
            return None
        found = self._token_id(prefix)
        if found == self.tokenizer.unk_token_id:
            raise ModelLoadError(f"the tokenizer has no token {prefix!r} (the checkpoint's "
                                 "query or document prefix)")
        return found

    def _load_dense(self, path: str) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """One ``Dense`` module's (weight ``[out, in]``, bias, activation)."""
        folder = self.model_dir / path
        cfg = json.loads((folder / "config.json").read_text())
        if cfg.get("use_residual"):
            raise ModelLoadError(f"{path}: a Dense projection with a residual is not supported")
        name = str(cfg.get("activation_function", "torch.nn.modules.linear.Identity"))
        if name not in ACTIVATIONS:
            raise ModelLoadError(f"{path}: activation {name!r} is not supported; "
                                 f"supported: {sorted(ACTIVATIONS)}")
        if (folder / "model.safetensors").exists():
            from safetensors.torch import load_file

            weights = load_file(str(folder / "model.safetensors"))
        else:
            weights = torch.load(folder / "pytorch_model.bin", map_location="cpu",
                                 weights_only=True)
        weight = weights["linear.weight"].float().to(self.device)
        bias = weights.get("linear.bias")
        return weight, None if bias is None else bias.float().to(self.device), ACTIVATIONS[name]

    def _side_tokenizer(self, query: bool) -> Any:
        """The Rust tokenizer cutting a query (or a document) where PyLate does: its length
        less the marker token put in after."""
        length = self.query_length if query else self.document_length
        rust = self._rust_tokenizer(True, "right", length - (self.prefix_ids[query] is not None))
        if rust is None:
            raise ModelLoadError("a multi-vector model needs a fast tokenizer")
        return rust

    # -- steps ---------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str], truncate: bool = True,
                 prompt_name: str | None = None, side: Side = "right", whole: bool = False
                 ) -> tuple[list[list[int]], int]:
        """Token ids per text as PyLate makes them: stripped, cut at the query or document
        length (``prompt_name`` ``query``: the query side), the marker token after the first;
        a query expanded to its length. ``truncate=False`` refuses a text that would be cut."""
        if side != "right" or whole:
            raise InvalidInput("a multi-vector model cuts texts at their end, as PyLate does, "
                               "and embeds no text whole", param="long_inputs")
        query = prompt_name == QUERY
        texts = [t.strip() for t in texts]
        if self.lower_case:
            texts = [t.lower() for t in texts]
        prefix, length = self.prefix_ids[query], self.query_length if query else self.max_length
        out: list[list[int]] = []
        cut = 0
        for i, enc in enumerate(self._rust_sides[query].encode_batch(texts)):
            ids = list(enc.ids)
            if prefix is not None:
                ids.insert(1, prefix)
            if enc.overflowing:
                if not truncate:
                    raise InvalidInput(
                        f"input {i} has more tokens than the model's "
                        f"{'query' if query else 'document'} length of {length}; shorten it "
                        "or allow truncation", param="input")
                cut += 1
            if query and self.expand:
                real = len(ids)
                ids += [self.expansion_id] * (length - real)
                out.append(QueryIds(ids, length if self.attend_expansion else real))
            elif query:
                out.append(QueryIds(ids, len(ids)))
            else:
                out.append(ids)
        return out, cut

    def prepare(self, inputs: Sequence[Input], truncate: bool = True,
                prompt_name: str | None = None, side: Side = "right"
                ) -> tuple[list[list[int]], int]:
        if any(not isinstance(x, str) for x in inputs):
            raise InvalidInput("a multi-vector model takes texts (it puts its query or "
                               "document marker into their tokens), not token ids",
                               param="input")
        return self.tokenize([x for x in inputs if isinstance(x, str)], truncate, prompt_name,
                             side)

    def feeds(self, seqs: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        out = super().feeds(seqs)
        for row, s in enumerate(seqs):
            if isinstance(s, QueryIds) and s.attended < len(s):  # expansion not attended
                out["attention_mask"][row, s.attended:] = 0
        return out

    def run(self, backend: Backend, seqs: Sequence[Sequence[int]],  # type: ignore[override]
            threads: int | None = None, normalize: bool | None = None) -> list[np.ndarray]:
        """One pass over exactly ``seqs``: each input's normalized vectors ``[rows, dim]``."""
        feeds = self.feeds(seqs)
        with torch.inference_mode():
            hidden = backend.run(feeds, threads).float()
            for weight, bias, activation in self.projections:
                hidden = torch.nn.functional.linear(hidden, weight, bias)
                if activation is not None:
                    hidden = activation(hidden)
            rows = torch.nn.functional.normalize(hidden, p=2, dim=-1).cpu().numpy()
        out = []
        for row, s in enumerate(seqs):
            if isinstance(s, QueryIds):
                out.append(np.ascontiguousarray(rows[row, : len(s)]))
            else:
                keep = ~np.isin(np.asarray(s, dtype=np.int64), self.skip)
                out.append(np.ascontiguousarray(rows[row, : len(s)][keep]))
        return out

    def serve_pass(self, seqs: Sequence[Sequence[int]],  # type: ignore[override]
                   threads: int | None = None) -> list[np.ndarray]:
        return self.run(self.backend, seqs, threads)

    def matrices(self, seqs: Sequence[Sequence[int]], backend: Backend | None = None
                 ) -> list[np.ndarray]:
        """Each input's vectors, in passes of ``max_batch_size`` (in process)."""
        out: list[np.ndarray] = []
        for i in range(0, len(seqs), self.max_batch_size):
            out += self.run(backend or self.backend, seqs[i: i + self.max_batch_size])
        return out

    def outputs(self, seqs: Sequence[Sequence[int]], backend: Backend | None = None
                ) -> np.ndarray:
        """Every input's vectors, stacked ``[rows, dim]`` (the fidelity check compares rows)."""
        return np.concatenate(self.matrices(seqs, backend))

    def encode_texts(self, texts: Sequence[str], query: bool = False) -> list[np.ndarray]:
        """Each text's vectors, as queries or documents (in process: tests, tools)."""
        return self.matrices(self.tokenize(texts, prompt_name=QUERY if query else None)[0])

    def rerank_inputs(self, query: str, documents: Sequence[str], truncate: bool = True,
                      side: Side = "right") -> tuple[list[list[int]], int]:
        """The query's ids (the query side) then each document's, for one MaxSim request."""
        q, cut_q = self.tokenize([query], truncate, QUERY, side)
        d, cut_d = self.tokenize(documents, truncate, None, side)
        return q + d, cut_q + cut_d

    def finish(self, vectors: Any, normalize: bool | None = None) -> Any:
        return vectors  # each row is normalized in the pass

    def output_settings(self) -> str:
        return (f"multivector q={self.query_prefix!r}/{self.query_length} "
                f"d={self.document_prefix!r}/{self.document_length} expand={self.expand}")

    def calibrate(self, verify: bool = False) -> None:
        """No int8 ranges; with ``verify``, measure the engine's fidelity."""
        if verify:
            self.verify()

    def info(self, name: str, version: str) -> ModelInfo:
        return dataclasses.replace(super().info(name, version), query_length=self.query_length)
