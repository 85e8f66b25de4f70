"""Compact encodings of embeddings, as sentence-transformers' ``quantize_embeddings`` makes them.

No torch here: plain numpy on float32 vectors.

- ``int8`` / ``uint8``: one byte per value. Each dimension's range ``[low, high]`` is cut into 255
  steps; a value becomes ``floor((v - low) / step)`` clipped to 0..255 (``int8`` subtracts 128).
  The ranges come from a fixed calibration set (:class:`Calibration`), never from the batch, so a
  text always gives the same bytes whatever else is in its request or forward pass.
- ``binary`` / ``ubinary``: the sign bits (``v > 0``), packed 8 to a byte, most significant bit
  first, the last byte padded with zeros; ``binary`` is the ``ubinary`` byte minus 128, as int8.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from serve_app.types import Encoding

#: The texts shipped for calibrating int8/uint8 ranges, one per line: 120 varied queries,
#: sentences, code, logs and a few languages, then 480 sentences of Python's own documentation
#: (``pydoc_data``). More texts only widen the ranges, so fewer values fall outside them.
CORPUS = "calibration.txt"


def calibration_texts(path: str | None = None) -> list[str]:
    """The calibration corpus: ``path`` (one text per line), or the one serve_app ships."""
    if path is None:
        text = resources.files("serve_app.engine.data").joinpath(CORPUS).read_text(encoding="utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    texts = [line.strip() for line in text.splitlines() if line.strip()]
    if len(texts) < 2:
        raise ValueError(f"the calibration corpus {path or CORPUS} holds fewer than 2 texts")
    return texts


def ranges_of(vectors: np.ndarray) -> np.ndarray:
    """Per-dimension ``[low, high]`` of ``vectors [n, dim]``: float32 ``[2, dim]``."""
    return np.vstack((vectors.min(axis=0), vectors.max(axis=0))).astype(np.float32)


def quantize(vectors: np.ndarray, encoding: Encoding, ranges: np.ndarray | None = None
             ) -> np.ndarray:
    """``vectors`` (float32 ``[n, dim]``) in ``encoding``: float32 as they are, int8/uint8
    ``[n, dim]`` on ``ranges`` (``[2, dim]``, required for them), binary int8 / ubinary uint8
    ``[n, ceil(dim / 8)]``."""
    if encoding == "float":
        return vectors
    if encoding in ("binary", "ubinary"):
        packed = np.packbits(vectors > 0, axis=-1)
        return packed if encoding == "ubinary" else (packed - 128).astype(np.int8)
    if ranges is None:
        raise ValueError(f"{encoding} needs calibrated ranges")
    starts = ranges[0]
    steps = (ranges[1] - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    buckets = np.clip(np.floor((vectors - starts) / steps), 0, 255)
    if encoding == "uint8":
        return buckets.astype(np.uint8)
    return (buckets - 128).astype(np.int8)


def reduce_dimensions(vectors: np.ndarray, n: int) -> np.ndarray:
    """Keep the first ``n`` values of each row and L2-normalize again (Matryoshka style)."""
    cut = np.ascontiguousarray(vectors[:, :n], dtype=np.float32)
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    np.maximum(norms, 1e-12, out=norms)
    return cut / norms


class Calibration:
    """int8/uint8 ranges from the embeddings of a calibration corpus ``[n, dim]`` (float32),
    for the full width and, computed on first use and kept, for each ``dimensions`` a request
    asks for (the calibration vectors cut and re-normalized the same way first)."""

    def __init__(self, embeddings: np.ndarray) -> None:
        self._embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.texts, self.dim = self._embeddings.shape
        self.full = ranges_of(self._embeddings)
        self._by_dims: dict[int, np.ndarray] = {self.dim: self.full}

    def ranges(self, dims: int | None = None) -> np.ndarray:
        """``[2, dims]`` ranges for vectors cut to ``dims`` (None: the full width)."""
        dims = dims or self.dim
        found = self._by_dims.get(dims)
        if found is None:
            found = self._by_dims[dims] = ranges_of(reduce_dimensions(self._embeddings, dims))
        return found

    def encode(self, vectors: np.ndarray, encoding: Encoding) -> np.ndarray:
        """``vectors`` (float32 ``[n, d]``, cut to ``d`` dimensions already) in ``encoding``."""
        if encoding in ("int8", "uint8"):
            return quantize(vectors, encoding, self.ranges(vectors.shape[1]))
        return quantize(vectors, encoding)
