"""What the CPU can do at most, beside what each engine does: the machine's peak matrix-multiply
rate (float32 and bfloat16, every core, measured), the default model's arithmetic per text at
the benchmark's shapes (counted from its config), and so each engine's share of the peak and the
rate a throughput target asks for.

    python bench/roofline.py                    # issue 22's targets, exact and fast
    python bench/roofline.py --targets 2.5 2.2  # W3 and W4 as multiples of torch (repeatable)

A target that needs more arithmetic per second than the peak cannot be met by any engine of that
precision on this machine; docs/benchmarks.md keeps the table of the last run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import texts_for  # noqa: E402

THREADS = os.cpu_count() or 1
SHAPES = ("W3", "W4")  # 32 texts of ~14 and ~110 tokens


def peak_gflops(dtype: Any, seconds: float = 3.0, n: int = 2048) -> float:
    """The best rate of ``n``-square matrix products in ``dtype`` on every core (oneDNN/MKL
    through torch: the kernels every engine here ends in)."""
    import torch

    torch.set_num_threads(THREADS)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(3):
        torch.mm(a, b)
    best, stop = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def flops_per_text(config: Any, tokens: float) -> float:
    """Multiply-adds (x2) of one text of ``tokens`` through a BERT-shaped encoder: the four
    attention projections, the two feed-forward layers and the two attention products per
    layer; embeddings, norms and activations are a rounding error beside them."""
    h, i = config.hidden_size, config.intermediate_size
    per_token = 2 * (4 * h * h + 2 * h * i) + 4 * tokens * h
    return config.num_hidden_layers * per_token * tokens


def shape_tokens(tokenizer: Any, shape: str) -> float:
    """The padded length of the benchmark's batches of ``shape`` (what the engines compute)."""
    lengths = [len(tokenizer(texts_for(shape, i * 32), padding=True)["input_ids"][0])
               for i in range(8)]
    return sum(lengths) / len(lengths)


def engine_rates(duration: float) -> list[dict[str, Any]]:
    from bench.run import engine_table

    return engine_table(duration)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--targets", nargs=2, type=float, action="append", metavar=("W3", "W4"),
                   help="throughput targets as multiples of torch float32, repeatable (default: "
                        "issue 22's, 2.5 2.2 for exact and 3.5 3.5 for precision fast)")
    a = p.parse_args()
    targets = a.targets or [(2.5, 2.2), (3.5, 3.5)]
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from serve_app.engine.model_files import resolve_model_dir

    model_dir = resolve_model_dir("sentence-transformers/all-MiniLM-L6-v2")
    config, tokenizer = AutoConfig.from_pretrained(model_dir), AutoTokenizer.from_pretrained(
        model_dir)
    peaks = {"float32": peak_gflops(torch.float32), "bfloat16": peak_gflops(torch.bfloat16)}
    tokens = {s: shape_tokens(tokenizer, s) for s in SHAPES}
    gflop = {s: flops_per_text(config, tokens[s]) / 1e9 for s in SHAPES}
    rows = engine_rates(a.duration)
    torch_rates = next(r for r in rows if r["engine"].startswith("torch float32"))
    lines = [
        f"Peak matrix-multiply rate, {THREADS} threads (torch.mm of 2048-square matrices, "
        f"best of {3:g} s): float32 {peaks['float32']:.0f} GFLOP/s, bfloat16 "
        f"{peaks['bfloat16']:.0f} GFLOP/s. Arithmetic per text: "
        + ", ".join(f"{s} {gflop[s] * 1e3:.0f} MFLOP ({tokens[s]:.0f} padded tokens)"
                    for s in SHAPES) + ".", "",
        "| engine | precision | W3 texts/s | W3 GFLOP/s (of peak) | W4 texts/s | "
        "W4 GFLOP/s (of peak) |", "|---|---|---|---|---|---|"]
    for r in rows:
        peak = peaks["bfloat16" if "bfloat16" in r["engine"] else "float32"]
        cells = []
        for s in SHAPES:
            rate = r[s] * gflop[s]
            share = "int8 math" if r["precision"] == "int8" else f"{rate / peak:.0%}"
            cells += [f"{r[s]:.0f}", f"{rate:.0f} ({share})"]
        lines.append(f"| {r['engine']} | {r['precision']} | " + " | ".join(cells) + " |")
    lines.append("")
    for s, target in ((s, t) for pair in targets for s, t in zip(SHAPES, pair, strict=True)):
        need = target * torch_rates[s] * gflop[s]
        lines.append(
            f"- {s} at {target:g}x torch float32 ({target * torch_rates[s]:.0f} texts/s) needs "
            f"{need:.0f} GFLOP/s: {need / peaks['float32']:.0%} of the float32 peak, "
            f"{need / peaks['bfloat16']:.0%} of the bfloat16 peak.")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
