"""PyLate's own vectors and scores, run in PyLate's environment (tests/references.py):
``pylate_encode.py SPEC_JSON OUT_DIR``.

SPEC: ``{"source": a transformer's folder, "queries": [...], "documents": [...], "variants":
{name: ColBERT(...) options}}``. For each variant it builds a ColBERT checkpoint from the
source as PyLate builds one (marker tokens added, a random projection, seeded), saves it to
``OUT_DIR/<name>``, loads it back from there, and writes ``OUT_DIR/<name>.npz``: ``q<i>`` and
``d<i>``, ``ColBERT.encode`` with ``is_query`` True and False, and ``scores`` ``[queries,
documents]``, ``colbert_scores`` of each pair.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    from pylate import models
    from pylate.scores import colbert_scores

    for name, options in spec["variants"].items():
        torch.manual_seed(0)
        built = models.ColBERT(model_name_or_path=spec["source"], device="cpu",
                               local_files_only=True, **options)
        built.save(str(out / name))
        del built
        model = models.ColBERT(model_name_or_path=str(out / name), device="cpu",
                               local_files_only=True).eval()
        queries = model.encode(spec["queries"], is_query=True, show_progress_bar=False)
        documents = model.encode(spec["documents"], is_query=False, show_progress_bar=False)
        arrays = {f"q{i}": np.asarray(q, np.float32) for i, q in enumerate(queries)}
        arrays |= {f"d{i}": np.asarray(d, np.float32) for i, d in enumerate(documents)}
        arrays["scores"] = np.array([[float(colbert_scores(
            torch.from_numpy(np.asarray(q))[None], torch.from_numpy(np.asarray(d))[None],
            backend="torch")[0, 0]) for d in documents] for q in queries], np.float32)
        np.savez(out / f"{name}.npz", **arrays)


if __name__ == "__main__":
    main()
