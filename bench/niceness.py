"""What the Ray Data job's niceness buys a server on the same cores: texts per second of one
engine (a replica's forward passes: batches of 32, 2 torch threads) alone, beside a second one
at niceness 0, and beside one at the job's niceness for level 10 (9), each competitor
embedding without pause.

    python bench/niceness.py        # writes docs/benchmarks-niceness.md
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
    from serve_app.config.schema import ModelConfig
    from serve_app.engine.embedding import EmbeddingEngine

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
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks-niceness.md"))
    p.add_argument("--competitor", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.competitor is not None:
        embed_for(a.seconds, a.competitor)
        return
    from serve_app.tools.offline import niceness
    from serve_app.types import BULK_PRIORITY

    job = niceness(BULK_PRIORITY)
    lines = [
        "## The Ray Data job beside a server", "",
        "`python bench/niceness.py`: texts per second of one engine (batches of 32 on 2 torch "
        "threads, as a replica's forward passes) on this 2-core machine, alone and beside a "
        "second engine embedding without pause, at niceness 0 or at the job's niceness for its "
        f"default level {BULK_PRIORITY} ({job}).", "",
        f"| round | alone | beside niceness 0 | beside niceness {job} (the job's default) |",
        "|---|---|---|---|",
    ]
    for r in range(1, a.rounds + 1):
        figures = [embed_for(a.seconds, 0)]
        for nice in (0, job):
            other = subprocess.Popen([sys.executable, __file__, "--competitor", str(nice),
                                      "--seconds", str(a.seconds + 15)],
                                     stderr=subprocess.DEVNULL)
            time.sleep(8)  # the competitor loads its model and starts
            figures.append(embed_for(a.seconds, 0))
            other.wait()
        lines.append(f"| {r} | " + " | ".join(f"{x:.0f}" for x in figures) + " |")
        print(lines[-1], flush=True)
    Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
