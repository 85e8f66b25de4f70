"""FlagEmbedding's own BGE-M3 outputs, run in FlagEmbedding's environment
(tests/references.py): ``bgem3_encode.py SPEC_JSON OUT_DIR``.

SPEC: ``{"model": a BGE-M3 folder, "texts": [...], "max_length": N}``. Writes
``OUT_DIR/ref.npz``: ``dense`` ``[n, hidden]``; per text ``colbert<i>`` (its multi-vector
rows) and ``lexical_ids<i>`` / ``lexical_weights<i>`` (its lexical weights, ids ascending),
from ``BGEM3FlagModel.encode`` in float32 on the CPU.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np


def import_bgem3() -> type:
    """FlagEmbedding's package imports its MiniCPM reranker, which imports
    ``transformers.modeling_attn_mask_utils``, gone in transformers 5: a stand-in module (BGE-M3
    never calls it) lets the package import."""
    try:
        import transformers.modeling_attn_mask_utils  # noqa: F401
    except ModuleNotFoundError:
        stub = types.ModuleType("transformers.modeling_attn_mask_utils")
        stub.AttentionMaskConverter = type("AttentionMaskConverter", (), {})  # type: ignore[attr-defined]
        for name in ("_prepare_4d_attention_mask", "_prepare_4d_causal_attention_mask",
                     "_prepare_4d_causal_attention_mask_for_sdpa",
                     "_prepare_4d_attention_mask_for_sdpa"):
            def fail(*args: object, _name: str = name, **kw: object) -> None:
                raise NotImplementedError(_name)
            fail.__name__ = name  # torch.fx.wrap() reads it at import
            setattr(stub, name, fail)
        sys.modules[stub.__name__] = stub
    from FlagEmbedding import BGEM3FlagModel

    return BGEM3FlagModel


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    model = import_bgem3()(spec["model"], use_fp16=False, devices="cpu")
    got = model.encode(spec["texts"], batch_size=4, max_length=spec["max_length"],
                       return_dense=True, return_sparse=True, return_colbert_vecs=True)
    arrays = {"dense": np.asarray(got["dense_vecs"], np.float32)}
    for i, (lexical, colbert) in enumerate(zip(got["lexical_weights"], got["colbert_vecs"],
                                               strict=True)):
        ids = sorted(int(k) for k in lexical)
        arrays[f"lexical_ids{i}"] = np.array(ids, np.int64)
        arrays[f"lexical_weights{i}"] = np.array([float(lexical[str(k)]) for k in ids],
                                                 np.float32)
        arrays[f"colbert{i}"] = np.asarray(colbert, np.float32)
    np.savez(out / "ref.npz", **arrays)


if __name__ == "__main__":
    main()
