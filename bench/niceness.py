"""What the Ray Data job's niceness buys a server on the same cores: texts per second of one
engine (a replica's forward passes: batches of 32, 2 torch threads) alone, beside a second one
at niceness 0, and beside one at the job's niceness for level 10 (9), each competitor
embedding without pause.

    python bench/niceness.py        # prints the three figures
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEXTS = ["a sentence of moderate length about search and indexing " * 2] * 32


def embed_for(seconds: float, nice: int) -> float:
    """Embed batches of 32 for ``seconds`` at ``nice``; texts per second."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from serve_app.config import ModelConfig
    from serve_app.engine import EmbeddingEngine

    if nice:
        os.nice(nice)
    engine = EmbeddingEngine(ModelConfig(), num_threads=2)
    engine.embed(TEXTS)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        engine.embed(TEXTS)
        n += len(TEXTS)
    return n / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--competitor", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.competitor is not None:
        embed_for(a.seconds, a.competitor)
        return
    from serve_app.offline import niceness
    from serve_app.types import BULK_PRIORITY

    figures = {"alone": embed_for(a.seconds, 0)}
    for nice in (0, niceness(BULK_PRIORITY)):
        other = subprocess.Popen([sys.executable, __file__, "--competitor", str(nice),
                                  "--seconds", str(a.seconds + 15)], stderr=subprocess.DEVNULL)
        time.sleep(8)  # the competitor loads its model and starts
        figures[f"beside niceness {nice}"] = embed_for(a.seconds, 0)
        other.wait()
    for k, v in figures.items():
        print(f"{k}: {v:.0f} texts/s")


if __name__ == "__main__":
    main()
