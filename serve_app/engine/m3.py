"""BGE-M3 style models: dense, sparse (lexical weights) and multi-vector (ColBERT) outputs from
one forward pass; no Ray and no HTTP.

A BGE-M3 directory is a transformer with two heads beside it, as FlagEmbedding saves them:
``colbert_linear.pt`` and ``sparse_linear.pt`` (``torch.nn.Linear`` state dicts). Outputs equal
FlagEmbedding's ``BGEM3FlagModel.encode`` (fp32):

- dense: the ``[CLS]`` state (the directory's pooling, if it names one), L2-normalized;
- sparse: ``relu(sparse_linear(h))`` per token, the largest weight of each token id, leaving
  out the ids of the tokenizer's cls, eos, pad and unk tokens and zero weights;
- multi-vector: ``colbert_linear(h)`` for every token after the first, each L2-normalized.

The dense output alone runs as any dense model's (:class:`EmbeddingEngine`); a request that asks
for the sparse or multi-vector output gets all it asks for from one pass (:meth:`M3Engine.heads`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from serve_app.engine.embedding import EmbeddingEngine
from serve_app.errors import ModelLoadError
from serve_app.types import Output

HEADS = ("colbert_linear.pt", "sparse_linear.pt")


def is_m3(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds BGE-M3's two heads beside its transformer."""
    return all((model_dir / f).is_file() for f in HEADS)


@dataclass(frozen=True, slots=True)
class Heads:
    """One text's outputs of a pass: its dense vector (pooled, not normalized), its lexical
    weights (token ids ascending, float32 weights) and its multi-vector rows (normalized)."""

    dense: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    multivector: np.ndarray


class M3Engine(EmbeddingEngine):
    """One loaded BGE-M3 style model (``task: embedding``, chosen by its head files)."""

    offers: tuple[Output, ...] = ("pooled", "tokens", "sparse", "multivector")

    def _output_kind(self) -> tuple[str, bool, int]:
        cfg = self.cfg
        self.colbert = self._head("colbert_linear.pt")
        self.sparse = self._head("sparse_linear.pt")
        if self.sparse.out_features != 1:
            raise ModelLoadError("sparse_linear.pt must map the hidden state to one weight")
        tok = self.tokenizer
        special = tok.special_tokens_map
        # FlagEmbedding's unused tokens: those of these names the tokenizer has
        found = (tok.convert_tokens_to_ids(str(special[k])) for k in
                 ("cls_token", "eos_token", "pad_token", "unk_token") if k in special)
        self.unused = np.array(sorted({i for i in found if isinstance(i, int)}), dtype=np.int64)
        self.multivector_dim = int(self.colbert.out_features)
        self.sparse_dim = self.vocab_size
        pooling = cfg.pooling if cfg.pooling != "auto" else (self.settings.pooling or "cls")
        normalize = cfg.normalize if cfg.normalize is not None else True
        return pooling, normalize, int(self.model_config.hidden_size)

    def _head(self, name: str) -> torch.nn.Linear:
        state = torch.load(self.model_dir / name, map_location="cpu", weights_only=True)
        weight = state["weight"]
        head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in state)
        head.load_state_dict(state)
        return head.float().to(self.device).eval()

    def heads(self, seqs: Sequence[Sequence[int]], threads: int | None = None
              ) -> list[Heads]:
        """One pass over exactly ``seqs``: every output of each."""
        feeds = self.feeds(seqs)
        with torch.inference_mode():
            hidden = self.backend.run(feeds, threads).float()
            mask = torch.from_numpy(feeds["attention_mask"]).to(hidden.device)
            weights = torch.relu(self.sparse(hidden)).squeeze(-1).cpu().numpy()
            multi = torch.nn.functional.normalize(self.colbert(hidden[:, 1:]), p=2,
                                                  dim=-1).cpu().numpy()
            dense = self.pool_pass(hidden, mask).cpu().numpy()
        out = []
        for row, s in enumerate(seqs):
            ids = np.asarray(s, dtype=np.int64)
            w = weights[row, : len(s)]
            keep = (w > 0) & ~np.isin(ids, self.unused)
            indices, first = np.unique(ids[keep], return_inverse=True)
            values = np.zeros(len(indices), dtype=np.float32)
            np.maximum.at(values, first, w[keep])
            out.append(Heads(dense[row], indices.astype(np.int32), values,
                             np.ascontiguousarray(multi[row, : len(s) - 1])))
        return out

    def output_settings(self) -> str:
        return f"m3 pooling={self.pooling} normalize={self.normalize}"
