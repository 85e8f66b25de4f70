"""The texts the tests and benchmarks embed: a short sentence (KServe's reference case), and a
few of several scripts and lengths (the last over MiniLM's 256 tokens)."""

from __future__ import annotations

SENTENCE = "This is an example sentence."
TEXTS = [SENTENCE, "Der schnelle braune Fuchs.", "東京は日本の首都です。", "long text " * 300]
