"""Stand-ins for fine-tuned checkpoints, made from a base model's files with numpy alone (no
torch: the testing layer loads no model), for the variant tests and ``bench/variants.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

#: The weights file a variant writes anew; every other file of the base is linked.
WEIGHTS = "model.safetensors"


def make_variants(base: Path, out: Path, names: list[str], scale: float = 0.05,
                  pooling: str | None = None) -> dict[str, Path]:
    """Stand-ins for checkpoints fine-tuned from ``base`` (a sentence-transformers directory
    holding ``model.safetensors``), one sub-directory of ``out`` per name: ``base``'s files
    linked, its weights each moved by seeded noise of ``scale`` times the weight's spread, so
    every variant embeds differently while keeping the base's width, tokenizer, pooling (unless
    ``pooling`` names another mode: then not a variant of ``base``) and prompts."""
    from safetensors.numpy import load_file, save_file

    original = load_file(base / WEIGHTS)
    hidden = json.loads((base / "config.json").read_text())["hidden_size"]
    made = {}
    for i, name in enumerate(names):
        d = out / name
        d.mkdir(parents=True)
        for f in base.iterdir():
            if f.name != WEIGHTS and not (pooling and f.name == "1_Pooling"):
                (d / f.name).symlink_to(f)
        if pooling:
            (d / "1_Pooling").mkdir()
            (d / "1_Pooling" / "config.json").write_text(json.dumps(
                {"word_embedding_dimension": hidden, "pooling_mode": pooling}))
        noise = np.random.default_rng(1000 + i)
        moved = {}
        for k, w in original.items():
            if np.issubdtype(w.dtype, np.floating) and w.size > 1:
                spread = w.std(ddof=1)  # as torch.Tensor.std
                w = (w + noise.standard_normal(w.shape, np.float32) * (scale * spread)).astype(
                    w.dtype)
            moved[k] = w
        save_file(moved, str(d / WEIGHTS), metadata={"format": "pt"})
        made[name] = d
    return made
