"""How closely an engine agrees with float32 torch, measured at warm-up, never assumed.

A replica runs its calibration inputs through its own engine and compares each output with the
same input's output from the model in float32 torch (sentence-transformers' own math): the
cosine of two embeddings (dense or sparse), or for a classifier's or cross-encoder's logits the
worst ``1 - |a - b| / (1 + |b|)`` (1.0 when equal, on the same scale). The reference outputs
are computed once per model files, settings and inputs and kept on disk beside the conversions
(:func:`serve_app.engine.convert.cache_root`), so a restart pays one pass of its own engine and
a file read. An engine whose minimum falls below
``min_fidelity`` refuses to load.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from serve_app.engine.convert import cache_root
from serve_app.errors import ModelLoadError

log = logging.getLogger(__name__)

#: the reference every engine is compared with
REFERENCE = "torch float32"
#: the default ``min_fidelity`` by precision
MIN_FIDELITY = {"exact": 0.99999, "fast": 0.9999, "int8": 0.97}


@dataclass(frozen=True)
class Fidelity:
    """Agreement with :data:`REFERENCE` over ``inputs`` calibration inputs (1.0: equal)."""

    min: float
    mean: float
    inputs: int
    #: False when the engine is the reference itself (nothing to compare)
    measured: bool = True


def agreement(out: np.ndarray, ref: np.ndarray, task: str) -> np.ndarray:
    """Per-row agreement of ``out`` with ``ref`` (both ``[n, k]``)."""
    out = np.asarray(out, dtype=np.float64).reshape(len(out), -1)
    ref = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1)
    if task in ("rerank", "classify"):  # logits
        return 1.0 - (np.abs(out - ref) / (1.0 + np.abs(ref))).max(axis=1)
    norms = np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1)
    return (out * ref).sum(axis=1) / np.maximum(norms, 1e-12)


def reference_key(files_digest: str, settings: str, seqs: Sequence[Sequence[int]]) -> str:
    """Names the reference outputs of ``seqs`` (token ids: they carry the corpus, prompts,
    casing and the token limit) for model files ``files_digest`` under ``settings`` (pooling,
    normalizing: whatever else shapes an output)."""
    h = hashlib.sha256(f"{files_digest}\0{settings}\0".encode())
    for seq in seqs:
        h.update(np.asarray(seq, dtype=np.int64).tobytes() + b"\xff" * 8)
    return h.hexdigest()[:24]


def reference_outputs(key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """The reference outputs named ``key``: read from disk, or ``compute``-d once and kept."""
    path = cache_root() / "references" / f"{key}.npy"
    try:
        return np.load(path)
    except (OSError, ValueError):
        pass
    out = np.ascontiguousarray(compute(), dtype=np.float32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{id(out)}.tmp")
        with tmp.open("wb") as f:
            np.save(f, out)
        tmp.replace(path)
    except OSError as e:  # a read-only cache only costs the next start this pass again
        log.warning("cannot keep the reference outputs in %s: %s", path, e)
    return out


def measure(out: np.ndarray, ref: np.ndarray, task: str) -> Fidelity:
    rows = agreement(out, ref, task)
    return Fidelity(min=float(rows.min()), mean=float(rows.mean()), inputs=len(rows))


def gate(fidelity: Fidelity, floor: float, model: str, engine: str) -> None:
    """Refuse an engine whose agreement falls below ``floor``."""
    log.info("model %r: %s agrees with %s to min %.7f, mean %.7f over %d inputs (floor %g)",
             model, engine, REFERENCE, fidelity.min, fidelity.mean, fidelity.inputs, floor)
    if fidelity.min < floor:
        raise ModelLoadError(
            f"model {model!r}: the {engine} engine agrees with {REFERENCE} to a minimum of "
            f"{fidelity.min:.7f} (mean {fidelity.mean:.7f}) over {fidelity.inputs} calibration "
            f"inputs, below min_fidelity {floor:g}; choose precision: exact, another backend, "
            "or a lower min_fidelity")
